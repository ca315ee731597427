"""Parameter-efficient supervised fine-tuning with any ``peft`` config (LoRA, DoRA, IA3, ...)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from tunelab.config import instantiate
from tunelab.methods.fullfinetune_sft import FullFinetuneSFT, supports_chunked_loss


def _lora_defaults() -> dict:
    return {
        "_target_": "peft.LoraConfig", "task_type": "CAUSAL_LM",
        "target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj", "up_proj"],
        "r": 64, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none",
    }  # fmt: skip


def _peft_node(node: dict) -> dict:
    """YAML writes the task type as ``peft.TaskType.CAUSAL_LM``; peft takes the member's name."""
    node = dict(node)
    task = node.get("task_type")
    if isinstance(task, str) and task.startswith("peft.TaskType."):
        node["task_type"] = task.rsplit(".", 1)[1]
    return node


def adapters_follow_autocast(model: torch.nn.Module) -> int:
    """peft casts each adapter's input to the adapter's dtype (float32) before the adapter runs;
    under autocast the adapter's matmul casts it straight back, so each adapted projection keeps
    one more copy of its input for the backward pass. While autocast is on (checked at every
    forward), skip that cast: the same values, and the adapters share the projection's saved input.
    Returns how many adapter layers this applies to."""
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    if not layers:
        return 0

    def before(module, args, kwargs):  # the device is read here: Fabric moves the model after this setup
        autocast = torch.is_autocast_enabled(next(module.parameters()).device.type)
        for layer in layers:
            layer.cast_input_dtype_enabled = not autocast

    def after(module, args, kwargs, output):
        for layer in layers:
            layer.cast_input_dtype_enabled = True

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)
    return len(layers)


def apply_peft(model: torch.nn.Module, peft_config: dict, adapter_name: str, fused_kernels: bool) -> torch.nn.Module:
    """Wrap a prepared model in a peft adapter from a ``_target_`` config node."""
    from peft import get_peft_model

    model = get_peft_model(model, instantiate(_peft_node(peft_config)), adapter_name=adapter_name)
    if fused_kernels:
        adapters_follow_autocast(model)
    return model


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

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = apply_peft(super().prepare_model(model), self.peft_config, self.adapter_name, self.fused_kernels)
        if self.chunked_loss and not supports_chunked_loss(model):  # e.g. an adapter on the output head
            self.chunked_loss = False
        return model

    def finalize(self, model: torch.nn.Module, output_dir: Path, tokenizer) -> dict:
        if not self.merge_and_unload:
            return {}
        from tunelab.deploy import merge_adapter

        return {"merged": merge_adapter(model, Path(output_dir) / "merged", tokenizer)}
