"""``tunelab data ...`` through the real command line (in-process): every subcommand on small files,
and the bad inputs the issue names, each a one-paragraph error with nothing written."""

import json

import pytest

from tunelab.cli.main import main

ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have now?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 12 pens. How many pens are in 3 boxes?", "answer": "12 * 3 = 36\n#### 36"},
    {"question": "Sara reads 5 pages a day. How many pages does she read in a week?", "answer": "5 * 7 = 35\n#### 35"},
    {"question": "Write to bob@example.com about the 9 kittens in the yard and what they eat.", "answer": "Done.\n#### 9"},
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have now?", "answer": "3 + 4 = 7\n#### 7"},  # duplicate of line 1
]


def _write(path, rows, broken_at=None):
    lines = [json.dumps(r) for r in rows]
    if broken_at is not None:
        lines.insert(broken_at - 1, '{"question": "unterminated')
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(capsys, *argv):
    code = main(["data", *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_data_usage_lists_every_command(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    for name in ("stats", "validate", "audit", "clean", "contamination", "split", "convert", "mix", "synth", "augment"):
        assert name in out
    code, out, _ = _run(capsys, "clean", "--help")
    assert code == 0 and "--near-threshold" in out


def test_validate_reports_lines_and_exits_non_zero_and_fix_writes_a_clean_copy(tmp_path, capsys):
    data = _write(tmp_path / "train.jsonl", [*ROWS[:2], {"question": "Empty answer here?", "answer": "  "}], broken_at=2)
    code, out, _ = _run(capsys, "validate", data)  # the format is guessed from the fields
    assert code == 1
    assert "line 2" in out and "broken_json" in out and "line 4" in out
    fixed = tmp_path / "fixed.jsonl"
    code, out, _ = _run(capsys, "validate", data, "--fix", fixed)
    assert fixed.exists()
    code, out, _ = _run(capsys, "validate", fixed, "--json")
    assert code == 0 and json.loads(out)["findings"] == [] or all(f["severity"] != "error" for f in json.loads(out)["findings"])


def test_stats_audit_clean_contamination_split_convert_mix(tmp_path, capsys, tokenizer):
    data = _write(tmp_path / "train.jsonl", ROWS)
    tok = ["--tokenizer", tokenizer.name_or_path] if tokenizer.name_or_path else []
    code, out, _ = _run(capsys, "stats", data, "--png", tmp_path / "hist.png", *tok)
    assert code == 0 and "5" in out and (tmp_path / "hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code, out, _ = _run(capsys, "audit", data, "-n", "2", "--no-color", "--html", tmp_path / "audit.html", *tok)
    assert code == 0 and "⟦" in out and "<html" in (tmp_path / "audit.html").read_text().lower()

    cleaned = tmp_path / "clean.jsonl"
    code, out, _ = _run(capsys, "clean", data, "-o", cleaned)
    assert code == 0
    kept = [json.loads(line) for line in cleaned.read_text().splitlines()]
    assert len(kept) == 4 and "<EMAIL>" in kept[3]["question"]

    heldout = _write(tmp_path / "eval.jsonl", [ROWS[1]])
    decontaminated = tmp_path / "decontaminated.jsonl"
    code, out, _ = _run(capsys, "contamination", cleaned, heldout, "--remove", decontaminated)
    assert code == 0 and "line 2" in out
    assert ROWS[1]["question"] not in decontaminated.read_text()

    code, out, _ = _run(capsys, "split", data, "--ratios", "0.6,0.4", "--names", "train,test", "-o", tmp_path / "splits", "--seed", "1")
    assert code == 0
    sizes = {p.stem: len(p.read_text().splitlines()) for p in (tmp_path / "splits").iterdir()}
    assert sizes == {"train": 3, "test": 2}

    sharegpt = tmp_path / "chat.json"
    code, out, _ = _run(capsys, "convert", data, "--to", "sharegpt", "-o", sharegpt, "--prompt-field", "question", "--completion-field", "answer")
    assert code == 0 and json.loads(sharegpt.read_text())[0]["conversations"][1]["value"] == ROWS[0]["answer"]

    mixed = tmp_path / "mix.jsonl"
    code, out, _ = _run(capsys, "mix", f"{data}:1", f"{heldout}:1", "-o", mixed, "--mixing", "equal", "--size", "10")
    assert code == 0 and len(mixed.read_text().splitlines()) == 10


@pytest.mark.parametrize(
    "argv, message",
    [
        (["stats", "{tmp}/missing.jsonl"], "does not exist"),
        (["validate", "{data}", "--format", "yaml"], "invalid choice"),
        (["validate", "{data}", "--format", "prompt_completion", "--prompt-field", "query"], "query"),
        (["clean", "{data}", "-o", "{data}"], "in place"),
        (["synth", "{alpaca}", "-o", "{tmp}/new.jsonl", "-n", "2", "--endpoint", "http://127.0.0.1:9/v1", "--timeout", "1"], "127.0.0.1:9"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, capsys, argv, message):
    data = _write(tmp_path / "train.jsonl", ROWS[:3])
    alpaca = _write(tmp_path / "seeds.jsonl", [{"instruction": r["question"], "input": "", "output": r["answer"]} for r in ROWS[:3]])
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = _run(capsys, *[a.format(tmp=tmp_path, data=data, alpaca=alpaca) for a in argv])
    assert code != 0
    assert message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
