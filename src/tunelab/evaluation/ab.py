"""A/B tests between two variants (models, prompts, checkpoints): is B's rate or score really
different from A's, by how much, and how many examples would settle it.

Two inputs:

- a results table (CSV or JSON lines) with a ``variant`` column holding exactly two values and an
  outcome column (``outcome``, ``success`` or ``score`` unless named), one row per trial;
- two predictions files of ``tunelab eval generate`` (``{"a_name": path, "b_name": path}``) and the
  metric to compare, a key of each row's ``scores``. Rows with the same id in both are paired.

0/1 outcomes get the two-proportion z test, other scores Welch's t test and the Mann-Whitney U
test; paired predictions also get the paired bootstrap, which then decides significance, since
pairing removes the example-to-example variation both models share. Every difference is b - a.
"""

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.evaluation.human import read_predictions
from tunelab.evaluation.stats import (
    BootstrapResult, MannWhitneyResult, MeanCI, ProportionTest, SampleSize, WelchResult, bootstrap_mean_ci, format_p, mann_whitney,
    paired_bootstrap, sample_size_means, sample_size_proportions, two_proportion_test, welch_test,
)  # fmt: skip

KINDS = ("auto", "proportion", "score")
OUTCOME_COLUMNS = ("outcome", "success", "score")
TABLE_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".json")
TRUE, FALSE = ("true", "yes"), ("false", "no")


@dataclass
class _Arm:
    name: str
    values: list[float] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # prediction files only


@dataclass
class ABReport:
    """The comparison of variant b against variant a."""

    source: str
    outcome: str  # the column or metric compared
    kind: str  # proportion or score
    a: str
    b: str
    n_a: int
    n_b: int
    missing: int = 0  # rows without an outcome, left out
    proportion: ProportionTest | None = None
    mean_a: MeanCI | None = None
    mean_b: MeanCI | None = None
    welch: WelchResult | None = None
    mann_whitney: MannWhitneyResult | None = None
    paired: BootstrapResult | None = None  # prediction files: rows with the same id in both
    unpaired_ids: int = 0  # ids in only one of the two files
    primary: str = ""  # the test that decides significance
    p_value: float | None = None
    alpha: float = 0.05
    significant: bool = False
    sample_size: SampleSize | None = None
    sample_size_basis: str = ""  # "observed" or "given"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return _json_safe(asdict(self))

    def render(self) -> str:
        lines = [
            f"A/B test on {self.source}: {self.outcome} ({self.kind})",
            f"  a = {self.a} (n={self.n_a}) · b = {self.b} (n={self.n_b}) · differences are b - a",
        ]
        if self.missing:
            lines.append(f"  {self.missing} rows without an outcome were left out")
        if self.proportion is not None:
            lines += ["  " + line for line in self.proportion.render().splitlines()]
        if self.mean_a is not None:
            lines += [f"  mean a: {self.mean_a.render()} (bootstrap)", f"  mean b: {self.mean_b.render()} (bootstrap)"]
        for test in (self.welch, self.mann_whitney, self.paired):
            if test is not None:
                lines.append("  " + test.render())
        if self.unpaired_ids:
            lines.append(f"  {self.unpaired_ids} ids are in only one file: the paired bootstrap leaves them out")
        verdict = "yes" if self.significant else "no"
        lines.append(
            f"significant at {self.alpha:.0%}? {verdict} ({self.primary}, {format_p(self.p_value, self.paired.n_resamples if self.paired else None)})"
        )
        if self.sample_size is not None:
            lines.append(f"sample size: {self.sample_size.render()} ({self.sample_size_basis} effect)")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def ab_test(results, metric: str | None = None, kind: str = "auto", outcome: str | None = None, variant_column: str = "variant",
            baseline: str | None = None, effect: float | None = None, alpha: float = 0.05, power: float = 0.8,
            n_resamples: int = 2000, seed: int = 0, where: dict[str, str] | None = None) -> ABReport:  # fmt: skip
    """Compare two variants. ``results`` is a results table (path) or two predictions files
    (``{a_name: path, b_name: path}``, a first) with ``metric`` naming the score to compare.

    ``kind`` is ``proportion`` (0/1 outcomes), ``score`` or ``auto`` (proportion when every value
    is 0 or 1). In a table, a is ``baseline`` or else the first variant in sorted order. The sample
    size is per arm for 80% (``power``) power at ``alpha``: for the observed effect, or for
    ``effect`` when given (a difference in rate for proportions, Cohen's d for scores). ``where``:
    only the table's rows whose columns hold these values (``{"route": "chat"}`` picks one route of
    a ``tunelab serve --ab-log`` file)."""
    if kind not in KINDS:
        raise TunelabError(f"kind={kind!r}: choose auto, proportion (0/1 outcomes) or score.")
    for name, value in (("alpha", alpha), ("power", power)):
        if not (isinstance(value, (int, float)) and 0 < value < 1):
            raise TunelabError(f"{name}={value!r}: give a number strictly between 0 and 1 (alpha 0.05, power 0.8 are usual).")
    if isinstance(results, dict):
        arms, source, name = _prediction_arms(results, metric)
        missing = 0
    else:
        arms, source, name, missing = _table_arms(Path(results), outcome, variant_column, baseline, where or {})
    a, b = arms
    for arm in arms:
        if len(arm.values) < 2:
            raise TunelabError(
                f"{source}: variant '{arm.name}' has {len(arm.values)} row{'s' * (len(arm.values) != 1)} with an outcome; an A/B test "
                "needs at least 2 per variant."
            )
    kind = _kind(kind, arms, source)
    report = ABReport(source, name, kind, a.name, b.name, len(a.values), len(b.values), missing, alpha=alpha)
    if kind == "proportion":
        report.proportion = two_proportion_test(int(sum(a.values)), len(a.values), int(sum(b.values)), len(b.values))
        report.primary, report.p_value = "two-proportion z test", report.proportion.p_value
    else:
        report.mean_a = bootstrap_mean_ci(a.values, n_resamples=n_resamples, seed=seed)
        report.mean_b = bootstrap_mean_ci(b.values, n_resamples=n_resamples, seed=seed)
        report.welch, report.mann_whitney = welch_test(a.values, b.values), mann_whitney(a.values, b.values)
        report.primary, report.p_value = "Welch t test", report.welch.p_value
    if a.ids:
        _paired(report, a, b, n_resamples, seed)
    report.significant = report.p_value is not None and math.isfinite(report.p_value) and report.p_value < alpha
    _sample_size(report, effect, alpha, power)
    return report


