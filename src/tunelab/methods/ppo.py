"""Proximal policy optimisation (PPO) against a trained reward model: RLHF as in InstructGPT.

Every step, before the loss (``before_step``), the current policy completes each prompt once; the
frozen reward model scores each prompt + completion; each completion token earns
-kl_coef · (log π - log π_ref) and its last token the score as well (minus
``missing_eos_penalty`` if it never ended). Generalised advantage estimation (GAE) against the
value model's estimates turns these rewards into per-token advantages (whitened over the step)
and returns. The step's batches are then trained on ``ppo_epochs`` times, in ``num_mini_batches``
optimizer steps each (``updates``), with

    loss_t = max(-A_t ρ_t, -A_t clip(ρ_t, 1 ± cliprange))
             + vf_coef · ½ max((V_t - R_t)², (V_old,t + clip(V_t - V_old,t, ± cliprange_value) - R_t)²)

where ρ_t = π(y_t | ...) / π_old(y_t | ...) against the policy that generated. With
``kl_target`` set, kl_coef adapts after every step toward that KL per completion (Ziegler et al.
2019). The value model is trained with the policy (``PolicyAndValue``): a copy of the reward model
(``value_model: reward``), a sequence-classification copy of the policy (``policy``), or one linear
head on the policy's own hidden states (``shared``: no second model).
"""

import copy
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch

from tunelab.data import IGNORE_INDEX
from tunelab.engine.method import LossResult, Models
from tunelab.errors import TunelabError
from tunelab.methods.bradley_terry_rm import _score_head
from tunelab.methods.bradley_terry_rm import rewards as reward_model_scores
from tunelab.methods.dpo import under_reference
from tunelab.methods.fullfinetune_sft import _unwrap, final_hidden_states, model_inputs, supports_chunked_loss
from tunelab.methods.grpo import clipped_token_losses
from tunelab.methods.online import OnlinePolicyOptimization
from tunelab.models.adapters import apply_adapter, check_sequence_classification_family, strip_virtual_positions
from tunelab.models.pool import full_precision_loader
from tunelab.rewards import RewardModel

log = logging.getLogger(__name__)

ValueModel = Literal["reward", "policy", "shared"]


# ----------------------------------------------------------------------------- the maths


