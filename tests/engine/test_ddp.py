"""Data parallelism through Lightning Fabric on CPU (gloo): two processes with batch b follow one
process with batch 2b; only rank 0 writes; a DDP run resumes exactly."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

COMMON = [
    "modelpool=CausalLMPool/tiny-llama", "data.path=pkg://tunelab/demo_data/gsm8k_demo.jsonl",
    "data.prompt_field=question", "data.completion_field=answer", "data.max_samples=32", "method.max_length=192",
    "method.max_steps=6", "method.optimizer.lr=1e-3", "method.lr_scheduler.warmup_steps=2",
    "method.fix_token_embedding=false", "method.save_optimizer_state=true", "method.checkpoint_save_interval=step",
    "method.checkpoint_save_frequency=3", "fabric.accelerator=cpu", "fabric.precision=32-true", "progress_bar=false",
]  # fmt: skip


def tunelab_train(out: Path, *extra: str) -> None:
    done = subprocess.run([sys.executable, "-m", "tunelab", "train", *COMMON, f"output_dir={out}", *extra],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def losses(out: Path) -> list[float]:
    with (out / "metrics.csv").open() as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f)]


def final_weights(out: Path) -> dict:
    return torch.load(out / "checkpoints/step-000006/state.ckpt", weights_only=True)["model"]


def test_two_processes_match_one_with_the_double_batch_and_resume(tmp_path):
    tunelab_train(tmp_path / "single", "method.dataloader_kwargs.batch_size=4")
    tunelab_train(tmp_path / "ddp", "fabric=ddp", "fabric.devices=2", "method.dataloader_kwargs.batch_size=2")
    single, ddp = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(ddp) == 6  # rank 0 alone wrote one row per step
    assert ddp == pytest.approx(single, rel=1e-4)
    a, b = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert len(list((tmp_path / "ddp/tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (tmp_path / "ddp/checkpoints").iterdir()) == ["latest", "step-000003", "step-000006"]

    tunelab_train(tmp_path / "resumed", "fabric=ddp", "fabric.devices=2", "method.dataloader_kwargs.batch_size=2",
                  f"method.ckpt_path={tmp_path / 'ddp/checkpoints/step-000003'}")  # fmt: skip
    resumed = final_weights(tmp_path / "resumed")
    for key in b:
        torch.testing.assert_close(resumed[key], b[key], rtol=0, atol=0)

