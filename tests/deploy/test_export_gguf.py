"""`export gguf`: Llama GGUF files that transformers' GGUF loader and llama.cpp read back as the
source model (tied and untied heads, grouped-query attention), the rotary permutation that makes
that so, LoRA adapter files that llama.cpp applies, and refusals that name what to do."""

import json

import pytest
import torch

from tests.deploy.test_export_merge import lora_adapter, tiny_folder
from tunelab.deploy import llama_cpp
from tunelab.errors import TunelabError, UsageError

needs_llama_cpp = pytest.mark.skipif(llama_cpp.available() is not None, reason=f"{llama_cpp.available()}")
IDS = [1, 50, 600, 7000, 31, 9, 44, 45, 900, 12]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("export-gguf")
    tiny_folder(root / "tied", tokenizer, tied=True)
    tiny_folder(root / "untied", tokenizer, tied=False, seed=3)
    lora_adapter(root / "tied", root / "adapter")
    return root


def logits_of(folder, ids=IDS, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_an_f32_gguf_reads_back_in_transformers_with_the_same_logits(models, tmp_path, head):
    from tunelab.deploy.gguf import write_model_gguf

    info = write_model_gguf(models / head, tmp_path / "m.gguf", "f32")
    assert info["tensor_types"] == {"F32": 20 if head == "tied" else 21}  # an untied head is written as output.weight
    assert info["pre_tokenizer"] == "gpt-2"
    torch.testing.assert_close(logits_of(tmp_path, gguf_file="m.gguf"), logits_of(models / head), atol=1e-5, rtol=1e-5)


def test_without_the_rotary_permutation_both_readers_load_the_file_and_verification_fails(models, tmp_path, monkeypatch):
    """The classic mistake: the file loads, the numbers are wrong. transformers' loader undoes a
    permutation that was never done, and the verification says so."""
    import tunelab.deploy.gguf as gguf_module
    from tunelab.deploy.export import export_gguf

    monkeypatch.setattr(gguf_module, "rope_permute", lambda weight, heads: weight)
    result = export_gguf(str(models / "tied"), tmp_path / "m.gguf", "f32", llama_cpp=False)
    assert not result.passed and result.path.name == "m.gguf.unverified"
    assert result.verification["max_logit_difference"] > 1e-2
    assert not (tmp_path / "m.gguf").exists()
    assert json.loads((tmp_path / "m.gguf.unverified.json").read_text())["passed"] is False


def test_a_q8_0_export_of_a_lora_run_passes_with_its_tolerance_and_keeps_the_tokenizer(models, tmp_path):
    import gguf

    from tunelab.deploy.export import export_gguf

    result = export_gguf(str(models / "adapter"), tmp_path / "m.gguf", "q8_0", base=str(models / "tied"), llama_cpp=False)
    assert result.passed and result.path == tmp_path / "m.gguf"
    assert 0 < result.verification["max_logit_difference"] < result.verification["tolerance"]["max_logit_difference"]
    assert result.checks["written"]["tensor_types"] == {"Q8_0": 15, "F32": 5}
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields = reader.fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert tokens[2] == "<|im_end|>" and types[2] == gguf.TokenType.CONTROL and types[1000] == gguf.TokenType.NORMAL
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2 and fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert json.loads((tmp_path / "m.gguf.json").read_text())["verification"]["passed"] is True


@needs_llama_cpp
def test_llama_cpp_runs_the_gguf_as_the_source_computes_it(models, tmp_path):
    from tunelab.deploy.export import export_gguf

    result = export_gguf(str(models / "untied"), tmp_path / "m.gguf", "f32", llama_cpp=True)
    check = result.checks["llama_cpp"]
    assert result.passed and check["passed"], check
    assert check["tokenizer_identical"] == "16/16"
    assert check["max_logit_difference"] < 1e-3 and check["top1_agreement"] > 0.999
    # a random model's greedy path meets near-ties that float32 rounding order can flip
    assert check["greedy_prompts"] == 8 and check["greedy_identical"] >= 7
    assert isinstance(check["chat"]["answer"], str) and check["chat"]["question"]


@needs_llama_cpp
def test_a_lora_adapter_file_applied_by_llama_cpp_gives_the_adapter_models_predictions(models, tmp_path):
    from tunelab.deploy.export import export_adapter_gguf
    from tunelab.deploy.gguf import write_model_gguf
    from tunelab.deploy.llama_cpp import LlamaCppScorer

    result = export_adapter_gguf(str(models / "adapter"), tmp_path / "adapter.gguf", base=str(models / "tied"))
    assert result.passed, result.verification
    assert result.verification["max_logit_difference"] < 1e-3 and result.verification["greedy_identical"] == 8
    assert result.checks["written"] == {"tensors": 28, "rank": 4, "alpha": 8.0, "scaling": 2.0}
    write_model_gguf(models / "tied", tmp_path / "base.gguf", "f32")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    source = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models / "tied"), models / "adapter").eval()
    with torch.no_grad():
        expected = source(input_ids=torch.tensor([IDS])).logits[0]
    with_adapter = LlamaCppScorer(tmp_path / "base.gguf", adapter=tmp_path / "adapter.gguf", context=256, threads=1).logits(IDS)
    base_only = LlamaCppScorer(tmp_path / "base.gguf", context=256, threads=1).logits(IDS)
    assert float((with_adapter - expected).abs().max()) < 1e-3
    assert float((base_only - expected).abs().max()) > 1e-2  # the adapter changes the answer, and llama.cpp applied it


def test_bad_inputs_name_what_to_do(models, tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from tunelab.deploy.export import export_adapter_gguf, export_gguf

    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(TunelabError, match="GPT2LMHeadModel; tunelab writes GGUF for LlamaForCausalLM"):
        export_gguf(str(tmp_path / "gpt2"), tmp_path / "gpt2.gguf")
    (tmp_path / "taken.gguf").write_text("x")
    with pytest.raises(UsageError, match="already exists.*--overwrite"):
        export_gguf(str(models / "tied"), tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_text() == "x"
    with pytest.raises(UsageError, match="--type q3_k is not one tunelab writes"):
        export_gguf(str(models / "tied"), tmp_path / "q.gguf", "q3_k")
    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(models / "tied"), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(TunelabError, match="DoRA.*Merge it"):
        export_adapter_gguf(str(tmp_path / "dora"), tmp_path / "dora.gguf", base=str(models / "tied"), verify=False)
    with pytest.raises(UsageError, match="not an adapter folder"):
        export_adapter_gguf(str(models / "tied"), tmp_path / "none.gguf")
    assert not (tmp_path / "gpt2.gguf").exists() and not (tmp_path / "dora.gguf").exists() and not list(tmp_path.glob(".*partial*"))
