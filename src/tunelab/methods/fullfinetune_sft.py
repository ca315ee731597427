"""Full-parameter supervised fine-tuning."""

import inspect
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from tunelab.data import IGNORE_INDEX, PackCollator, PadCollator, build_datasets
from tunelab.engine.method import DataSplits, LossResult, Method, Models
from tunelab.errors import TunelabError
from tunelab.methods.ewc import ElasticWeightConsolidation, diagonal_fisher, ewc_options
from tunelab.models.adapters import strip_virtual_positions
from tunelab.models.pool import is_quantized
from tunelab.models.kernels import (
    autocast_dtype, compile_decoder_layers, linear_cross_entropy, rotary_in_compute_dtype, use_fused_norm_and_mlp, use_packed_attention,
)
from tunelab.planning import estimate_run

log = logging.getLogger(__name__)


def supervised_token_count(batch: dict) -> torch.Tensor:
    """Tokens that carry loss: labels shifted by one, as the model predicts the next token."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def model_inputs(batch: dict) -> dict:
    """What the model's forward takes from a padded or a packed batch."""
    names = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    return {name: batch[name] for name in names if name in batch}


def causal_lm_loss(model: torch.nn.Module, batch: dict) -> LossResult:
    """Summed next-token cross-entropy over supervised tokens, and their count (the reference path).

    Returning the sum (not the mean) lets the engine weight every token equally across
    accumulated micro-batches and across ranks. The third item holds extra metrics as sums over
    the same units (none for SFT).
    """
    logits = strip_virtual_positions(model(**model_inputs(batch), use_cache=False).logits, batch["input_ids"])
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return LossResult(loss, (labels != IGNORE_INDEX).sum(), {})


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside Fabric / DDP / peft wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_chunked_loss(model: torch.nn.Module) -> bool:
    """The chunked loss needs a plain bias-free linear head, no logit soft-capping or scaling,
    and a forward that takes ``logits_to_keep`` (transformers' causal LMs)."""
    inner = _unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    config = getattr(inner, "config", None)
    return (
        type(head) is torch.nn.Linear and head.bias is None and hasattr(inner, "get_decoder")
        and not getattr(config, "final_logit_softcapping", None) and getattr(config, "logit_scale", None) in (None, 1.0)
        and "logits_to_keep" in inspect.signature(inner.forward).parameters
    )  # fmt: skip


def final_hidden_states(model: torch.nn.Module, batch: dict, **forward_kwargs) -> tuple[torch.Tensor, torch.dtype | None]:
    """The decoder's last hidden states (rows, positions, hidden) and the dtype the forward computed
    in, from the model's own forward with no logits formed.

    The model runs through its own forward (so Fabric's precision and DDP's hooks apply) with
    ``logits_to_keep`` empty; the hidden states are taken from the decoder's output. The head is
    then applied in the precision the forward ran in: Fabric's autocast covers only the model's
    forward, so it is read inside it (outside, a bf16-mixed run would compute the head in float32).
    """
    inner = _unwrap(model)
    captured = {}

    def keep_hidden(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state
        captured["dtype"] = autocast_dtype(captured["hidden"].device.type)

    handle = inner.get_decoder().register_forward_hook(keep_hidden)
    try:
        no_positions = torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device)
        model(**model_inputs(batch), use_cache=False, logits_to_keep=no_positions, **forward_kwargs)
    finally:
        handle.remove()
    return captured["hidden"], captured["dtype"]


def chunked_causal_lm_loss(model: torch.nn.Module, batch: dict, chunk_rows: int = 1024) -> LossResult:
    """The same loss as ``causal_lm_loss``, with the output head applied only where the next token
    is supervised and in chunks of rows (``models.kernels.linear_cross_entropy``)."""
    hidden, dtype = final_hidden_states(model, batch)
    weight = _unwrap(model).get_output_embeddings().weight
    index = batch.get("supervised_index")  # from the collator: selecting with it never waits for the device
    if index is not None:
        rows, targets = hidden.flatten(0, 1).index_select(0, index), batch["labels"].flatten().index_select(0, index + 1)
        return LossResult(linear_cross_entropy(rows, weight, targets, chunk_rows=chunk_rows, compute_dtype=dtype), index.numel(), {})
    targets = batch["labels"][:, 1:]
    supervised = targets != IGNORE_INDEX
    loss = linear_cross_entropy(hidden[:, :-1][supervised], weight, targets[supervised], chunk_rows=chunk_rows, compute_dtype=dtype)
    return LossResult(loss, supervised.sum(), {})


