import json
import sys
import types

import pytest

from conftest import shared_data
from tunelab.data.clean import clean_file, normalize_text, repetition, shingle_hashes, text_minhashes
from tunelab.errors import TunelabError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def gsm8k_rows(count=None):
    rows = read_jsonl(shared_data("gsm8k", "train.jsonl"))
    return rows[:count] if count else rows


def checks(report):
    return [(f.line, f.check) for f in report.findings]


def test_normalize_text():
    assert normalize_text("cafe\u0301") == ("caf\u00e9", ["unicode NFC"])
    assert normalize_text("a\x00b\u200bc\r\nd") == ("abc\nd", ["control characters removed"])
    assert normalize_text("a  b\t\tc") == ("a b c", ["runs of spaces collapsed"])
    assert normalize_text("  x  \ny \n") == ("x\ny", ["runs of spaces collapsed", "trailing whitespace stripped"])
    code = "def f():\n    return  1\n\tpass"
    assert normalize_text(code)[0] == "def f():\n    return 1\n\tpass"  # indentation keeps its meaning
    assert normalize_text("clean text\twith a tab") == ("clean text\twith a tab", [])


def test_normalize_keeps_hh_rlhf_markup():
    transcript = "\n\nHuman: hi  there \n\nAssistant: \n\nHuman: ok\n\nAssistant: "
    assert normalize_text(transcript)[0] == "\n\nHuman: hi there\n\nAssistant: \n\nHuman: ok\n\nAssistant: "


