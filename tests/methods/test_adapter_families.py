"""Every adapter family x {SFT, reward model, DPO} on a tiny model: one training step, the adapter
folder reloads in the ecosystem's loader (peft, or tunelab's for bottleneck adapters) with the
trained model's outputs, and mergeable families merge to the same outputs."""

import json
from pathlib import Path

import pytest
import torch

from tunelab.config import compose_config
from tunelab.engine import train
from tunelab.errors import TunelabError

DEMO_DATA = "pkg://tunelab/demo_data/gsm8k_demo.jsonl"
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "tie_word_embeddings": True}  # fmt: skip
LORA = "_target_:peft.LoraConfig,task_type:CAUSAL_LM,r:8,lora_alpha:16,target_modules:[q_proj,v_proj,down_proj]"
FAMILIES = {
    "lora": LORA,
    "dora": LORA + ",use_dora:true",
    "rslora": LORA + ",use_rslora:true",
    "pissa": LORA + ",init_lora_weights:pissa",
    "olora": LORA + ",init_lora_weights:olora",
    "ia3": "_target_:peft.IA3Config,task_type:CAUSAL_LM,target_modules:[k_proj,v_proj,down_proj],feedforward_modules:[down_proj]",
    "loha": "_target_:peft.LoHaConfig,task_type:CAUSAL_LM,r:4,alpha:4,target_modules:[q_proj,v_proj]",
    "lokr": "_target_:peft.LoKrConfig,task_type:CAUSAL_LM,r:4,alpha:4,target_modules:[q_proj,v_proj]",
    "prompt": "_target_:peft.PromptTuningConfig,task_type:CAUSAL_LM,num_virtual_tokens:4",
    "prompt_text": "_target_:peft.PromptTuningConfig,task_type:CAUSAL_LM,num_virtual_tokens:4,prompt_tuning_init:TEXT,prompt_tuning_init_text:'Solve it'",
    "prefix": "_target_:peft.PrefixTuningConfig,task_type:CAUSAL_LM,num_virtual_tokens:4",
    "prefix_projection": "_target_:peft.PrefixTuningConfig,task_type:CAUSAL_LM,num_virtual_tokens:4,prefix_projection:true,encoder_hidden_size:32",
    "bottleneck": "_target_:tunelab.models.bottleneck.BottleneckConfig,size:8",
}
UNMERGEABLE = ("prompt", "prompt_text", "prefix", "prefix_projection", "bottleneck")
METHODS = ("sft", "reward_model", "dpo")
TEXT = "Natalia sold clips to 48 of her friends in April."


@pytest.fixture(scope="module")
def base_model(tiny_base_model) -> Path:
    return tiny_base_model


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    good = ["Mix flour, water, yeast and salt, then bake.", "Preheat the oven and knead the dough well."]
    rows = [{"prompt": f"Question {i}: how do I bake bread?", "chosen": good[i % 2], "rejected": "No."} for i in range(8)]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def overrides(method: str, family: str, base: Path, pairs: Path, out: Path, *extra: str) -> list[str]:
    data = {
        "sft": ["method=lm_finetune/peftfinetune_sft", "modelpool=CausalLMPool/tiny-llama", f"data.path={DEMO_DATA}", "data.prompt_field=question",
                "data.completion_field=answer", "data.max_samples=8", "method.dataloader_kwargs.batch_size=4"],
        "reward_model": ["method=lm_finetune/bradley_terry_rm", "modelpool=SequenceClassificationModelPool/tiny-llama",
                         f"data.path={pairs}", "data.format=preference", "method.dataloader_kwargs.batch_size=4"],
        "dpo": ["method=lm_finetune/dpo", "modelpool=CausalLMPool/tiny-llama", f"data.path={pairs}", "data.format=preference", "method.dataloader_kwargs.batch_size=4"],
    }[method]  # fmt: skip
    return [
        *data, f"modelpool.model_path={base}", "modelpool.dtype=float32", f"data.cache_dir={out.parent / 'cache'}",
        "method.max_length=96", "method.max_steps=1", "method.optimizer.lr=1e-2", "method.lr_scheduler=null",
        *(["~method.peft_config", "method.compile=false"] if method == "sft" else ["method.compile=false"] if method == "dpo" else []),
        "method.save_ckpt_type=peft", f"+method.peft_config={{{FAMILIES[family]}}}",
        f"output_dir={out}", "progress_bar=false", "fabric.precision=32-true", *extra,
    ]  # fmt: skip