def freeze_token_embedding(model: torch.nn.Module) -> torch.nn.Module:
    model.get_input_embeddings().weight.requires_grad_(False)
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        log.info("Token embeddings frozen; they are tied to the output head, which is frozen with them")
    return model


@dataclass
class FullFinetuneSFT(Method):
    """Supervised fine-tuning of every weight (the token embeddings optionally frozen);
    the loss is the model's cross-entropy on assistant tokens only."""

    max_length: int = 4096
    """Longest example in tokens; see data.overlong for what happens to longer ones."""
    fix_token_embedding: bool = True
    """Freeze the input token embeddings (with tied embeddings this freezes the output head too)."""
    packing: bool = True
    """Padding-free batches: the examples of a batch are concatenated into one row, each attending
    only to itself. The same examples and loss as padded batches, without compute spent on padding."""
    pad_to_multiple_of: int = 1
    """With packing: the row is lengthened with pad tokens (no targets, after its last example) to
    a multiple of this many tokens, so rows take a few lengths rather than one per batch. On a CPU
    under bf16, oneDNN builds and caches kernels per shape, and memory grows with every new length
    (DPO on SmolLM2: 7.0 GiB after 100 steps unpadded, 5.8 GiB with 128). 1: no padding."""
    chunked_loss: bool = True
    """Apply the output head only where the next token is supervised, in chunks, so the
    full-vocabulary logits are never materialised (false: the plain reference path)."""
    loss_chunk_size: int = 1024
    """Rows of logits formed at a time by the chunked loss."""
    fused_kernels: bool = True
    """RMSNorm and the SwiGLU MLP as single autograd ops that keep only their inputs for the
    backward pass (same forward values, about a third less activation memory on Llama-shaped
    models), and rotary embeddings applied in the autocast dtype; false: transformers' own modules."""
    compile: bool = True
    """torch.compile the decoder layers (packed attention stays eager between the compiled parts).
    On 2 CPU cores (SmolLM2, packed rows): ~15% faster steps and ~0.4 GiB less memory, for about
    ten seconds of compiling in the first two steps. Without a GPU it needs a C++ compiler (g++ or
    $CXX); where none is found the run trains uncompiled and says so. false: eager."""

    ewc: Optional[dict] = None
    """Elastic weight consolidation against forgetting (``methods/ewc.py``): ``{lambda: 100,
    fisher_data: general.jsonl, fisher_format: alpaca, fisher_batches: 64}``; the penalty is
    logged as train/ewc_penalty beside train/task_loss. null: off."""

    _ewc = None  # the EWC penalty, set up by prepare_data (a plain attribute, not a config option)
    _fisher_set = None

    def check(self) -> None:
        super().check()
        if not isinstance(self.pad_to_multiple_of, int) or self.pad_to_multiple_of < 1:
            raise TunelabError(f"method.pad_to_multiple_of={self.pad_to_multiple_of!r} must be a whole number of tokens, 1 or more (1: no padding).")
        if ewc_options(self.ewc) is not None and type(self).loss is not FullFinetuneSFT.loss:
            raise TunelabError(f"method.ewc works with SFT and pretraining; {type(self).__name__} does not take it yet: set method.ewc=null.")

    def build_split(self, data_cfg, tokenizer):
        """One data file (or mixture) -> (train, val, report), as this method trains on it."""
        return build_datasets(data_cfg, tokenizer, self.max_length)

    def build_data(self, data_cfg, tokenizer) -> DataSplits:
        splits = DataSplits(*self.build_split(data_cfg, tokenizer))
        options = ewc_options(self.ewc)
        if options is not None:  # the reference set, tokenized as the training data is
            fisher_cfg = replace(data_cfg, path=options.fisher_data, format=options.fisher_format or data_cfg.format, sources=None,
                                 val_path=None, val_fraction=0.0, max_samples=options.fisher_batches)  # fmt: skip
            self._fisher_set = self.build_split(fisher_cfg, tokenizer)[0]
        return splits

    def prepare_data(self, splits: DataSplits, model: torch.nn.Module, frozen: dict, batches) -> tuple[DataSplits, dict]:
        """With method.ewc: the Fisher information of the reference set at the starting weights
        (before a resumed run loads its checkpoint, so a resume computes the same one)."""
        options = ewc_options(self.ewc)
        if options is not None:
            examples = self._fisher_set
            fisher = diagonal_fisher(model, (next(iter(batches(examples.select([i])))) for i in range(len(examples))), self.loss)
            self._ewc = ElasticWeightConsolidation(model, fisher, options.strength)
            log.info("EWC: Fisher information of %d parameters from %d examples of %s", sum(f.numel() for f in fisher.values()), len(examples), options.fisher_data)
            if self.run_dir is not None and int(os.environ.get("RANK", "0")) == 0:
                self._ewc.save(Path(self.run_dir) / "ewc_fisher.safetensors")
        return splits, frozen

    def build_models(self, pool, tokenizer) -> Models:
        return Models(self.prepare_model(pool.load_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)))

    def collate_fn(self, tokenizer):
        return PackCollator(self.pad_to_multiple_of) if self.packing else PadCollator(tokenizer.pad_token_id)

    def prepare_model(self, model: torch.nn.Module, compile: bool | None = None, lm_head: bool = True) -> torch.nn.Module:
        """The fast paths this method's options ask for, on a freshly loaded model
        (``compile``: override ``self.compile``, e.g. for a frozen model; ``lm_head``: false for a
        model whose output head this method's loss never uses, such as PPO's value model)."""
        compile_layers = self.compile if compile is None else compile
        if self.packing:
            use_packed_attention(model)
        elif compile_layers and torch.cuda.is_available() and getattr(model.config, "_attn_implementation", None) == "sdpa":
            # Padded rows: the packed attention function hands them to sdpa unchanged, but outside
            # the compiled layers. Compiled, sdpa with a padding mask made the step 11x slower on
            # an H200 (1.93 s against 0.17 s, bench/gpu_profile.py); on CPU it stays compiled.
            use_packed_attention(model)
        if self.fused_kernels:
            log.info("Fused RMSNorm/SwiGLU in %d modules", use_fused_norm_and_mlp(model))
            rotary_in_compute_dtype(model)
        if compile_layers and is_quantized(model):
            log.info("torch.compile skipped: the base is quantised (bitsandbytes' kernels do not compile)")
        elif compile_layers:
            log.info("torch.compile on %d modules (compiled at the first steps)", compile_decoder_layers(model))
        if lm_head and self.chunked_loss and not supports_chunked_loss(model):
            log.info("This model's output head does not fit the chunked loss; using the plain loss")
            self.chunked_loss = False
        return freeze_token_embedding(model) if self.fix_token_embedding else model

    def loss(self, model: torch.nn.Module, batch: dict) -> LossResult:
        result = chunked_causal_lm_loss(model, batch, self.loss_chunk_size) if self.chunked_loss else causal_lm_loss(model, batch)
        consolidation = self._ewc
        if consolidation is None or not model.training:  # held-out losses stay the task's own
            return result
        # The penalty belongs to the step, not to a token: weighted by this micro-batch's units, it
        # adds exactly the penalty once the engine divides the step's sum by all its units.
        weighted = consolidation.penalty(model) * result.units
        metrics = {**result.metrics, "task_loss": result.loss.detach(), "ewc_penalty": weighted.detach()}
        return LossResult(result.loss + weighted, result.units, metrics)

    def loss_units(self, batch: dict) -> int | torch.Tensor:
        """What ``loss`` sums over (supervised tokens), counted before the forward pass so the
        engine can weight accumulated micro-batches: the collator's count when it made one."""
        index = batch.get("supervised_index")
        return index.numel() if index is not None else supervised_token_count(batch)

    def estimate(self, model: torch.nn.Module, train_set, device, precision: str, steps: int):
        """Memory and time before the first step, from a sample of the tokenized examples."""
        if not len(train_set):
            return None
        sample = train_set.shuffle(seed=0).select(range(2000)) if len(train_set) > 2000 else train_set
        return estimate_run(
            model, precision=precision, lengths=[len(ids) for ids in sample["input_ids"]],
            supervised=[sum(1 for t in labels[1:] if t != IGNORE_INDEX) for labels in sample["labels"]], steps=steps,
            batch_size=int(self.dataloader_kwargs.get("batch_size", 1)), packing=self.packing,
            accumulate=self.accumulate_grad_batches, chunked_loss=self.chunked_loss,
            loss_chunk_size=self.loss_chunk_size, device=device, fused_kernels=self.fused_kernels,
        )  # fmt: skip
