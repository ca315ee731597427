"""Bradley-Terry reward modeling: loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))."""

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Optional

import torch
import torch.nn.functional as F

from tunelab.data import PairCollator, build_datasets
from tunelab.engine.method import DataSplits, LossResult, Method, Models
from tunelab.errors import TunelabError
from tunelab.methods.fullfinetune_sft import freeze_token_embedding
from tunelab.models.adapters import apply_adapter, check_adapter_options, check_sequence_classification_family, strip_virtual_positions
from tunelab.models.pool import full_precision_loader


def check_pair_batch_size(dataloader_kwargs: dict, whose: str, example: int) -> None:
    """Pair methods count sequences in ``batch_size``: each pair is two, so it must be even."""
    batch_size = int(dataloader_kwargs.get("batch_size", 2))
    if batch_size % 2:
        raise TunelabError(
            f"method.dataloader_kwargs.batch_size={batch_size} is odd, but {whose} batch holds each pair as two "
            f"sequences (chosen and rejected). Use an even number, e.g. method.dataloader_kwargs.batch_size={example}."
        )


def _score_head(model: torch.nn.Module) -> torch.nn.Module:
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft or bottleneck wrapper
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise TunelabError(
        f"{type(model).__name__} has no 'score' or 'classifier' head; use modelpool=SequenceClassificationModelPool/... "
        "so the model has a one-output score head."
    )


def rewards(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """One reward per row, read at the row's last real token.

    transformers pools the score at the last token that is not the pad token, which picks the
    wrong position when pad == eos and a sequence holds eos tokens (every ChatML turn ends with
    one). So the per-position scores are captured from the head and indexed by attention mask.
    """
    captured = []
    hook = _score_head(getattr(model, "module", model)).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        hook.remove()
    scores = strip_virtual_positions(captured[-1][..., 0], batch["input_ids"])  # (rows, positions)
    last = batch["attention_mask"].sum(dim=1) - 1  # right padding
    return scores[torch.arange(scores.shape[0], device=scores.device), last].float()


def bradley_terry_loss(model: torch.nn.Module, batch: dict) -> LossResult:
    """Summed -log σ(margin) over the pairs of a batch (chosen rows first), the pair count, and
    summed accuracy and margin."""
    reward = rewards(model, batch)
    pairs = reward.shape[0] // 2
    margin = reward[:pairs] - reward[pairs:]
    loss = -F.logsigmoid(margin).sum()  # log-sigmoid: stable for any margin
    return LossResult(loss, pairs, {"accuracy": (margin > 0).sum(), "margin": margin.detach().sum()})


@dataclass
class BradleyTerryRewardModeling(Method):
    """Train a scalar reward model on (prompt, chosen, rejected) pairs. ``batch_size`` counts
    sequences, so it must be even: each pair is two rows, chosen and rejected."""

    max_length: int = 4096
    """Longest sequence in tokens; longer sides keep their last max_length tokens."""
    fix_token_embedding: bool = True
    """Freeze the input token embeddings."""
    peft_config: Optional[dict] = None
    """An adapter instead of every weight (any family of ``models.adapters``; its task type is
    SEQ_CLS, so the score head trains whole beside it)."""
    adapter_name: str = "default"
    merge_and_unload: bool = False
    """With peft_config: also write the adapter merged into the base to OUTPUT_DIR/merged (a
    sequence-classification folder that PPO's reward_model_path takes)."""
    save_ckpt_type: Literal["lightning", "hf", "peft"] = "lightning"

    loss_unit: ClassVar[str] = "pair"

    def check(self) -> None:
        if self.export:
            raise TunelabError(
                "method.export writes causal language models (merged folders, GGUF); a reward model is a sequence classifier. "
                "Use method.merge_and_unload=true for a merged reward model, and drop method.export."
            )
        super().check()
        check_pair_batch_size(self.dataloader_kwargs, "a reward-model", example=2)
        if self.save_ckpt_type == "peft" and not self.peft_config:
            raise TunelabError("method.save_ckpt_type=peft writes adapter folders, but there is no adapter: set method.peft_config, or use hf.")
        check_sequence_classification_family(
            self.peft_config, "a reward model", "Use prompt tuning (peft.PromptTuningConfig) or a weight adapter (LoRA, IA3, LoHa, LoKr, bottleneck) for the reward model."
        )
        check_adapter_options(self, self.peft_config, self.merge_and_unload)

    def build_models(self, pool, tokenizer) -> Models:
        self.full_precision_base = full_precision_loader(pool, tokenizer)  # merging a QLoRA adapter loads it
        model = pool.load_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        model = freeze_token_embedding(model) if self.fix_token_embedding else model
        if self.peft_config:
            model = apply_adapter(model, self.peft_config, self.adapter_name, tokenizer=tokenizer, task_type="SEQ_CLS")
        return Models(model)

    def finalize(self, model: torch.nn.Module, output_dir: Path, tokenizer) -> dict:
        if not (self.merge_and_unload and self.peft_config):
            return {}
        from tunelab.deploy import merge_adapter

        return {"merged": merge_adapter(model, Path(output_dir) / "merged", tokenizer, getattr(self, "full_precision_base", None))}

    def examples_per_batch(self, batch_size: int) -> int:
        return max(1, batch_size // 2)

    def build_data(self, data_cfg, tokenizer):
        if data_cfg.format != "preference":
            raise TunelabError(f"Reward modeling reads preference pairs: set data.format=preference (it is {data_cfg.format!r}).")
        return DataSplits(*build_datasets(data_cfg, tokenizer, self.max_length))

    def collate_fn(self, tokenizer):
        return PairCollator(tokenizer.pad_token_id)

    def loss(self, model: torch.nn.Module, batch: dict) -> LossResult:
        return bradley_terry_loss(model, batch)

    def loss_units(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2
