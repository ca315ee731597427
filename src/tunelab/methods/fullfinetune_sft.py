"""Full-parameter supervised fine-tuning."""

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunelab.data import IGNORE_INDEX, PadCollator, build_datasets
from tunelab.engine.options import TrainingOptions

log = logging.getLogger(__name__)


def supervised_token_count(batch: dict) -> int:
    """Tokens that carry loss: labels shifted by one, as the model predicts the next token."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int, dict]:
    """Summed next-token cross-entropy over supervised tokens, and their count.

    Returning the sum (not the mean) lets the engine weight every token equally across
    accumulated micro-batches and across ranks. The third item holds extra metrics as sums over
    the same units (none for SFT).
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((labels != IGNORE_INDEX).sum()), {}


def freeze_token_embedding(model: torch.nn.Module) -> torch.nn.Module:
    model.get_input_embeddings().weight.requires_grad_(False)
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        log.info("Token embeddings frozen; they are tied to the output head, which is frozen with them")
    return model


@dataclass
class FullFinetuneSFT(TrainingOptions):
    """Supervised fine-tuning of every weight (the token embeddings optionally frozen);
    the loss is the model's cross-entropy on assistant tokens only."""

    max_length: int = 4096
    """Longest example in tokens; see data.overlong for what happens to longer ones."""
    fix_token_embedding: bool = True
    """Freeze the input token embeddings (with tied embeddings this freezes the output head too)."""

    def build_data(self, data_cfg, tokenizer):
        return build_datasets(data_cfg, tokenizer, self.max_length)

    def collate_fn(self, tokenizer):
        return PadCollator(tokenizer.pad_token_id)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return freeze_token_embedding(model) if self.fix_token_embedding else model

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int, dict]:
        return causal_lm_loss(model, batch)

    def finalize(self, model: torch.nn.Module, output_dir, tokenizer) -> dict:
        """Work after the last checkpoint, on rank 0; returns named output paths (none here)."""
        return {}

    def loss_units(self, batch: dict) -> int:
        """What ``loss`` sums over (supervised tokens), counted before the forward pass so the
        engine can weight accumulated micro-batches."""
        return supervised_token_count(batch)
