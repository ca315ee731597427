"""``tunelab eval lm-eval``: lm-evaluation-harness on a tiny random model with the shipped
gsm8k_local task (a few problems, a few new tokens), and the errors that come before any loading."""

import json
import os

import pytest

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'tunelab[lmeval]' or pip install lm-eval)")

from tunelab.cli.main import main
from tunelab.errors import TunelabError
from tunelab.evaluation.lm_eval_bridge import check_tasks, local_task, shipped_tasks

ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have now?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 12 pens. How many pens are in 3 boxes?", "answer": "12 * 3 = 36\n#### 36"},
    {"question": "Sara reads 1,000 pages a year. How many pages does she read in 2 years?", "answer": "1,000 * 2 = 2,000\n#### 2,000"},
]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _error(capsys, *argv) -> str:
    assert main(["eval", "lm-eval", *map(str, argv)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_gsm8k_local_on_a_tiny_model_scores_both_filters_and_writes_results(tmp_path, data, capsys, tokenizer):
    from tunelab.data import render

    offline_before = os.environ.get("HF_HUB_OFFLINE")
    out = tmp_path / "out"
    code = main(["eval", "lm-eval", "--model", "tiny-llama", "--device", "cpu", "--tasks", "gsm8k_local", "--data", str(data),
                 "--limit", "3", "--gen-kwargs", "max_gen_toks=8", "-o", str(out), "--json"])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    scores = {(s["task"], s["metric"], s["filter"]): s for s in report["scores"]}
    for filter_name in ("strict-match", "flexible-extract"):
        score = scores[("gsm8k_local", "exact_match", filter_name)]
        assert 0.0 <= score["value"] <= 1.0
        assert score["samples"] == 3
    assert report["settings"]["chat_template"] is True
    assert os.environ.get("HF_HUB_OFFLINE") == offline_before  # offline only for the call

    results = json.loads((out / "results.json").read_text())
    assert "exact_match,strict-match" in results["results"]["gsm8k_local"]
    assert results["configs"]["gsm8k_local"]["dataset_kwargs"]["data_files"]["test"] == str(data.resolve())
    assert (out / "tasks" / "gsm8k_local.yaml").is_file()  # the task as it ran, with this data file
    samples = [json.loads(line) for line in (out / "samples_gsm8k_local.jsonl").read_text().splitlines()]
    assert sorted((s["doc_id"], s["filter"]) for s in samples) == [(i, f) for i in range(3) for f in ("flexible-extract", "strict-match")]
    first = min(samples, key=lambda s: s["doc_id"])
    # The prompt is tunelab's: the question as the user turn of the chat template, nothing else.
    prompt, gen_kwargs = first["arguments"][0]
    assert prompt == render(tokenizer, [{"role": "user", "content": ROWS[0]["question"]}], add_generation_prompt=True)
    assert gen_kwargs["max_gen_toks"] == 8 and gen_kwargs["do_sample"] is False
    assert first["target"] == "7"


def test_unknown_task_lists_the_tasks_found(tmp_path, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text(
        "task: my_arith\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: /nowhere.jsonl\n"
        "output_type: generate_until\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "metric_list:\n  - metric: exact_match\n"
    )  # fmt: skip
    with pytest.raises(TunelabError) as info:
        check_tasks(["gsm8k"], include_path=str(tasks))
    message = str(info.value)
    assert "Unknown lm_eval task gsm8k" in message
    assert "my_arith" in message and "gsm8k_local" in message
    assert "Hugging Face Hub" in message
    check_tasks(["my_arith"], include_path=str(tasks))  # a task of the include path needs no --data
    err = _error(capsys, "--model", "tiny-llama", "--tasks", "hellaswag")
    assert "Unknown lm_eval task hellaswag" in err


def test_missing_or_unfit_data_file(tmp_path, capsys):
    assert "gsm8k_local" in shipped_tasks()
    err = _error(capsys, "--model", "tiny-llama", "--tasks", "gsm8k_local", "--data", tmp_path / "absent.jsonl")
    assert "absent.jsonl' does not exist" in err
    err = _error(capsys, "--model", "tiny-llama", "--tasks", "gsm8k_local")
    assert "--data FILE" in err
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n")
    with pytest.raises(TunelabError, match="lacks answer, question"):
        local_task(shipped_tasks()["gsm8k_local"], wrong, tmp_path / "out")


def test_num_fewshot_shows_whole_worked_answers_as_earlier_turns(tmp_path, data):
    from tunelab.evaluation.lm_eval_bridge import run_lm_eval
    from tunelab.evaluation.models import load_eval_model

    model = load_eval_model("tiny-llama", device="cpu")
    report = run_lm_eval(model, ["gsm8k_local"], limit=1, num_fewshot=2, gen_kwargs="max_gen_toks=2", apply_chat_template=True,
                         data_file=str(data), output_dir=tmp_path / "out")  # fmt: skip
    assert "strict-match" in report.render() and report.to_dict()["scores"]
    sample = json.loads((tmp_path / "out" / "samples_gsm8k_local.jsonl").read_text().splitlines()[0])
    prompt = sample["arguments"][0][0]
    assert prompt.count("<|im_start|>user") == 3  # two shots and the question
    assert "#### 36" in prompt and "#### 2,000" in prompt  # the shots' worked answers, not just their numbers
