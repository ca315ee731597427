"""The options every method shares: what the engine needs to run any method the same way."""

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from tunelab.errors import TunelabError


@dataclass
class TrainingOptions:
    optimizer: dict = field(default_factory=lambda: {"_target_": "torch.optim.AdamW", "lr": 1e-5})
    """``_target_`` node of the optimizer; the trainable parameters are passed at build time."""
    lr_scheduler: Optional[dict] = None
    """``_target_`` node of the scheduler; the string ``_T_max_`` becomes the number of scheduler steps."""
    dataloader_kwargs: dict = field(default_factory=lambda: {"batch_size": 1, "num_workers": 0, "pin_memory": True})
    """torch DataLoader options, per device."""
    max_epochs: int = 3
    """Stop after this many epochs (-1: no limit from this side)."""
    max_steps: int = -1
    """Stop after this many steps (-1: no limit from this side). A step is one optimizer step, or
    for methods that reuse a generated batch (PPO, GRPO's num_iterations) the updates made on it."""
    max_steps_per_epoch: int = -1
    """Cap each epoch at this many optimizer steps (-1: the whole dataset)."""
    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer step; the loss is weighted by supervised tokens across them."""
    lr_scheduler_interval: Literal["step", "epoch"] = "step"
    lr_scheduler_frequency: int = 1
    checkpoint_save_interval: Literal["step", "epoch"] = "epoch"
    checkpoint_save_frequency: int = 1
    gradient_clip_val: Optional[float] = None
    gradient_clip_algorithm: Literal["norm", "value"] = "norm"
    save_optimizer_state: bool = False
    """Store optimizer state in checkpoints (needed for an exact resume)."""
    keep_last_checkpoints: Optional[int] = None
    """Keep only this many newest step checkpoints, deleting older ones as new ones are written
    (null: keep every one)."""
    save_full_model: bool = True
    """False: checkpoints hold only the trainable parameters."""
    save_ckpt_type: Literal["lightning", "hf"] = "lightning"
    ckpt_path: Optional[str] = None
    """Resume from this checkpoint folder."""
    export: list = field(default_factory=list)
    """After training, export the final checkpoint, verified, into OUTPUT_DIR/export: ``merged``
    (``merged:bfloat16``, ``merged:float16``), ``gguf`` (f16; ``gguf:q8_0``, ...), ``adapter-gguf``
    (a LoRA adapter as a llama.cpp adapter file). The reports go into summary.json."""

    def check(self) -> None:
        """Raise on option combinations that cannot run."""
        if self.max_epochs == -1 and self.max_steps == -1:
            raise TunelabError(
                "method.max_epochs and method.max_steps are both -1, so training would never stop. "
                "Set one of them, e.g. method.max_epochs=1 or method.max_steps=100."
            )
        for name in ("max_epochs", "max_steps", "max_steps_per_epoch"):
            value = getattr(self, name)
            if value == 0 or value < -1:
                raise TunelabError(f"method.{name}={value}: use a positive number, or -1 for no limit.")
        for name in ("accumulate_grad_batches", "lr_scheduler_frequency", "checkpoint_save_frequency"):
            if getattr(self, name) < 1:
                raise TunelabError(f"method.{name}={getattr(self, name)} must be at least 1.")
        if int(self.dataloader_kwargs.get("batch_size", 1)) < 1:
            raise TunelabError("method.dataloader_kwargs.batch_size must be at least 1.")
        if self.export:
            from tunelab.deploy.export import check_export_targets

            check_export_targets(list(self.export), self.save_ckpt_type)

    def examples_per_batch(self, batch_size: int) -> int:
        """Dataset items in a batch of ``batch_size`` sequences (a preference pair holds two)."""
        return batch_size

    def steps_per_epoch(self, batches_per_epoch: int) -> int:
        steps = math.ceil(batches_per_epoch / self.accumulate_grad_batches)
        return min(steps, self.max_steps_per_epoch) if self.max_steps_per_epoch > 0 else steps

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps the run will take: whichever of max_epochs and max_steps comes first."""
        per_epoch = self.steps_per_epoch(batches_per_epoch)
        limits = [per_epoch * self.max_epochs] if self.max_epochs > 0 else []
        if self.max_steps > 0:
            limits.append(self.max_steps)
        return min(limits)

    def updates_per_step(self) -> int:
        """Optimizer steps per step (see ``engine.Method.updates``)."""
        return 1

    def scheduler_steps(self, batches_per_epoch: int) -> int:
        """The value of ``_T_max_``: how often the scheduler will be stepped (with interval
        ``step``, once per optimizer step)."""
        if self.lr_scheduler_interval == "step":
            total = self.total_steps(batches_per_epoch) * self.updates_per_step()
        else:
            total = math.ceil(self.total_steps(batches_per_epoch) / max(1, self.steps_per_epoch(batches_per_epoch)))
        return max(1, total // self.lr_scheduler_frequency)

