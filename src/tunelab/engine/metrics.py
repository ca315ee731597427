"""Metrics: a CSV file (rewritten atomically) beside Fabric's TensorBoard logger, and the
loss-curve plot made from the CSV at the end of a run."""

import csv
import io
from pathlib import Path

from tunelab.engine.checkpoint import atomic_write_text


class MetricsCSV:
    """One row per logged step; columns grow as new metrics appear. On resume, rows after the
    resumed step are dropped so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        self.rows: dict[int, dict] = {}
        if resume_step is not None and path.exists():
            with path.open() as f:
                for row in csv.DictReader(f):
                    step = int(row["step"])
                    if step <= resume_step:
                        self.rows[step] = {k: v for k, v in row.items() if v != ""}

    def log(self, metrics: dict, step: int) -> None:
        self.rows.setdefault(step, {"step": step}).update(metrics)
        columns = ["step"] + sorted({k for row in self.rows.values() for k in row} - {"step"})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        for step_key in sorted(self.rows):
            writer.writerow(self.rows[step_key])
        atomic_write_text(self.path, buffer.getvalue())


def plot_loss_curve(csv_path: Path, png_path: Path) -> Path | None:
    """Training loss per step and, where logged, held-out loss; returns the PNG's path."""
    series = [("train/loss", "training loss"), ("val/loss", "held-out loss")]
    header = []
    if csv_path.exists():
        with csv_path.open() as f:
            header = next(csv.reader(f), [])
    if "train/task_loss" in header:  # EWC: the task's own loss beside loss + penalty
        series.insert(1, ("train/task_loss", "training loss without the EWC penalty"))
    # A mixture's sources, each on its own (data.sources: val/loss/<source>): what a run forgets shows here.
    series += [(column, f"held-out: {column[len('val/loss/'):]}") for column in header if column.startswith("val/loss/")]
    return plot_metric_panels(csv_path, png_path, [("loss (nats per supervised token)", series)])


def plot_metric_panels(csv_path: Path, png_path: Path, panels: list[tuple[str, list[tuple[str, str]]]]) -> Path | None:
    """One panel per (y label, [(column, legend label), ...]) of metrics.csv against the step;
    panels with no logged values are left out. Returns the PNG's path, or None if nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not csv_path.exists():
        return None
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    drawn = []
    for ylabel, series in panels:
        lines = [(label, [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]) for key, label in series]
        lines = [(label, points) for label, points in lines if points]
        if lines:
            drawn.append((ylabel, lines))
    if not drawn:
        return None
    fig, axes = plt.subplots(1, len(drawn), figsize=(6 * len(drawn), 4), squeeze=False)
    for ax, (ylabel, lines) in zip(axes[0], drawn):
        for label, points in lines:
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
