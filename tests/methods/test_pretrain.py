"""CausalLMPretrain: pretraining from a config and continued pretraining on raw text, held-out
perplexity, MFU, exact resume mid-epoch, checkpoints transformers loads, and its bad input."""

import json
from pathlib import Path

import pytest
import torch

from tunelab.config import compose_config
from tunelab.engine import train
from tunelab.errors import TunelabError



def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint / "state.ckpt", weights_only=True)["model"]

TEXT = "\n\n".join(
    f"{speaker}:\n{line}"
    for speaker, line in [
        ("First Citizen", "Before we proceed any further, hear me speak."), ("All", "Speak, speak."),
        ("First Citizen", "You are all resolved rather to die than to famish?"), ("All", "Resolved. resolved."),
        ("First Citizen", "First, you know Caius Marcius is chief enemy to the people."), ("All", "We know't, we know't."),
        ("First Citizen", "Let us kill him, and we'll have corn at our own price. Is't a verdict?"),
        ("All", "No more talking on't; let it be done: away, away!"),
    ] * 6
)  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "citizens.txt"
    path.write_text(TEXT)
    return path


def run(corpus: Path, out: Path, *extra: str):
    return train(compose_config([
        "method=lm_finetune/pretrain", "modelpool=CausalLMPool/tiny-llama", f"data.path={corpus}", "data.format=text",
        "data.val_fraction=0.15", f"data.cache_dir={out.parent / 'cache'}", "method.block_size=48",
        "method.dataloader_kwargs.batch_size=4", "method.max_epochs=50", "method.optimizer.lr=3e-3", "method.lr_scheduler.warmup_steps=2",
        "taskpool=perplexity", f"output_dir={out}", "progress_bar=false", "fabric.precision=32-true", *extra,
    ]))  # fmt: skip


def test_pretraining_from_a_config_lowers_heldout_perplexity_and_saves_a_transformers_model(corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    result = run(corpus, tmp_path / "scratch", "method.max_steps=12", "method.save_ckpt_type=hf")
    before, after = result.evaluations[0], result.evaluations[12]
    assert after["val/perplexity"] < 0.5 * before["val/perplexity"]
    summary = json.loads((tmp_path / "scratch/summary.json").read_text())
    assert summary["data"]["train"]["records"] == 48 and summary["data"]["val"]["examples"] >= 1
    header, *rows = (tmp_path / "scratch/metrics.csv").read_text().splitlines()
    mfu = [float(r.split(",")[header.split(",").index("train/mfu")]) for r in rows if r.split(",")[1]]
    assert mfu and all(0 < m < 1.5 for m in mfu)  # against the measured matmul speed of this machine
    model = AutoModelForCausalLM.from_pretrained(result.final_checkpoint)
    assert model.get_input_embeddings().weight.shape[0] > 49000  # the tokenizer's vocabulary, embeddings trained


def test_continued_pretraining_starts_from_the_model(corpus, tmp_path, tiny_base_model):
    result = run(corpus, tmp_path / "continued", f"modelpool.model_path={tiny_base_model}", "modelpool.config=null",
                 "method.max_steps=6", "data.cross_document_attention=false")  # fmt: skip
    from transformers import AutoModelForCausalLM

    from tunelab.config import DataConfig
    from tunelab.data import build_text_blocks
    from tunelab.models import CausalLMPool

    # The step-0 evaluation is the base model's own held-out loss on the same blocks.
    base = AutoModelForCausalLM.from_pretrained(tiny_base_model).eval()
    tokenizer = CausalLMPool(model_path=str(tiny_base_model)).load_tokenizer()
    cfg = DataConfig(path=str(corpus), format="text", val_fraction=0.15, cross_document_attention=False, cache_dir=str(tmp_path / "cache"))
    _, val, _ = build_text_blocks(cfg, tokenizer, 48)
    total = count = 0
    for block in val:  # each document piece alone: the same loss as the packed, attention-separated batch
        start = 0
        for length in block["segments"]:
            ids = torch.tensor([block["input_ids"][start : start + length]])
            start += length
            if length < 2:
                continue
            with torch.no_grad():
                logits = base(ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += length - 1
    assert result.evaluations[0]["val/loss"] == pytest.approx(total / count, rel=1e-4)
    assert result.evaluations[6]["val/loss"] < result.evaluations[0]["val/loss"]


def test_resume_mid_epoch_is_exact(corpus, tmp_path):
    exact = ("method.max_steps=5", "method.save_optimizer_state=true", "method.checkpoint_save_interval=step", "taskpool=dummy")
    full = run(corpus, tmp_path / "full", *exact)
    resumed = run(corpus, tmp_path / "resumed", *exact, f"method.ckpt_path={tmp_path / 'full/checkpoints/step-000002'}")
    assert resumed.state.global_step == 5
    a, b = weights(full.final_checkpoint), weights(resumed.final_checkpoint)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["method.block_size=8192", "data.val_fraction=0", "taskpool=dummy"], r"block_size=8192 is longer than the model's context length \(max_position_embeddings=4096\)"),
        (["data.format=alpaca"], "trains on raw text, and data.format=alpaca: set data.format=text"),
        (["data.cross_document_attention=false", "method.packing=false"], "needs packed rows: set method.packing=true"),
        (["method.block_size=1"], "block_size=1: a block needs at least 2 tokens"),
        (["data.text_field=body", "data.path=JSONL"], r"line 1: no text field 'body' \(data.text_field\)"),
    ],
)
def test_bad_input_is_refused_before_training(corpus, tmp_path, extra, message):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": "hello"}) + "\n")
    extra = [e.replace("JSONL", str(jsonl)) for e in extra]
    with pytest.raises(TunelabError, match=message):
        run(corpus, tmp_path / "bad", "method.max_steps=1", *extra)
    assert not (tmp_path / "bad/checkpoints").exists()
