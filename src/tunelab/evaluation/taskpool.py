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
        sums: dict[str, float] = {"loss": 0.0, "units": 0.0}
        with torch.no_grad():
            for batch in val_loader:
                loss_sum, units, extra = method.loss(model, batch)
                for key, value in {"loss": loss_sum, "units": units, **extra}.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
        totals = fabric.all_reduce(torch.tensor(list(sums.values()), dtype=torch.float64, device=fabric.device), reduce_op="sum")
        model.train(was_training)
        means = {key: (value / max(totals[1].item(), 1)) for key, value in zip(sums, totals.tolist()) if key != "units"}
        scores = {f"val/{key}": value for key, value in means.items()}
        if not extra_metrics_only(method):
            scores["val/perplexity"] = math.exp(min(means["loss"], 50))
        if "accuracy" in means:
            low, high = wilson_interval(means["accuracy"], totals[1].item())
            scores |= {"val/accuracy_ci95_low": low, "val/accuracy_ci95_high": high, "val/pairs": totals[1].item()}
        return scores


def wilson_interval(p: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``p`` measured on ``n`` trials."""
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def extra_metrics_only(method) -> bool:
    """Perplexity means something only for a token-level language-modelling loss."""
    return getattr(method, "loss_unit", "token") != "token"
