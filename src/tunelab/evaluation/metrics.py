"""Generation metrics: one score per example (for confidence intervals and paired comparisons)
and one corpus score.

Text overlap comes from the maintained libraries: ROUGE from ``rouge-score`` (Google's reference
implementation), BLEU and chrF from ``sacrebleu`` (corpus scores, as papers report them; the
per-example scores are sentence-level). GSM8K's accuracy compares final numbers. A user metric is
any importable callable ``f(predictions, references, **columns) -> list[float]``, named by its
dotted path (``mypkg.metrics.keyword_hit``) or by a ``{_target_: ...}`` node.
"""

import importlib
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable

from tunelab.errors import TunelabError


@dataclass
class MetricScores:
    """A metric's per-example scores and its corpus score (the mean, unless the metric says otherwise)."""

    name: str
    per_example: list[float]
    corpus: float


# ----------------------------------------------------------------------------- GSM8K
_NUMBER = r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_MARKED = re.compile(r"####\s*(" + _NUMBER + ")")
_ANY = re.compile(_NUMBER)


def _as_number(text: str) -> Decimal | None:
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "")
    try:
        return Decimal(cleaned).normalize() + 0  # + 0 turns -0 into 0
    except InvalidOperation:
        return None


def gsm8k_answer(text: str | None, flexible: bool = False) -> Decimal | None:
    """The final number of a GSM8K-style answer: the number after the last ``####`` marker
    (``#### 1,200`` and ``#### $1,200.00`` both read 1200, ``#### -3`` reads -3). With
    ``flexible``, an answer without the marker gives its last number instead (units and
    currency signs around it are ignored)."""
    text = text or ""
    marked = _MARKED.findall(text)
    if marked:
        return _as_number(marked[-1])
    if not flexible:
        return None
    numbers = _ANY.findall(text)
    return _as_number(numbers[-1]) if numbers else None


def gsm8k(predictions: list[str], references: list[str], **_) -> list[float]:
    """1 where the prediction's ``#### <n>`` equals the reference's final number (strict: an
    answer without the marker scores 0)."""
    return [float(p is not None and p == gsm8k_answer(r, flexible=True)) for p, r in ((gsm8k_answer(p), r) for p, r in zip(predictions, references))]


def gsm8k_flexible(predictions: list[str], references: list[str], **_) -> list[float]:
    """1 where the prediction's final number (after the last ``####`` if there is one, else its
    last number) equals the reference's. Close to lm-evaluation-harness's "flexible-extract",
    which always takes the last number (also when a marked answer is followed by more text), and
    compared as numbers (``#### 18.00`` equals 18), where lm-eval compares strings."""
    return [float(p is not None and p == gsm8k_answer(r, flexible=True)) for p, r in ((gsm8k_answer(p, True), r) for p, r in zip(predictions, references))]


def gsm8k_format(predictions: list[str], references: list[str], **_) -> list[float]:
    """1 where the prediction ends its reasoning with GSM8K's ``#### <number>`` line."""
    return [float(gsm8k_answer(p) is not None) for p in predictions]


# ----------------------------------------------------------------------------- exact match
def _normalise(text: str) -> str:
    return " ".join((text or "").split()).strip().lower()


def exact_match(predictions: list[str], references: list[str], **_) -> list[float]:
    """1 where prediction and reference are equal after trimming, collapsing whitespace and lowercasing."""
    return [float(_normalise(p) == _normalise(r)) for p, r in zip(predictions, references)]


