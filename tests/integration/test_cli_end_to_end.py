"""The real command line, in a subprocess, as a user runs it."""

import json
import subprocess
import sys

import pytest
from conftest import shared_data


def tunelab(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, cwd=cwd, timeout=900)


def test_quick_demo_prints_before_after_and_paths(tmp_path):
    done = tunelab("demo", "--quick", "--output-dir", str(tmp_path / "demo"))
    assert done.returncode == 0, done.stderr[-3000:]
    for line in ("held-out loss", "answers in GSM8K's format", "right final number", "answers that loop", "answer before:", "answer after:"):
        assert line in done.stdout, line
    for name in ("loss_curve.png", "metrics.csv", "summary.json", "demo.json"):
        assert (tmp_path / "demo" / name).exists()
    record = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert record["before"]["problems"] == record["after"]["problems"] == 8  # the quick demo's held-out split
    assert record["loss_after"] < record["loss_before"]


def test_bad_input_exits_non_zero_without_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n{"question": "c", "answer": \n')
    done = tunelab("train", "modelpool=CausalLMPool/tiny-llama", f"data.path={bad}", "data.prompt_field=question",
                   "data.completion_field=answer", f"output_dir={tmp_path / 'out'}")  # fmt: skip
    assert done.returncode == 1
    assert "bad.jsonl' line 2 is not valid JSON" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_smollm2_trains_on_gsm8k_and_the_hf_checkpoint_answers(tmp_path):
    """The real model: a few steps on GSM8K, then the saved folder loads with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train_file = shared_data("gsm8k", "train.jsonl")
    out = tmp_path / "gsm8k"
    done = tunelab(
        "train", "method=lm_finetune/fullfinetune_sft", "modelpool=CausalLMPool/smollm2-135m",
        f"data.path={train_file}", "data.format=prompt_completion", "data.prompt_field=question",
        "data.completion_field=answer", "data.max_samples=40", "data.val_fraction=0.2", "taskpool=heldout-loss",
        "taskpool.every_n_steps=0", f"output_dir={out}", "method.optimizer.lr=5e-5", "method.max_steps=4",
        "method.lr_scheduler.warmup_steps=1", "method.dataloader_kwargs.batch_size=8", "method.max_length=320",
        "method.save_ckpt_type=hf", "fabric.precision=auto", "progress_bar=false",  # bf16 where native
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    losses = summary["evaluations"]
    assert losses["4"]["val/loss"] < losses["0"]["val/loss"]  # held-out loss on unseen problems went down
    folder = summary["final_checkpoint"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "Tom has 3 apples and buys 5 more. How many apples does he have?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=48, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(answer.strip()) > 0
