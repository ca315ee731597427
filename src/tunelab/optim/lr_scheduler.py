"""Learning-rate schedules."""

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class CosineDecayWithWarmup(LRScheduler):
    """Linear warmup from ``init_lr`` to ``max_lr`` over ``warmup_steps``, then cosine decay to
    ``min_lr`` at step ``T_max``; ``min_lr`` after that. Every param group gets this rate, times
    its ``lr_scale`` where it has one (PPO's value model under ``method.value_lr``)."""

    def __init__(
        self,
        optimizer: Optimizer,
        T_max: int,
        init_lr: float = 0.0,
        warmup_steps: int = 0,
        max_lr: float = 1e-5,
        min_lr: float = 1e-6,
        last_epoch: int = -1,
    ):
        if T_max < 1:
            raise ValueError(f"T_max must be at least 1, got {T_max}")
        self.T_max, self.init_lr, self.warmup_steps = T_max, init_lr, warmup_steps
        self.max_lr, self.min_lr = max_lr, min_lr
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.init_lr + (self.max_lr - self.init_lr) * step / self.warmup_steps
        if step >= self.T_max:
            return self.min_lr
        progress = (step - self.warmup_steps) / max(1, self.T_max - self.warmup_steps)
        return self.min_lr + 0.5 * (self.max_lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch) * group.get("lr_scale", 1.0) for group in self.optimizer.param_groups]


class ExponentialRamp(LRScheduler):
    """The rate multiplied by the same factor every step, from ``start_lr`` at step 0 to ``end_lr``
    at step ``T_max`` (an LR range test, ``tunelab plan lr --probe``)."""

    def __init__(self, optimizer: Optimizer, T_max: int, start_lr: float = 1e-7, end_lr: float = 1.0, last_epoch: int = -1):
        if T_max < 1 or not 0 < start_lr < end_lr:
            raise ValueError(f"need T_max >= 1 and 0 < start_lr < end_lr, got T_max={T_max}, start_lr={start_lr}, end_lr={end_lr}")
        self.T_max, self.start_lr, self.end_lr = T_max, start_lr, end_lr
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int) -> float:
        return self.start_lr * (self.end_lr / self.start_lr) ** (min(step, self.T_max) / self.T_max)

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch) for _ in self.optimizer.param_groups]
