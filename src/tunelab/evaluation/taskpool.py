"""Task pools: how a run is evaluated while and after it trains."""

import math

import torch

from tunelab.errors import TunelabError


class TaskPool:
    """What the engine reads of a task pool: when to evaluate, whether a validation split is
    needed, the validation batch size (None: the method's), and ``evaluate``."""

    every_n_steps: int = 0
    at_start: bool = False
    needs_validation: bool = False
    batch_size: int | None = None

    def evaluate(self, fabric, model, method, val_loader) -> dict[str, float]:
        return {}


class DummyTaskPool(TaskPool):
    """No evaluation."""


class HeldoutLossTaskPool(TaskPool):
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
        sums: dict[str, torch.Tensor] = {}
        with torch.no_grad():  # sums stay on the device until the end
            for batch in val_loader:
                loss_sum, units, extra = method.loss(model, batch)
                for key, value in {"loss": loss_sum, "units": units, **extra}.items():
                    value = torch.as_tensor(value, device=fabric.device).detach().double()
                    sums[key] = sums[key] + value if key in sums else value
        totals = dict(zip(sums, fabric.all_reduce(torch.stack(list(sums.values())), reduce_op="sum").tolist()))
        model.train(was_training)
        units = totals.pop("units")
        means = {key: value / max(units, 1) for key, value in totals.items()}
        scores = {f"val/{key}": value for key, value in means.items()}
        if method.loss_unit == "token":  # perplexity means something only for a language-modelling loss
            scores["val/perplexity"] = math.exp(min(means["loss"], 50))
        for key in [k for k in means if k.endswith("accuracy")]:  # e.g. accuracy, rewards/accuracy
            low, high = wilson_interval(means[key], units)
            scores |= {f"val/{key}_ci95_low": low, f"val/{key}_ci95_high": high, f"val/{method.loss_unit}s": units}
        return scores


def wilson_interval(p: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``p`` measured on ``n`` trials."""
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


class HeldoutRewardTaskPool(TaskPool):
    """Mean reward of completions generated for the validation prompts (online RL methods):
    greedy by default, so the number moves only when the policy does.

    Args:
        every_n_steps: evaluate every N optimizer steps (0: only at the start and the end).
        at_start: evaluate once before the first step, as the baseline.
        batch_size: completions per batch, counted as in training (null: the method's batch size).
        greedy: greedy completions (false: sampled as in training, one per prompt, fixed seed).
    """

    needs_validation = True

    def __init__(self, every_n_steps: int = 50, at_start: bool = True, batch_size: int | None = None, greedy: bool = True):
        self.every_n_steps, self.at_start, self.batch_size, self.greedy = every_n_steps, at_start, batch_size, greedy

    def evaluate(self, fabric, model, method, val_loader) -> dict[str, float]:
        if val_loader is None:
            return {}
        if not hasattr(method, "evaluate_prompts"):
            raise TunelabError(f"taskpool=heldout-reward scores generated completions, and {type(method).__name__} generates none: use taskpool=heldout-loss.")
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(val_loader):
            batch_sums, count = method.evaluate_prompts(model, batch, greedy=self.greedy, seed=i)
            for key, value in {**batch_sums, "units": count}.items():
                value = torch.as_tensor(value, device=fabric.device).detach().double()
                sums[key] = sums[key] + value if key in sums else value
        totals = dict(zip(sums, fabric.all_reduce(torch.stack(list(sums.values())), reduce_op="sum").tolist()))
        units = totals.pop("units")
        scores = {f"val/{key}": value / max(units, 1) for key, value in totals.items()}
        scores["val/completions"] = units
        return scores