def test_clean_keeps_structure_of_every_format(tmp_path):
    rows = [
        {"instruction": "  Say\u00a0hi  ", "input": "", "output": "Hi\x07 there.  "},
        {"conversations": [{"from": "human", "value": "Mail me: x.y@example.com"}, {"from": "gpt", "value": "OK."}]},
        {"messages": [{"role": "user", "content": "Card 4111 1111 1111 1111?"}, {"role": "assistant", "content": "No."}], "id": 7},
        {"question": "What is 2+2?", "answer": "<<2+2=4>>4\n#### 4"},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    report = clean_file(src, tmp_path / "out.jsonl")
    out = read_jsonl(tmp_path / "out.jsonl")
    assert out[0] == {"instruction": "Say\u00a0hi", "input": "", "output": "Hi there."}
    assert out[1]["conversations"][0] == {"from": "human", "value": "Mail me: <EMAIL>"}
    assert out[2] == {"messages": [{"role": "user", "content": "Card <CREDIT_CARD>?"}, {"role": "assistant", "content": "No."}], "id": 7}
    assert out[3] == rows[3]
    assert checks(report) == [(1, "normalized"), (2, "pii_email"), (3, "pii_credit_card")]
    assert "fields: instruction, output" in report.findings[0].message
    assert "conversations[0].value" in report.findings[1].message
    assert "x.y@example.com" not in report.render() + json.dumps(report.to_dict())  # the report does not repeat the PII
    assert report.pii == {"email": 1, "credit_card": 1} and report.changed == {"normalized": 1, "pii": 2}
    assert (report.records_in, report.records_out) == (4, 4)


def test_exact_duplicates_compare_normalised_content(tmp_path):
    apples = {"q": "How many apples?", "a": "Three."}
    rows = [apples, {"q": "Other"}, {"q": "how  many APPLES?", "a": "three."}, dict(apples)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    report = clean_file(src, tmp_path / "out.jsonl", near_dedup=False, normalize=False)
    assert read_jsonl(tmp_path / "out.jsonl") == rows[:2]
    dupes = [f for f in report.findings if f.check == "exact_duplicate"]
    assert [(f.line, f.message) for f in dupes] == [(3, "removed: same content as line 1 (kept)"), (4, "removed: same content as line 1 (kept)")]
    assert report.removed == {"exact_duplicate": 2}


def test_unreadable_lines_are_dropped_and_reported(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine"}\n{"text": broken\n[1, 2]\n{"text": "also fine"}\n', encoding="utf-8")
    report = clean_file(src, tmp_path / "out.jsonl")
    assert read_jsonl(tmp_path / "out.jsonl") == [{"text": "fine"}, {"text": "also fine"}]
    assert checks(report) == [(2, "broken_json"), (3, "not_an_object")]
    assert report.removed == {"unreadable": 2} and (report.records_in, report.records_out) == (4, 2)
    assert "left out of the output" in report.findings[0].message


def test_quality_filters(tmp_path):
    rows = [{"text": "short"}, {"text": "a reasonable sentence about cleaning data files"}, {"text": "x" * 200},
            {"text": ("buy now " * 15).strip()}, {"text": "the cat sat on the mat and the dog sat on the rug"}]  # fmt: skip
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    report = clean_file(src, tmp_path / "out.jsonl", min_chars=10, max_chars=150, max_repetition=0.3)
    assert read_jsonl(tmp_path / "out.jsonl") == [rows[1], rows[4]]
    assert checks(report) == [(1, "too_short"), (3, "too_long"), (4, "repetitive")]
    assert report.findings[2].message.startswith("removed: 93% of its word 3-grams repeat") and "max_repetition=0.3" in report.findings[2].message
    assert clean_file(src, None).records_out == 5  # every filter is off by default


def test_repetition_share():
    assert repetition("one two three four five") == 0
    assert repetition("a b c a b c a b c") == pytest.approx(4 / 7)
    assert repetition("too short") == 0


def test_language_filter_needs_a_detector(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "langdetect", None)  # as if not installed (neither is, here)
    monkeypatch.setitem(sys.modules, "fasttext", None)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    with pytest.raises(TunelabError, match="pip install langdetect"):
        clean_file(src, tmp_path / "out.jsonl", language="en")


def test_language_filter_with_langdetect(tmp_path, monkeypatch):
    fake = types.ModuleType("langdetect")
    fake.DetectorFactory = types.SimpleNamespace(seed=None)
    fake.detect = lambda text: "de" if "der" in text.split() else "en"
    monkeypatch.setitem(sys.modules, "langdetect", fake)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "the cat"}, {"text": "der Hund"}, {"text": "the dog"}])
    report = clean_file(src, tmp_path / "out.jsonl", language="en")
    assert [r["text"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["the cat", "the dog"]
    assert checks(report) == [(2, "language")] and "'de'" in report.findings[0].message


def test_never_in_place_and_dry_run(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}, {"text": "a"}])
    with pytest.raises(TunelabError, match="never edits data in place"):
        clean_file(src, src)
    report = clean_file(src, None)
    assert report.records_out == 1 and report.out is None and "dry run" in report.render()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_bad_options_are_clear_errors(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    with pytest.raises(TunelabError, match="near_threshold=1.5"):
        clean_file(src, None, near_threshold=1.5)
    with pytest.raises(TunelabError, match="Unknown PII kind 'mail'"):
        clean_file(src, None, pii=["mail"])
    with pytest.raises(TunelabError, match="min_chars=10 is above max_chars=5"):
        clean_file(src, None, min_chars=10, max_chars=5)


def test_shingles_of_short_and_empty_texts():
    assert len(shingle_hashes("abc")) == 1  # shorter than a shingle: the whole text is one
    assert len(shingle_hashes("")) == 0
    assert len(shingle_hashes("abcdefabcdef")) == 6  # distinct 5-grams only
    empty, short = text_minhashes(["", "hi"])
    assert empty is None and short is not None  # an empty text never matches as a near duplicate


def change_words(text, changes):
    for old, new in changes:
        assert old in text
        text = text.replace(old, new, 1)
    return text


def test_near_duplicates_keep_distinct_gsm8k_questions(tmp_path):
    rows = gsm8k_rows(200)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    report = clean_file(src, tmp_path / "out.jsonl", pii=None)
    assert report.removed == {} and report.records_out == 200


def test_near_duplicates_found(tmp_path):
    rows = gsm8k_rows(100)
    planted = [
        {**rows[2], "question": change_words(rows[2]["question"], [("Betty is", "Bettina is"), ("wallet", "purse"),
                                                                   ("grandparents", "grandmother")])},  # fmt: skip
        {"question": change_words(rows[4]["question"], [("James", "John"), ("week", "month")]), "answer": rows[4]["answer"]},  # a short one
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows + planted)
    report = clean_file(src, tmp_path / "out.jsonl")
    near = [f for f in report.findings if f.check == "near_duplicate"]
    assert [(f.line, f.message.split(",")[0]) for f in near] == [
        (101, "removed: near duplicate of line 3 (kept)"), (102, "removed: near duplicate of line 5 (kept)")]  # fmt: skip
    assert all(float(f.message.split("Jaccard ")[1].split()[0]) >= 0.8 for f in near)
    assert report.records_out == 100


def test_near_threshold_is_configurable(tmp_path):
    base = "The quick brown fox jumps over the lazy dog while the farmer counts forty two sheep in the field"
    rows = [{"text": base}, {"text": base.replace("forty two", "fifty one").replace("lazy", "sleepy")}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    assert clean_file(src, None, near_threshold=0.95).records_out == 2
    assert clean_file(src, None, near_threshold=0.5).records_out == 1


def test_report_render_and_dict(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a  b"}, {"text": "a b"}, {"text": "mail x@example.com"}])
    report = clean_file(src, tmp_path / "out.jsonl")
    text = report.render(limit=1)
    assert "2 of 3 records kept, 1 removed" in text and "exact_duplicate" in text and "... and 2 more" in text
    data = report.to_dict()
    assert data["removed"] == {"exact_duplicate": 1} and data["pii"] == {"email": 1} and len(data["findings"]) == 3
    json.dumps(data)
