"""Dataset statistics (tunelab.data.stats): counts, lengths as training sees them, the histogram."""

import json

import pytest

from conftest import shared_data
from tunelab.config.schema import DataConfig
from tunelab.data import render, tokenize_conversation
from tunelab.data.constants import IGNORE_INDEX
from tunelab.data.stats import Histogram, Summary, dataset_stats, save_histogram
from tunelab.data.tokenize import supervision_labels
from tunelab.errors import TunelabError

CHAT = DataConfig(format="prompt_completion", prompt_field="question", completion_field="answer")
ROWS = [
    {"question": "What is 2+2?", "answer": "2+2 = 4.\n#### 4"},
    {"question": "Tom has 3 apples and eats one. How many are left?", "answer": "3 - 1 = 2 apples are left.\n#### 2"},
    {"question": "Double 21.", "answer": "21 * 2 = 42.\n#### 42"},
]


def write_jsonl(path, rows: list, extra_lines: tuple[str, ...] = ()) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "".join(line + "\n" for line in extra_lines))
    return str(path)


def messages_of(row: dict) -> list[dict]:
    return [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]


def test_summary_percentiles_interpolate_like_numpy():
    summary = Summary.of(list(range(1, 11)))  # 1..10
    assert (summary.count, summary.total, summary.min, summary.max) == (10, 55, 1, 10)
    assert summary.mean == 5.5 and summary.median == 5.5
    assert summary.p90 == pytest.approx(9.1) and summary.p99 == pytest.approx(9.91)
    assert Summary.of([]) is None


def test_histogram_has_round_edges_and_counts_every_value():
    histogram = Histogram.of([3, 7, 12, 48, 49, 95], bins=10)
    assert histogram.edges[0] == 0 and histogram.edges[1] - histogram.edges[0] == 10
    assert sum(histogram.counts) == 6
    assert histogram.counts[0] == 2 and histogram.counts[4] == 2 and histogram.counts[-1] == 1
    bars = histogram.bars(marker=45)
    assert len(bars) == len(histogram.counts)
    assert "◀ max_length=45" in bars[4] and "max_length" not in bars[3]


def test_token_counts_match_a_hand_computation(tmp_path, tokenizer):
    report = dataset_stats(write_jsonl(tmp_path / "math.jsonl", ROWS), CHAT, tokenizer)
    totals = [len(tokenizer(render(tokenizer, messages_of(row)), add_special_tokens=False)["input_ids"]) for row in ROWS]
    # Each reply is supervised with its end-of-turn token, nothing else (the replies start after a newline, so
    # they tokenize alone as they do in the conversation).
    supervised = [len(tokenizer(row["answer"] + "<|im_end|>", add_special_tokens=False)["input_ids"]) for row in ROWS]
    assert report.unit == "tokens" and report.examples == report.records == 3
    assert report.lengths.total == sum(totals) and report.lengths.max == max(totals) and report.lengths.min == min(totals)
    assert report.supervised.total == sum(supervised)
    assert report.supervised_share == pytest.approx(sum(supervised) / sum(totals))
    # The same numbers as the training path, one conversation at a time.
    for row, total, count in zip(ROWS, totals, supervised):
        ids, labels = tokenize_conversation(tokenizer, messages_of(row))
        assert len(ids) == total and sum(label != IGNORE_INDEX for label in labels[1:]) == count


def test_batched_labels_equal_the_training_labels(tokenizer):
    from tunelab.data.stats import conversation_spans

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hi 🎉 naïvely"},
        {"role": "assistant", "content": " Hi  there 😀"},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": ""},
    ]
    text, spans, _ = conversation_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert supervision_labels(encoded["input_ids"], encoded["offset_mapping"], spans) == tokenize_conversation(tokenizer, messages)[1]


