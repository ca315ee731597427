"""Direct preference optimisation and its variants (IPO, hinge, robust, SimPO, ORPO, RPO).

The policy is trained to prefer the chosen completion over the rejected one, relative to a frozen
reference: with per-sequence log-probabilities summed over completion tokens only,

    logits = (log π(chosen) - log π(rejected)) - (log π_ref(chosen) - log π_ref(rejected))
    sigmoid loss = -log σ(β · logits)

A batch holds B pairs as 2B sequences (chosen first), packed into one row by default. The
log-probabilities come from the output head applied only at completion tokens, chunk by chunk
(``models.kernels.linear_log_probs``): the full-vocabulary logits are never formed.
"""

import copy
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Optional

import torch
import torch.nn.functional as F

from tunelab.data import IGNORE_INDEX, REFERENCE_COLUMNS, CompletionPairCollator, build_datasets
from tunelab.engine.method import DataSplits, LossResult, Models
from tunelab.errors import TunelabError
from tunelab.methods.bradley_terry_rm import check_pair_batch_size
from tunelab.methods.fullfinetune_sft import FullFinetuneSFT, _unwrap, final_hidden_states, model_inputs, supports_chunked_loss
from tunelab.models.adapters import apply_adapter, check_adapter_options, check_reference_under_adapter, mutates_base, strip_virtual_positions
from tunelab.models.kernels import linear_log_probs
from tunelab.models.pool import full_precision_loader
from tunelab.progress import progress_bar
from tunelab.resources import cache_dir

log = logging.getLogger(__name__)

LossType = Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"]
REFERENCE_FREE = ("simpo", "orpo")
LENGTH_NORMALISED = ("ipo", "simpo", "orpo")  # these compare mean per-token log-probabilities


# ----------------------------------------------------------------------------- log-probabilities


def _sequence_of_targets(batch: dict, supervised: torch.Tensor) -> torch.Tensor:
    """For every supervised target position, the index of the sequence it belongs to."""
    if "cu_seq_lens_q" in batch:  # one packed row: sequence i covers tokens bounds[i]:bounds[i+1]
        bounds = batch["cu_seq_lens_q"].long()
        tokens = batch["input_ids"].shape[1]
        sequence = torch.repeat_interleave(torch.arange(bounds.shape[0] - 1, device=bounds.device), bounds.diff(), output_size=tokens)
        return sequence[1:][supervised[0]]  # target t is token t + 1
    rows, positions = supervised.shape
    return torch.arange(rows, device=supervised.device)[:, None].expand(rows, positions)[supervised]


def sequence_count(batch: dict) -> int:
    """Sequences in a packed or padded batch (from shapes: no wait for the device)."""
    return batch["cu_seq_lens_q"].shape[0] - 1 if "cu_seq_lens_q" in batch else batch["input_ids"].shape[0]


def token_log_probs(
    model: torch.nn.Module, batch: dict, chunked: bool = True, chunk_rows: int = 1024, temperature: float = 1.0, **forward_kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every supervised (completion) target token, in row order (float32), and
    the index of the sequence each belongs to.

    ``chunked``: the head only at supervised positions, in chunks (``linear_log_probs``); otherwise
    the plain reference path, full logits and a log-softmax. ``temperature``: of the distribution
    the tokens were sampled from (logits divided by it; online methods). ``forward_kwargs`` go to
    the model's forward (PPO's value model runs in the same call).
    """
    targets = batch["labels"][:, 1:]
    supervised = targets != IGNORE_INDEX
    if chunked:
        hidden, dtype = final_hidden_states(model, batch, **forward_kwargs)
        weight = _unwrap(model).get_output_embeddings().weight
        rows = hidden[:, :-1][supervised]
        log_probs = linear_log_probs(rows / temperature if temperature != 1.0 else rows, weight, targets[supervised], chunk_rows, dtype)
    else:
        logits = strip_virtual_positions(model(**model_inputs(batch), use_cache=False, **forward_kwargs).logits, batch["input_ids"])[:, :-1]
        log_probs = (logits[supervised].float() / temperature).log_softmax(-1).gather(1, targets[supervised][:, None]).squeeze(1)
    return log_probs, _sequence_of_targets(batch, supervised)


def sequence_log_probs(model: torch.nn.Module, batch: dict, chunked: bool = True, chunk_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's supervised (completion) tokens, and how many
    there are: two float32 vectors of one value per sequence (see ``token_log_probs``)."""
    log_probs, sequence = token_log_probs(model, batch, chunked, chunk_rows)
    sequences = sequence_count(batch)
    sums = torch.zeros(sequences, dtype=torch.float32, device=log_probs.device).index_add(0, sequence, log_probs)
    counts = torch.zeros(sequences, dtype=torch.float32, device=sums.device).index_add(0, sequence, torch.ones_like(log_probs))
    return sums, counts


