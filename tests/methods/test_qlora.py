"""QLoRA and 8-bit bases through bitsandbytes (its CPU build): training, the merge onto the
full-precision base and its logit check, and the errors around quantised loading."""

import json
import sys
from pathlib import Path

import pytest
import torch

from tunelab.config import compose_config
from tunelab.engine import train
from tunelab.errors import TunelabError

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e .[dev] installs it)")

DEMO_DATA = "pkg://tunelab/demo_data/gsm8k_demo.jsonl"
TEXT = "Natalia sold clips to 48 of her friends in April."


@pytest.fixture(scope="module")
def base_model(tiny_base_model) -> Path:
    return tiny_base_model


def sft(base: Path, out: Path, *extra: str) -> list[str]:
    return [
        "method=lm_finetune/peftfinetune_sft", "modelpool=CausalLMPool/tiny-llama", f"modelpool.model_path={base}",
        f"data.path={DEMO_DATA}", "data.prompt_field=question", "data.completion_field=answer", "data.max_samples=8",
        f"data.cache_dir={out.parent / 'cache'}", "method.max_length=96", "method.dataloader_kwargs.batch_size=4",
        "method.optimizer.lr=1e-2", "method.lr_scheduler=null", "method.peft_config.r=8", "method.save_ckpt_type=peft",
        f"output_dir={out}", "progress_bar=false", "fabric.precision=32-true", *extra,
    ]  # fmt: skip


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_qlora_trains_and_merges_onto_the_full_precision_base(base_model, tmp_path, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.models.pool import quantization_config

    result = train(compose_config(sft(base_model, tmp_path / "q", "modelpool.quantization=nf4", "method.max_steps=2", "method.merge_and_unload=true")))
    losses = [float(line.split(",")[1]) for line in (tmp_path / "q/metrics.csv").read_text().splitlines()[1:] if line.split(",")[1]]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    summary = json.loads((tmp_path / "q/summary.json").read_text())
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"] / 4

    full = AutoModelForCausalLM.from_pretrained(base_model)
    quantized = AutoModelForCausalLM.from_pretrained(base_model, quantization_config=quantization_config("nf4"))
    assert type(quantized.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    quantized_base = logits(quantized, tokenizer)
    quantization_error = (logits(full, tokenizer) - quantized_base).abs().max()

    merged = logits(AutoModelForCausalLM.from_pretrained(result.outputs["merged"]), tokenizer)
    exact = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), result.final_checkpoint), tokenizer)
    torch.testing.assert_close(merged, exact, rtol=0, atol=1e-4)  # the merge itself is exact in full precision
    qlora = logits(PeftModel.from_pretrained(quantized, result.final_checkpoint), tokenizer)
    assert (merged - qlora).abs().max() <= 2 * quantization_error + 1e-3  # what remains is the base's rounding
    assert (qlora - quantized_base).abs().max() > 1e-4  # and the adapter learned something (PeftModel wraps quantized in place)
    check = json.loads((result.outputs["merged"] / "merge_check.json").read_text())
    assert check["max_logit_difference"] == pytest.approx(float((merged - qlora).abs().max()), abs=1e-3)


def test_int8_base_trains_an_adapter(base_model, tmp_path):
    result = train(compose_config(sft(base_model, tmp_path / "i8", "modelpool.quantization=int8", "method.max_steps=1")))
    assert (result.final_checkpoint / "adapter_model.safetensors").exists()


def test_full_fine_tuning_of_a_quantised_base_is_refused_before_loading(base_model, tmp_path):
    with pytest.raises(TunelabError, match="quantization=nf4.*trains only through an adapter.*peftfinetune_sft"):
        train(compose_config([
            "method=lm_finetune/fullfinetune_sft", "modelpool=CausalLMPool/tiny-llama", f"modelpool.model_path={base_model}",
            "modelpool.quantization=nf4", f"data.path={DEMO_DATA}", "data.prompt_field=question", "data.completion_field=answer",
            f"output_dir={tmp_path / 'full'}", "progress_bar=false",
        ]))  # fmt: skip


def test_quantisation_without_the_backend_or_with_a_bad_value_says_what_to_do(base_model, monkeypatch):
    from tunelab.models import CausalLMPool

    with pytest.raises(TunelabError, match="quantization='nf3' is not one of: null, nf4, int8"):
        CausalLMPool(model_path=str(base_model), quantization="nf3")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, as where it is not installed
    with pytest.raises(TunelabError, match="bitsandbytes, which is not installed.*pip install"):
        CausalLMPool(model_path=str(base_model), quantization="nf4").load_model()


@pytest.mark.parametrize("quantization, threshold", [("nf4", 2**20), ("null", 32 * 2**20)])
def test_quantised_base_on_cpu_gets_the_small_mmap_threshold(base_model, tmp_path, monkeypatch, quantization, threshold):
    """The weights a quantised base dequantises in every pass must not fragment the heap: with one,
    the engine sets glibc's mmap threshold to 1 MiB before loading; without one, to 32 MiB."""
    import tunelab.engine.trainer as trainer

    class Stop(Exception):
        pass

    seen = []

    def record(mmap_threshold):
        seen.append(mmap_threshold)
        raise Stop

    monkeypatch.setattr(trainer, "tune_cpu_allocator", record)
    with pytest.raises(Stop):
        train(compose_config(sft(base_model, tmp_path / "alloc", f"modelpool.quantization={quantization}", "method.max_steps=1")))
    assert seen == [threshold]
