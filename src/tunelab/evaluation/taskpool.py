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

    def connect(self, tokenizer, data_cfg) -> None:
        """Called once by the engine after the data is built: task pools that read their own
        files or generate text take the tokenizer and the run's data settings here."""

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


class GenerationTaskPool(TaskPool):
    """Generate answers for held-out prompts with the current weights and score them (every N
    steps, before the first step and at the end): any metric of ``tunelab eval generate``.

    Args:
        path: the prompts and their references, a data file in any training format (null: the
            run's data.val_path).
        format: its data.format (null: guessed from the fields).
        metrics: metric names (exact_match, gsm8k, gsm8k_flexible, gsm8k_format, rouge, bleu, chrf),
            dotted paths or ``_target_`` nodes.
        limit: evaluate the first N records (generation is the slow part of a run on a CPU).
        every_n_steps: evaluate every N optimizer steps (0: only at the start and the end).
        at_start: evaluate once before the first step, as the baseline.
        max_new_tokens, batch_size: generation length and prompts per batch (greedy decoding).
    """

    def __init__(self, path: str | None = None, format: str | None = None, metrics=("exact_match",), limit: int | None = 50,
                 every_n_steps: int = 100, at_start: bool = True, max_new_tokens: int = 256, batch_size: int = 16,
                 fields: dict | None = None):  # fmt: skip
        if limit is not None and limit < 1:
            raise TunelabError(f"taskpool.limit={limit} must be at least 1 (or null for the whole file).")
        if max_new_tokens < 1 or batch_size < 1:
            raise TunelabError("taskpool.max_new_tokens and taskpool.batch_size must be at least 1.")
        self.path, self.format, self.metrics, self.limit = path, format, list(metrics), limit
        self.every_n_steps, self.at_start, self.max_new_tokens, self.batch_size = every_n_steps, at_start, max_new_tokens, batch_size
        self.fields = dict(fields or {})
        self.items, self.tokenizer = None, None

    def connect(self, tokenizer, data_cfg) -> None:
        from tunelab.evaluation.items import load_items
        from tunelab.evaluation.metrics import resolve_metric

        path = self.path or getattr(data_cfg, "val_path", None)
        if not path:
            raise TunelabError(f"taskpool={type(self).__name__} generates answers for held-out prompts: set taskpool.path=FILE (or data.val_path).")
        for spec in self.metrics:
            resolve_metric(spec)
        self.items = load_items(path, self.format, limit=self.limit, **self.fields)
        self.tokenizer = tokenizer

    def evaluate(self, fabric, model, method, val_loader) -> dict[str, float]:
        from tunelab.evaluation.generate import GenerationSettings, generate_predictions, score_rows
        from tunelab.evaluation.models import LocalModel
        from tunelab.models.sampling import generating

        mine = self.items[fabric.global_rank :: fabric.world_size]  # each rank answers its share
        with generating(model) as inner:
            local = LocalModel(inner, self.tokenizer, "training", device=str(fabric.device))
            settings = GenerationSettings(self.max_new_tokens, True, batch_size=self.batch_size)
            rows, _ = generate_predictions(local, mine, settings) if mine else ([], None)
        names, sums = [], []
        if rows:
            score_rows(rows, self.metrics)
            names = list(rows[0]["scores"])
        names = names or [m if isinstance(m, str) else "metric" for m in self.metrics]
        for name in names:
            values = [r["scores"].get(name, float("nan")) for r in rows]
            present = [v for v in values if v == v]
            sums += [sum(present), len(present)]
        sums += [sum(r["tokens"] for r in rows), sum(not r["finished"] for r in rows), len(rows)]
        totals = fabric.all_reduce(torch.tensor(sums, dtype=torch.float64, device=fabric.device), reduce_op="sum").tolist()
        scores = {f"val/{name}": totals[2 * i] / max(totals[2 * i + 1], 1) for i, name in enumerate(names)}
        count = max(totals[-1], 1)
        scores |= {"val/completion_tokens": totals[-3] / count, "val/unfinished": totals[-2] / count}
        return scores


class GSM8KTaskPool(GenerationTaskPool):
    """GSM8K accuracy while training: the share of held-out problems whose generated
    ``#### <number>`` equals the reference's (``gsm8k``), the share in that format, and the
    last-number reading (``gsm8k_flexible``). ``path`` holds ``{"question", "answer"}`` rows."""

    def __init__(self, path: str | None = None, limit: int | None = 50, every_n_steps: int = 100, at_start: bool = True,
                 max_new_tokens: int = 256, batch_size: int = 16, format: str | None = None, fields: dict | None = None):  # fmt: skip
        super().__init__(path, format, ("gsm8k", "gsm8k_flexible", "gsm8k_format"), limit, every_n_steps, at_start, max_new_tokens, batch_size, fields)
