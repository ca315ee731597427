import json
import os

import pytest

from conftest import shared_data
from tunelab.data.clean import clean_file
from tunelab.data.contamination import find_contamination, remove_contaminated, words
from tunelab.errors import TunelabError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def gsm8k():
    return read_jsonl(shared_data("gsm8k", "train.jsonl"))


def pairs_of(report):
    return [(p.train_line, p.eval_line, p.kind) for p in report.pairs]


def embedded(question):
    """An evaluation question pasted inside a longer training prompt."""
    return f"Read the problem below and solve it step by step, showing your work.\n\nProblem: {question}\n\nEnd with the number after ####."


def test_words_ignore_case_and_punctuation():
    assert words("Natalia sold 48/2 = <<48/2=24>>24 clips, in MAY!") == ["natalia", "sold", "48", "2", "48", "2", "24", "24", "clips", "in", "may"]


def test_finds_questions_inside_longer_training_examples(tmp_path):
    rows = gsm8k()
    evals = rows[7000:7020]
    train = rows[:50] + [{"question": embedded(evals[4]["question"]), "answer": "I am not sure."}] + rows[50:60]
    report = find_contamination(write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "eval.jsonl", evals))
    assert pairs_of(report) == [(51, 5, "ngram")]
    assert report.pairs[0].shared in " ".join(words(evals[4]["question"])) and len(report.pairs[0].shared.split()) == 13
    assert report.contaminated == 1 and report.train_records == 61 and report.eval_records == 20


def test_short_evaluation_examples_match_whole(tmp_path):
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"q": "What is the capital of France?"}])
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"text": "Quiz time. What is the capital of France? Answer in one word, please."},
        {"text": "What is the capital city of France, and what river flows through it?"},  # not the same run of words
        {"text": "The capital of France is Paris."},
    ])  # fmt: skip
    report = find_contamination(train, evals)
    assert pairs_of(report) == [(1, 1, "ngram")] and report.pairs[0].shared == "what is the capital of france"


def test_reworded_copies_are_near_duplicates(tmp_path):
    rows = gsm8k()
    original = rows[7005]
    # a typo in every eighth word: no run of 13 words survives, most characters do
    typo = " ".join(w + "s" if i % 8 == 0 else w for i, w in enumerate(original["question"].split()))
    train = write_jsonl(tmp_path / "train.jsonl", rows[:30] + [{"question": typo, "answer": original["answer"].replace("\n", " ; ")}])
    evals = write_jsonl(tmp_path / "eval.jsonl", [original])
    report = find_contamination(train, evals, n=50)  # the answer is shared word for word; n=50 leaves the near check to find it
    assert pairs_of(report) == [(31, 1, "near")] and report.pairs[0].jaccard >= 0.8
    assert find_contamination(train, evals, n=50, near_threshold=None).pairs == []


def test_unrelated_examples_are_not_flagged(tmp_path):
    rows = gsm8k()
    report = find_contamination(write_jsonl(tmp_path / "train.jsonl", rows[:300]), write_jsonl(tmp_path / "eval.jsonl", rows[7000:7100]))
    assert report.pairs == [] and report.contaminated == 0


def test_heldout_slice_of_gsm8k(tmp_path):
    # GSM8K itself has a few template siblings across this split (the same story with other
    # numbers); they share 13-grams of the question and are reported, nothing else is.
    rows = gsm8k()
    train, evals = write_jsonl(tmp_path / "train.jsonl", rows[:-300]), write_jsonl(tmp_path / "eval.jsonl", rows[-300:])
    report = find_contamination(train, evals, eval_fields=["question"], near_threshold=None)
    assert pairs_of(report) == [(1175, 61, "ngram"), (3253, 113, "ngram"), (4139, 233, "ngram"), (4193, 81, "ngram")]
    assert "butterflies" in report.pairs[0].shared


def test_eval_fields_limit_what_is_looked_for(tmp_path):
    shared = "this sentence of the answer is long enough to be a shared thirteen word run"
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": "Something else entirely.", "answer": shared}])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"question": "A different question.", "answer": shared}])
    assert len(find_contamination(train, evals).pairs) == 1
    assert find_contamination(train, evals, eval_fields=["question"]).pairs == []
    with pytest.raises(TunelabError, match=r"fields \['prompt'\].*\['answer', 'question'\]"):
        find_contamination(train, evals, eval_fields=["prompt"])


