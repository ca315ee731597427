"""A base model and its fine-tune on the same sets: ``tunelab eval compare``.

Both models answer the same task items and are scored with the same metrics; each difference
(tuned minus base) gets a paired bootstrap interval over the items. Perplexity is compared on the
task set (when it has references) and on general sets that neither model was tuned on: a rise
there is what fine-tuning cost in general ability (forgetting). The result is a folder holding
``report.html`` (charts as PNG files beside it, samples side by side), ``report.json`` and each
model's predictions.
"""

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tunelab.errors import TunelabError
from tunelab.evaluation.generate import GenerationSettings, generate_predictions, score_rows, write_predictions
from tunelab.evaluation.items import EvalItem
from tunelab.evaluation.perplexity import PerplexityReport, perplexity
from tunelab.evaluation.stats import format_p, paired_bootstrap
from tunelab.resources import atomic_write_text

DEFAULT_GENERAL = "pkg://tunelab/demo_data/general_text.txt"
BOOTSTRAP_RESAMPLES = 2000
FORGETTING_THRESHOLD = 0.05  # a general-set perplexity rise above 5% (with its interval above 0) is reported as forgetting


@dataclass
class Side:
    """What one model produced."""

    name: str
    rows: list[dict]
    scores: dict
    tokens_per_s: float
    perplexities: dict[str, PerplexityReport] = field(default_factory=dict)


def perplexity_ratio(base: PerplexityReport, tuned: PerplexityReport, n_resamples: int = 2000, seed: int = 0) -> dict:
    """tuned / base perplexity on the same items, with a paired percentile-bootstrap interval
    (items resampled, the same indices for both models)."""
    nll = np.array([[b["nll"], t["nll"]] for b, t in zip(base.per_item, tuned.per_item)])
    tokens = np.array([b["tokens"] for b in base.per_item], dtype=float)
    ratio = math.exp(tuned.mean_nll - base.mean_nll)
    if len(tokens) < 2:
        return {"ratio": ratio, "ci95_low": math.nan, "ci95_high": math.nan}
    picks = np.random.default_rng(seed).integers(0, len(tokens), size=(n_resamples, len(tokens)))
    counted = tokens[picks].sum(1)
    diff = (nll[:, 1][picks].sum(1) - nll[:, 0][picks].sum(1)) / np.maximum(counted, 1)
    low, high = np.exp(np.percentile(diff, [2.5, 97.5]))
    return {"ratio": ratio, "ci95_low": float(low), "ci95_high": float(high)}