# ----------------------------------------------------------------------------- ROUGE, BLEU, chrF
def rouge(predictions: list[str], references: list[str], **_) -> list[MetricScores]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures (rouge-score, with its Porter stemmer), per example and their means."""
    from rouge_score import rouge_scorer

    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    out = []
    for kind in kinds:
        values = [s[kind].fmeasure for s in scores]
        out.append(MetricScores(kind, values, sum(values) / len(values) if values else 0.0))
    return out


def _sacrebleu():
    try:
        import sacrebleu
    except ImportError:
        raise TunelabError("BLEU and chrF come from sacrebleu, which is not installed: pip install 'sacrebleu>=2.0'.") from None
    return sacrebleu


def bleu(predictions: list[str], references: list[str], **_) -> MetricScores:
    """sacrebleu's corpus BLEU (0-100, default 13a tokenisation), and its sentence BLEU per example."""
    sacrebleu = _sacrebleu()
    corpus = sacrebleu.corpus_bleu(predictions, [references]).score
    per = [sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(predictions, references)]
    return MetricScores("bleu", per, corpus)


def chrf(predictions: list[str], references: list[str], **_) -> MetricScores:
    """sacrebleu's corpus chrF (0-100), and its sentence chrF per example."""
    sacrebleu = _sacrebleu()
    corpus = sacrebleu.corpus_chrf(predictions, [references]).score
    per = [sacrebleu.sentence_chrf(p, [r]).score for p, r in zip(predictions, references)]
    return MetricScores("chrf", per, corpus)


METRICS: dict[str, Callable] = {
    "exact_match": exact_match, "gsm8k": gsm8k, "gsm8k_flexible": gsm8k_flexible, "gsm8k_format": gsm8k_format,
    "rouge": rouge, "bleu": bleu, "chrf": chrf,
}  # fmt: skip


def _import(path: str) -> Callable:
    module, _, attr = path.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise TunelabError(
            f"Metric '{path}' is not a known metric ({', '.join(METRICS)}) and cannot be imported as a "
            f"user metric ({err}). A user metric is a dotted path to f(predictions, references, **columns) -> list[float]."
        ) from None


def resolve_metric(spec) -> tuple[str, Callable]:
    """(name, function) for a shipped metric's name, a dotted path or a ``{_target_: ...}`` node
    (a mapping, or its YAML text: ``--metric '{_target_: mypkg.Keyword, word: apple}'``)."""
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        import yaml

        try:
            spec = yaml.safe_load(spec)
        except yaml.YAMLError as err:
            raise TunelabError(f"--metric {spec!r} starts with '{{' but is not a YAML mapping ({err}).") from None
    if isinstance(spec, dict) or hasattr(spec, "keys"):
        from tunelab.config import instantiate

        node = dict(spec)
        if "_target_" not in node:
            raise TunelabError(f"A metric node needs a _target_; got keys {sorted(node)}.")
        target = node["_target_"]
        extra = {k: v for k, v in node.items() if k != "_target_"}
        function = instantiate(node) if extra else _import(target)
        return target.rsplit(".", 1)[-1], function
    if spec in METRICS:
        return spec, METRICS[spec]
    if "." not in str(spec):
        raise TunelabError(f"Unknown metric '{spec}'. Metrics: {', '.join(METRICS)}, or a dotted path to your own function.")
    return str(spec).rsplit(".", 1)[-1].rsplit(":", 1)[-1], _import(str(spec))


def compute_metrics(specs: list, predictions: list[str], references: list[str], columns: list[dict] | None = None) -> list[MetricScores]:
    """Every metric of ``specs`` on the predictions; missing references count as empty strings."""
    references = [r if r is not None else "" for r in references]
    extra = {}
    if columns:
        keys = set().union(*columns)
        extra = {k: [c.get(k) for c in columns] for k in keys if k not in ("predictions", "references")}
    results = []
    for spec in specs:
        name, function = resolve_metric(spec)
        value = function(predictions, references, **extra)
        for item in value if isinstance(value, list) and value and isinstance(value[0], MetricScores) else [value]:
            if isinstance(item, MetricScores):
                results.append(item)
                continue
            values = [float(v) if v is not None else float("nan") for v in item]
            if len(values) != len(predictions):
                raise TunelabError(f"Metric '{name}' returned {len(values)} scores for {len(predictions)} predictions; it must return one per prediction.")
            present = [v for v in values if v == v]
            results.append(MetricScores(name, values, sum(present) / len(present) if present else float("nan")))
    return results