# ----------------------------------------------------------------------------- inputs


def _table_arms(path: Path, outcome: str | None, variant_column: str, baseline: str | None, where: dict[str, str]) -> tuple[list[_Arm], str, str, int]:
    rows, columns = _read_table(path)
    for column, value in where.items():
        if column not in columns:
            raise TunelabError(f"Results file '{path}' has no column '{column}' (--where {column}={value}); its columns are {', '.join(columns)}.")
        rows = [(line, row) for line, row in rows if str(row.get(column, "")).strip() == value]
        if not rows:
            raise TunelabError(f"Results file '{path}' has no rows with {column}={value}.")
    column = outcome or next((c for c in OUTCOME_COLUMNS if c in columns), None)
    for wanted, flag in ((variant_column, "--variant-column"), (column, "--outcome")):
        if wanted is None or wanted not in columns:
            what = f"no column '{wanted}'" if wanted else f"none of the outcome columns {', '.join(OUTCOME_COLUMNS)}"
            raise TunelabError(f"Results file '{path}' has {what}; its columns are {', '.join(columns) or '(none)'}. Name the right one with {flag}.")
    arms: dict[str, _Arm] = {}
    missing = 0
    for line, row in rows:
        variant = "" if row.get(variant_column) is None else str(row[variant_column]).strip()
        if not variant:
            raise TunelabError(
                f"Results file '{path}', line {line}: the {variant_column} column is empty; every row must say which variant it belongs to."
            )
        value = _number(row.get(column), f"Results file '{path}', line {line}: {column}")
        if value is None:
            missing += 1
            continue
        arm = arms.setdefault(variant, _Arm(variant))
        arm.values.append(value)
        arm.lines.append(line)
    return _two_arms(path, arms, variant_column, baseline), str(path), column, missing


def _read_table(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line, row) pairs and the column names, from CSV or JSON lines."""
    if not path.is_file():
        raise TunelabError(f"Results file '{path}' does not exist. Give a CSV or JSON lines file with a variant column and an outcome column.")
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise TunelabError(f"Results file '{path}' has the extension '{path.suffix}'; give a CSV or JSON lines file ({', '.join(TABLE_SUFFIXES)}).")
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as lines:
            reader = csv.DictReader(lines)
            reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
            rows = [(reader.line_num, row) for row in reader if any(v.strip() for v in row.values() if isinstance(v, str))]
            return rows, reader.fieldnames
    rows, columns = [], {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TunelabError(f"Results file '{path}', line {number} is not valid JSON ({err.msg}); give one JSON object per line.") from None
            if not isinstance(row, dict):
                raise TunelabError(
                    f"Results file '{path}', line {number} is a JSON {type(row).__name__}, not an object with variant and outcome fields."
                )
            columns.update(dict.fromkeys(row))
            rows.append((number, row))
    return rows, list(columns)


def _number(value, where: str) -> float | None:
    """A numeric outcome: numbers, true/false (1/0), numeric text; None for a blank."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TRUE or text in FALSE:
            return float(text in TRUE)
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            return number
    raise TunelabError(
        f"{where} is {value!r}, not a number. Outcomes must be numbers (0/1 or true/false for success, any number for a score); fix or "
        "blank the value."
    )