@dataclass
class ComparisonReport:
    base: str
    tuned: str
    data: str
    items: int
    settings: dict
    metrics: list[dict]  # {"metric", "base", "tuned", "diff", "ci95_low", "ci95_high", "p_value"}
    perplexity: list[dict]  # {"set", "role", "base", "tuned", "ratio", "ci95_low", "ci95_high", "tokens"}
    speed: dict  # tokens/s of generation per model
    forgetting: str
    output_dir: str = ""
    samples: list[dict] = field(default_factory=list, repr=False)

    def render(self) -> str:
        lines = [f"base:  {self.base}", f"tuned: {self.tuned}", f"task set: {self.data} ({self.items} items)", ""]
        lines.append(f"{'metric':<18}{'base':>9}{'tuned':>9}{'diff':>9}   95% CI of diff      p")
        for m in self.metrics:
            lines.append(f"{m['metric']:<18}{m['base']:>9.4f}{m['tuned']:>9.4f}{m['diff']:>+9.4f}   {m['ci95_low']:+.4f} .. {m['ci95_high']:+.4f}  {_p(m['p_value'])}")
        if self.perplexity:
            lines += ["", f"{'perplexity':<34}{'base':>11}{'tuned':>11}{'tuned/base':>11}   95% CI"]
            for p in self.perplexity:
                label = f"{p['role']}: {Path(p['set']).name}"[:33]
                lines.append(f"{label:<34}{p['base']:>11.3f}{p['tuned']:>11.3f}{p['ratio']:>11.3f}   {p['ci95_low']:.3f} .. {p['ci95_high']:.3f}")
        lines += ["", f"forgetting: {self.forgetting}"]
        if self.output_dir:
            lines.append(f"report: {Path(self.output_dir) / 'report.html'}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def forgetting_verdict(rows: list[dict]) -> str:
    general = [r for r in rows if r["role"] == "general"]
    if not general:
        return "not measured: give a general set (--general FILE) that neither model was tuned on."
    worst = max(general, key=lambda r: r["ratio"])
    change = f"{100 * (worst['ratio'] - 1):+.1f}% (95% CI {100 * (worst['ci95_low'] - 1):+.1f}% .. {100 * (worst['ci95_high'] - 1):+.1f}%)"
    name = Path(worst["set"]).name
    if worst["ratio"] > 1 + FORGETTING_THRESHOLD and worst["ci95_low"] > 1:
        return f"yes: perplexity on the general set {name} rose {change}."
    if worst["ci95_low"] > 1:
        return f"slight: perplexity on the general set {name} rose {change}, within the {100 * FORGETTING_THRESHOLD:.0f}% tolerance."
    if worst["ci95_high"] < 1:
        return f"none: perplexity fell on every general set (least: {name}, {change})."
    return f"none measured: perplexity on the general set {name} changed {change}."


def _evaluate_side(model, items: list[EvalItem], metrics: list, settings: GenerationSettings, general: dict, reuse: str | None, progress) -> Side:
    if reuse:
        rows = _reused_rows(reuse, items)
        speed = float("nan")
    else:
        rows, stats = generate_predictions(model, items, settings, progress)
        speed = stats.tokens_per_s
    scores = score_rows(rows, metrics)
    side = Side(model.name, rows, scores, speed)
    if any(item.messages is not None for item in items):
        side.perplexities["task"] = perplexity(model, [i for i in items if i.messages is not None], "task")
    for name, general_items in general.items():
        side.perplexities[name] = perplexity(model, general_items, name)
    return side


def _reused_rows(path: str, items: list[EvalItem]) -> list[dict]:
    """Predictions that `tunelab eval generate` wrote for the same items (matched by id)."""
    file = Path(path)
    file = file / "predictions.jsonl" if file.is_dir() else file
    if not file.is_file():
        raise TunelabError(f"--*-predictions '{path}' is not a predictions.jsonl (or a folder holding one) written by `tunelab eval generate`.")
    found = {}
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
                found[row["id"]] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                raise TunelabError(f"'{file}' line {number} is not a prediction row ({{\"id\", \"prediction\", ...}}).") from None
    missing = [item.id for item in items if item.id not in found]
    if missing:
        raise TunelabError(f"'{file}' has no prediction for {len(missing)} of the {len(items)} items (ids {missing[:5]}...): it was made on other data or rows.")
    return [{**found[item.id], "columns": item.columns, "scores": {}} for item in items]


def compare_models(load_base, load_tuned, items: list[EvalItem], metrics: list, settings: GenerationSettings | None = None,
                   general: dict[str, list[EvalItem]] | None = None, data_name: str = "", output_dir: str | Path | None = None,
                   reuse: tuple[str | None, str | None] = (None, None), samples: int = 12, progress=None) -> ComparisonReport:  # fmt: skip
    """Evaluate both models (``load_base()`` and ``load_tuned()`` load them one at a time) and
    compare; with ``output_dir``, write the HTML report there."""
    from tunelab.evaluation.metrics import resolve_metric

    settings = settings or GenerationSettings()
    settings.check()
    for spec in metrics:
        resolve_metric(spec)
    general = general or {}
    sides = []
    for load, reused in zip((load_base, load_tuned), reuse):
        model = load()
        sides.append(_evaluate_side(model, items, metrics, settings, general, reused, progress))
        del model
    base, tuned = sides
    metric_rows = []
    for name in base.scores:
        a = [r["scores"][name] for r in base.rows]
        b = [r["scores"][name] for r in tuned.rows]
        boot = paired_bootstrap([x if x == x else 0.0 for x in a], [x if x == x else 0.0 for x in b], BOOTSTRAP_RESAMPLES) if len(a) >= 2 else None
        row = {"metric": name, "base": base.scores[name]["score"], "tuned": tuned.scores[name]["score"],
               "base_ci95": [base.scores[name]["ci95_low"], base.scores[name]["ci95_high"]],
               "tuned_ci95": [tuned.scores[name]["ci95_low"], tuned.scores[name]["ci95_high"]]}  # fmt: skip
        row["diff"] = row["tuned"] - row["base"]
        row |= {"ci95_low": boot.ci_low if boot else math.nan, "ci95_high": boot.ci_high if boot else math.nan, "p_value": boot.p_value if boot else math.nan}
        metric_rows.append(row)
    ppl_rows = []
    for name, report in base.perplexities.items():
        other = tuned.perplexities[name]
        ratio = perplexity_ratio(report, other)
        ppl_rows.append({"set": data_name if name == "task" else name, "role": "task" if name == "task" else "general",
                         "base": report.perplexity, "tuned": other.perplexity, **{"ratio": ratio["ratio"], "ci95_low": ratio["ci95_low"],
                         "ci95_high": ratio["ci95_high"]}, "tokens": report.tokens})  # fmt: skip
    sample_rows = [
        {"id": b["id"], "prompt": b["prompt"], "reference": b["reference"], "base": b["prediction"], "tuned": t["prediction"],
         "base_scores": b.get("scores", {}), "tuned_scores": t.get("scores", {})}
        for b, t in zip(base.rows[:samples], tuned.rows[:samples])
    ]  # fmt: skip
    report = ComparisonReport(
        base.name, tuned.name, data_name, len(items), settings.__dict__.copy(), metric_rows, ppl_rows,
        {"base_tokens_per_s": base.tokens_per_s, "tuned_tokens_per_s": tuned.tokens_per_s}, forgetting_verdict(ppl_rows), samples=sample_rows,
    )  # fmt: skip
    if output_dir is not None:
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        write_predictions(base.rows, folder / "base")
        write_predictions(tuned.rows, folder / "tuned")
        report.output_dir = str(folder)
        write_report(report, folder)
    return report


# ----------------------------------------------------------------------------- the HTML report
def _charts(report: ComparisonReport, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    if report.metrics:
        fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(report.metrics) + 2), 3.4))
        x = np.arange(len(report.metrics))
        base = [m["base"] for m in report.metrics]
        tuned = [m["tuned"] for m in report.metrics]
        for offset, side, values, color in ((-0.2, "base", base, "#8a9bb0"), (0.2, "tuned", tuned, "#2f6db5")):
            low = [v - m[f"{side}_ci95"][0] for v, m in zip(values, report.metrics)]
            high = [m[f"{side}_ci95"][1] - v for v, m in zip(values, report.metrics)]
            err = np.clip(np.nan_to_num(np.array([low, high])), 0, None)
            ax.bar(x + offset, values, 0.4, yerr=err, capsize=3, label=side, color=color)
        ax.set_xticks(x, [m["metric"] for m in report.metrics])
        ax.set_title(f"Task metrics on {report.items} items (95% bootstrap intervals)")
        ax.legend(frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout()
        fig.savefig(folder / "metrics.png", dpi=110)
        plt.close(fig)
        names.append("metrics.png")
    if report.perplexity:
        fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(report.perplexity) + 2), 3.4))
        x = np.arange(len(report.perplexity))
        ratios = [p["ratio"] for p in report.perplexity]
        err = [[r - p["ci95_low"] for r, p in zip(ratios, report.perplexity)], [p["ci95_high"] - r for r, p in zip(ratios, report.perplexity)]]
        err = np.nan_to_num(np.array(err))
        colors = ["#c0392b" if p["role"] == "general" and p["ci95_low"] > 1 + FORGETTING_THRESHOLD else "#2f6db5" for p in report.perplexity]
        ax.bar(x, ratios, 0.5, yerr=err, capsize=4, color=colors)
        ax.axhline(1.0, color="#444", linewidth=1)
        ax.set_xticks(x, [f"{p['role']}\n{Path(p['set']).name[:24]}" for p in report.perplexity])
        ax.set_ylabel("tuned / base perplexity")
        ax.set_title("Perplexity ratio (below 1: the tuned model is better)")
        ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout()
        fig.savefig(folder / "perplexity.png", dpi=110)
        plt.close(fig)
        names.append("perplexity.png")
    return names


