import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import shared_data
from tunelab.config.schema import DataConfig
from tunelab.data.files import scan_file
from tunelab.data.formats import to_example
from tunelab.data.mixture import mixture_shares
from tunelab.data.transform import convert_file, mix_files, split_file
from tunelab.errors import TunelabError


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read(path: Path) -> list[dict]:
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def labelled(tmp_path: Path, counts: dict[str, int]) -> Path:
    rows = [{"prompt": f"{label} {i}", "completion": "x", "label": label} for label, n in counts.items() for i in range(n)]
    return write_jsonl(tmp_path / "data.jsonl", rows)


# ---------------------------------------------------------------- split


def test_split_is_deterministic_complete_and_disjoint(tmp_path):
    source = labelled(tmp_path, {"a": 100})
    first = split_file(source, out_dir=tmp_path / "one", seed=3)
    again = split_file(source, out_dir=tmp_path / "two", seed=3)
    other = split_file(source, out_dir=tmp_path / "three", seed=4)
    assert first.counts == {"train": 80, "validation": 10, "test": 10}
    assert set(first.outputs) == {"train", "validation", "test"} and first.outputs["train"] == tmp_path / "one" / "train.jsonl"
    parts = {name: read(p) for name, p in first.outputs.items()}
    assert parts == {name: read(p) for name, p in again.outputs.items()}
    assert parts != {name: read(p) for name, p in other.outputs.items()}
    prompts = [r["prompt"] for rows in parts.values() for r in rows]
    assert sorted(prompts) == sorted(r["prompt"] for r in read(source))  # every record once
    train = [r["prompt"] for r in parts["train"]]
    assert train == sorted(train, key=lambda p: int(p.split()[1]))  # file order kept inside a split