def outputs(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def fresh_base(method: str, base: Path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if method == "reward_model":
        return AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    return AutoModelForCausalLM.from_pretrained(base)


def reload(method: str, family: str, base: Path, folder: Path, tokenizer):
    if family == "bottleneck":
        from tunelab.models.bottleneck import load_bottleneck_adapters

        return load_bottleneck_adapters(fresh_base(method, base, tokenizer), folder)
    from peft import PeftModel

    return PeftModel.from_pretrained(fresh_base(method, base, tokenizer), folder)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_family_trains_saves_reloads_and_merges(method, family, base_model, pairs, tmp_path, tokenizer, monkeypatch):
    from tunelab.methods import BradleyTerryRewardModeling, DirectPreferenceOptimization, PeftFinetuneSFT

    if method == "reward_model" and family.startswith("prefix"):
        with pytest.raises(TunelabError, match="Prefix tuning cannot train a reward model.*prompt tuning"):
            train(compose_config(overrides(method, family, base_model, pairs, tmp_path / "run")))
        return
    cls = {"sft": PeftFinetuneSFT, "reward_model": BradleyTerryRewardModeling, "dpo": DirectPreferenceOptimization}[method]
    trained, original_finalize = {}, cls.finalize

    def finalize(self, model, output_dir, tok):  # the trained model's outputs, before any merge changes it
        trained["outputs"] = outputs(model, tokenizer)
        model.train()
        return original_finalize(self, model, output_dir, tok)

    monkeypatch.setattr(cls, "finalize", finalize)
    merge = family not in UNMERGEABLE
    result = train(compose_config(overrides(method, family, base_model, pairs, tmp_path / "run", f"method.merge_and_unload={str(merge).lower()}")))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"] / 4

    reloaded = outputs(reload(method, family, base_model, result.final_checkpoint, tokenizer), tokenizer)
    torch.testing.assert_close(reloaded, trained["outputs"], rtol=0, atol=1e-5)
    untouched = outputs(fresh_base(method, base_model, tokenizer), tokenizer)
    if method != "reward_model":  # a fresh score head is random, so only the language models compare with their base
        extra = reloaded.shape[1] - untouched.shape[1]  # prompt tuning's logits include its virtual tokens
        assert (reloaded[:, extra:] - untouched).abs().max() > 1e-4, "one step at lr 1e-2 changed nothing"
    if merge:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        loader = AutoModelForSequenceClassification if method == "reward_model" else AutoModelForCausalLM
        merged = outputs(loader.from_pretrained(result.outputs["merged"]), tokenizer)
        torch.testing.assert_close(merged, trained["outputs"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", UNMERGEABLE)
def test_merging_a_family_that_cannot_merge_is_refused_before_training(family, base_model, pairs, tmp_path):
    with pytest.raises(TunelabError, match="cannot be merged"):
        train(compose_config(overrides("sft", family, base_model, pairs, tmp_path / "run", "method.merge_and_unload=true")))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_target_modules_that_match_nothing_name_the_linear_modules(base_model, pairs, tmp_path):
    bad = FAMILIES["lora"].replace("[q_proj,v_proj,down_proj]", "[q_proj,qkv]")
    run = overrides("sft", "lora", base_model, pairs, tmp_path / "run")
    run[run.index(f"+method.peft_config={{{FAMILIES['lora']}}}")] = f"+method.peft_config={{{bad}}}"
    with pytest.raises(TunelabError, match=r"\['qkv'\].*linear modules are: .*down_proj.*q_proj"):
        train(compose_config(run))


def test_virtual_token_families_switch_packing_and_the_chunked_loss_off(base_model, pairs, tmp_path, caplog):
    from tunelab.config import instantiate

    cfg = compose_config(overrides("sft", "prompt", base_model, pairs, tmp_path / "run"))
    method = instantiate(cfg.method)
    assert method.packing and method.chunked_loss
    with caplog.at_level("INFO"):
        method.check()
    assert not method.packing and not method.chunked_loss
    assert "packing switched off" in caplog.text


@pytest.fixture(scope="module")
def reward_model_folder(tmp_path_factory, tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("rm")
    config = LlamaConfig(vocab_size=len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id, **TINY)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # scores that differ between completions
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["pissa", "prompt", "prefix", "bottleneck"])
@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_online_methods_train_every_kind_of_family(method, family, base_model, reward_model_folder, tmp_path, tokenizer):
    """Weight adapters, PiSSA (reference: a copy), virtual tokens (padded rows, transformers'
    generate) and bottleneck adapters each take two GRPO or PPO steps and save a folder that reloads."""
    out = tmp_path / "run"
    common = [
        "modelpool=CausalLMPool/tiny-llama", f"modelpool.model_path={base_model}", f"data.path={DEMO_DATA}", "data.format=prompt",
        "data.prompt_field=question", "data.max_samples=8", f"data.cache_dir={tmp_path / 'cache'}", "method.max_completion_length=6",
        "method.compile=false", "taskpool=dummy", "method.optimizer.lr=1e-2", "method.max_steps=2", "method.save_ckpt_type=peft",
        f"+method.peft_config={{{FAMILIES[family]}}}", f"output_dir={out}", "progress_bar=false", "fabric.precision=32-true",
    ]  # fmt: skip
    specific = {
        "grpo": ["method=lm_finetune/grpo", "method.num_generations=2", "method.dataloader_kwargs.batch_size=4", "method.beta=0.1"],
        "ppo": ["method=lm_finetune/ppo", f"method.reward_model_path={reward_model_folder}", "method.value_model=shared",
                "method.dataloader_kwargs.batch_size=2", "method.ppo_epochs=1"],
    }[method]  # fmt: skip
    result = train(compose_config(specific + common))
    lines = (out / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    losses = [float(row.split(",")[header.index("train/loss")]) for row in lines[1:] if row.split(",")[header.index("train/loss")]]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    reloaded = reload("sft", family, base_model, result.final_checkpoint, tokenizer)
    assert torch.isfinite(outputs(reloaded, tokenizer)).all()


@pytest.mark.parametrize("family", ["prompt", "prefix"])
def test_virtual_tokens_keep_the_loss_and_the_reward_on_the_real_positions(family, tokenizer):
    """With virtual tokens in front, a padded batch gives every row the loss and the reward it has
    alone: the labels, the padding and the last real token are read at the input's positions."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from tunelab.config import instantiate
    from tunelab.data import pad_collate
    from tunelab.methods.bradley_terry_rm import rewards
    from tunelab.methods.fullfinetune_sft import causal_lm_loss
    from tunelab.models.adapters import _peft_node

    node = dict(item.split(":", 1) for item in FAMILIES[family].split(","))
    node["num_virtual_tokens"] = int(node["num_virtual_tokens"])
    examples = [{"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, -100, 8, 9, 10]}, {"input_ids": [11, 12, 13], "labels": [-100, 12, 13]}]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, num_labels=1, pad_token_id=0, **TINY)
    lm = get_peft_model(LlamaForCausalLM(config), instantiate(_peft_node(node))).eval()
    batch = pad_collate(examples, pad_token_id=0)
    together = causal_lm_loss(lm, batch)
    alone = [causal_lm_loss(lm, pad_collate([e], pad_token_id=0)) for e in examples]
    assert int(together.units) == sum(int(a.units) for a in alone) == 5
    torch.testing.assert_close(together.loss, sum(a.loss for a in alone), rtol=1e-5, atol=1e-5)
    if family == "prefix":
        return  # prefix tuning does not adapt reward models (test_family_trains_saves_reloads_and_merges)
    torch.manual_seed(0)
    rm = get_peft_model(LlamaForSequenceClassification(config), instantiate(_peft_node({**node, "task_type": "SEQ_CLS"}))).eval()
    scores = rewards(rm, batch)
    single = torch.cat([rewards(rm, pad_collate([e], pad_token_id=0)) for e in examples])
    torch.testing.assert_close(scores, single, rtol=1e-5, atol=1e-5)


def test_prefix_tuning_ppo_needs_the_shared_value_head(base_model, reward_model_folder, tmp_path):
    with pytest.raises(TunelabError, match=r"Prefix tuning cannot train the value model \(method.value_model=reward\).*value_model=shared"):
        train(compose_config([
            "method=lm_finetune/ppo", "modelpool=CausalLMPool/tiny-llama", f"modelpool.model_path={base_model}", f"data.path={DEMO_DATA}",
            "data.format=prompt", "data.prompt_field=question", f"method.reward_model_path={reward_model_folder}", "method.value_model=reward",
            f"+method.peft_config={{{FAMILIES['prefix']}}}", f"output_dir={tmp_path / 'run'}", "progress_bar=false",
        ]))  # fmt: skip
