"""``tunelab plan data``: how many examples a fine-tune needs, and what a data file already holds.

The need depends on what the run must teach (``goal``: a format or style, or the task itself), on
how hard the task is, and on how much the base can already do. The ranges are rules of thumb,
each with where it comes from:

- a format or style: OpenAI's fine-tuning guide sees clear gains from 50-100 examples; LIMA
  (Zhou et al., 2023) aligned a strong 65B base's style with 1,000 curated ones; tunelab's demo
  taught SmolLM2-135M GSM8K's answer format with 160 (7 -> 29 answers of 40 in the format);
- the task itself: the same demo moved GSM8K accuracy from 0 to 1 of 40 only: a small base needs
  far more than a format does; GSM8K's own training set holds 7,473 problems; classification and
  extraction tasks reach their plateau with a few hundred to a few thousand.

A weaker base needs more (x1.5), a strong one fewer (x0.5). ``MEASURED`` holds tunelab's own
points, and the tests hold the ranges to them. With a file, its examples, lengths and
supervised tokens (``tunelab data stats``) are set against the range.
"""

from dataclasses import dataclass

from tunelab.errors import UsageError

# goal -> task -> (fewest, plenty) examples, for a base of fair ability
RANGES = {
    "format": {"simple": (50, 200), "moderate": (100, 500), "complex": (100, 1000)},
    "task": {"simple": (200, 1000), "moderate": (1000, 5000), "complex": (5000, 50000)},
}
BASE_FACTOR = {"weak": 1.5, "fair": 1.0, "strong": 0.5}
# What tunelab measured (the demo, SmolLM2-135M on GSM8K, a weak base for it): (goal, task, base, examples, learned?)
MEASURED = [("format", "complex", "weak", 160, True), ("task", "complex", "weak", 160, False)]
SOURCES = {
    "format": "OpenAI's fine-tuning guide (gains from 50-100 examples), LIMA (1,000 for a strong base's style), "
              "tunelab's demo (GSM8K's format taught to SmolLM2-135M with 160)",
    "task": "GSM8K (7,473 training problems for multi-step math), tunelab's demo (160 examples moved a 135M base's GSM8K "
            "accuracy from 0 to 1 of 40), the usual plateau of classification and extraction at hundreds to thousands",
}  # fmt: skip


@dataclass
class DataPlan:
    goal: str
    task: str
    base: str
    fewest: int
    plenty: int
    have: int | None = None
    stats: object = None  # StatsReport of the file

    def verdict(self) -> str:
        if self.have is None:
            return ""
        if self.have < self.fewest:
            return f"below the range: {self.have:,} of at least {self.fewest:,}; collect {self.fewest - self.have:,} more, or synthesise (tunelab data synth)"
        if self.have < self.plenty:
            return f"within the range: {self.have:,}; more (up to {self.plenty:,}) should still help"
        return f"at the top of the range: {self.have:,}; more data is unlikely to help as much as cleaning it (tunelab data clean)"

    def render(self) -> str:
        lines = [f"Teaching {'a format or style' if self.goal == 'format' else 'the task'} ({self.task} task, {self.base} base): "
                 f"{self.fewest:,} to {self.plenty:,} examples", f"  from: {SOURCES[self.goal]}"]  # fmt: skip
        if self.stats is not None:
            s = self.stats
            lines.append(f"Your file {s.path}: {s.examples:,} {s.kind}" + (f" ({s.schema_failures:,} records fail data.format={s.format})" if s.schema_failures else ""))
            if s.lengths is not None:
                lines.append(f"  {s.unit} per example: mean {s.lengths.mean:,.0f}, max {s.lengths.max:,}; {s.lengths.total:,} in all")
            if s.supervised is not None:
                lines.append(f"  supervised {s.unit}: {s.supervised.total:,} ({s.supervised_share:.0%} of all)")
            lines.append(f"  {self.verdict()}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        out = {"goal": self.goal, "task": self.task, "base": self.base, "fewest": self.fewest, "plenty": self.plenty, "sources": SOURCES[self.goal]}
        if self.stats is not None:
            out.update(have=self.have, verdict=self.verdict(), stats=self.stats.to_dict())
        return out


def plan_data(goal: str = "task", task: str = "moderate", base: str = "fair", path: str | None = None, cfg=None, tokenizer=None) -> DataPlan:
    """The range of examples for ``goal`` and ``task`` on a ``base`` of that ability, and, with
    ``path``, what the file holds, read as ``cfg`` (a DataConfig; default: the format guessed
    from its records) says, in tokens with ``tokenizer``, else characters."""
    for name, value, choices in (("goal", goal, RANGES), ("task", task, RANGES["task"]), ("base", base, BASE_FACTOR)):
        if value not in choices:
            raise UsageError(f"--{name} {value!r}: choose {', '.join(choices)}.")
    fewest, plenty = (round(n * BASE_FACTOR[base]) for n in RANGES[goal][task])
    plan = DataPlan(goal, task, base, fewest, plenty)
    if path is not None:
        from pathlib import Path

        from tunelab.config import DataConfig
        from tunelab.data.stats import dataset_stats

        if not Path(path).is_file():
            raise UsageError(f"--data {path}: no such file.")
        if cfg is None:  # the format and its fields guessed from the records, as tunelab data does
            from tunelab.data.files import guess_format, scan_file

            fmt, fields = guess_format(scan_file(path, "text"))
            cfg = DataConfig(path=path, format=fmt, **fields)
        plan.stats = dataset_stats(path, cfg, tokenizer)
        plan.have = plan.stats.examples
    return plan