def _two_arms(path: Path, arms: dict[str, _Arm], variant_column: str, baseline: str | None) -> list[_Arm]:
    if len(arms) != 2:
        found = ", ".join(f"'{name}' ({len(arm.values)} rows)" for name, arm in arms.items()) or "none"
        raise TunelabError(
            f"Results file '{path}': an A/B test compares exactly two variants, but the {variant_column} column has {len(arms)}: {found}. "
            "Filter the file to two variants."
        )
    names = sorted(arms)
    if baseline is not None:
        if baseline not in arms:
            raise TunelabError(f"--baseline {baseline!r} is not a variant of '{path}'; its variants are {', '.join(names)}.")
        names = [baseline, *(n for n in names if n != baseline)]
    return [arms[n] for n in names]


def _prediction_arms(files: dict, metric: str | None) -> tuple[list[_Arm], str, str]:
    if len(files) != 2:
        raise TunelabError(f"An A/B test compares two predictions files (a and b); got {len(files)}: {', '.join(files) or 'none'}.")
    read = {name: (Path(path), read_predictions(path)) for name, path in files.items()}
    if metric is None:
        found = sorted({key for _, rows in read.values() for row in rows.values() for key in row.scores})
        raise TunelabError(
            "Comparing predictions files needs --metric, the score to compare; the files' scores are "
            f"{', '.join(found) or '(none: run tunelab eval generate with metrics)'}."
        )
    arms = []
    for name, (path, rows) in read.items():
        arm = _Arm(name)
        for id_, row in sorted(rows.items()):
            if metric not in row.scores:
                raise TunelabError(
                    f"Predictions file '{path}', line {row.line} has no score '{metric}'; its scores are "
                    f"{', '.join(row.scores) or '(none)'}. Choose one with --metric."
                )
            value = _number(row.scores[metric], f"Predictions file '{path}', line {row.line}: score '{metric}'")
            if value is None:
                raise TunelabError(f"Predictions file '{path}', line {row.line}: score '{metric}' is empty; every row needs a number.")
            arm.values.append(value)
            arm.lines.append(row.line)
            arm.ids.append(id_)
        arms.append(arm)
    source = ", ".join(f"{name}={path}" for name, (path, _) in read.items())
    return arms, source, metric


def _kind(kind: str, arms: list[_Arm], source: str) -> str:
    binary = all(v in (0.0, 1.0) for arm in arms for v in arm.values)
    if kind == "auto":
        return "proportion" if binary else "score"
    if kind == "proportion" and not binary:
        arm, i = next((arm, i) for arm in arms for i, v in enumerate(arm.values) if v not in (0.0, 1.0))
        raise TunelabError(
            f"{source}, line {arm.lines[i]} (variant {arm.name}): outcome {arm.values[i]:g} is not 0 or 1, so this is no proportion. Use "
            "--kind score (or auto)."
        )
    return kind


# ----------------------------------------------------------------------------- tests


def _paired(report: ABReport, a: _Arm, b: _Arm, n_resamples: int, seed: int) -> None:
    """The paired bootstrap over ids present in both files; it becomes the deciding test."""
    value_a, value_b = dict(zip(a.ids, a.values)), dict(zip(b.ids, b.values))
    common = sorted(set(value_a) & set(value_b))
    report.unpaired_ids = len(set(value_a) ^ set(value_b))
    if len(common) < 2:
        report.notes.append(f"only {len(common)} id is in both files: no paired comparison (were they generated from the same data?)")
        return
    report.paired = paired_bootstrap([value_a[i] for i in common], [value_b[i] for i in common], n_resamples=n_resamples, seed=seed)
    report.primary, report.p_value = "paired bootstrap", report.paired.p_value


def _sample_size(report: ABReport, effect: float | None, alpha: float, power: float) -> None:
    report.sample_size_basis = "given" if effect is not None else "observed"
    if report.kind == "proportion":
        p_a = report.proportion.rate_a
        p_b = p_a + effect if effect is not None else report.proportion.rate_b
        if not 0 <= p_b <= 1:
            raise TunelabError(
                f"--effect {effect}: a's rate {p_a:.3f} plus the effect is {p_b:.3f}, outside 0-1. Give a difference in rate that stays within it."
            )
        if p_a == p_b:
            report.notes.append("no difference between the rates: no sample size detects it (give --effect, the smallest difference worth detecting)")
            return
        report.sample_size = sample_size_proportions(p_a, p_b, alpha=alpha, power=power)
        return
    d = effect if effect is not None else report.welch.cohens_d
    if not math.isfinite(d) or d == 0:
        report.notes.append("no standardised difference between the means: no sample size detects it (give --effect, a Cohen's d)")
        return
    report.sample_size = sample_size_means(d, alpha=alpha, power=power)