_CSS = """body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}td,th{padding:.3em .8em;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left}.good{color:#1e7b34}.bad{color:#b03a2e}.muted{color:#777}
.sample{border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:.6em 1em}.pair{display:grid;grid-template-columns:1fr 1fr;gap:1em}
pre{white-space:pre-wrap;background:#f7f7f9;padding:.6em;border-radius:4px;margin:.3em 0;font-size:13px}
.verdict{padding:.6em 1em;background:#f3f6fb;border-left:4px solid #2f6db5}img{max-width:100%}"""


def _p(value: float) -> str:
    """A bootstrap p-value for a table cell: '0.667', '< 0.0005' where no resample crossed 0."""
    return format_p(value, BOOTSTRAP_RESAMPLES).removeprefix("p ").removeprefix("= ")


def _number(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def _significance(low: float, high: float, higher_is_better: bool = True) -> str:
    if low != low or high != high or low <= 0 <= high:
        return "muted"
    return "good" if (low > 0) == higher_is_better else "bad"


def write_report(report: ComparisonReport, folder: Path) -> Path:
    """``report.html`` (with its PNG charts) and ``report.json`` in ``folder``."""
    charts = _charts(report, folder)
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>tunelab: base vs tuned</title><style>{_CSS}</style></head><body>",
             "<h1>Base vs tuned</h1>", f"<p><b>base</b> {e(report.base)}<br><b>tuned</b> {e(report.tuned)}<br>",
             f"<b>task set</b> {e(report.data)} ({report.items} items; {'greedy' if report.settings['greedy'] else 'sampled'} decoding, "
             f"at most {report.settings['max_new_tokens']} new tokens)</p>",
             f"<p class='verdict'><b>Forgetting:</b> {e(report.forgetting)}</p>", "<h2>Task metrics</h2>",
             "<table><tr><th>metric</th><th>base</th><th>tuned</th><th>tuned − base</th><th>95% CI (paired bootstrap)</th><th>p</th></tr>"]  # fmt: skip
    for m in report.metrics:
        css = _significance(m["ci95_low"], m["ci95_high"])
        parts.append(f"<tr><td>{e(m['metric'])}</td><td>{_number(m['base'])}</td><td>{_number(m['tuned'])}</td><td class='{css}'>{m['diff']:+.4f}</td>"
                     f"<td class='{css}'>{_number(m['ci95_low'])} .. {_number(m['ci95_high'])}</td><td>{_p(m['p_value'])}</td></tr>")  # fmt: skip
    parts.append("</table>")
    if report.perplexity:
        parts.append("<h2>Perplexity</h2><table><tr><th>set</th><th>role</th><th>scored tokens</th><th>base</th><th>tuned</th><th>tuned / base</th><th>95% CI</th></tr>")
        for p in report.perplexity:
            css = _significance(p["ci95_low"] - 1, p["ci95_high"] - 1, higher_is_better=False)
            parts.append(f"<tr><td>{e(Path(p['set']).name)}</td><td>{p['role']}</td><td>{p['tokens']:,}</td><td>{_number(p['base'], 3)}</td><td>{_number(p['tuned'], 3)}</td>"
                         f"<td class='{css}'>{_number(p['ratio'], 3)}</td><td>{_number(p['ci95_low'], 3)} .. {_number(p['ci95_high'], 3)}</td></tr>")  # fmt: skip
        parts.append("</table>")
    if charts:
        parts.append("<h2>Charts</h2>" + "".join(f"<p><img src='{name}' alt='{name}'></p>" for name in charts))
    speed = {k: "predictions reused from tunelab eval generate" if v != v else f"{v:.1f} tokens/s" for k, v in report.speed.items()}
    parts.append(f"<p class='muted'>Generation: base {e(speed['base_tokens_per_s'])}; tuned {e(speed['tuned_tokens_per_s'])}.</p>")
    parts.append(f"<h2>Samples (the first {len(report.samples)} items, not chosen)</h2>")
    for s in report.samples:
        def scored(d):
            return ", ".join(f"{k} {v:.3g}" for k, v in d.items())

        parts.append(f"<div class='sample'><b>#{s['id']}</b><pre>{e(s['prompt'])}</pre>")
        if s["reference"] is not None:
            parts.append(f"<details><summary>reference</summary><pre>{e(s['reference'])}</pre></details>")
        parts.append(f"<div class='pair'><div><b>base</b> <span class='muted'>{e(scored(s['base_scores']))}</span><pre>{e(s['base'])}</pre></div>"
                     f"<div><b>tuned</b> <span class='muted'>{e(scored(s['tuned_scores']))}</span><pre>{e(s['tuned'])}</pre></div></div></div>")  # fmt: skip
    parts.append("<p class='muted'>Intervals: percentile bootstrap over items (2,000 resamples, the same items for both models). "
                 "Made by <code>tunelab eval compare</code>; predictions in base/ and tuned/.</p></body></html>")  # fmt: skip
    atomic_write_text(folder / "report.html", "\n".join(parts))
    atomic_write_text(folder / "report.json", json.dumps(report.to_dict(), indent=2, default=str))
    return folder / "report.html"
