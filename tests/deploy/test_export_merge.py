"""`export merge`: the merged folder computes what base + adapter computed, in every number format
it is asked for; a broken export fails verification; bad input is refused by name."""

import json

import pytest
import torch

from tests.conftest import TINY_LLAMA
from tunelab.errors import TunelabError, UsageError


def tiny_folder(path, tokenizer, tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **{**TINY_LLAMA, "tie_word_embeddings": tied})
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def lora_adapter(base_folder, out, **options):
    """A LoRA adapter with non-zero B (a trained one), saved where peft saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        init_lora_weights=False, **options)  # fmt: skip
    model = get_peft_model(base, config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.save_pretrained(out)
    return out


def _pair(tmp_path_factory, tokenizer, tied: bool):
    root = tmp_path_factory.mktemp("export-merge")
    tiny_folder(root / "base", tokenizer, tied=tied)
    return root / "base", lora_adapter(root / "base", root / "adapter")


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory, tokenizer):
    return _pair(tmp_path_factory, tokenizer, tied=True)


@pytest.fixture(scope="module")
def untied_base_and_adapter(tmp_path_factory, tokenizer):
    return _pair(tmp_path_factory, tokenizer, tied=False)


@pytest.mark.parametrize("pair", ["base_and_adapter", "untied_base_and_adapter"], ids=["tied", "untied"])
def test_merged_folder_reloads_with_transformers_and_matches_the_adapter_model(request, pair, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.deploy.export import export_merged

    base, adapter = request.getfixturevalue(pair)
    result = export_merged(str(adapter), tmp_path / "merged", base=str(base))
    assert result.passed and result.path == tmp_path / "merged"
    report = result.verification
    assert report["max_logit_difference"] < 1e-4 and report["greedy_identical"] == report["greedy_prompts"] == 8
    assert report["perplexity_export"] == pytest.approx(report["perplexity_source"], rel=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name in merged.state_dict())
    source = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    ids = torch.tensor([[1, 50, 600, 7000, 31, 9]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, source(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert json.loads((tmp_path / "merged/export.json").read_text())["passed"] is True


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_lower_precision_exports_are_judged_by_their_own_tolerance(base_and_adapter, tmp_path, dtype):
    from safetensors import safe_open

    from tunelab.deploy.export import export_merged

    base, adapter = base_and_adapter
    result = export_merged(str(adapter), tmp_path / dtype, base=str(base), dtype=dtype)
    assert result.passed, result.verification
    assert 0 < result.verification["max_logit_difference"] <= result.verification["tolerance"]["max_logit_difference"]
    with safe_open(tmp_path / dtype / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == getattr(torch, dtype)


def test_a_corrupted_export_fails_verification_and_is_kept_aside(base_and_adapter, tmp_path, monkeypatch):
    import tunelab.deploy.export as export

    base, adapter = base_and_adapter
    real_merge = export.merge

    def merge_then_break(model):
        merged = real_merge(model)
        with torch.no_grad():
            merged.model.layers[1].mlp.down_proj.weight.add_(0.05 * torch.randn_like(merged.model.layers[1].mlp.down_proj.weight))
        return merged

    monkeypatch.setattr(export, "merge", merge_then_break)
    result = export.export_merged(str(adapter), tmp_path / "merged", base=str(base))
    assert not result.passed
    assert not (tmp_path / "merged").exists() and result.path == tmp_path / "merged.unverified"
    assert json.loads((result.path / "export.json").read_text())["passed"] is False
    assert result.verification["max_logit_difference"] > 1e-3


def test_bad_inputs_are_refused_and_leave_nothing_at_the_output(base_and_adapter, tmp_path, tokenizer):
    from tunelab.deploy.export import export_merged

    base, adapter = base_and_adapter
    (tmp_path / "taken").mkdir()
    with pytest.raises(UsageError, match="already exists.*--overwrite"):
        export_merged(str(adapter), tmp_path / "taken", base=str(base))
    with pytest.raises(TunelabError, match="adapter without the config.yaml of a tunelab run, so its base is unknown.*--base"):
        export_merged(str(adapter), tmp_path / "orphan")
    other = tmp_path / "other-base"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **{**TINY_LLAMA, "hidden_size": 96, "num_attention_heads": 4})).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(TunelabError, match="(?i)shape|size mismatch"):
        export_merged(str(adapter), tmp_path / "mismatch", base=str(other))
    assert not (tmp_path / "orphan").exists() and not (tmp_path / "mismatch").exists()
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_qlora_run_is_merged_into_its_dequantized_base(tiny_base_model, tmp_path, quantization):
    """What was trained is the 4-bit base plus the adapter: merged into the dequantized weights the
    export matches it far closer than the adapter merged into the original full-precision weights."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e .[dev] installs it)")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.methods.test_qlora import sft
    from tunelab.config import compose_config
    from tunelab.deploy.export import export_merged
    from tunelab.engine import train

    run = tmp_path / "qlora"
    train(compose_config(sft(tiny_base_model, run, f"modelpool.quantization={quantization}", "method.max_steps=2")))
    result = export_merged(str(run), tmp_path / "merged")
    assert result.passed, result.verification
    assert result.checks["base"] == {"quantization": quantization, "merged_into": "the dequantized base", "judged_as": "bfloat16"}
    checkpoint = json.loads((run / "summary.json").read_text())["final_checkpoint"]
    naive = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_model), checkpoint).merge_and_unload().eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[1, 50, 600, 7000, 31, 9, 44, 45]])
    from tunelab.deploy.export import load_quantized_source, quantized_run

    source = load_quantized_source(*quantized_run(str(run))).model
    with torch.no_grad():
        trained, ours, theirs = (m(input_ids=ids).logits.float() for m in (source, merged, naive))
    # int8 layers also quantize their inputs, which no float weights reproduce: closer, not twice as close
    assert (ours - trained).abs().max() < (0.5 if quantization == "nf4" else 1.0) * (theirs - trained).abs().max()


def test_other_mergeable_families_merge_too(base_and_adapter, tmp_path):
    """IA3 (a scaling vector, not a low-rank pair) goes through the same verified merge."""
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.deploy.export import export_merged

    base, _ = base_and_adapter
    torch.manual_seed(2)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                                                  feedforward_modules=["down_proj"], init_ia3_weights=False))  # fmt: skip
    model.save_pretrained(tmp_path / "ia3")
    result = export_merged(str(tmp_path / "ia3"), tmp_path / "merged", base=str(base), verify_limit=4)
    assert result.passed and result.verification["max_logit_difference"] < 1e-4
