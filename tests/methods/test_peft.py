"""PeftFinetuneSFT: LoRA, DoRA and IA3 train and save; adapters and merged models reload in
transformers / peft unchanged; resume is exact with adapter-only checkpoints."""

import json
from pathlib import Path

import pytest
import torch

from tunelab.config import compose_config
from tunelab.engine import train

DEMO_DATA = "pkg://tunelab/demo_data/gsm8k_demo.jsonl"
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "tie_word_embeddings": True}  # fmt: skip


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama saved as a Hugging Face folder, so peft can reload the same base."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **TINY)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(base: Path, out: Path, *extra: str):
    return train(compose_config([
        "method=lm_finetune/peftfinetune_sft", f"modelpool.model_path={base}", "modelpool.dtype=float32",
        f"data.path={DEMO_DATA}", "data.prompt_field=question", "data.completion_field=answer", "data.max_samples=16",
        f"data.cache_dir={out.parent / 'cache'}", "method.max_length=192", "method.dataloader_kwargs.batch_size=4",
        "method.optimizer.lr=1e-2", "method.peft_config.r=8", f"output_dir={out}", "progress_bar=false", "fabric.precision=32-true", *extra,
    ]))  # fmt: skip


def logits(model, tokenizer):
    ids = tokenizer("Natalia sold clips to 48 of her friends.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def test_lora_adapter_and_merged_model_reload_and_match(base_model, tmp_path, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = run(base_model, tmp_path / "lora", "method.max_steps=3", "method.save_ckpt_type=peft", "method.merge_and_unload=true")
    adapter = result.final_checkpoint
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    summary = json.loads((tmp_path / "lora/summary.json").read_text())
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"] / 2
    plain = logits(AutoModelForCausalLM.from_pretrained(base_model), tokenizer)
    with_adapter = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), adapter), tokenizer)
    merged = logits(AutoModelForCausalLM.from_pretrained(result.outputs["merged"]), tokenizer)
    assert (with_adapter - plain).abs().max() > 1e-3  # the adapter learned something
    torch.testing.assert_close(merged, with_adapter, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "variant",
    [
        ("method.peft_config.use_dora=true",),
        ("~method.peft_config", "+method.peft_config={_target_:peft.IA3Config,task_type:CAUSAL_LM,"
         "target_modules:[k_proj,v_proj,down_proj],feedforward_modules:[down_proj]}"),
    ],
    ids=["dora", "ia3"],
)
def test_dora_and_ia3_train_and_save(base_model, tmp_path, tokenizer, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = run(base_model, tmp_path / "v", "method.max_steps=2", "method.save_ckpt_type=peft", *variant)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), result.final_checkpoint)
    plain = logits(AutoModelForCausalLM.from_pretrained(base_model), tokenizer)
    assert (logits(reloaded, tokenizer) - plain).abs().max() > 1e-4


@pytest.mark.parametrize("ckpt_type", ["lightning", "peft"])
def test_lora_resume_is_exact_with_adapter_only_checkpoints(base_model, tmp_path, ckpt_type):
    exact = ("method.max_steps=6", "method.save_optimizer_state=true", "method.checkpoint_save_interval=step",
             f"method.save_ckpt_type={ckpt_type}")  # fmt: skip
    full = run(base_model, tmp_path / "full", *exact)
    state = torch.load(full.final_checkpoint / "state.ckpt", weights_only=True)
    if ckpt_type == "lightning":
        assert state["model"] and all("lora_" in key for key in state["model"])  # adapter weights only
    resumed = run(base_model, tmp_path / "resumed", *exact, f"method.ckpt_path={tmp_path / 'full/checkpoints/step-000003'}")

    def adapter(folder):
        if ckpt_type == "peft":
            from safetensors.torch import load_file

            return load_file(folder / "adapter_model.safetensors")
        return torch.load(folder / "state.ckpt", weights_only=True)["model"]

    a, b = adapter(full.final_checkpoint), adapter(resumed.final_checkpoint)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_adapters_under_autocast_keep_no_extra_input_copies_and_compute_the_same():
    """Skipping peft's input cast under autocast changes no number and keeps less for backward."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.models.adapters import adapters_follow_autocast
    from tunelab.models.kernels import use_fused_norm_and_mlp

    def lora_model():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        base = LlamaForCausalLM(config)
        use_fused_norm_and_mlp(base)  # as in training: the norms hand bf16 to the projections
        model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)  # a trained adapter, so its gradients reach lora_A
        return model

    plain, ours = lora_model(), lora_model()
    assert adapters_follow_autocast(ours) == 14
    ids = torch.randint(0, 320, (1, 300), generator=torch.Generator().manual_seed(0))
    results = []
    for model in (plain, ours):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, sum(storages.values())))
        assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))
    (loss_a, grads_a, saved_a), (loss_b, grads_b, saved_b) = results
    assert loss_b == loss_a
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=0, rtol=0, msg=name)
    assert saved_b < 0.9 * saved_a, (saved_b, saved_a)
    with torch.no_grad():  # without autocast the adapters still cast (fp32 here: nothing to do)
        torch.testing.assert_close(ours(input_ids=ids).logits, plain(input_ids=ids).logits)
