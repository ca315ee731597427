"""`tunelab eval ...` through the real entry point: exit codes and the messages users see."""

import json

import pytest

from tunelab.cli.main import main

PROBLEMS = [{"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a, b in [(1, 2), (3, 4), (5, 6)]]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


def test_eval_help_lists_the_commands(capsys):
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    for command in ("perplexity", "generate", "compare", "human-sheet", "agreement", "ab", "lm-eval"):
        assert command in out


def test_a_model_that_does_not_exist(data, tmp_path, capsys):
    assert main(["eval", "generate", "--model", str(tmp_path / "nope"), "--data", str(data), "--metric", "gsm8k"]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_a_metric_that_does_not_exist_lists_the_metrics(data, capsys):
    assert main(["eval", "generate", "--model", "tiny-llama", "--data", str(data), "--metric", "acuracy"]) == 1
    err = capsys.readouterr().err
    assert "Unknown metric 'acuracy'" in err and "gsm8k" in err and "rouge" in err and "bleu" in err


def test_unknown_subcommand_and_flag(capsys):
    assert main(["eval", "score"]) == 2  # usage errors exit 2
    assert "Unknown command 'tunelab eval score'" in capsys.readouterr().err
    assert main(["eval", "generate", "--modle", "x"]) == 2
    assert "required: --model, --data" in capsys.readouterr().err


def test_ratings_with_missing_columns_and_one_rater(tmp_path, capsys):
    bad = tmp_path / "ratings.csv"
    bad.write_text("item,score\n1,4\n")
    assert main(["eval", "agreement", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "ratings.csv" in err and "rating_" in err
    one = tmp_path / "sheet-alice.csv"
    one.write_text("item,rating_1,rating_2\n1,4,5\n2,3,2\n")
    assert main(["eval", "agreement", str(one)]) == 1
    assert "two raters" in capsys.readouterr().err


def test_generate_and_perplexity_end_to_end(tiny_base_model, data, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "generate", "--model", str(tiny_base_model), "--data", str(data), "--metric", "gsm8k", "--metric", "bleu",
                 "--max-new-tokens", "6", "-o", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "gsm8k" in printed and "bleu" in printed and "predictions.jsonl" in printed
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("gsm8k" in r["scores"] for r in rows)
    assert main(["eval", "perplexity", "--model", str(tiny_base_model), "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["items"] == 3 and report["perplexity"] > 1
    assert main(["eval", "generate", "--model", str(tiny_base_model), "--data", str(data), "--metric", "gsm8k", "--max-new-tokens", "80",
                 "--stop-loops", "-o", str(out)]) == 0  # fmt: skip
    assert "looped (stopped by the loop guard)" in capsys.readouterr().out
    assert all("looped" in json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines())


def test_the_loop_guard_is_refused_for_an_endpoint(data, capsys):
    assert main(["eval", "generate", "--model", "http://127.0.0.1:9/v1", "--data", str(data), "--stop-loops"]) == 2
    err = capsys.readouterr().err
    assert "--stop-loops needs a model in this process" in err and "Traceback" not in err


@pytest.mark.parametrize("flags", [["--max-new-tokens", "0"], ["--batch-size", "-1"], ["--sample", "--temperature", "0"], ["--top-p", "1.5"], ["--limit", "0"]])
def test_generation_flags_out_of_range_are_usage_errors(data, capsys, flags):
    assert main(["eval", "generate", "--model", "tiny-llama", "--data", str(data), *flags]) == 2
    err = capsys.readouterr().err
    assert flags[-2] in err and "Traceback" not in err