def test_records_unreadable_and_schema_failures_are_counted_with_their_lines(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", ROWS, extra_lines=("{broken", '{"question": "no answer"}', "[1, 2]"))
    report = dataset_stats(path, CHAT)
    assert (report.records, report.unreadable, report.schema_failures, report.examples) == (4, 2, 1, 3)
    assert {(f.line, f.check) for f in report.findings} == {(4, "broken_json"), (5, "schema"), (6, "not_an_object")}
    schema = next(f for f in report.findings if f.check == "schema")
    assert "'answer'" in schema.message and schema.where == "mixed.jsonl line 5"


def test_characters_and_words_without_a_tokenizer(tmp_path):
    report = dataset_stats(write_jsonl(tmp_path / "math.jsonl", ROWS), CHAT, max_length=10)
    lengths = [len(r["question"]) + len(r["answer"]) for r in ROWS]
    assert report.unit == "characters"
    assert report.lengths.total == sum(lengths)
    assert report.supervised.total == sum(len(r["answer"]) for r in ROWS)
    assert report.words.total == sum(len(r["question"].split()) + len(r["answer"].split()) for r in ROWS)
    # max_length counts tokens: without a tokenizer nothing is compared against it.
    assert report.over_max_length is None and "give a tokenizer" in report.render()


def test_turns_roles_longest_and_max_length(tmp_path, tokenizer):
    conversations = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "A?"}, {"role": "assistant", "content": "B."},
                      {"role": "user", "content": "C?"}, {"role": "assistant", "content": "D, a much longer answer " * 20}]},
        {"messages": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Hey there."}]},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "chat.jsonl", conversations)
    report = dataset_stats(path, DataConfig(format="openai"), tokenizer, max_length=100, longest=2)
    assert report.turns == {1: 2, 2: 1}
    assert report.roles == {"assistant": 4, "system": 1, "user": 4}
    assert [e.line for e in report.longest] == [2, 3]
    assert report.longest[0].length == report.lengths.max > 100
    assert report.over_max_length == 1
    text = report.render()
    assert "longer than max_length=100: 1 (33.3%)" in text and "chat.jsonl line 2" in text


def test_preference_pairs_measure_both_sides(tmp_path, tokenizer):
    pairs = [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I will not, and here is a long refusal for no reason at all."},
        {"prompt": "Say yes.", "chosen": "Yes, gladly!", "rejected": "No."},
    ]
    report = dataset_stats(write_jsonl(tmp_path / "pairs.jsonl", pairs), DataConfig(format="preference"), tokenizer)

    def tokens(prompt, reply):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        return len(tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"])

    chosen = [tokens(p["prompt"], p["chosen"]) for p in pairs]
    rejected = [tokens(p["prompt"], p["rejected"]) for p in pairs]
    assert report.kind == "pairs" and report.examples == 2
    assert report.chosen.total == sum(chosen) and report.rejected.total == sum(rejected)
    assert report.lengths.total == sum(map(max, zip(chosen, rejected)))


def test_text_documents_and_tokens(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("First paragraph here.\n\nSecond one,\nover two lines.\n\n\nThird.\n")
    report = dataset_stats(path, DataConfig(format="text"), tokenizer)
    documents = ["First paragraph here.", "Second one,\nover two lines.", "Third."]
    expected = [len(tokenizer(d)["input_ids"]) + 1 for d in documents]  # each document ends with EOS
    assert report.kind == "documents" and report.examples == 3
    assert report.lengths.total == sum(expected)
    assert report.supervised is None and report.turns == {}


def test_report_is_json_and_histogram_png(tmp_path, tokenizer):
    report = dataset_stats(write_jsonl(tmp_path / "math.jsonl", ROWS), CHAT, tokenizer, max_length=40)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["examples"] == 3 and data["turns"] == {"1": 3} and data["over_max_length"] == report.over_max_length
    png = save_histogram(report, tmp_path / "plots" / "lengths.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_nothing_to_draw_is_a_clear_error(tmp_path):
    report = dataset_stats(write_jsonl(tmp_path / "empty.jsonl", [], extra_lines=("{broken",)), CHAT)
    assert report.examples == 0 and "no conversations to measure" in report.render()
    with pytest.raises(TunelabError, match="nothing was written"):
        save_histogram(report, tmp_path / "h.png")


def test_shared_sharegpt_file(tokenizer):
    report = dataset_stats(shared_data("sharegpt", "conversations.json"), DataConfig(format="sharegpt"), tokenizer, max_length=2048)
    assert report.records == report.examples == 500 and not report.findings
    assert report.turns == {1: 167, 2: 166, 3: 167} and report.roles == {"assistant": 1000, "user": 1000}
    assert 0 < report.supervised_share < 1 and report.over_max_length == 0


def test_a_template_that_refuses_a_conversation_is_a_finding(tmp_path, tokenizer):
    import copy

    refusing = copy.deepcopy(tokenizer)
    refusing.chat_template = "{{ raise_exception('no chat here') }}"
    report = dataset_stats(write_jsonl(tmp_path / "math.jsonl", ROWS[:2]), CHAT, refusing)
    assert [(f.line, f.check) for f in report.findings] == [(1, "chat_template"), (2, "chat_template")]
    assert report.examples == 0 and "no chat here" in report.findings[0].message
