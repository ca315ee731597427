"""The gsm8k and generation task pools inside a training run."""

import json

import pytest

from tunelab.config import compose_config
from tunelab.engine import train
from tunelab.errors import TunelabError

DEMO_DATA = "pkg://tunelab/demo_data/gsm8k_demo.jsonl"


def overrides(out, *extra):
    return [
        "modelpool=CausalLMPool/tiny-llama", f"data.path={DEMO_DATA}", "data.prompt_field=question", "data.completion_field=answer",
        "data.max_samples=8", f"data.cache_dir={out.parent / 'cache'}", "method.max_length=192", "method.dataloader_kwargs.batch_size=4",
        "method.max_steps=2", f"output_dir={out}", "progress_bar=false", "fabric.precision=32-true", *extra,
    ]  # fmt: skip


def test_gsm8k_taskpool_scores_generated_answers_before_and_after(tmp_path):
    problems = tmp_path / "heldout.jsonl"
    problems.write_text("".join(json.dumps({"question": f"What is {a} + 1?", "answer": f"#### {a + 1}"}) + "\n" for a in range(3)))
    result = train(compose_config(overrides(tmp_path / "run", "taskpool=gsm8k", f"taskpool.path={problems}", "taskpool.max_new_tokens=4")))
    assert sorted(result.evaluations) == [0, 2]  # at the start and at the end
    scores = result.evaluations[2]
    for key in ("val/gsm8k", "val/gsm8k_flexible", "val/gsm8k_format", "val/completion_tokens", "val/unfinished"):
        assert 0 <= scores[key] <= 4
    assert scores["val/completion_tokens"] <= 4
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert "val/gsm8k" in header


def test_generation_taskpool_with_rouge_reads_the_val_path(tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"question": "Say hi", "answer": "hi there"}) + "\n" for _ in range(2)))
    result = train(compose_config(overrides(tmp_path / "run", "taskpool=generation", f"data.val_path={val}", "taskpool.metrics=[rouge]",
                                            "taskpool.max_new_tokens=3", "taskpool.at_start=false")))  # fmt: skip
    assert {"val/rouge1", "val/rouge2", "val/rougeL"} <= set(result.evaluations[2])


def test_generation_taskpool_without_prompts_says_what_to_set(tmp_path):
    with pytest.raises(TunelabError, match="taskpool.path=FILE"):
        train(compose_config(overrides(tmp_path / "run", "taskpool=gsm8k")))