def test_remove_contaminated_writes_a_new_file(tmp_path):
    rows = gsm8k()
    evals = write_jsonl(tmp_path / "eval.jsonl", rows[7000:7010])
    train_rows = rows[:5] + [{"question": embedded(rows[7003]["question"]), "answer": rows[7003]["answer"]}] + rows[5:8]
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    report = find_contamination(train, evals)
    out = remove_contaminated(report, tmp_path / "clean.jsonl")
    assert read_jsonl(out) == rows[:8]
    with pytest.raises(TunelabError, match="never edits data in place"):
        remove_contaminated(report, train)
    with pytest.raises(TunelabError, match="never edits data in place"):
        remove_contaminated(report, evals)
    find_contamination(train, evals, out=tmp_path / "again.jsonl")
    assert read_jsonl(tmp_path / "again.jsonl") == rows[:8]
    os.utime(train, ns=(0, 0))
    with pytest.raises(TunelabError, match="changed since it was checked"):
        remove_contaminated(report, tmp_path / "late.jsonl")


def test_clear_errors(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a b c"}])
    with pytest.raises(TunelabError, match="both the training and an evaluation file"):
        find_contamination(train, [train])
    with pytest.raises(TunelabError, match="No evaluation file"):
        find_contamination(train, [])
    with pytest.raises(TunelabError, match="n=0"):
        find_contamination(train, train, n=0)


def test_report_render_and_dict(tmp_path):
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"q": "What is the capital of France?"}])
    train = tmp_path / "train.jsonl"
    train.write_text('{"t": "so what is the capital of france"}\nnot json\n', encoding="utf-8")
    report = find_contamination(train, evals)
    text = report.render()
    assert "1 of 1 training examples leak" in text and 'train.jsonl line 1 leaks eval.jsonl line 1: shares "what is the capital of france"' in text
    assert "train.jsonl line 2: [error] broken_json" in text
    assert [f.check for f in report.findings] == ["broken_json", "contamination_ngram"]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["contaminated"] == 1 and data["pairs"][0]["eval_line"] == 1 and data["pairs"][0]["kind"] == "ngram"


def test_issue_scenario_clean_then_decontaminate(tmp_path):
    """A copy of GSM8K with planted exact and near duplicates, e-mails, card numbers, and evaluation
    questions embedded in training examples: clean and the contamination check remove each, by line."""
    rows = gsm8k()
    evals = rows[7000:7100]
    train = list(rows[:300])
    train[20] = {**rows[20], "question": rows[20]["question"] + " Questions to tutor.jones@example.com."}  # line 21
    train[30] = {**rows[30], "answer": "Paid with card 4111 1111 1111 1111.\n" + rows[30]["answer"]}  # line 31
    plants = {  # position (0-based) in the final file -> the record planted there
        40: rows[10],  # exact duplicate of line 11
        80: {**rows[2], "question": rows[2]["question"].replace("wallet", "purse").replace("grandparents", "grandmother")},  # near line 3
        200: {"question": embedded(evals[5]["question"]), "answer": evals[5]["answer"]},
        250: {"question": "Warm-up first. " + evals[50]["question"] + " Explain briefly.", "answer": "No idea."},
    }
    for position in sorted(plants):
        train.insert(position, plants[position])
    src = write_jsonl(tmp_path / "train.jsonl", train)
    eval_path = write_jsonl(tmp_path / "eval.jsonl", evals)

    cleaned = clean_file(src, tmp_path / "cleaned.jsonl")
    found = {(f.line, f.check) for f in cleaned.findings if f.check != "normalized"}
    assert found == {(21, "pii_email"), (31, "pii_credit_card"), (41, "exact_duplicate"), (81, "near_duplicate")}
    by_check = {f.check: f.message for f in cleaned.findings}
    assert "same content as line 11 (kept)" in by_check["exact_duplicate"]
    assert "near duplicate of line 3 (kept)" in by_check["near_duplicate"]
    assert cleaned.records_out == len(train) - 2 and cleaned.pii == {"email": 1, "credit_card": 1}

    contaminated = find_contamination(src, eval_path)
    assert pairs_of(contaminated) == [(201, 6, "ngram"), (251, 51, "ngram")]

    # the pipeline: clean, then check the cleaned file and remove what leaks
    after = find_contamination(tmp_path / "cleaned.jsonl", eval_path)
    final = read_jsonl(remove_contaminated(after, tmp_path / "final.jsonl"))
    assert [p.train_line for p in after.pairs] == [199, 249]  # two lines above each was removed as a duplicate
    text = json.dumps(final)
    assert len(final) == len(train) - 4 and "@example.com" not in text and "4111" not in text
    assert "<EMAIL>" in text and "<CREDIT_CARD>" in text and "Problem:" not in text and "Warm-up first." not in text
