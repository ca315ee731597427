"""The issue's scenario through the real command line: a copy of GSM8K problems with planted defects
(broken JSON, an empty answer, a duplicate, a near duplicate, an email, a card number, evaluation
questions inside training examples) is caught defect by defect with the right lines, and
validate --fix, clean and contamination --remove leave a file with none of them that trains."""

import json
import re
from importlib import resources

from tunelab.cli.main import main

CARD = "4111 1111 1111 1111"  # passes Luhn


def _problems():
    text = resources.files("tunelab").joinpath("demo_data/gsm8k_demo.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _planted(tmp_path):
    """(train file, eval file, {defect: line}) from the shipped GSM8K problems: 100 training
    problems with defects planted at known lines; the last 20 problems are the evaluation set."""
    problems = _problems()
    train, heldout = [dict(p) for p in problems[:100]], problems[-20:]
    lines = [json.dumps(p) for p in train]
    words = train[5]["question"].split()
    words[0], words[4] = "Jordan", "lovely"  # two words of ~50 changed: a near duplicate of line 6
    near = dict(train[5], question=" ".join(words))
    plants = {
        "email": (20, dict(train[19], question=train[19]["question"] + " Email the answer to maria.lopez@example.org.")),
        "card": (30, dict(train[29], answer=train[29]["answer"] + f"\nPaid with card {CARD}.")),
        "duplicate": (41, train[10]),
        "near_duplicate": (60, near),
        "contaminated": (70, {"question": "Solve this one first. " + heldout[3]["question"] + " Then explain.", "answer": heldout[3]["answer"]}),
        "empty_answer": (80, dict(train[79], answer="   ")),
    }
    for _, (line, row) in sorted(plants.items(), key=lambda kv: kv[1][0]):
        lines[line - 1] = json.dumps(row)
    lines.insert(50 - 1, '{"question": "How many apples', )  # broken JSON on line 50 (later lines shift by one)
    where = {name: line + (line >= 50) for name, (line, _) in plants.items()} | {"broken_json": 50}
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(p) + "\n" for p in heldout))
    return tmp_path / "train.jsonl", tmp_path / "eval.jsonl", where


def _run(capsys, *argv):
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def test_planted_defects_are_caught_by_line_and_removed(tmp_path, capsys):
    train, heldout, where = _planted(tmp_path)
    near_question = json.loads(train.read_text().splitlines()[where["near_duplicate"] - 1])["question"]

    code, out, _ = _run(capsys, "data", "validate", train, "--json")
    assert code == 1
    findings = json.loads(out)["findings"]
    errors = {(f["check"], f["line"]) for f in findings if f["severity"] == "error"}
    assert ("broken_json", where["broken_json"]) in errors
    assert ("empty_field", where["empty_answer"]) in errors

    cleaned, report = tmp_path / "clean.jsonl", tmp_path / "clean-report.json"
    code, out, _ = _run(capsys, "data", "clean", train, "-o", cleaned, "--report", report)
    assert code == 0
    found = {(f["check"], f["line"]) for f in json.loads(report.read_text())["findings"]}
    checks_at = {line: {c for c, at in found if at == line} for _, line in found}
    assert any("email" in c for c in checks_at[where["email"]]), checks_at[where["email"]]
    assert any("card" in c for c in checks_at[where["card"]]), checks_at[where["card"]]
    assert any("duplicate" in c and "near" not in c for c in checks_at[where["duplicate"]])
    assert any("near" in c for c in checks_at[where["near_duplicate"]])

    code, out, _ = _run(capsys, "data", "contamination", train, heldout, "--json")
    pairs = json.loads(out)["pairs"]
    assert [(p["train_line"], p["eval_line"]) for p in pairs] == [(where["contaminated"], 4)]

    # Repair, clean, decontaminate: nothing planted is left, and the result validates.
    fixed, cleaned, final = tmp_path / "fixed.jsonl", tmp_path / "fixed-clean.jsonl", tmp_path / "final.jsonl"
    _run(capsys, "data", "validate", train, "--fix", fixed)
    assert _run(capsys, "data", "clean", fixed, "-o", cleaned)[0] == 0
    assert _run(capsys, "data", "contamination", cleaned, heldout, "--remove", final)[0] == 0
    text = final.read_text()
    assert "maria.lopez@example.org" not in text and CARD not in text and "<EMAIL>" in text and "<CREDIT_CARD>" in text
    rows = [json.loads(line) for line in text.splitlines()]
    assert not any("Solve this one first" in r["question"] for r in rows)
    questions = [r["question"] for r in rows]
    assert len(questions) == len(set(questions)) and near_question not in questions
    assert all(not re.fullmatch(r"\s*", r["answer"]) for r in rows)
    assert len(rows) == 100 - 4  # the empty answer, the duplicate, the near duplicate, the contaminated one
    assert _run(capsys, "data", "validate", final)[0] == 0
