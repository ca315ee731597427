"""Parameter-efficient supervised fine-tuning with any adapter family (``models.adapters``)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from tunelab.engine.method import Models
from tunelab.methods.fullfinetune_sft import FullFinetuneSFT, supports_chunked_loss
from tunelab.models.adapters import apply_adapter, check_adapter_options
from tunelab.models.pool import full_precision_loader


def _lora_defaults() -> dict:
    return {
        "_target_": "peft.LoraConfig", "task_type": "CAUSAL_LM",
        "target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj", "up_proj"],
        "r": 64, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none",
    }  # fmt: skip


@dataclass
class PeftFinetuneSFT(FullFinetuneSFT):
    """SFT that trains only an adapter from the ``peft`` library; the base weights stay frozen."""

    optimizer: dict = field(default_factory=lambda: {"_target_": "torch.optim.AdamW", "lr": 1e-4, "weight_decay": 0.01})
    peft_config: dict = field(default_factory=_lora_defaults)
    """``_target_`` node of any peft config (peft.LoraConfig, peft.IA3Config, peft.PromptTuningConfig, ...)."""
    adapter_name: str = "default"
    merge_and_unload: bool = False
    """After training, also write the adapter merged into the base weights to OUTPUT_DIR/merged."""
    save_full_model: bool = False
    """False: checkpoints hold only the adapter weights."""
    save_ckpt_type: Literal["lightning", "peft"] = "lightning"
    """peft: checkpoints are adapter folders that PeftModel.from_pretrained loads."""

    def check(self) -> None:
        super().check()
        check_adapter_options(self, self.peft_config, self.merge_and_unload)

    def build_models(self, pool, tokenizer) -> Models:
        self.full_precision_base = full_precision_loader(pool, tokenizer)  # merging a QLoRA adapter loads it
        model = self.prepare_model(pool.load_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id))
        model = apply_adapter(model, self.peft_config, self.adapter_name, self.fused_kernels, tokenizer=tokenizer)
        if self.chunked_loss and not supports_chunked_loss(model):  # e.g. an adapter on the output head
            self.chunked_loss = False
        return Models(model)

    def finalize(self, model: torch.nn.Module, output_dir: Path, tokenizer) -> dict:
        if not self.merge_and_unload:
            return {}
        from tunelab.deploy import merge_adapter

        return {"merged": merge_adapter(model, Path(output_dir) / "merged", tokenizer, getattr(self, "full_precision_base", None))}