# ----------------------------------------------------------------------------- the losses


def preference_losses(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
    chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, *, loss_type: str, beta: float, label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5, rpo_alpha: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards of chosen and rejected, from summed completion
    log-probabilities (policy and reference) and completion lengths. All vectors of B pairs."""
    if loss_type in LENGTH_NORMALISED:  # compare mean per-token log-probabilities
        chosen, rejected = chosen / chosen_tokens, rejected / rejected_tokens
        if ref_chosen is not None:
            ref_chosen, ref_rejected = ref_chosen / chosen_tokens, ref_rejected / rejected_tokens
    if loss_type in REFERENCE_FREE:
        reward_chosen, reward_rejected = beta * chosen.detach(), beta * rejected.detach()
    else:
        reward_chosen, reward_rejected = beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()
        logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    smoothing = label_smoothing
    if loss_type == "sigmoid":  # label_smoothing > 0: conservative DPO
        losses = -F.logsigmoid(beta * logits) * (1 - smoothing) - F.logsigmoid(-beta * logits) * smoothing
    elif loss_type == "robust":  # unbiased under preference noise of rate label_smoothing
        losses = (-F.logsigmoid(beta * logits) * (1 - smoothing) + F.logsigmoid(-beta * logits) * smoothing) / (1 - 2 * smoothing)
    elif loss_type == "hinge":
        losses = F.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "simpo":  # target margin simpo_gamma between the mean-log-prob rewards
        margin = beta * (chosen - rejected) - simpo_gamma
        losses = -F.logsigmoid(margin) * (1 - smoothing) - F.logsigmoid(-margin) * smoothing
    elif loss_type == "orpo":  # NLL of chosen plus beta times -log σ(log odds ratio)
        log_odds = (chosen - rejected) - (torch.log(-torch.expm1(chosen)) - torch.log(-torch.expm1(rejected)))
        losses = -chosen - beta * F.logsigmoid(log_odds)
    else:
        raise TunelabError(f"method.loss_type={loss_type!r} is not one of: {', '.join(LossType.__args__)}.")
    if rpo_alpha > 0:  # RPO: also the mean per-token NLL of the chosen completion
        mean_chosen = chosen if loss_type in LENGTH_NORMALISED else chosen / chosen_tokens
        losses = losses - rpo_alpha * mean_chosen
    return losses, reward_chosen, reward_rejected


# ----------------------------------------------------------------------------- the method


@dataclass
class DirectPreferenceOptimization(FullFinetuneSFT):
    """DPO and its variants on preference pairs (``data.format=preference``), full or with any
    peft adapter. ``dataloader_kwargs.batch_size`` counts sequences: each pair is two."""

    max_length: int = 1024
    """Longest sequence (prompt + completion) in tokens; longer completions lose their end."""
    max_prompt_length: int = 512
    """Longest prompt in tokens; longer prompts keep their last tokens."""
    beta: float = 0.1
    """Strength of the tie to the reference (the KL coefficient); for ORPO the odds-ratio weight."""
    loss_type: LossType = "sigmoid"
    label_smoothing: float = 0.0
    """sigmoid: conservative DPO; robust: the assumed rate of flipped preference labels (< 0.5)."""
    simpo_gamma: float = 0.5
    """SimPO's target margin between the chosen and rejected rewards."""
    rpo_alpha: float = 0.0
    """> 0 adds rpo_alpha times the chosen completion's mean token NLL (RPO)."""
    reference: Literal["auto", "copy", "adapter_disabled", "none"] = "auto"
    """auto: the base model with the adapter switched off under peft, a frozen copy of the starting
    model otherwise, none for simpo and orpo (which need no reference)."""
    precompute_ref_log_probs: bool = False
    """Compute the reference's log-probabilities over the training data once before the first
    step (cached beside the tokenized data) and keep no reference model in memory."""
    peft_config: Optional[dict] = None
    """A peft ``_target_`` node (e.g. peft.LoraConfig): train only an adapter."""
    adapter_name: str = "default"
    merge_and_unload: bool = False
    """With peft_config: also write the adapter merged into the base weights to OUTPUT_DIR/merged."""
    save_ckpt_type: Literal["lightning", "hf", "peft"] = "lightning"
    """hf: folders AutoModelForCausalLM loads; peft (with peft_config): adapter folders."""

    loss_unit: ClassVar[str] = "pair"

    def reference_kind(self) -> str:
        """What plays the reference: copy, adapter_disabled or none."""
        if self.reference != "auto":
            return self.reference
        if self.loss_type in REFERENCE_FREE:
            return "none"
        return "adapter_disabled" if self.peft_config and not mutates_base(self.peft_config) else "copy"

    def check(self) -> None:
        super().check()
        check_pair_batch_size(self.dataloader_kwargs, "a DPO", example=8)
        check_adapter_options(self, self.peft_config, self.merge_and_unload)
        check_reference_under_adapter(self.reference, self.peft_config)
        if self.loss_type not in LossType.__args__:
            raise TunelabError(f"method.loss_type={self.loss_type!r} is not one of: {', '.join(LossType.__args__)}.")
        if self.reference == "adapter_disabled" and not self.peft_config:
            raise TunelabError(
                "method.reference=adapter_disabled uses the base model under the adapter as the reference, but there is "
                "no adapter: set method.peft_config (e.g. a peft.LoraConfig node), or use method.reference=copy."
            )
        if self.loss_type in REFERENCE_FREE and self.reference not in ("auto", "none"):
            raise TunelabError(
                f"method.loss_type={self.loss_type} uses no reference model, but method.reference={self.reference}: "
                "set method.reference=auto (or none)."
            )
        if self.reference_kind() == "none" and self.loss_type not in REFERENCE_FREE:
            raise TunelabError(
                f"method.loss_type={self.loss_type} compares the policy with a reference, but method.reference=none. "
                "Use method.reference=auto, or a reference-free loss (method.loss_type=simpo or orpo)."
            )
        if self.precompute_ref_log_probs and self.reference_kind() == "none":
            raise TunelabError(
                "method.precompute_ref_log_probs=true, but this run has no reference model "
                f"(method.reference={self.reference}, method.loss_type={self.loss_type}): set it to false."
            )
        if self.save_ckpt_type == "peft" and not self.peft_config:
            raise TunelabError("method.save_ckpt_type=peft writes adapter folders, but there is no adapter: set method.peft_config, or use hf.")
        if not 0 <= self.label_smoothing < 0.5:
            raise TunelabError(f"method.label_smoothing={self.label_smoothing} must be in [0, 0.5).")
        if self.beta <= 0:
            raise TunelabError(f"method.beta={self.beta} must be positive.")

    def build_data(self, data_cfg, tokenizer) -> DataSplits:
        if data_cfg.format != "preference":
            raise TunelabError(
                f"DPO trains on preference pairs: set data.format=preference (it is {data_cfg.format!r}); records need "
                "'chosen' and 'rejected' (and optionally 'prompt')."
            )
        self._cache = Path(data_cfg.cache_dir).expanduser() if data_cfg.cache_dir else cache_dir("datasets")
        return DataSplits(*build_datasets(data_cfg, tokenizer, self.max_length, max_prompt_length=self.max_prompt_length))

    def build_models(self, pool, tokenizer) -> Models:
        self.full_precision_base = full_precision_loader(pool, tokenizer)  # merging a QLoRA adapter loads it
        model = pool.load_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        frozen = {}
        if self.reference_kind() == "copy":  # a copy, not a second load: a randomly initialised model would differ
            frozen["reference"] = self.prepare_reference(copy.deepcopy(model))
        model = self.prepare_model(model)
        if self.peft_config:
            model = apply_adapter(model, self.peft_config, self.adapter_name, self.fused_kernels, tokenizer=tokenizer)
            if self.chunked_loss and not supports_chunked_loss(model):  # e.g. an adapter on the output head
                self.chunked_loss = False
        return Models(model, frozen)

    def prepare_reference(self, model: torch.nn.Module) -> torch.nn.Module:
        """The same fast paths as the policy (it reads the same packed batches), uncompiled: it
        runs without gradients, where compiling would cost more than it saves."""
        return self.prepare_model(model, compile=False)

    def collate_fn(self, tokenizer):
        return CompletionPairCollator(tokenizer.pad_token_id, self.packing, self.pad_to_multiple_of)

    def examples_per_batch(self, batch_size: int) -> int:
        return max(1, batch_size // 2)

    def loss_units(self, batch: dict) -> int:
        return sequence_count(batch) // 2

    def estimate(self, model, train_set, device, precision, steps):
        return None  # the estimate models SFT batches; pairs with a reference are not modelled yet

    # -- the reference ------------------------------------------------------------------------

    def reference_log_probs(self, model: torch.nn.Module, frozen: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed completion log-probabilities of chosen and rejected under the reference."""
        sums, _ = under_reference(self.reference_kind(), model, frozen, lambda m: sequence_log_probs(m, batch, self.chunked_loss, self.loss_chunk_size))
        pairs = sums.shape[0] // 2
        return sums[:pairs], sums[pairs:]

    def prepare_data(self, splits: DataSplits, model, frozen: dict, batches) -> tuple[DataSplits, dict]:
        """The reference's log-probabilities of the validation pairs always (they never change),
        and of the training pairs with precompute_ref_log_probs; then the reference is let go."""
        if self.reference_kind() == "none":
            return splits, frozen
        train, val = splits.train, splits.val
        if self.precompute_ref_log_probs:
            train = self._with_reference(train, "training", model, frozen, batches)
        if val is not None:
            val = self._with_reference(val, "validation", model, frozen, batches)
        keep = {k: v for k, v in frozen.items() if not (self.precompute_ref_log_probs and k == "reference")}
        return DataSplits(train, val, splits.report), keep

    def _with_reference(self, dataset, what: str, model, frozen: dict, batches):
        """``dataset`` plus its reference log-probability columns, computed once and cached."""
        from safetensors.torch import load_file, save_file

        reference = frozen.get("reference", model)
        key = hashlib.sha1(
            f"{dataset._fingerprint}|{self.reference_kind()}|{_weights_checksum(reference)}|{self.packing}|{self.chunked_loss}".encode()
        ).hexdigest()[:16]
        file = self._cache / "reference-logps" / f"{key}.safetensors"
        if file.exists():
            columns = load_file(file)
            log.info("Reference log-probabilities of the %s pairs read from %s", what, file)
        else:
            chosen, rejected = [], []
            bar = progress_bar(len(dataset), desc=f"Reference log-probs ({what})")
            for batch in batches(dataset):
                c, r = self.reference_log_probs(model, frozen, batch)
                chosen.append(c.cpu())
                rejected.append(r.cpu())
                bar.update(c.shape[0])
            bar.close()
            columns = dict(zip(REFERENCE_COLUMNS, (torch.cat(chosen), torch.cat(rejected))))
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")  # every rank computes and writes the same
            save_file(columns, tmp)
            tmp.replace(file)  # atomic: a crash leaves no half-written cache
        for name in REFERENCE_COLUMNS:
            dataset = dataset.remove_columns(name) if name in dataset.column_names else dataset
            dataset = dataset.add_column(name, columns[name].tolist())
        return dataset

    def before_step(self, model, frozen: dict, batches: list[dict], step: int = 0) -> list[dict]:
        """Live reference: its log-probabilities of the step's pairs, before the policy's forward."""
        if self.reference_kind() == "none" or REFERENCE_COLUMNS[0] in batches[0]:
            return batches
        out = []
        for batch in batches:
            chosen, rejected = self.reference_log_probs(model, frozen, batch)
            out.append({**batch, REFERENCE_COLUMNS[0]: chosen, REFERENCE_COLUMNS[1]: rejected})
        return out

    # -- the loss -------------------------------------------------------------------------------

    def loss(self, model: torch.nn.Module, batch: dict) -> LossResult:
        sums, counts = sequence_log_probs(model, batch, self.chunked_loss, self.loss_chunk_size)
        pairs = sums.shape[0] // 2
        ref_chosen, ref_rejected = (batch.get(name) for name in REFERENCE_COLUMNS)
        if self.reference_kind() != "none" and ref_chosen is None:
            raise TunelabError("DPO batch without reference log-probabilities: before_step (or prepare_data) did not run.")
        losses, reward_chosen, reward_rejected = preference_losses(
            sums[:pairs], sums[pairs:], ref_chosen, ref_rejected, counts[:pairs], counts[pairs:],
            loss_type=self.loss_type, beta=self.beta, label_smoothing=self.label_smoothing,
            simpo_gamma=self.simpo_gamma, rpo_alpha=self.rpo_alpha,
        )  # fmt: skip
        metrics = {
            "rewards/chosen": reward_chosen.sum(), "rewards/rejected": reward_rejected.sum(),
            "rewards/accuracy": (reward_chosen > reward_rejected).sum(), "rewards/margin": (reward_chosen - reward_rejected).sum(),
            "logps/chosen": sums[:pairs].detach().sum(), "logps/rejected": sums[pairs:].detach().sum(),
        }  # fmt: skip
        return LossResult(losses.sum(), pairs, metrics)

    def finalize(self, model: torch.nn.Module, output_dir: Path, tokenizer) -> dict:
        if not (self.merge_and_unload and self.peft_config):
            return {}
        from tunelab.deploy import merge_adapter

        return {"merged": merge_adapter(model, Path(output_dir) / "merged", tokenizer, getattr(self, "full_precision_base", None))}


def under_reference(kind: str, model: torch.nn.Module, frozen: dict, forward):
    """``forward(reference_model)`` without gradients: the policy with its adapter switched off
    (``kind`` adapter_disabled), else the frozen copy ``frozen["reference"]``."""
    with torch.no_grad():
        if kind == "adapter_disabled":
            with _peft_model(model).disable_adapter():
                return forward(model)
        return forward(frozen["reference"])


def _peft_model(model: torch.nn.Module) -> torch.nn.Module:
    """The peft model inside Fabric / DDP wrappers."""
    while not hasattr(model, "disable_adapter") and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _weights_checksum(model: torch.nn.Module) -> str:
    """A cheap fingerprint of a model's weights (which reference computed a cache)."""
    total = torch.zeros((), dtype=torch.float64)
    for i, p in enumerate(_unwrap(model).parameters()):
        total += p.detach().double().sum().cpu() * (i + 1)
    return f"{total.item():.10e}"
