"""Group relative policy optimisation (GRPO) with rewards a program can check.

Every step, before the loss, the current weights complete each prompt ``num_generations`` times
(``before_step``); the reward functions score the completions; each completion's advantage is its
reward against its own group's (standardised by ``scale_rewards``). The policy is then trained on
the completions (prompt tokens never in the loss) with the clipped surrogate of PPO,

    ratio_t = π(y_t | ...) / π_old(y_t | ...)
    loss_t  = -min(ratio_t · A, clip(ratio_t, 1 - ε, 1 + ε_high) · A) + β · KL_t

where KL_t is the k3 estimator exp(r) - r - 1 of the divergence to a frozen reference (r = log
π_ref - log π at the token). ``loss_type`` decides how token losses are averaged: ``dapo`` over
every completion token of the step, ``grpo`` within each completion and then over completions,
``dr_grpo`` over completions times ``max_completion_length`` (no length bias).

The completions of a micro-batch train as one packed row, with the output head applied only at
completion tokens (``token_log_probs``).
"""

import functools
import inspect
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

import torch

from tunelab.config import instantiate
from tunelab.data import IGNORE_INDEX
from tunelab.engine.method import LossResult, Models
from tunelab.errors import TunelabError
from tunelab.methods.bradley_terry_rm import rewards as reward_model_scores
from tunelab.methods.fullfinetune_sft import supports_chunked_loss
from tunelab.methods.online import OnlinePolicyOptimization
from tunelab.models.adapters import apply_adapter
from tunelab.models.pool import full_precision_loader

log = logging.getLogger(__name__)

LossType = Literal["dapo", "grpo", "dr_grpo"]
ScaleRewards = Literal["group", "batch", "none"]


