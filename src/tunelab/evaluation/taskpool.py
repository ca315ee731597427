"""Task pools: how a run is evaluated while and after it trains."""

import math

import torch


class DummyTaskPool:
    """No evaluation."""

    every_n_steps = 0
    at_start = False
    needs_validation = False

    def evaluate(self, fabric, model, method, val_loader) -> dict[str, float]:
        return {}


class HeldoutLossTaskPool:
    """Mean per-token loss (and perplexity) on the validation split.

    Args:
        every_n_steps: evaluate every N optimizer steps (0: only at the start and the end).
        at_start: evaluate once before the first step, as the baseline.
        batch_size: examples per forward pass.
    """

    needs_validation = True

    def __init__(self, every_n_steps: int = 50, at_start: bool = True, batch_size: int = 8):
        self.every_n_steps, self.at_start, self.batch_size = every_n_steps, at_start, batch_size

    def evaluate(self, fabric, model, method, val_loader) -> dict[str, float]:
        if val_loader is None:
            return {}
        was_training = model.training
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=fabric.device)
        with torch.no_grad():
            for batch in val_loader:
                loss_sum, n = method.loss(model, batch)
                total += torch.tensor([loss_sum.item(), n], dtype=torch.float64, device=fabric.device)
        total = fabric.all_reduce(total, reduce_op="sum")
        model.train(was_training)
        loss = (total[0] / total[1].clamp(min=1)).item()
        return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50))}
