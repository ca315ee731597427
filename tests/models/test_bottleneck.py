"""Bottleneck adapters on a tiny random Llama: identity at zero init, only adapters (and a reward
model's score head) train, exact save/reload, switching off, placement, refusals and bf16 autocast."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from tunelab.errors import TunelabError
from tunelab.models.bottleneck import (
    BottleneckConfig,
    add_bottleneck_adapters,
    is_bottleneck_config,
    is_bottleneck_folder,
    load_bottleneck_adapters,
)

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "tie_word_embeddings": True}  # fmt: skip
TEXT = "Natalia sold clips to 48 of her friends in April."
FILES = {"bottleneck_config.json", "bottleneck_adapter.safetensors"}


def tiny(tokenizer, cls=LlamaForCausalLM, **extra):
    """The same random model every call (a fresh base to reload onto)."""
    torch.manual_seed(0)
    return cls(LlamaConfig(vocab_size=len(tokenizer), **{**TINY, **extra})).eval()


@pytest.fixture(scope="module")
def ids(tokenizer) -> torch.Tensor:
    return tokenizer(TEXT, return_tensors="pt")["input_ids"]


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def step(model, ids, loss_of=lambda model, ids: model(input_ids=ids, labels=ids).loss) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss_of(model, ids).backward()
    optimizer.step()


def adapted_blocks(model) -> list[str]:
    return [name.removesuffix(".bottleneck_adapter") for name, _ in model.named_modules() if name.endswith(".bottleneck_adapter")]


def test_zero_init_is_the_identity_and_the_default_init_is_near_it(tokenizer, ids):
    base = logits(tiny(tokenizer), ids)
    assert torch.equal(logits(add_bottleneck_adapters(tiny(tokenizer), BottleneckConfig(init_std=0)), ids), base)
    change = (logits(add_bottleneck_adapters(tiny(tokenizer), BottleneckConfig()), ids) - base).abs().max()
    assert 0 < change < 1e-2


def test_only_adapters_train_and_a_saved_adapter_reloads_exactly(tokenizer, ids, tmp_path):
    model = add_bottleneck_adapters(tiny(tokenizer), BottleneckConfig(size=8))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert all(".bottleneck_adapter." in name for name in trainable)
    hidden, size = TINY["hidden_size"], 8
    assert sum(p.numel() for p in trainable.values()) == 2 * 2 * (hidden * size + size + size * hidden + hidden)

    before = logits(model, ids)
    step(model, ids)
    assert all(p.grad is None for name, p in model.named_parameters() if name not in trainable)
    assert all(p.grad is not None for p in trainable.values())
    after = logits(model, ids)
    assert (after - before).abs().max() > 1e-4

    model.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    assert {f.name for f in (tmp_path / "adapter").iterdir()} == FILES
    assert load_file(tmp_path / "adapter/bottleneck_adapter.safetensors").keys() == model.adapter_state_dict().keys()
    assert all(".bottleneck_adapter." in key for key in model.adapter_state_dict())
    meta = json.loads((tmp_path / "adapter/bottleneck_config.json").read_text())
    assert (meta["format"], meta["version"], meta["size"], meta["base_model_class"]) == ("tunelab-bottleneck", 1, 8, "LlamaForCausalLM")
    assert is_bottleneck_folder(tmp_path / "adapter") and not is_bottleneck_folder(tmp_path)

    reloaded = load_bottleneck_adapters(tiny(tokenizer), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, ids), after, rtol=0, atol=0)
    assert not any(p.requires_grad for p in reloaded.parameters())


def test_disable_adapter_gives_the_base_outputs(tokenizer, ids):
    base = logits(tiny(tokenizer), ids)
    model = add_bottleneck_adapters(tiny(tokenizer), BottleneckConfig(size=8, init_std=0.1))
    adapted = logits(model, ids)
    assert (adapted - base).abs().max() > 1e-3
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), base)
    assert torch.equal(logits(model, ids), adapted)


def test_placement_and_layers_choose_the_adapted_blocks(tokenizer):
    mlp_only = add_bottleneck_adapters(tiny(tokenizer), BottleneckConfig(size=4, placement=["mlp"]))
    assert adapted_blocks(mlp_only) == ["base_model.model.layers.0.mlp", "base_model.model.layers.1.mlp"]
    node = {"_target_": "tunelab.models.bottleneck.BottleneckConfig", "size": 4, "layers": [1]}  # as from YAML
    assert is_bottleneck_config(node) and is_bottleneck_config(BottleneckConfig()) and not is_bottleneck_config({"_target_": "peft.LoraConfig"})
    layer_1 = add_bottleneck_adapters(tiny(tokenizer), node)
    assert adapted_blocks(layer_1) == ["base_model.model.layers.1.self_attn", "base_model.model.layers.1.mlp"]


def test_a_reward_models_score_head_trains_and_is_saved_with_the_adapters(tokenizer, ids, tmp_path):
    def reward_model():
        return tiny(tokenizer, LlamaForSequenceClassification, num_labels=1, pad_token_id=tokenizer.pad_token_id)

    model = add_bottleneck_adapters(reward_model(), BottleneckConfig(size=8))
    assert {n for n, p in model.named_parameters() if p.requires_grad and ".bottleneck_adapter." not in n} == {"base_model.score.weight"}
    step(model, ids, loss_of=lambda model, ids: -model(input_ids=ids).logits.sum())
    scores = logits(model, ids)
    model.save_pretrained(tmp_path / "rm")
    assert "base_model.score.weight" in load_file(tmp_path / "rm/bottleneck_adapter.safetensors")
    reloaded = load_bottleneck_adapters(reward_model(), tmp_path / "rm")
    torch.testing.assert_close(logits(reloaded, ids), scores, rtol=0, atol=0)
    assert not torch.equal(logits(reward_model(), ids), scores)


def test_merge_and_unload_is_refused_with_what_to_do_instead(tokenizer):
    model = add_bottleneck_adapters(tiny(tokenizer), BottleneckConfig(size=4))
    with pytest.raises(TunelabError, match="nonlinearity.*cannot be merged.*load_bottleneck_adapters.*LoRA"):
        model.merge_and_unload()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"size": 0}, r"method.peft_config.size=0 must be at least 1"),
        ({"placement": ["ffn"]}, r"placement=\['ffn'\] must be a non-empty list of: attention, mlp"),
        ({"placement": []}, r"placement=\[\] must be"),
        ({"activation": "swish"}, r"activation='swish' is not one of: relu, gelu, silu, tanh"),
        ({"init_std": -0.1}, r"init_std=-0.1 must be a number >= 0"),
        ({"dropout": 1.0}, r"dropout=1.0 must be .*0 <= dropout < 1"),
        ({"layers": []}, r"layers=\[\] must be null"),
        ({"sise": 8}, r"no field sise; BottleneckConfig's fields are: activation, dropout"),
    ],
)
def test_bad_config_values_name_the_field(values, message):
    with pytest.raises(TunelabError, match=message):
        add_bottleneck_adapters(None, values)


def test_models_and_layers_that_cannot_be_adapted_are_named(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(TunelabError, match=r"layers=\[5\] names a layer that LlamaForCausalLM lacks: it has layers 0..1"):
        add_bottleneck_adapters(tiny(tokenizer), {"layers": [5]})
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(TunelabError, match=r"GPT2LMHeadModel.*model.base_model.layers.*self_attn, mlp"):
        add_bottleneck_adapters(gpt2, {})


def test_loading_a_folder_that_is_incomplete_or_for_another_model_names_the_folder(tokenizer, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TunelabError, match=re.escape(f"'{empty}' is not a bottleneck adapter folder: bottleneck_config.json is missing")):
        load_bottleneck_adapters(tiny(tokenizer), empty)

    folder = tmp_path / "adapter"
    add_bottleneck_adapters(tiny(tokenizer), BottleneckConfig(size=8)).save_pretrained(folder)
    with pytest.raises(TunelabError, match=re.escape(f"'{folder}'") + r" does not fit this LlamaForCausalLM: wrong shape \(12\): .*\[8, 64\] in the file, \[8, 32\] in the model.* and 9 more"):
        load_bottleneck_adapters(tiny(tokenizer, hidden_size=32), folder)
    with pytest.raises(TunelabError, match=re.escape(f"'{folder}'") + r" does not fit .*unexpected \(8\): base_model.model.layers.1.mlp.bottleneck_adapter"):
        load_bottleneck_adapters(tiny(tokenizer, num_hidden_layers=1), folder)
    (folder / "bottleneck_adapter.safetensors").unlink()
    with pytest.raises(TunelabError, match=re.escape(f"'{folder}' has bottleneck_config.json but no bottleneck_adapter.safetensors")):
        load_bottleneck_adapters(tiny(tokenizer), folder)


def test_bf16_autocast_and_gradient_checkpointing_train_the_adapters(tokenizer, ids):
    model = add_bottleneck_adapters(tiny(tokenizer), BottleneckConfig(size=8, init_std=0.02, dropout=0.1)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)

    # The adapters run inside their layers' recomputation (dropout off, so the two backward passes agree).
    model = add_bottleneck_adapters(tiny(tokenizer), BottleneckConfig(size=8, init_std=0.02))
    model(input_ids=ids, labels=ids).loss.backward()
    plain = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    model.train().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model(input_ids=ids, labels=ids).loss.backward()
    for a, b in zip(plain, [p.grad for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(b, a)