# ----------------------------------------------------------------------------- the maths


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantage of each completion: its reward minus its group's mean, divided by the group's
    standard deviation (``group``), by the whole batch's (``batch``) or by nothing (``none``).
    ``rewards`` holds consecutive groups of ``group_size``. Returns the advantages and each
    group's reward standard deviation."""
    groups = rewards.view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    spread = groups.std(dim=1) if group_size > 1 else torch.zeros(groups.shape[0], device=rewards.device)
    centred = (groups - mean).flatten()
    if scale == "group":
        return centred / (spread.repeat_interleave(group_size) + eps), spread
    if scale == "batch":
        return centred / (rewards.std() + eps if rewards.numel() > 1 else 1.0), spread
    if scale == "none":
        return centred, spread
    raise TunelabError(f"method.scale_rewards={scale!r} is not one of: group, batch, none.")


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from samples of π: exp(r) - r - 1 with r = log π_ref - log π
    (non-negative, unbiased; Schulman's k3)."""
    r = ref_log_probs - log_probs
    return torch.exp(r) - r - 1


def clipped_token_losses(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, epsilon: float, epsilon_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (to minimise), and which tokens the clip bound."""
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


def normalise(token_losses: torch.Tensor, sequence: torch.Tensor, sequences: int, loss_type: str, max_completion_length: int) -> tuple[torch.Tensor, int | torch.Tensor]:
    """A micro-batch's summed loss and the units the engine divides the step's sum by:
    dapo -> (sum over tokens, tokens); grpo -> (sum over completions of their mean token loss,
    completions); dr_grpo -> (sum over tokens, completions x max_completion_length)."""
    if loss_type == "dapo":
        return token_losses.sum(), token_losses.numel()
    if loss_type == "grpo":
        sums = torch.zeros(sequences, dtype=token_losses.dtype, device=token_losses.device).index_add(0, sequence, token_losses)
        counts = torch.zeros(sequences, dtype=token_losses.dtype, device=token_losses.device).index_add(0, sequence, torch.ones_like(token_losses))
        return (sums / counts.clamp(min=1)).sum(), sequences
    if loss_type == "dr_grpo":
        return token_losses.sum(), sequences * max_completion_length
    raise TunelabError(f"method.loss_type={loss_type!r} is not one of: {', '.join(LossType.__args__)}.")


# ----------------------------------------------------------------------------- rewards


def _reward_name(fn) -> str:
    while isinstance(fn, functools.partial):  # _partial_ nodes
        fn = fn.func
    return getattr(fn, "__name__", None) or type(fn).__name__


def call_reward_function(fn, index: int, prompts: list, completions: list[str], columns: dict[str, list]) -> list[float | None]:
    """One reward function over a batch, with the keywords it takes; any failure or a wrong-sized
    answer is a TunelabError naming the function (method.reward_funcs[index]) and an example."""
    name = f"method.reward_funcs[{index}] ({_reward_name(fn)})"
    parameters = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        kwargs = columns
    else:
        kwargs = {k: v for k, v in columns.items() if k in parameters}
    try:
        values = fn(prompts, completions, **kwargs)
    except Exception as error:
        raise TunelabError(
            f"The reward function {name} raised {type(error).__name__}: {error}. First example: prompt "
            f"{json.dumps(prompts[0])[:300]}, completion {completions[0][:300]!r}. Fix the function, or the data fields it reads "
            f"(the record's fields arrive as keyword arguments: {', '.join(sorted(columns)) or 'none'})."
        ) from error
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
        raise TunelabError(f"The reward function {name} returned {got} for {len(completions)} completions; it must return one float (or None) per completion.")
    for i, value in enumerate(values):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise TunelabError(
                f"The reward function {name} returned {value!r} for completion {i} ({completions[i][:200]!r}); "
                "each value must be a finite number, or None where the function does not apply."
            )
    return [None if v is None else float(v) for v in values]


# ----------------------------------------------------------------------------- the method


@dataclass
class GroupRelativePolicyOptimization(OnlinePolicyOptimization):
    """GRPO on prompts (``data.format=prompt``) with reward functions, full or with any peft
    adapter. ``dataloader_kwargs.batch_size`` counts completions: each prompt is completed
    ``num_generations`` times, so it must be a multiple of that. The prompt, sampling, reference
    and adapter options are ``OnlinePolicyOptimization``'s."""

    num_generations: int = 8
    """Completions per prompt (the group their rewards are compared within)."""
    beta: float = 0.0
    """Weight of the KL to the reference (k3 estimator); 0 loads no reference model."""
    epsilon: float = 0.2
    """Ratio clipping: [1 - epsilon, 1 + epsilon_high]."""
    epsilon_high: Optional[float] = None
    """Upper clipping bound (default: epsilon); DAPO's clip-higher uses e.g. 0.28."""
    num_iterations: int = 1
    """Optimizer steps on each generated batch (the clipped ratio matters from the second one on)."""
    loss_type: LossType = "dapo"
    scale_rewards: ScaleRewards = "group"
    """Divide advantages by the group's reward std (group), the step's (batch), or not (none)."""
    reward_funcs: list = field(default_factory=list)
    """``_target_`` nodes of reward functions (tunelab.rewards or your own), summed with reward_weights."""
    reward_weights: Optional[list] = None
    """One weight per reward function (default: all 1)."""
    mask_truncated_completions: bool = False
    """Leave completions that hit max_completion_length out of the loss."""

    loss_unit: ClassVar[str] = "token"

    def __post_init__(self):
        super().__post_init__()
        # what the step's loss is averaged over: completion tokens (dapo) or completions
        self.loss_unit = "token" if self.loss_type == "dapo" else "sequence"
        self.rewarders = []

    def completions_per_prompt(self) -> int:
        return self.num_generations

    def updates_per_step(self) -> int:
        return self.num_iterations

    def updates(self, batches: list[dict], step: int) -> list[list[dict]]:
        return [batches] * self.num_iterations

    # -- checks and set-up ------------------------------------------------------------------------

    def check(self) -> None:
        super().check()
        batch = int(self.dataloader_kwargs.get("batch_size", 1))
        if self.num_generations < 2:
            raise TunelabError(f"method.num_generations={self.num_generations}: a group needs at least 2 completions to compare.")
        if batch % self.num_generations:
            raise TunelabError(
                f"method.dataloader_kwargs.batch_size={batch} counts completions and must be a multiple of "
                f"method.num_generations={self.num_generations} (each prompt is completed that many times); "
                f"e.g. method.dataloader_kwargs.batch_size={self.num_generations * max(1, round(batch / self.num_generations))}."
            )
        if self.loss_type not in LossType.__args__:
            raise TunelabError(f"method.loss_type={self.loss_type!r} is not one of: {', '.join(LossType.__args__)}.")
        if self.scale_rewards not in ScaleRewards.__args__:
            raise TunelabError(f"method.scale_rewards={self.scale_rewards!r} is not one of: {', '.join(ScaleRewards.__args__)}.")
        if self.num_iterations < 1:
            raise TunelabError(f"method.num_iterations={self.num_iterations} must be at least 1 (optimizer steps per generated batch).")
        if self.beta < 0 or self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise TunelabError("method.beta must be >= 0, and method.epsilon (and epsilon_high) positive.")
        self.rewarders = self._build_reward_functions()

    def _build_reward_functions(self) -> list:
        if not self.reward_funcs:
            raise TunelabError(
                "GRPO needs at least one reward function: set method.reward_funcs to a list of _target_ nodes, e.g. "
                "'method.reward_funcs=[{_target_:tunelab.rewards.gsm8k_exact_match,_partial_:true}]'."
            )
        built = []
        for i, node in enumerate(self.reward_funcs):
            if not isinstance(node, dict) or "_target_" not in node:
                raise TunelabError(f"method.reward_funcs[{i}] must be a _target_ node (a dict with _target_), got {node!r}.")
            target = node["_target_"]
            if inspect.isfunction(_import_target(target, i)) and not node.get("_partial_"):
                node = {**node, "_partial_": True}  # a plain function is the reward itself, not a factory
            try:
                fn = instantiate(node)
            except TunelabError as error:
                raise TunelabError(f"method.reward_funcs[{i}]: {error}") from None
            if not (callable(fn) or getattr(fn, "needs_model", False)):
                raise TunelabError(f"method.reward_funcs[{i}] ({target}) built a {type(fn).__name__}, which is not callable.")
            if getattr(fn, "needs_model", False):
                fn.check(f"method.reward_funcs[{i}].path")
            built.append(fn)
        if self.reward_weights is not None and len(self.reward_weights) != len(built):
            raise TunelabError(f"method.reward_weights has {len(self.reward_weights)} weights for {len(built)} reward functions; give one per function.")
        return built

    def build_models(self, pool, tokenizer) -> Models:
        self.full_precision_base = full_precision_loader(pool, tokenizer)  # merging a QLoRA adapter loads it
        model = pool.load_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        frozen = {}
        if self.beta > 0 and self.reference_kind() == "copy":
            frozen["reference"] = self.frozen_reference(model)
        for i, fn in enumerate(self.rewarders):
            if getattr(fn, "needs_model", False):
                frozen[f"reward_model_{i}"] = fn.load()
        model = self.prepare_model(model)
        if self.peft_config:
            model = apply_adapter(model, self.peft_config, self.adapter_name, self.fused_kernels, tokenizer=tokenizer)
            if self.chunked_loss and not supports_chunked_loss(model):
                self.chunked_loss = False
        self.base_seed = torch.initial_seed()  # the run's seed: completions depend on it and the step only
        return Models(model, frozen)

    def score(self, batch: dict, generated: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Each completion's total reward (weighted sum over the functions that apply) and the
        per-function rewards (NaN where a function returned None): (N,) and (N, functions)."""
        prompts = [json.loads(batch["prompt"][i]) for i in generated["prompt_index"]]
        records = [json.loads(batch["columns"][i]) for i in generated["prompt_index"]]
        columns = {key: [r.get(key) for r in records] for key in (records[0] if records else {})}
        columns["completion_ids"] = generated["completion_ids"]
        per_function = []
        for i, fn in enumerate(self.rewarders):
            if getattr(fn, "needs_model", False):
                device = batch["prompt_ids"].device
                scores = [reward_model_scores(self.frozen[f"reward_model_{i}"], {k: v.to(device) for k, v in b.items()})
                          for b in fn.batches(prompts, generated["texts"])]  # fmt: skip
                per_function.append(torch.cat(scores).float().cpu())
            else:
                values = call_reward_function(fn, i, prompts, generated["texts"], columns)
                per_function.append(torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32))
        table = torch.stack(per_function, dim=1)
        weights = torch.tensor(self.reward_weights or [1.0] * len(self.rewarders), dtype=torch.float32)
        return torch.nansum(table * weights, dim=1), table

    def reward_names(self) -> list[str]:
        return [_metric_name(fn, i) for i, fn in enumerate(self.rewarders)]

    # -- every step -----------------------------------------------------------------------------------

    def before_step(self, model, frozen: dict, batches: list[dict], step: int) -> list[dict]:
        """Generate, score and build the step's training batches: packed prompt + completion rows
        with completion-only labels, each completion's advantage, the reference's log-probabilities
        when beta > 0, and the policy's own when the batch is trained on more than once."""
        rounds = []
        started = time.perf_counter()
        for i, batch in enumerate(batches):
            generated = self.generate(model, batch, self.generation_seed(step, i))
            rounds.append((batch, generated, *self.score(batch, generated)))
        generation_seconds = time.perf_counter() - started  # (generation waits for its tokens: no device work is left pending)
        all_rewards = torch.cat([r[2] for r in rounds])
        out = []
        for batch, generated, rewards, table in rounds:
            if self.scale_rewards == "batch":  # the std of every reward of the step on this device
                advantages, spread = group_advantages(rewards, self.num_generations, "none")
                advantages = advantages / (all_rewards.std() + 1e-4 if all_rewards.numel() > 1 else 1.0)
            else:
                advantages, spread = group_advantages(rewards, self.num_generations, self.scale_rewards)
            train_batch = self.completion_batch(batch, generated, self.mask_truncated_completions)
            train_batch["advantages"] = advantages.to(train_batch["input_ids"].device)
            if self.beta > 0:
                train_batch["ref_log_probs"] = self.reference_log_probs(model, frozen, train_batch)
            if self.num_iterations > 1:  # π_old: the weights that generated, before the first update
                with torch.no_grad():
                    train_batch["old_log_probs"] = self.policy_log_probs(model, train_batch)[0]
            metrics = self.completion_metrics(generated, rewards, table)
            metrics["frac_reward_zero_std"] = (spread < 1e-6).float().mean()
            metrics["timing/generation_seconds"] = torch.tensor(generation_seconds)
            train_batch["step_metrics"] = metrics  # the step's, in every micro-batch
            out.append(train_batch)
        if self.samples_due(step):
            self.write_samples(step, *rounds[0])
        return out

    # -- the loss ---------------------------------------------------------------------------------------

    def loss_units(self, batch: dict) -> int | torch.Tensor:
        sequences = batch["advantages"].shape[0]
        if self.loss_type == "dapo":
            return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        return sequences if self.loss_type == "grpo" else sequences * self.max_completion_length

    def loss(self, model: torch.nn.Module, batch: dict) -> LossResult:
        if "advantages" not in batch:
            raise TunelabError(
                "GRPO's loss takes generated completions, and this batch holds prompts only: evaluate GRPO with "
                "taskpool=heldout-reward (mean reward of generated completions), not heldout-loss."
            )
        log_probs, sequence = self.policy_log_probs(model, batch)
        advantages = batch["advantages"][sequence]
        old = batch.get("old_log_probs", log_probs.detach())  # one update per generation: π_old is π
        token_losses, clipped = clipped_token_losses(log_probs, old, advantages, self.epsilon, self.epsilon_high or self.epsilon)
        metrics = {"clip_ratio": clipped.float().mean()}
        if self.beta > 0:
            kl = k3_kl(log_probs, batch["ref_log_probs"])
            token_losses = token_losses + self.beta * kl
            metrics["kl"] = kl.detach().mean()
        sequences = batch["advantages"].shape[0]
        loss, units = normalise(token_losses, sequence, sequences, self.loss_type, self.max_completion_length)
        # The engine divides every metric by the step's units: per-micro-batch means enter weighted by units.
        metrics.update(batch.get("step_metrics", {}))
        scale = torch.as_tensor(units, dtype=torch.float32, device=log_probs.device)
        return LossResult(loss, units, {k: torch.as_tensor(v, device=scale.device).float() * scale for k, v in metrics.items()})


def _metric_name(fn, index: int) -> str:
    name = _reward_name(fn)
    return name.split("(")[0] if name else f"reward_{index}"


def _import_target(target: str, index: int):
    """The object a reward function's _target_ names, or a clear error (nothing has loaded yet)."""
    import importlib

    module_name, _, attribute = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise TunelabError(
            f"method.reward_funcs[{index}]._target_={target!r} does not import ({type(error).__name__}: {error}). "
            "Give the dotted path of a function or class, e.g. tunelab.rewards.gsm8k_exact_match, and make sure its module is importable."
        ) from None