def per_sequence(values: torch.Tensor, sequence: torch.Tensor, sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token values in packed order (each completion's tokens consecutive, completions in order)
    -> a (sequences, longest) matrix, zero-padded on the right, and its mask."""
    counts = torch.bincount(sequence, minlength=sequences)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(values.numel(), device=values.device) - starts[sequence]
    longest = int(counts.max()) if sequences else 0
    padded = values.new_zeros(sequences, longest)
    mask = torch.zeros(sequences, longest, dtype=torch.bool, device=values.device)
    padded[sequence, position] = values
    mask[sequence, position] = True
    return padded, mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (sequences, tokens) matrices, right-padded (mask):
    δ_t = r_t + γ V_{t+1} - V_t (V after the last token is 0), A_t = δ_t + γλ A_{t+1}.
    Returns the advantages and the returns A + V, zero on padding."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0]) if rewards.shape[1] else None
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over every value, across ranks when distributed; ``shift_mean=False``
    keeps the mean (for rewards: only their scale changes)."""
    stats = torch.stack([values.sum(), (values * values).sum(), torch.tensor(float(values.numel()), device=values.device)]).double()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats)
    total, squares, count = stats.tolist()
    mean = total / max(count, 1)
    variance = max(squares / max(count, 1) - mean * mean, 0.0)
    whitened = (values - mean) / math.sqrt(variance + eps)
    return whitened if shift_mean else whitened + mean


def clipped_value_losses(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """½ max((V - R)², (V_old + clip(V - V_old, ±c) - R)²) per token, and where the clipped term won."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.maximum(unclipped_loss, clipped_loss), clipped_loss > unclipped_loss


def adapt_kl_coef(kl_coef: float, kl: float, target: float, horizon: int, completions: int) -> float:
    """The adaptive KL controller of Ziegler et al. (2019): move kl_coef toward the value that
    keeps the mean KL per completion at ``target``, by at most 20% of the way per horizon."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * completions / horizon)


# ----------------------------------------------------------------------------- the trained model


class PolicyAndValue(torch.nn.Module):
    """What PPO trains: the policy and its value model, set up, optimised and checkpointed as one.

    The forward is the policy's; ``forward(..., values=True)`` also runs the value model on the
    same rows in the same call (the estimates are read by ``capture_values``), so DDP and Fabric's
    precision see one forward per loss. Checkpoints keep the policy in the folder itself (where
    ``from_pretrained`` finds it) and the value model in ``value_model/``.
    """

    def __init__(self, policy: torch.nn.Module, value_model: torch.nn.Module | None = None, value_head: torch.nn.Module | None = None):
        super().__init__()
        self.policy, self.value_model, self.value_head = policy, value_model, value_head

    def forward(self, *args, values: bool = False, **kwargs):
        out = self.policy(*args, **kwargs)
        if values and self.value_model is not None:
            self.value_model(**{k: v for k, v in kwargs.items() if k != "logits_to_keep"})
        return out

    def checkpoint_parts(self) -> dict[str, torch.nn.Module]:
        return {"": self.policy, "value_model": self.value_model if self.value_model is not None else self.value_head}

    # The policy's own methods, for generation, the chunked head and the adapter-disabled reference.
    def generate(self, *args, **kwargs):
        return self.policy.generate(*args, **kwargs)

    def get_decoder(self):
        return _unwrap(self.policy).get_decoder()

    def get_output_embeddings(self):
        return _unwrap(self.policy).get_output_embeddings()

    def disable_adapter(self):
        return self.policy.disable_adapter()

    def gradient_checkpointing_enable(self, **kwargs):
        for part in (self.policy, self.value_model):
            if part is not None:
                part.gradient_checkpointing_enable(**kwargs)


def _composite(model: torch.nn.Module) -> PolicyAndValue:
    while not isinstance(model, PolicyAndValue):
        model = model.module  # Fabric's and DDP's wrappers
    return model


@contextmanager
def capture_values(model: torch.nn.Module):
    """Collects the per-position value estimates (rows, positions) of the next forward run with
    ``values=True``: from the value model's score head, or from the shared head applied to the
    policy's final hidden states."""
    composite, captured = _composite(model), {}
    if composite.value_head is not None:
        def keep(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
            captured["values"] = composite.value_head(hidden)[..., 0].float()
        handle = composite.get_decoder().register_forward_hook(keep)
    else:
        def keep(_module, _args, output):
            captured["values"] = output[..., 0].float()
        handle = _score_head(_unwrap(composite.value_model)).register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- the method


@dataclass
class ProximalPolicyOptimization(OnlinePolicyOptimization):
    """PPO on prompts (``data.format=prompt``) against a reward model, full or with any peft
    adapter. ``dataloader_kwargs.batch_size`` counts prompts (one completion each); a step's
    rollout is its ``accumulate_grad_batches`` micro-batches, split into ``num_mini_batches``
    optimizer steps, ``ppo_epochs`` times. The prompt, sampling, reference and adapter options
    are ``OnlinePolicyOptimization``'s."""

    reward_model_path: Optional[str] = None
    """A one-output sequence-classification model folder (method=lm_finetune/bradley_terry_rm with save_ckpt_type=hf)."""
    reward_model_batch_size: int = 16
    """Completions scored per reward-model forward."""
    value_model: ValueModel = "reward"
    """The value model: a trained copy of the reward model (reward; it must share the policy's
    tokenizer), a sequence-classification copy of the policy with a zero score head (policy), or a
    zero-initialised linear head on the policy's final hidden states (shared: no second model)."""
    kl_coef: float = 0.05
    """Weight of the per-token KL penalty in the reward (0 with no kl_target loads no reference)."""
    kl_target: Optional[float] = None
    """Set: kl_coef adapts after every step toward this KL per completion (nats)."""
    kl_horizon: int = 10000
    """Completions over which the adaptive controller closes the gap to kl_target."""
    kl_bound: Optional[float] = None
    """Set: a bound on the KL to the reference per completion (nats), held at every rollout and
    every epoch. The measure: at every completion token of the step's rollout, the exact KL between
    the policy's and the reference's next-token distributions (over the whole vocabulary, at the
    sampling temperature), summed per completion (no-grad passes). A rollout that measures past
    the bound sends the weights back to those that sampled the previous rollout, and is sampled
    again from them (once a step). After each epoch the measure is taken again: an epoch that
    leaves it past the bound and higher than it found it is undone and ends the step; one that
    lowers it is kept. The optimizer's moments keep the gradients of undone work. Costs a reference
    forward per step, a policy forward per epoch and one more, and up to two copies of the
    trainable weights; a resumed run cannot roll back its first step."""
    missing_eos_penalty: Optional[float] = None
    """Subtracted from the score of completions that hit max_completion_length without ending."""
    gamma: float = 1.0
    lam: float = 0.95
    """GAE's discount and its bias/variance trade-off."""
    whiten_rewards: bool = False
    """Scale the per-token rewards to unit variance over the step before GAE."""
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    """Weight of the value loss."""
    value_lr: Optional[float] = None
    """Learning rate of the value model or head (the schedule scales it like the policy's); null:
    method.optimizer.lr. A shared head starts at zero, and at a policy's rate it barely moves."""
    ppo_epochs: int = 4
    """Passes over each step's rollout."""
    num_mini_batches: int = 1
    """Optimizer steps per pass; must divide accumulate_grad_batches (each takes its share of the micro-batches)."""

    loss_unit: ClassVar[str] = "token"

    def __post_init__(self):
        super().__post_init__()
        self.current_kl_coef, self.scorer = self.kl_coef, None
        # kl_bound: epochs skipped and undone and rollouts rolled back so far; the model it measures, the
        # rollout's measure, and the weights that sampled the last rollout
        self.skipped_epochs = self.undone_epochs = self.rollbacks = 0
        self._policy, self._measured, self._step_start = None, None, None

    def updates_per_step(self) -> int:
        return self.ppo_epochs * self.num_mini_batches

    def state_dict(self) -> dict:
        return {"kl_coef": self.current_kl_coef}

    def load_state_dict(self, state: dict) -> None:
        self.current_kl_coef = float(state.get("kl_coef", self.kl_coef))

    def uses_reference(self) -> bool:
        return self.kl_coef > 0 or self.kl_target is not None

    # -- checks and set-up ------------------------------------------------------------------------

    def check(self) -> None:
        super().check()
        if not self.reward_model_path:
            raise TunelabError(
                "PPO needs a reward model: set method.reward_model_path to a sequence-classification model folder, e.g. the "
                "checkpoint of `tunelab train method=lm_finetune/bradley_terry_rm method.save_ckpt_type=hf ...`."
            )
        if self.value_model not in ValueModel.__args__:
            raise TunelabError(f"method.value_model={self.value_model!r} is not one of: {', '.join(ValueModel.__args__)}.")
        if self.value_model != "shared":  # the value model gets an adapter of the policy's family
            check_sequence_classification_family(self.peft_config, f"the value model (method.value_model={self.value_model})", "Use method.value_model=shared (a value head on the policy).")
        for name in ("ppo_epochs", "num_mini_batches", "reward_model_batch_size", "kl_horizon"):
            if getattr(self, name) < 1:
                raise TunelabError(f"method.{name}={getattr(self, name)} must be at least 1.")
        if self.accumulate_grad_batches % self.num_mini_batches:
            raise TunelabError(
                f"method.num_mini_batches={self.num_mini_batches} must divide method.accumulate_grad_batches={self.accumulate_grad_batches}: "
                "a step's rollout is its accumulated micro-batches, and each mini-batch takes an equal share of them "
                f"(e.g. method.accumulate_grad_batches={self.num_mini_batches * max(1, self.accumulate_grad_batches // self.num_mini_batches)})."
            )
        for name in ("cliprange", "cliprange_value", "vf_coef") + (("value_lr",) if self.value_lr is not None else ()):
            if getattr(self, name) <= 0:
                raise TunelabError(f"method.{name}={getattr(self, name)} must be positive.")
        if self.kl_coef < 0 or (self.kl_target is not None and self.kl_target <= 0):
            raise TunelabError("method.kl_coef must be >= 0 and method.kl_target (when set) positive.")
        if self.kl_bound is not None and (self.kl_bound <= 0 or not self.uses_reference()):
            raise TunelabError("method.kl_bound must be positive, and needs the reference model (method.kl_coef > 0 or method.kl_target).")
        if self.kl_target is not None and self.kl_coef == 0:
            raise TunelabError("method.kl_target adapts kl_coef by ratios, so kl_coef must start above 0 (e.g. method.kl_coef=0.05).")
        if not (0 < self.gamma <= 1 and 0 <= self.lam <= 1):
            raise TunelabError(f"method.gamma={self.gamma} must be in (0, 1] and method.lam={self.lam} in [0, 1].")
        self.scorer = RewardModel(self.reward_model_path, batch_size=self.reward_model_batch_size, max_length=self.max_prompt_length + self.max_completion_length)
        self.scorer.check("method.reward_model_path")

    def build_models(self, pool, tokenizer) -> Models:
        self.full_precision_base = full_precision_loader(pool, tokenizer)  # merging a QLoRA adapter loads it
        policy = pool.load_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        frozen = {"reward_model": self.scorer.load()}
        if self.uses_reference() and self.reference_kind() == "copy":
            frozen["reference"] = self.frozen_reference(policy)
        value_model, value_head = self._value_model(policy, frozen["reward_model"], tokenizer), None
        if value_model is None:
            value_head = torch.nn.Linear(policy.config.hidden_size, 1)
            torch.nn.init.zeros_(value_head.weight), torch.nn.init.zeros_(value_head.bias)
        policy = self.prepare_model(policy)
        if self.peft_config:
            policy = apply_adapter(policy, self.peft_config, self.adapter_name, self.fused_kernels, tokenizer=tokenizer)
            if self.chunked_loss and not supports_chunked_loss(policy):
                self.chunked_loss = False
        if value_model is not None:
            value_model = self.prepare_model(value_model, lm_head=False)
            if self.peft_config:  # the value model gets its own adapter; its score head trains whole
                value_model = apply_adapter(value_model, self.peft_config, self.adapter_name, self.fused_kernels, tokenizer=tokenizer, task_type="SEQ_CLS")
        self.base_seed = torch.initial_seed()  # the run's seed: completions depend on it and the step only
        composite = PolicyAndValue(policy, value_model, value_head)
        return Models(composite, frozen, self.param_groups(composite))

    def param_groups(self, composite: "PolicyAndValue") -> list[dict] | None:
        """The policy's and the value side's trainable parameters as two groups when the value side
        has its own learning rate (``value_lr``)."""
        if self.value_lr is None:
            return None
        value = composite.value_model if composite.value_model is not None else composite.value_head
        lr = float(self.optimizer["lr"])
        return [
            {"params": [p for p in composite.policy.parameters() if p.requires_grad]},
            {"params": [p for p in value.parameters() if p.requires_grad], "lr": self.value_lr, "lr_scale": self.value_lr / lr},
        ]

    def _value_model(self, policy: torch.nn.Module, reward_model: torch.nn.Module, tokenizer) -> torch.nn.Module | None:
        if self.value_model == "shared":
            return None
        if self.value_model == "reward":
            if self.scorer.tokenizer.get_vocab() != tokenizer.get_vocab():
                raise TunelabError(
                    f"method.value_model=reward starts the value model from the reward model, but '{self.reward_model_path}' has another "
                    "tokenizer than the policy, so it cannot read the policy's tokens. Use method.value_model=policy or shared."
                )
            value = copy.deepcopy(reward_model)
            value.config.pad_token_id = tokenizer.pad_token_id
            return value.requires_grad_(True).train()
        from transformers import AutoModelForSequenceClassification

        config = copy.deepcopy(policy.config)
        config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
        value = AutoModelForSequenceClassification.from_config(config, dtype=policy.dtype)
        value.base_model.load_state_dict(policy.base_model.state_dict())
        for parameter in _score_head(value).parameters():
            torch.nn.init.zeros_(parameter)
        return value

    def policy_of(self, model: torch.nn.Module) -> torch.nn.Module:
        return _composite(model).policy

    # -- scoring ------------------------------------------------------------------------------------

    def reward_names(self) -> list[str]:
        return ["reward_model"]

    def score(self, batch: dict, generated: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The reward model's score of each prompt + completion (its own chat template and tokenizer)."""
        prompts = [json.loads(batch["prompt"][i]) for i in generated["prompt_index"]]
        device = batch["prompt_ids"].device
        scores = torch.cat([
            reward_model_scores(self.frozen["reward_model"], {k: v.to(device) for k, v in b.items()})
            for b in self.scorer.batches(prompts, generated["texts"])
        ]).float().cpu()  # fmt: skip
        return scores, scores[:, None].clone()

    # -- every step: the rollout -----------------------------------------------------------------------

    def before_step(self, model, frozen: dict, batches: list[dict], step: int) -> list[dict]:
        """Generate one completion per prompt, score it, and give every completion token its old
        log-probability, value estimate, advantage and return.

        With ``kl_bound``, the rollout's KL is measured (``policy_kl``); past the bound, the
        trainable weights go back to those that sampled the previous step's rollout, and the
        rollout is generated again from them (once a step)."""
        self._policy = model if self.kl_bound is not None else None
        out, rounds, all_kl = self.rollout(model, frozen, batches, step)
        rolled_back = False
        if self.kl_bound is not None:
            references = {}  # the reference's logits, kept for the epochs' measures
            kl = self.policy_kl(model, out, references)
            if kl > self.kl_bound and self._step_start is not None:
                _restore(_trainable(model), self._step_start)
                log.info("step %d: the policy's KL on its rollout is %.2f nats per completion, past method.kl_bound=%g; "
                         "its weights go back to those that sampled the previous rollout, which samples this one again",
                         step + 1, kl, self.kl_bound)  # fmt: skip
                self.rollbacks, rolled_back = self.rollbacks + 1, True
                out, rounds, all_kl = self.rollout(model, frozen, batches, step)
                references = {}
                kl = self.policy_kl(model, out, references)
            self._measured = (kl, references)
            for batch in out:  # logged with the step: the bound's measure of the policy that sampled it
                batch["step_metrics"].update({"kl_exact": torch.tensor(kl), "kl_rollback": torch.tensor(float(rolled_back))})
        if self.kl_target is not None:  # every rank adapts by the same (global) numbers, so all keep one coefficient
            kl_sum, completions = _global_sum(all_kl.sum(), all_kl.numel(), device=out[0]["input_ids"].device)
            self.current_kl_coef = adapt_kl_coef(self.current_kl_coef, kl_sum / max(completions, 1), self.kl_target, self.kl_horizon, int(completions))
        if self.samples_due(step):
            self.write_samples(step, *rounds[0])
        return out

    def rollout(self, model, frozen: dict, batches: list[dict], step: int) -> tuple[list[dict], list[tuple], torch.Tensor]:
        """The step's training rows from the current weights: (rows, what was generated and
        scored per micro-batch, each completion's sampled KL)."""
        started = time.perf_counter()
        rounds = []
        for i, batch in enumerate(batches):
            generated = self.generate(model, batch, self.generation_seed(step, i))
            scores, table = self.score(batch, generated)
            if self.missing_eos_penalty is not None:
                scores = scores - self.missing_eos_penalty * torch.tensor(generated["truncated"], dtype=torch.float32)
            rounds.append((batch, generated, scores, table))
        generation_seconds = time.perf_counter() - started
        out, token_rewards, kls = [], [], []
        for batch, generated, scores, _table in rounds:
            train_batch = self.completion_batch(batch, generated)
            with torch.no_grad(), capture_values(model) as captured:
                old_log_probs, sequence = self.policy_log_probs(model, train_batch, values=True)
            supervised = train_batch["labels"][:, 1:] != IGNORE_INDEX
            train_batch["old_values"] = strip_virtual_positions(captured["values"], train_batch["input_ids"])[:, :-1][supervised]
            train_batch["old_log_probs"] = old_log_probs
            kl = old_log_probs - self.reference_log_probs(model, frozen, train_batch) if self.uses_reference() else torch.zeros_like(old_log_probs)
            train_batch["reference_log_probs"] = old_log_probs - kl  # kl_bound measures the updated policy against it
            rewards = -self.current_kl_coef * kl
            last = torch.cumsum(torch.bincount(sequence, minlength=len(scores)), 0) - 1  # each completion's last token
            rewards[last] += scores.to(rewards.device)
            train_batch["sequence"] = sequence
            out.append(train_batch)
            token_rewards.append(rewards)
            kls.append(torch.zeros(len(scores), device=kl.device).index_add(0, sequence, kl))
        if self.whiten_rewards:
            scale = whiten(torch.cat(token_rewards), shift_mean=False)
            token_rewards = list(scale.split([r.numel() for r in token_rewards]))
        for train_batch, rewards in zip(out, token_rewards):
            n = int(train_batch["sequence"].max()) + 1 if train_batch["sequence"].numel() else 0
            padded_rewards, mask = per_sequence(rewards, train_batch["sequence"], n)
            padded_values, _ = per_sequence(train_batch["old_values"], train_batch["sequence"], n)
            advantages, returns = gae(padded_rewards, padded_values, mask, self.gamma, self.lam)
            train_batch["advantages"], train_batch["returns"] = advantages[mask], returns[mask]
        whitened = whiten(torch.cat([b["advantages"] for b in out]))
        for train_batch, advantages in zip(out, whitened.split([b["advantages"].numel() for b in out])):
            train_batch["advantages"] = advantages
        all_scores, all_kl = torch.cat([r[2] for r in rounds]), torch.cat(kls).float().cpu()
        for (batch, generated, scores, table), train_batch in zip(rounds, out):
            metrics = self.completion_metrics(generated, scores, table)
            metrics.update({
                "kl": all_kl.mean(), "kl_coef": torch.tensor(self.current_kl_coef),
                "reward_with_kl_penalty": (all_scores - self.current_kl_coef * all_kl).mean(),
                "timing/generation_seconds": torch.tensor(generation_seconds),
            })  # fmt: skip
            train_batch["step_metrics"] = metrics  # the step's, in every micro-batch
        return out, rounds, all_kl

    def updates(self, batches: list[dict], step: int) -> list[list[dict]]:
        """``ppo_epochs`` passes over the rollout's micro-batches, each shuffled (seeded by the run
        and the step) and cut into ``num_mini_batches`` optimizer steps."""
        generator = torch.Generator().manual_seed((self.base_seed * 7_919 + step) % 2**63)
        groups = []
        for _ in range(self.ppo_epochs):
            order = torch.randperm(len(batches), generator=generator).tolist()
            groups += [[batches[i] for i in part] for part in _split(order, self.num_mini_batches)]
        if self.kl_bound is None:
            return groups
        return self._bounded(groups, step)

    def _bounded(self, groups: list[list[dict]], step: int):
        """``groups`` one optimizer step at a time (the engine takes updates lazily, so each update
        has been applied before the next is asked for); after each epoch the KL is measured, and an
        epoch that left it past ``kl_bound`` and higher than it found it is undone, ending the step."""
        model, (kl, references) = self._policy, self._measured  # measured on this rollout by before_step
        batches = [b for group in groups[: self.num_mini_batches] for b in group]  # an epoch holds the rollout once
        trainable = _trainable(model)
        for epoch in range(self.ppo_epochs):
            saved = [p.detach().clone() for p in trainable]
            if epoch == 0:
                self._step_start = saved  # the weights that sampled this rollout: the next step may come back to them
            yield from groups[epoch * self.num_mini_batches : (epoch + 1) * self.num_mini_batches]
            before, kl = kl, self.policy_kl(model, batches, references)
            if kl > self.kl_bound and kl > before:
                _restore(trainable, saved)
                log.info("step %d: epoch %d of %d took the KL from %.2f to %.2f nats per completion, past method.kl_bound=%g; "
                         "the epoch is undone and the step's other epochs are skipped",
                         step + 1, epoch + 1, self.ppo_epochs, before, kl, self.kl_bound)  # fmt: skip
                self.undone_epochs += 1
                self.skipped_epochs += self.ppo_epochs - epoch - 1
                return

    def policy_kl(self, model: torch.nn.Module, batches: list[dict], references: dict) -> float:
        """The policy's KL to the reference per completion on the rollout's completions: at each
        completion token the exact KL between the two next-token distributions, summed (no-grad
        passes; ``references`` keeps the reference's logits between calls)."""
        total, completions = 0.0, 0
        for batch in batches:
            total += self.exact_kl(model, batch, references)
            completions += int(batch["sequence"].max()) + 1 if batch["sequence"].numel() else 0
        kl_sum, completions = _global_sum(total, completions, device=batches[0]["input_ids"].device)
        return kl_sum / max(completions, 1)

    def exact_kl(self, model: torch.nn.Module, batch: dict, references: dict | None = None) -> float:
        """KL(policy || reference) between the next-token distributions at every completion token
        of ``batch`` (the sampling temperature's), summed; ``references`` caches the reference's side."""
        chunked, references = self.chunked_loss, {} if references is None else references
        with torch.no_grad():
            if id(batch) not in references:
                references[id(batch)] = under_reference(self.reference_kind(), model, self.frozen, lambda m: completion_logits(m, batch, chunked))
            return float(token_kl(completion_logits(model, batch, chunked), references[id(batch)], self.temperature, self.loss_chunk_size))

    # -- the loss ---------------------------------------------------------------------------------------

    def loss_units(self, batch: dict) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def loss(self, model: torch.nn.Module, batch: dict) -> LossResult:
        if "advantages" not in batch:
            raise TunelabError(
                "PPO's loss takes generated completions, and this batch holds prompts only: evaluate PPO with "
                "taskpool=heldout-reward (the reward model's mean score of generated completions), not heldout-loss."
            )
        with capture_values(model) as captured:
            log_probs, _ = self.policy_log_probs(model, batch, values=True)
        values = strip_virtual_positions(captured["values"], batch["input_ids"])[:, :-1][batch["labels"][:, 1:] != IGNORE_INDEX]
        policy_losses, clipped = clipped_token_losses(log_probs, batch["old_log_probs"], batch["advantages"], self.cliprange, self.cliprange)
        value_losses, value_clipped = clipped_value_losses(values, batch["old_values"], batch["returns"], self.cliprange_value)
        loss = (policy_losses + self.vf_coef * value_losses).sum()
        units = log_probs.numel()
        detached = log_probs.detach() - batch["old_log_probs"]
        sums = {
            "policy_loss": policy_losses.detach().sum(), "value_loss": value_losses.detach().sum(),
            "clip_ratio": clipped.float().sum(), "value_clip_ratio": value_clipped.float().sum(),
            "approx_kl": (0.5 * detached * detached).sum(), "value_mean": values.detach().sum(),
        }  # fmt: skip
        # The engine divides every metric by the step's units: the step's means enter weighted by units.
        scale = torch.as_tensor(units, dtype=torch.float32, device=log_probs.device)
        sums.update({k: torch.as_tensor(v, device=scale.device).float() * scale for k, v in batch.get("step_metrics", {}).items()})
        return LossResult(loss, units, sums)

    # -- evaluation ------------------------------------------------------------------------------------

    def evaluate_completions(self, model: torch.nn.Module, batch: dict, generated: dict) -> dict:
        """The KL of the policy to the reference on the held-out completions, summed over them: ``kl``
        from the completions' own log-ratios (an estimate of the KL when they are sampled:
        taskpool.greedy=false), ``kl_exact`` from the whole next-token distributions at each of
        their tokens (method.kl_bound's measure)."""
        if not self.uses_reference():
            return {}
        train_batch = self.completion_batch(batch, generated)
        with torch.no_grad():
            log_probs, sequence = self.policy_log_probs(model, train_batch)
            kl = log_probs - self.reference_log_probs(model, self.frozen, train_batch)
        return {"kl": kl.sum(), "kl_exact": torch.tensor(self.exact_kl(model, train_batch))}


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _restore(parameters: list[torch.nn.Parameter], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for parameter, value in zip(parameters, values):
            parameter.copy_(value)


def completion_logits(model: torch.nn.Module, batch: dict, chunked: bool) -> tuple[int, object]:
    """How many completion tokens ``batch`` has, and a function giving the float32 logits that
    predict tokens [a, b) of them: the head applied on demand to the final hidden states
    (``chunked``), or slices of the model's full logits."""
    supervised = batch["labels"][:, 1:] != IGNORE_INDEX
    if chunked:
        hidden, _ = final_hidden_states(model, batch)
        rows, weight = hidden[:, :-1][supervised], _unwrap(model).get_output_embeddings().weight
        return rows.shape[0], lambda a, b: rows[a:b].float() @ weight.float().T
    logits = strip_virtual_positions(model(**model_inputs(batch), use_cache=False).logits, batch["input_ids"])[:, :-1][supervised]
    return logits.shape[0], lambda a, b: logits[a:b].float()


def token_kl(policy, reference, temperature: float = 1.0, chunk_rows: int = 1024) -> torch.Tensor:
    """Sum over the positions of KL(policy || reference) between the next-token distributions at
    ``temperature``; both are ``completion_logits`` results for the same rows."""
    (rows, policy_logits), (reference_rows, reference_logits) = policy, reference
    if rows != reference_rows:
        raise TunelabError(f"the policy has {rows} completion tokens and the reference {reference_rows}: they must score the same rows.")
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, rows, chunk_rows):
        end = min(start + chunk_rows, rows)
        p = (policy_logits(start, end) / temperature).log_softmax(-1)
        q = (reference_logits(start, end) / temperature).log_softmax(-1)
        total += float((p.exp() * (p - q)).sum())
    return total


def _global_sum(*values, device) -> list[float]:
    """Numbers summed over ranks (themselves when not distributed)."""
    stacked = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stacked)
    return stacked.tolist()


def _split(order: list[int], parts: int) -> list[list[int]]:
    """``order`` cut into ``parts`` consecutive groups of near-equal size (none empty)."""
    parts = min(parts, len(order))
    size, extra = divmod(len(order), parts)
    groups, start = [], 0
    for k in range(parts):
        end = start + size + (k < extra)
        groups.append(order[start:end])
        start = end
    return groups
