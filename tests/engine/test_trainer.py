"""The engine on a tiny random Llama: exact resume, token-weighted accumulation, checkpoints,
NaN guard, output-folder safety."""

import contextlib
import json
from pathlib import Path

import pytest
import torch

from tunelab.config import compose_config
from tunelab.engine import train
from tunelab.errors import TunelabError

DEMO_DATA = "pkg://tunelab/demo_data/gsm8k_demo.jsonl"


def overrides(out: Path, *extra: str) -> list[str]:
    return [
        "modelpool=CausalLMPool/tiny-llama", f"data.path={DEMO_DATA}", "data.prompt_field=question",
        "data.completion_field=answer", "data.max_samples=16", f"data.cache_dir={out.parent / 'cache'}",
        "method.max_length=192", "method.dataloader_kwargs.batch_size=4", "method.optimizer.lr=1e-3",
        "method.lr_scheduler.warmup_steps=2", "method.fix_token_embedding=false", f"output_dir={out}",
        "progress_bar=false", "fabric.precision=32-true", *extra,
    ]  # fmt: skip


def run(out: Path, *extra: str):
    return train(compose_config(overrides(out, *extra)))


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state_file = checkpoint / "state.ckpt"
    if (checkpoint / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(checkpoint / "model.safetensors")
    return torch.load(state_file, weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


EXACT = ("method.max_steps=6", "method.save_optimizer_state=true", "method.checkpoint_save_interval=step")


def test_resume_from_a_checkpoint_ends_with_the_same_weights(tmp_path):
    # 16 examples / batch 4 = 4 steps an epoch: step 3 is mid-epoch and step 6 is in epoch 2.
    full = run(tmp_path / "full", *EXACT)
    assert full.state.global_step == 6 and full.state.epoch == 1
    resumed = run(tmp_path / "resumed", *EXACT, f"method.ckpt_path={tmp_path / 'full/checkpoints/step-000003'}")
    assert resumed.state.global_step == 6
    assert_same_weights(weights(full.final_checkpoint), weights(resumed.final_checkpoint))


@contextlib.contextmanager
def during_step(step: int, action):
    """Call ``action`` inside optimizer step ``step`` (after its backward pass) of the runs within."""
    import tunelab.engine.trainer as trainer

    real_grad_norm, calls = trainer._grad_norm, {"n": 0}

    def hooked(parameters):
        calls["n"] += 1
        if calls["n"] == step:
            action()
        return real_grad_norm(parameters)

    trainer._grad_norm = hooked
    try:
        yield
    finally:
        trainer._grad_norm = real_grad_norm


def test_interrupted_run_resumes_in_place_exactly(tmp_path):
    full = run(tmp_path / "full", *EXACT)

    def crash():
        raise KeyboardInterrupt  # the process dies mid-step

    with during_step(5, crash), pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crashed", *EXACT)
    latest = (tmp_path / "crashed/checkpoints/latest").read_text().strip()
    assert latest == "step-000004"
    resumed = run(tmp_path / "crashed", *EXACT, f"method.ckpt_path={tmp_path / 'crashed/checkpoints'}")
    assert_same_weights(weights(full.final_checkpoint), weights(resumed.final_checkpoint))
    steps = [int(line.split(",")[0]) for line in (tmp_path / "crashed/metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # one row per step, no duplicates


def test_sigterm_stops_after_the_step_with_a_checkpoint_that_resumes_exactly(tmp_path):
    # The board's Stop button: SIGTERM mid-step 4 (checkpoints every 100 steps, so none would exist)
    # finishes step 4, writes its checkpoint and returns; resuming in place ends as the full run.
    import os
    import signal

    exact = ("method.max_steps=6", "method.save_optimizer_state=true", "method.checkpoint_save_interval=step",
             "method.checkpoint_save_frequency=100")  # fmt: skip
    full = run(tmp_path / "full", *exact)
    with during_step(4, lambda: os.kill(os.getpid(), signal.SIGTERM)):
        stopped = run(tmp_path / "stopped", *exact)
    assert stopped.stopped and stopped.state.global_step == 4
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is the run's only
    assert (tmp_path / "stopped/checkpoints/latest").read_text().strip() == "step-000004"
    summary = json.loads((tmp_path / "stopped/summary.json").read_text())
    assert summary["stopped"] is True and summary["global_step"] == 4
    marker = json.loads((tmp_path / "stopped/run.json").read_text())
    assert marker["total_steps"] == 6 and marker["estimate"]["seconds_per_step"] > 0
    resumed = run(tmp_path / "stopped", *exact, f"method.ckpt_path={tmp_path / 'stopped/checkpoints'}")
    assert not resumed.stopped and resumed.state.global_step == 6
    assert json.loads((tmp_path / "stopped/run.json").read_text())["started"] == marker["started"]
    assert_same_weights(weights(full.final_checkpoint), weights(resumed.final_checkpoint))


def test_keep_last_checkpoints_deletes_older_step_folders_as_it_goes(tmp_path):
    result = run(tmp_path / "kept", "method.max_steps=5", "method.checkpoint_save_interval=step", "method.keep_last_checkpoints=2")
    folders = sorted(p.name for p in (tmp_path / "kept" / "checkpoints").iterdir() if p.is_dir())
    assert folders == ["step-000004", "step-000005"] and result.final_checkpoint.name == "step-000005"
    from tunelab.engine.checkpoint import prune_checkpoints

    (tmp_path / "kept" / "checkpoints" / "latest").write_text("step-000004\n")  # the one latest names survives any pruning
    assert [p.name for p in prune_checkpoints(tmp_path / "kept" / "checkpoints", 1)] == []


def test_gradient_accumulation_is_token_weighted(tmp_path):
    sgd = ("method.optimizer._target_=torch.optim.SGD", "method.optimizer.lr=1.0", "method.optimizer.weight_decay=0",
           "method.lr_scheduler=null", "method.max_steps=1", "data.shuffle=false")  # fmt: skip
    one_batch = run(tmp_path / "b4", *sgd, "method.dataloader_kwargs.batch_size=4")
    accumulated = run(tmp_path / "b1x4", *sgd, "method.dataloader_kwargs.batch_size=1", "method.accumulate_grad_batches=4")
    a, b = weights(one_batch.final_checkpoint), weights(accumulated.final_checkpoint)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # The examples carry different numbers of supervised tokens, so averaging per-micro-batch
    # means (the bug this guards against) would have given a different update.
    assert len({json.dumps(r) for r in one_batch.data_report["train"].values()}) > 0
    counts = [sum(1 for t in ex["labels"][1:] if t != -100) for ex in _first_examples(tmp_path, 4)]
    assert len(set(counts)) > 1


def _first_examples(tmp_path, n):
    from omegaconf import OmegaConf

    from tunelab.config import DataConfig
    from tunelab.data import build_datasets
    from tunelab.models import CausalLMPool

    cfg = compose_config(overrides(tmp_path / "x"))
    tokenizer = CausalLMPool(**{k: v for k, v in OmegaConf.to_container(cfg.modelpool).items() if k != "_target_"}).load_tokenizer()
    train_set, _, _ = build_datasets(DataConfig(**OmegaConf.to_container(cfg.data)), tokenizer, 192)
    return [train_set[i] for i in range(n)]


def test_hf_checkpoint_loads_with_transformers_and_resumes(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run(tmp_path / "hf", "method.max_steps=2", "method.save_ckpt_type=hf", "method.save_optimizer_state=true")
    folder = result.final_checkpoint
    assert (folder / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("How many apples?", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    resumed = run(tmp_path / "hf2", "method.max_steps=3", "method.save_ckpt_type=hf", f"method.ckpt_path={folder}")
    assert resumed.state.global_step == 3


def test_limits_whichever_comes_first(tmp_path):
    by_epochs = run(tmp_path / "e", "method.max_epochs=2", "method.max_steps=100")
    assert (by_epochs.state.global_step, by_epochs.state.epoch) == (8, 2)
    capped = run(tmp_path / "c", "method.max_epochs=2", "method.max_steps_per_epoch=3")
    assert (capped.state.global_step, capped.state.epoch) == (6, 2)
    folders = sorted(p.name for p in (tmp_path / "c/checkpoints").iterdir() if p.is_dir())
    assert folders == ["step-000003", "step-000006"]  # one per epoch


def test_run_writes_metrics_plot_and_tensorboard(tmp_path):
    result = run(tmp_path / "m", "method.max_steps=3", "taskpool=heldout-loss", "data.val_fraction=0.25", "taskpool.every_n_steps=2")
    header = (tmp_path / "m/metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/supervised_tokens_per_s", "val/loss"):
        assert column in header
    assert sorted(result.evaluations) == [0, 2, 3]
    assert result.loss_curve is not None and result.loss_curve.stat().st_size > 1000
    assert list((tmp_path / "m/tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((tmp_path / "m/summary.json").read_text())
    assert summary["global_step"] == 3 and summary["supervised_tokens_per_s"] > 0


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from tunelab.methods import FullFinetuneSFT

    real_loss = FullFinetuneSFT.loss
    calls = {"n": 0}

    def loss_that_explodes(self, model, batch):
        calls["n"] += 1
        loss, n, extra = real_loss(self, model, batch)
        return (loss * float("nan"), n, extra) if calls["n"] == 3 else (loss, n, extra)

    monkeypatch.setattr(FullFinetuneSFT, "loss", loss_that_explodes)
    with pytest.raises(TunelabError, match=r"became nan at step 3.*step-000002"):
        run(tmp_path / "nan", "method.max_steps=5", "method.checkpoint_save_interval=step")
    assert (tmp_path / "nan/checkpoints/latest").read_text().strip() == "step-000002"
    assert weights(tmp_path / "nan/checkpoints/step-000002")


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import lightning.fabric

    real_save = lightning.fabric.Fabric.save
    calls = {"n": 0}

    def save_then_die(self, path, state, filter=None):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path).write_bytes(b"partial")
            raise OSError("disk full")
        return real_save(self, path, state, filter=filter)

    monkeypatch.setattr(lightning.fabric.Fabric, "save", save_then_die)
    with pytest.raises(OSError):
        run(tmp_path / "w", "method.max_steps=3", "method.checkpoint_save_interval=step")
    checkpoints = tmp_path / "w/checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-000001"
    assert not (checkpoints / "step-000002").exists()
    assert weights(checkpoints / "step-000001")


def test_output_dir_with_another_run_is_refused(tmp_path):
    run(tmp_path / "o", "method.max_steps=1")
    with pytest.raises(TunelabError, match="already holds a run.*overwrite=true"):
        run(tmp_path / "o", "method.max_steps=1")
    assert run(tmp_path / "o", "method.max_steps=1", "overwrite=true").state.global_step == 1


def test_ckpt_path_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(TunelabError, match="is not a tunelab checkpoint"):
        run(tmp_path / "r", f"method.ckpt_path={tmp_path / 'junk'}")
    with pytest.raises(TunelabError, match="does not exist"):
        run(tmp_path / "r", f"method.ckpt_path={tmp_path / 'nowhere'}")


def test_a_run_that_fails_during_setup_does_not_claim_the_output_dir(tmp_path):
    with pytest.raises(TunelabError, match="does not exist"):
        run(tmp_path / "o", "data.path=/nowhere/train.jsonl")
    assert not (tmp_path / "o/run.json").exists()
    assert run(tmp_path / "o", "method.max_steps=1").state.global_step == 1


def test_packing_and_chunked_loss_train_like_the_reference_path(tmp_path):
    """The fast defaults (packed rows, supervised-only chunked loss) take the same steps as padded
    batches with full logits: same per-step losses and token counts, same weights after 3 steps.
    So do packed rows padded at their end to a multiple of 64 tokens (the padding is not counted)."""
    import csv

    common = ("method.max_steps=3", "data.shuffle=false", "method.lr_scheduler=null", "taskpool=heldout-loss",
              "data.val_fraction=0.25", "taskpool.every_n_steps=0")  # fmt: skip
    fast = run(tmp_path / "fast", *common)
    reference = run(tmp_path / "reference", *common, "method.packing=false", "method.chunked_loss=false")
    padded_rows = run(tmp_path / "padded_rows", *common, "method.pad_to_multiple_of=64")

    def rows(out):
        with open(out / "metrics.csv") as f:
            return [r for r in csv.DictReader(f) if r["train/loss"]]

    for other in (reference, padded_rows):
        for a, b in zip(rows(fast.output_dir), rows(other.output_dir), strict=True):
            assert float(a["train/loss"]) == pytest.approx(float(b["train/loss"]), rel=1e-5)
            assert float(a["train/tokens"]) == float(b["train/tokens"])
            assert float(a["train/supervised_tokens"]) == float(b["train/supervised_tokens"])
        assert fast.evaluations[3]["val/loss"] == pytest.approx(other.evaluations[3]["val/loss"], rel=1e-5)
        a, b = weights(fast.final_checkpoint), weights(other.final_checkpoint)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_summary_records_the_estimate_next_to_what_the_run_measured(tmp_path):
    result = run(tmp_path / "o", "method.max_steps=2", "data.group_by_length=true")
    summary = json.loads((result.output_dir / "summary.json").read_text())
    estimate = summary["estimate"]
    assert estimate["parameters"] == estimate["trainable"] > 0  # full fine-tuning, embeddings not frozen
    assert estimate["peak_gib"] > 0 and estimate["seconds_per_step"] > 0
    assert estimate["measured_peak_gib"] > 0 and estimate["measured_seconds_per_step"] > 0


def test_logged_grad_norm_is_measured_before_clipping(tmp_path):
    """The logged norm is the gradient's own, not the clipped one (which never exceeds the limit)."""
    import csv

    result = run(tmp_path / "o", "method.max_steps=2", "method.gradient_clip_val=1e-3", "method.optimizer.lr=1e-3")
    with open(result.metrics_csv) as f:
        norms = [float(r["train/grad_norm"]) for r in csv.DictReader(f) if r["train/grad_norm"]]
    assert len(norms) == 2 and min(norms) > 1e-2


@pytest.mark.compile
def test_compiled_decoder_layers_train_like_eager(tmp_path):
    common = ("method.max_steps=2", "data.shuffle=false", "method.lr_scheduler=null")
    from torch._dynamo.utils import counters

    eager = run(tmp_path / "eager", *common, "method.compile=false")
    graphs = counters["stats"]["unique_graphs"]
    compiled = run(tmp_path / "compiled", *common)  # compiled by default
    assert counters["stats"]["unique_graphs"] > graphs
    a, b = weights(eager.final_checkpoint), weights(compiled.final_checkpoint)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_compile_without_a_cpu_compiler_trains_uncompiled(monkeypatch, caplog):
    from tunelab.models import kernels

    monkeypatch.setattr(kernels.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    layer = torch.nn.Linear(2, 2)
    assert kernels.compile_decoder_layers(layer) == 0
    assert layer._compiled_call_impl is None and "needs a C++ compiler" in caplog.text