def test_split_does_not_depend_on_hash_randomisation(tmp_path):
    source = labelled(tmp_path, {"b": 13, "a": 7, "c": 5})
    here = split_file(source, out_dir=tmp_path / "here", stratify="label", seed=1)
    code = (
        "import sys; from tunelab.data.transform import split_file; "
        f"split_file({str(source)!r}, out_dir={str(tmp_path / 'there')!r}, stratify='label', seed=1)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).resolve().parents[2])
    for name, path in here.outputs.items():
        assert path.read_text() == (tmp_path / "there" / path.name).read_text()


def test_stratified_split_keeps_each_value_share(tmp_path):
    source = labelled(tmp_path, {"a": 60, "b": 30, "c": 10})
    report = split_file(source, stratify="label")  # beside the input by default
    assert report.outputs["test"] == tmp_path / "test.jsonl"
    assert "label=c: train 8, validation 1, test 1" in report.render()
    assert report.strata == {"a": {"train": 48, "validation": 6, "test": 6}, "b": {"train": 24, "validation": 3, "test": 3},
                             "c": {"train": 8, "validation": 1, "test": 1}}  # fmt: skip
    for name, path in report.outputs.items():
        assert Counter(r["label"] for r in read(path)) == {value: per_split[name] for value, per_split in report.strata.items()}


def test_stratified_split_with_uneven_values_stays_within_rounding(tmp_path):
    counts = {"a": 7, "b": 5, "c": 3, "d": 1}
    ratios = (0.7, 0.15, 0.15)
    report = split_file(labelled(tmp_path, counts), out_dir=tmp_path / "out", ratios=ratios, stratify="label", seed=9)
    for value, n in counts.items():
        for name, ratio in zip(report.outputs, ratios):
            assert abs(report.strata[value][name] - n * ratio) < 1, (value, name, report.strata)
    assert list(report.counts.values()) == [11, 3, 2]  # the file-wide largest-remainder rounding of 16 records


def test_split_into_named_files_and_two_splits(tmp_path):
    source = labelled(tmp_path, {"a": 10})
    report = split_file(source, {"train": tmp_path / "tr.json", "eval": tmp_path / "ev.csv"}, ratios=(0.7, 0.3))
    assert report.counts == {"train": 7, "eval": 3}
    assert len(read(tmp_path / "tr.json")) == 7 and len((tmp_path / "ev.csv").read_text().splitlines()) == 4


@pytest.mark.parametrize(
    "ratios, message",
    [((0.8, 0.1, 0.2), "sum to 1.1, not 1"), ((0.9, 0.1, 0), "every ratio must be a positive number"),
     ((1.2, -0.1, -0.1), "ratio of split 'validation' is -0.1"), ((0.5, 0.5), "2 ratios (0.5, 0.5) for 3 splits")],
)  # fmt: skip
def test_bad_ratios_are_refused_before_anything_is_written(tmp_path, ratios, message):
    source = labelled(tmp_path, {"a": 10})
    with pytest.raises(TunelabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        split_file(source, out_dir=tmp_path / "out", ratios=ratios)
    assert not (tmp_path / "out").exists()


def test_stratify_by_a_missing_field_names_it_and_the_fields_present(tmp_path):
    source = labelled(tmp_path, {"a": 4})
    with pytest.raises(TunelabError, match=r"stratify by 'topic'.*fields are: completion, label, prompt"):
        split_file(source, out_dir=tmp_path / "out", stratify="topic")
    rows = read(source) + [{"prompt": "p", "completion": "c"}]
    write_jsonl(source, rows)
    with pytest.raises(TunelabError, match=r"1 records lack that field \(data.jsonl line 5"):
        split_file(source, out_dir=tmp_path / "out", stratify="label")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- convert

RICH = [
    {"instruction": "Summarise the text.", "input": "A long text.\n\nWith two paragraphs.", "output": "Short.", "system": "Be brief.",
     "history": [["Hi", "Hello!"], ["Can you help?", "Yes."]], "id": 7},
    {"instruction": "Name a colour.", "input": "", "output": "Red."},
    {"instruction": "Two\n\nparagraphs of instruction", "input": "and an input", "output": "ok"},
]  # fmt: skip


def round_trip(tmp_path: Path, source: Path, via: str, **fields) -> list[dict]:
    middle = tmp_path / f"via-{via}.jsonl"
    assert convert_file(source, middle, "alpaca", via, **fields).skipped == 0
    back = tmp_path / f"back-{via}.jsonl"
    assert convert_file(middle, back, via, "alpaca", **fields).skipped == 0
    return read(back)


@pytest.mark.parametrize("via", ["sharegpt", "openai"])
def test_alpaca_round_trips_through_conversations_unchanged(tmp_path, via):
    source = write_jsonl(tmp_path / "rich.jsonl", RICH)
    assert round_trip(tmp_path, source, via) == RICH
    # and the converted file trains exactly like the source
    middle = scan_file(tmp_path / f"via-{via}.jsonl").records
    for original, converted in zip(scan_file(source).records, middle):
        assert to_example(converted, DataConfig(format=via))["messages"] == to_example(original, DataConfig(format="alpaca"))["messages"]
    assert "alpaca" in middle[0].fields and "alpaca" not in middle[1].fields  # the split hint only where input is non-empty


def test_real_alpaca_file_round_trips_unchanged(tmp_path):
    source = shared_data("alpaca", "alpaca_cleaned_1000.json")
    original = json.loads(source.read_text(encoding="utf-8"))
    assert round_trip(tmp_path, source, "sharegpt") == original
    assert round_trip(tmp_path, source, "prompt_completion") == original


def test_multi_turn_to_prompt_completion_is_a_finding_per_record(tmp_path):
    source = write_jsonl(tmp_path / "rich.jsonl", RICH)
    report = convert_file(source, tmp_path / "pc.jsonl", "alpaca", "prompt_completion", prompt_field="question", completion_field="answer")
    assert (report.records, report.converted, report.skipped) == (3, 2, 1)
    assert "2 of 3 records converted, 1 left out:\n  rich.jsonl line 1: [error] unconvertible: it has a system message" in report.render()
    finding = next(f for f in report.findings if f.check == "unconvertible")
    assert finding.line == 1 and "has a system message" in finding.message
    rows = read(tmp_path / "pc.jsonl")
    assert rows[0] == {"question": "Name a colour.", "answer": "Red."}
    assert rows[1]["question"] == "Two\n\nparagraphs of instruction\n\nand an input"
    no_system = write_jsonl(tmp_path / "turns.jsonl", [{**RICH[0], "system": None}])
    with pytest.raises(TunelabError, match=r"line 1.*3 user turns.*convert to alpaca"):
        convert_file(no_system, tmp_path / "none.jsonl", "alpaca", "prompt_completion")
    assert not (tmp_path / "none.jsonl").exists()


def test_openai_and_prompt_completion_conversions(tmp_path):
    chats = [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                      {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}], "tag": "x"},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "user", "content": "Q again"}]},
    ]  # fmt: skip
    source = write_jsonl(tmp_path / "chat.jsonl", chats)
    report = convert_file(source, tmp_path / "alpaca.json", "openai", "alpaca")
    assert report.converted == 2 and [f.line for f in report.findings] == [3]
    assert "do not alternate user, assistant" in report.findings[0].message
    assert read(tmp_path / "alpaca.json") == [
        {"instruction": "Q2", "input": "", "output": "A2", "system": "S", "history": [["Q1", "A1"]], "tag": "x"},
        {"instruction": "Q", "input": "", "output": "A"},
    ]
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"q": "What?", "a": "That."}])
    convert_file(pc, tmp_path / "sg.jsonl", "prompt_completion", "sharegpt", prompt_field="q", completion_field="a")
    assert read(tmp_path / "sg.jsonl") == [{"conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "That."}]}]
    convert_file(tmp_path / "sg.jsonl", tmp_path / "oa.jsonl", "sharegpt", "openai")
    convert_file(tmp_path / "oa.jsonl", tmp_path / "pc2.jsonl", "openai", "prompt_completion")
    assert read(tmp_path / "pc2.jsonl") == [{"prompt": "What?", "completion": "That."}]


def test_unreadable_lines_are_reported_not_dropped(tmp_path):
    source = tmp_path / "mixed.jsonl"
    source.write_text(json.dumps(RICH[1]) + "\n{broken\n" + json.dumps({"instruction": "x"}) + "\n", encoding="utf-8")
    report = convert_file(source, tmp_path / "out.jsonl", "alpaca", "openai")
    assert report.converted == 1
    assert [(f.line, f.check) for f in report.findings] == [(2, "broken_json"), (3, "unconvertible")]
    assert "no field 'output'" in report.findings[1].message


def test_bad_convert_inputs_fail_clearly(tmp_path):
    source = write_jsonl(tmp_path / "pc.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(TunelabError, match="does not exist"):
        convert_file(tmp_path / "nope.jsonl", tmp_path / "o.jsonl", "alpaca", "openai")
    with pytest.raises(TunelabError, match="'chatml' is not one tunelab converts: use alpaca, sharegpt, openai, prompt_completion"):
        convert_file(source, tmp_path / "o.jsonl", "prompt_completion", "chatml")
    with pytest.raises(TunelabError, match=r"No record .* has the field 'prompt' \(prompt_field\)\. The records' fields are: answer, question"):
        convert_file(source, tmp_path / "o.jsonl", "prompt_completion", "openai")
    with pytest.raises(TunelabError, match=r"the field 'conversations' \(messages_field\)"):
        convert_file(source, tmp_path / "o.jsonl", "sharegpt", "openai")
    with pytest.raises(TunelabError, match="is the input file"):
        convert_file(source, source, "prompt_completion", "prompt_completion", prompt_field="question", completion_field="answer")
    assert not (tmp_path / "o.jsonl").exists()


# ---------------------------------------------------------------- mix


@pytest.fixture
def three_sources(tmp_path):
    sizes = {"big": 100, "mid": 50, "small": 10}
    return [write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": f"{name} {i}", "completion": "c"} for i in range(n)]) for name, n in sizes.items()]


def test_mix_proportional_keeps_every_record_once(tmp_path, three_sources):
    report = mix_files(three_sources, tmp_path / "mix.jsonl")
    rows = read(tmp_path / "mix.jsonl")
    assert report.counts == [100, 50, 10] and report.total == len(rows) == 160
    assert report.shares == pytest.approx([100 / 160, 50 / 160, 10 / 160])
    assert len({r["prompt"] for r in rows}) == 160 and Counter(r["source"] for r in rows) == {"big": 100, "mid": 50, "small": 10}
    assert [r["source"] for r in rows[:20]] != sorted(r["source"] for r in rows[:20])  # shuffled together


def test_mix_equal_repeats_a_small_source_whole_then_tops_up(tmp_path, three_sources):
    report = mix_files([(p, 1.0) for p in three_sources], tmp_path / "mix.jsonl", mixing="equal", size=95, seed=1)
    assert report.shares == pytest.approx([1 / 3] * 3) and report.counts == [32, 32, 31] and report.repeated == [False, False, True]
    assert "small       31 of      10 records · weight 1 · share 33.3% (repeated: more than it holds)" in report.render()
    rows = read(tmp_path / "mix.jsonl")
    small = Counter(r["prompt"] for r in rows if r["source"] == "small")
    assert len(small) == 10 and sorted(small.values()) == [3] * 9 + [4]  # three whole passes and one more record
    big = [r["prompt"] for r in rows if r["source"] == "big"]
    assert len(big) == len(set(big)) == 32  # without replacement where the source is large enough


def test_mix_temperature_and_weights_match_training_shares(tmp_path, three_sources):
    sources = [{"path": three_sources[0], "weight": 2.0, "name": "web"}, (three_sources[1], 1.0), three_sources[2]]
    report = mix_files(sources, tmp_path / "mix.jsonl", mixing="temperature", temperature=2.0, size=200, source_field=None)
    assert report.names == ["web", "mid", "small"]
    assert report.shares == pytest.approx(mixture_shares([100, 50, 10], [2.0, 1.0, 1.0], "temperature", 2.0))
    assert report.shares[0] == pytest.approx(math.sqrt(200) / (math.sqrt(200) + math.sqrt(50) + math.sqrt(10)))
    assert sum(report.counts) == 200 and all("source" not in r for r in read(tmp_path / "mix.jsonl"))
    mix_files(sources, tmp_path / "again.jsonl", mixing="temperature", temperature=2.0, size=200, source_field=None)
    assert read(tmp_path / "again.jsonl") == read(tmp_path / "mix.jsonl")


def test_mix_converts_sources_in_different_formats(tmp_path, three_sources):
    alpaca = write_jsonl(tmp_path / "alp.jsonl", RICH[1:])
    with pytest.raises(TunelabError, match="different formats.*give to_format"):
        mix_files([(three_sources[2], "prompt_completion", 1), (alpaca, "alpaca", 1)], tmp_path / "mix.jsonl")
    report = mix_files([(three_sources[2], "prompt_completion", 1), (alpaca, "alpaca", 1)], tmp_path / "mix.jsonl", to_format="openai")
    rows = read(tmp_path / "mix.jsonl")
    assert report.counts == [10, 2] and all(set(r) >= {"messages", "source"} for r in rows)
    with pytest.raises(TunelabError, match="already has a field 'source'"):
        mix_files([tmp_path / "mix.jsonl"], tmp_path / "again.jsonl")
    with pytest.raises(TunelabError, match="mixing='uniform' is not one of"):
        mix_files(three_sources, tmp_path / "again.jsonl", mixing="uniform")
    with pytest.raises(TunelabError, match="weight -1"):
        mix_files([(three_sources[0], -1)], tmp_path / "again.jsonl")
    assert not (tmp_path / "again.jsonl").exists()
