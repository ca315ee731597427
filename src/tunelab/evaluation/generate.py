"""Generate answers for a data set and score them: ``tunelab eval generate``.

The predictions are written beside the scores (``predictions.jsonl``: one row per item with its
prompt, reference, prediction and per-example scores; ``scores.json``: the corpus scores with
95% bootstrap intervals and the generation speed), so that any number can be traced to the
answers behind it and compared with another model's, item by item.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.evaluation.items import EvalItem
from tunelab.evaluation.metrics import MetricScores, compute_metrics
from tunelab.evaluation.models import GenerationStats
from tunelab.resources import atomic_write_text


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 16
    seed: int = 0
    stop_loops: bool = False  # end (and flag) a completion that cycles through one span (local models)

    def check(self) -> None:
        from tunelab.errors import UsageError  # flags out of range: exit 2

        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1.")
        if not self.greedy and self.temperature <= 0:
            raise UsageError(f"--temperature {self.temperature} must be positive when sampling (or use --greedy).")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p {self.top_p} must be in (0, 1].")


@dataclass
class GenerationReport:
    model: str
    data: str
    items: int
    settings: dict
    scores: dict  # metric -> {"score", "ci95_low", "ci95_high"}
    seconds: float
    generated_tokens: int
    tokens_per_s: float
    unfinished: int  # completions that ran into max_new_tokens (the loop guard's not counted)
    looped: int = 0  # completions the loop guard stopped (settings.stop_loops)
    predictions_path: str | None = None
    rows: list[dict] = field(default_factory=list, repr=False)

    def render(self) -> str:
        lines = [f"{self.model} on {self.data} ({self.items} items, {'greedy' if self.settings['greedy'] else 'sampled'}, "
                 f"max {self.settings['max_new_tokens']} new tokens)"]  # fmt: skip
        for name, s in self.scores.items():
            lines.append(f"  {name:<16} {s['score']:.4f}  (95% CI {s['ci95_low']:.4f} .. {s['ci95_high']:.4f})")
        lines.append(f"  generated {self.generated_tokens:,} tokens in {self.seconds:.1f} s ({self.tokens_per_s:.1f} tokens/s); "
                     f"{self.unfinished} of {self.items} answers hit the token limit"
                     + (f", {self.looped} looped (stopped by the loop guard)" if self.settings.get("stop_loops") else ""))  # fmt: skip
        if self.predictions_path:
            lines.append(f"  predictions: {self.predictions_path}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "rows"}


def _interval(values: list[float], seed: int = 0) -> tuple[float, float]:
    from tunelab.evaluation.stats import bootstrap_mean_ci

    present = [v for v in values if v == v]
    if len(present) < 2:
        return (math.nan, math.nan)
    ci = bootstrap_mean_ci(present, seed=seed)
    return ci.ci_low, ci.ci_high


def score_rows(rows: list[dict], metrics: list) -> dict:
    """Add each metric's per-example score to ``rows[i]["scores"]``; return the corpus scores."""
    results: list[MetricScores] = compute_metrics(metrics, [r["prediction"] for r in rows], [r["reference"] for r in rows], [r.get("columns", {}) for r in rows])
    scores = {}
    for result in results:
        for row, value in zip(rows, result.per_example):
            row.setdefault("scores", {})[result.name] = value
        low, high = _interval(result.per_example)
        scores[result.name] = {"score": result.corpus, "ci95_low": low, "ci95_high": high}
    return scores


def generate_predictions(model, items: list[EvalItem], settings: GenerationSettings, progress=None) -> tuple[list[dict], GenerationStats]:
    stats = GenerationStats()
    generations = model.generate(
        [item.prompt for item in items], max_new_tokens=settings.max_new_tokens, greedy=settings.greedy, temperature=settings.temperature,
        top_p=settings.top_p, top_k=settings.top_k, batch_size=settings.batch_size, seed=settings.seed, stats=stats, progress=progress,
        **({"stop_loops": True} if settings.stop_loops else {}),
    )  # fmt: skip
    rows = [
        {"id": item.id, "prompt": item.prompt_text(), "reference": item.reference, "prediction": g.text,
         "tokens": g.tokens, "finished": g.ended, "looped": getattr(g, "looped", False), "columns": item.columns}
        for item, g in zip(items, generations)
    ]  # fmt: skip
    return rows, stats


def write_predictions(rows: list[dict], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "predictions.jsonl"
    keep = ("id", "prompt", "reference", "prediction", "tokens", "finished", "looped", "scores")
    atomic_write_text(path, "".join(json.dumps({k: r.get(k) for k in keep}, ensure_ascii=False) + "\n" for r in rows))
    return path


def evaluate_generation(model, items: list[EvalItem], metrics: list, settings: GenerationSettings | None = None,
                        data_name: str = "", output_dir: str | Path | None = None, progress=None) -> GenerationReport:  # fmt: skip
    """Generate an answer for every item, score them with ``metrics`` and (with ``output_dir``)
    write predictions.jsonl and scores.json there."""
    from tunelab.errors import UsageError
    from tunelab.evaluation.metrics import resolve_metric
    from tunelab.evaluation.models import LocalModel

    settings = settings or GenerationSettings()
    settings.check()
    if settings.stop_loops and not isinstance(model, LocalModel):
        raise UsageError(f"--stop-loops needs a model in this process; {model.name} generates on its own side (drop --stop-loops).")
    for spec in metrics:  # an unknown metric fails before minutes of generation
        resolve_metric(spec)
    rows, stats = generate_predictions(model, items, settings, progress)
    scores = score_rows(rows, metrics)
    report = GenerationReport(
        model.name, data_name, len(items), settings.__dict__.copy(), scores, stats.seconds, stats.tokens, stats.tokens_per_s,
        sum(1 for r in rows if not r["finished"] and not r["looped"]), sum(1 for r in rows if r["looped"]), rows=rows,
    )  # fmt: skip
    if output_dir is not None:
        report.predictions_path = str(write_predictions(rows, Path(output_dir)))
        atomic_write_text(Path(output_dir) / "scores.json", json.dumps(report.to_dict(), indent=2))
    return report
