from decimal import Decimal

import pytest

from tunelab.errors import TunelabError
from tunelab.evaluation.metrics import compute_metrics, exact_match, gsm8k, gsm8k_answer, gsm8k_flexible, resolve_metric


@pytest.mark.parametrize(
    "text, strict, flexible",
    [
        ("so 3 + 4 = 7\n#### 7", "7", "7"),
        ("#### 1,200", "1200", "1200"),
        ("#### $1,200.00", "1200", "1200"),
        ("the loss is #### -3", "-3", "-3"),
        ("first guess #### 5\nthen corrected #### 6", "6", "6"),  # the last marker counts
        ("#### 72.0", "72", "72"),
        ("She earns $18 per hour, 4 hours: 72 dollars.", None, "72"),  # no marker: flexible takes the last number
        ("It costs $1,234.50 in total.", None, "1234.5"),
        ("no number here", None, None),
        ("#### 0.50", "0.5", "0.5"),
        ("-0 left: #### -0", "0", "0"),
    ],
)
def test_gsm8k_answer_extraction(text, strict, flexible):
    assert gsm8k_answer(text) == (Decimal(strict) if strict else None)
    assert gsm8k_answer(text, flexible=True) == (Decimal(flexible) if flexible else None)


def test_gsm8k_scores_compare_numbers_not_strings():
    refs = ["... #### 1200", "... #### 5", "... #### 18"]
    preds = ["#### 1,200.00", "The answer is 5", "#### 81"]
    assert gsm8k(preds, refs) == [1.0, 0.0, 0.0]
    assert gsm8k_flexible(preds, refs) == [1.0, 1.0, 0.0]


def test_exact_match_normalises_whitespace_and_case():
    assert exact_match(["  Paris ", "paris\n", "Lyon"], ["Paris", "PARIS", "Paris"]) == [1.0, 1.0, 0.0]


def test_rouge_equals_rouge_score():
    from rouge_score import rouge_scorer

    preds = ["the cat sat on the mat", "a quick brown fox jumps", "hello"]
    refs = ["the cat is on the mat", "the quick brown fox jumped over", "goodbye"]
    results = {r.name: r for r in compute_metrics(["rouge"], preds, refs)}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = [scorer.score(r, p) for p, r in zip(preds, refs)]
    for kind in ("rouge1", "rouge2", "rougeL"):
        assert results[kind].per_example == pytest.approx([e[kind].fmeasure for e in expected])
        assert results[kind].corpus == pytest.approx(sum(e[kind].fmeasure for e in expected) / 3)


def test_bleu_and_chrf_equal_sacrebleu():
    import sacrebleu

    preds = ["the cat sat on the mat", "a quick brown fox jumps over the dog"]
    refs = ["the cat is on the mat", "the quick brown fox jumped over the lazy dog"]
    results = {r.name: r for r in compute_metrics(["bleu", "chrf"], preds, refs)}
    assert results["bleu"].corpus == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert results["bleu"].per_example == pytest.approx([sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(preds, refs)])
    assert results["chrf"].corpus == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)


def keyword_hit(predictions, references, keyword, **_):
    return [float(k in p) for p, k in zip(predictions, keyword)]


def test_user_metric_by_dotted_path_gets_the_record_columns():
    scores = compute_metrics([f"{__name__}.keyword_hit"], ["a red apple", "a pear"], ["", ""], [{"keyword": "apple"}, {"keyword": "plum"}])
    assert scores[0].name == "keyword_hit" and scores[0].per_example == [1.0, 0.0] and scores[0].corpus == 0.5


def test_unknown_metric_lists_the_metrics():
    with pytest.raises(TunelabError, match="Unknown metric 'acuracy'.*exact_match.*gsm8k.*rouge.*bleu"):
        resolve_metric("acuracy")
    with pytest.raises(TunelabError, match="cannot be imported"):
        resolve_metric("nosuchpackage.metric")


def test_a_metric_returning_the_wrong_count_is_named():
    with pytest.raises(TunelabError, match="returned 1 scores for 2 predictions"):
        compute_metrics([f"{__name__}.one_score"], ["a", "b"], ["a", "b"])


def one_score(predictions, references, **_):
    return [1.0]


class Contains:
    def __init__(self, word: str):
        self.word = word

    def __call__(self, predictions, references, **_):
        return [float(self.word in p) for p in predictions]


def test_user_metric_as_a_target_node_with_arguments():
    node = f"{{_target_: {__name__}.Contains, word: apple}}"
    scores = compute_metrics([node], ["an apple", "a pear"], ["", ""])
    assert scores[0].name == "Contains" and scores[0].per_example == [1.0, 0.0]
