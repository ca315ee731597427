"""What a data file holds, measured the way training will see it: records that read and parse,
conversation shapes, and the length of every example (tokens when a tokenizer is given,
characters and words otherwise) with its distribution, a histogram and the longest examples.

Token counts come from the training path itself (``assistant_spans`` and the same label rule as
``tokenize_conversation``), only batched: the tokenizer is called once per chunk of examples, which
is what keeps a file of thousands of conversations to a few seconds.
"""

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from jinja2 import TemplateError

from tunelab.config.schema import DataConfig
from tunelab.data.constants import IGNORE_INDEX
from tunelab.data.files import Finding, scan_file
from tunelab.data.formats import to_example
from tunelab.data.readers import Record
from tunelab.data.tokenize import assistant_spans, render, supervision_labels
from tunelab.errors import TunelabError

CHUNK = 512  # examples per tokenizer call: large enough to amortise the call, small enough for memory


# ----------------------------------------------------------------------------- batched tokenization
# Shared with ``audit``: both must count exactly what training counts.


def encode_batched(tokenizer, texts: list[str], offsets: bool = False) -> Iterator[tuple[list[int], list]]:
    """(ids, offsets) of each text, as ``tokenizer(text, add_special_tokens=False)`` gives them,
    with one tokenizer call per chunk of texts. ``offsets`` is an empty list unless asked for."""
    for start in range(0, len(texts), CHUNK):
        encoded = tokenizer(texts[start : start + CHUNK], add_special_tokens=False, return_offsets_mapping=offsets)
        spans = encoded["offset_mapping"] if offsets else [[]] * len(encoded["input_ids"])
        yield from zip(encoded["input_ids"], spans)


def supervised_count(labels: list[int]) -> int:
    # As training counts it: the first label is never predicted (nothing comes before it).
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def conversation_spans(tokenizer, messages: list[dict], from_message: int = 0) -> tuple[str, list[tuple[int, int]], list[int]]:
    """The rendered conversation, the supervised spans of the replies at or after ``from_message``,
    and the start (in characters) of every assistant reply, in order. Raises ``TunelabError``
    where training would (a template that is not prefix-stable)."""
    text, spans = assistant_spans(tokenizer, messages)
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    kept = [span for i, span in zip(assistants, spans) if i >= from_message]
    return text, kept, [start for start, _ in spans]


# ----------------------------------------------------------------------------- report pieces


@dataclass
class Summary:
    """The distribution of one length over the examples."""

    count: int
    total: int
    min: int
    mean: float
    median: float
    p90: float
    p99: float
    max: int

    @classmethod
    def of(cls, values: list[int]) -> "Summary | None":
        if not values:
            return None
        ordered = sorted(values)
        return cls(
            count=len(ordered), total=sum(ordered), min=ordered[0], mean=sum(ordered) / len(ordered),
            median=_percentile(ordered, 50), p90=_percentile(ordered, 90), p99=_percentile(ordered, 99), max=ordered[-1],
        )  # fmt: skip

    def render(self) -> str:
        return (
            f"min {self.min:,} · mean {self.mean:,.1f} · median {self.median:,.0f} · p90 {self.p90:,.0f} · "
            f"p99 {self.p99:,.0f} · max {self.max:,} (total {self.total:,})"
        )


def _percentile(ordered: list[int], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default), on sorted values."""
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Histogram:
    """Counts of examples per length bin; ``edges`` has one more entry than ``counts`` and bin i
    holds lengths in [edges[i], edges[i+1])."""

    edges: list[int]
    counts: list[int]

    @classmethod
    def of(cls, values: list[int], bins: int = 20) -> "Histogram | None":
        if not values:
            return None
        low, high = min(values), max(values)
        width = _round_width(max(1, math.ceil((high - low + 1) / bins)))
        start = low // width * width
        n = (high - start) // width + 1
        counts = [0] * n
        for value in values:
            counts[(value - start) // width] += 1
        return cls([start + i * width for i in range(n + 1)], counts)

    def bars(self, width: int = 40, marker: int | None = None) -> list[str]:
        """One text line per bin; ``marker`` (max_length) is pointed at in its bin."""
        most = max(self.counts) or 1
        label = len(f"{self.edges[-1] - 1:,}")
        lines = []
        for i, count in enumerate(self.counts):
            low, high = self.edges[i], self.edges[i + 1]
            bar = "█" * round(width * count / most) or ("▏" if count else "")
            note = f"  ◀ max_length={marker:,}" if marker is not None and low <= marker < high else ""
            lines.append(f"{low:>{label},}–{high - 1:<{label},} │{bar} {count:,}{note}")
        return lines


def _round_width(width: int) -> int:
    """The next 1, 2 or 5 times a power of ten, so that bin edges read as round numbers."""
    power = 10 ** (len(str(width)) - 1)
    for step in (1, 2, 5, 10):
        if step * power >= width:
            return step * power
    return 10 * power


@dataclass
class LongExample:
    where: str
    line: int | None
    length: int


@dataclass
class StatsReport:
    path: str
    format: str
    unit: str  # "tokens" with a tokenizer, "characters" without
    records: int = 0  # records that were read
    unreadable: int = 0  # lines that could not be read (broken JSON, bad bytes, non-objects)
    schema_failures: int = 0  # records read that do not fit data.format
    examples: int = 0  # conversations, documents, pairs or prompts measured
    turns: dict[int, int] = field(default_factory=dict)  # assistant replies per conversation -> conversations
    roles: dict[str, int] = field(default_factory=dict)  # messages per role, over the file
    lengths: Summary | None = None  # whole example (for pairs: the longer side)
    supervised: Summary | None = None  # tokens (characters) that carry loss, per example
    supervised_share: float | None = None  # of all tokens (characters)
    words: Summary | None = None  # without a tokenizer
    chosen: Summary | None = None  # preference pairs
    rejected: Summary | None = None
    histogram: Histogram | None = None
    max_length: int | None = None
    over_max_length: int | None = None  # examples longer than max_length
    longest: list[LongExample] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def kind(self) -> str:
        return {"text": "documents", "preference": "pairs", "prompt": "prompts"}.get(self.format, "conversations")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["turns"] = {str(k): v for k, v in self.turns.items()}  # JSON keys are strings
        out["kind"] = self.kind
        return out

    def render(self, max_findings: int = 10) -> str:
        lines = [f"{self.path} (data.format={self.format})"]
        lines.append(
            f"  records: {self.records:,} read · {self.unreadable:,} unreadable · {self.schema_failures:,} failing the "
            f"format → {self.examples:,} {self.kind}"
        )
        if self.turns:
            lines.append("  assistant replies per conversation: " + " · ".join(f"{k}: {v:,}" for k, v in sorted(self.turns.items())))
        if self.roles:
            lines.append("  messages per role: " + " · ".join(f"{k} {v:,}" for k, v in sorted(self.roles.items())))
        lines += self._lengths()
        if self.histogram:
            lines.append(f"  {self.unit} per {self._each()}:")
            lines += ["    " + bar for bar in self.histogram.bars(marker=self.max_length if self.over_max_length is not None else None)]
        if self.longest:
            lines.append("  longest:")
            lines += [f"    {e.where}: {e.length:,} {self.unit}" for e in self.longest]
        if self.findings:
            shown = self.findings[:max_findings]
            lines.append(f"  findings ({len(shown)} of {len(self.findings)}):" if len(shown) < len(self.findings) else "  findings:")
            lines += ["    " + f.render() for f in shown]
        lines.append(f"  measured in {self.seconds:.1f} s")
        return "\n".join(lines)

    def _each(self) -> str:
        return {"documents": "document", "pairs": "pair (longer side)", "prompts": "prompt"}.get(self.kind, "example")

    def _lengths(self) -> list[str]:
        if self.lengths is None:
            return [f"  no {self.kind} to measure"]
        lines = [f"  {self.unit} per {self._each()}: {self.lengths.render()}"]
        for name, summary in (("chosen", self.chosen), ("rejected", self.rejected), ("supervised", self.supervised)):
            if summary is not None:
                lines.append(f"  {name} {self.unit}: {summary.render()}")
        if self.words is not None:
            lines.append(f"  words per {self._each()}: {self.words.render()}")
        if self.supervised_share is not None:
            lines.append(f"  supervised share: {self.supervised_share:.1%} of all {self.unit}")
        if self.max_length is not None and self.over_max_length is None:
            lines.append(f"  max_length={self.max_length:,} counts tokens: give a tokenizer to see which {self.kind} exceed it")
        elif self.max_length is not None:
            share = self.over_max_length / self.examples if self.examples else 0.0
            lines.append(f"  longer than max_length={self.max_length:,}: {self.over_max_length:,} ({share:.1%})")
        return lines


# ----------------------------------------------------------------------------- measuring


@dataclass
class _Measured:
    """Per-example lengths, in file order."""

    records: list[Record] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    supervised: list[int] = field(default_factory=list)
    words: list[int] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


def dataset_stats(path: str | Path, cfg: DataConfig, tokenizer=None, max_length: int | None = None, longest: int = 5) -> StatsReport:
    """Measure a data file in the format ``cfg`` gives it. With a tokenizer, lengths are tokens as
    training tokenizes them (chat template, end-of-turn tokens, supervised replies); without one,
    characters and words of the text fields."""
    began = time.perf_counter()
    scanned = scan_file(path, cfg.text_field)
    report = StatsReport(str(path), cfg.format, "tokens" if tokenizer is not None else "characters", max_length=max_length)
    report.records, report.unreadable = len(scanned.records), len(scanned.findings)
    report.findings = list(scanned.findings)
    formatted, failures = format_records(scanned.records, cfg)
    report.schema_failures = len(failures)
    report.findings += failures
    examples = [(record, example) for _, record, example in formatted]
    _shape(report, [example for _, example in examples])
    measured = _measure(examples, tokenizer)
    report.findings += measured.findings
    _fill(report, measured, longest)
    report.seconds = time.perf_counter() - began
    return report


def format_records(records: list[Record], cfg: DataConfig) -> tuple[list[tuple[int, Record, dict]], list[Finding]]:
    """(index among ``records``, record, example) for each record that fits data.format, and a
    ``schema`` finding for each that does not."""
    examples, findings = [], []
    for index, record in enumerate(records):
        try:
            examples.append((index, record, to_example(record, cfg)))
        except TunelabError as err:
            findings.append(Finding(record.where, record.line, "schema", "error", str(err).removeprefix(f"Data {record.where}: ")))
    return examples, findings


def _shape(report: StatsReport, examples: list[dict]) -> None:
    """Turns and roles of the conversations (pairs count their chosen side)."""
    turns, roles = Counter(), Counter()
    for example in examples:
        messages = example.get("messages") or example.get("chosen") or example.get("prompt_messages")
        if messages is None:
            continue
        roles.update(m["role"] for m in messages)
        turns[sum(m["role"] == "assistant" for m in messages)] += 1
    if report.format != "prompt":  # a prompt has no reply yet
        report.turns = dict(sorted(turns.items()))
    report.roles = dict(sorted(roles.items()))


def _measure(examples: list[tuple[Record, dict]], tokenizer) -> _Measured:
    if not examples:
        return _Measured()
    first = examples[0][1]
    if tokenizer is None:
        return _measure_characters(examples)
    if "messages" in first:
        return _measure_conversations(examples, tokenizer)
    if "text" in first:
        return _measure_texts(examples, tokenizer)
    if "chosen" in first:
        return _measure_pairs(examples, tokenizer)
    return _measure_prompts(examples, tokenizer)


def _measure_conversations(examples: list[tuple[Record, dict]], tokenizer) -> _Measured:
    out = _Measured()
    texts, spans = [], []
    for record, example in examples:
        try:
            text, kept, _ = conversation_spans(tokenizer, example["messages"])
        except (TunelabError, TemplateError) as err:  # training would stop here; the stats go on
            out.findings.append(Finding(record.where, record.line, "chat_template", "error", str(err)))
            continue
        out.records.append(record)
        texts.append(text)
        spans.append(kept)
    for (ids, offsets), kept in zip(encode_batched(tokenizer, texts, offsets=True), spans):
        out.lengths.append(len(ids))
        out.supervised.append(supervised_count(supervision_labels(ids, offsets, kept)))
    return out


def _eos_length(ids: list[int], eos: int | None) -> int:
    # ``tokenize_text`` ends every document with EOS unless it already ends with one.
    return len(ids) + (eos is not None and (not ids or ids[-1] != eos))


def _measure_texts(examples: list[tuple[Record, dict]], tokenizer) -> _Measured:
    out = _Measured(records=[record for record, _ in examples])
    texts = [example["text"] for _, example in examples]
    for start in range(0, len(texts), CHUNK):
        for ids in tokenizer(texts[start : start + CHUNK], add_special_tokens=True)["input_ids"]:
            out.lengths.append(_eos_length(ids, tokenizer.eos_token_id))
    return out


def _rendered(examples: list[tuple[Record, dict]], tokenizer, out: _Measured, sides: tuple[str, ...], prompt: bool = False) -> list[str]:
    """The rendered texts of each example's ``sides``; an example the template refuses becomes a finding."""
    texts = []
    for record, example in examples:
        try:
            rendered = [render(tokenizer, example[side], add_generation_prompt=prompt) for side in sides]
        except TemplateError as err:
            out.findings.append(Finding(record.where, record.line, "chat_template", "error", f"the chat template fails on it: {err}"))
            continue
        out.records.append(record)
        texts += rendered
    return texts


def _measure_pairs(examples: list[tuple[Record, dict]], tokenizer) -> _Measured:
    """Each side whole, as a reward model reads it (``tokenize_pair``)."""
    out = _Measured()
    texts = _rendered(examples, tokenizer, out, ("chosen", "rejected"))
    lengths = [len(ids) for ids, _ in encode_batched(tokenizer, texts)]
    out.chosen, out.rejected = lengths[0::2], lengths[1::2]
    out.lengths = [max(pair) for pair in zip(out.chosen, out.rejected)]
    return out


def _measure_prompts(examples: list[tuple[Record, dict]], tokenizer) -> _Measured:
    """Prompts rendered with the assistant's turn opened, as online RL feeds them to the model."""
    out = _Measured()
    texts = _rendered(examples, tokenizer, out, ("prompt_messages",), prompt=True)
    out.lengths = [len(ids) for ids, _ in encode_batched(tokenizer, texts)]
    return out


def _contents(messages: list[dict], roles: tuple[str, ...] | None = None) -> list[str]:
    return [m["content"] for m in messages if roles is None or m["role"] in roles]


def _words(parts: list[str]) -> int:
    return sum(len(part.split()) for part in parts)


def _measure_characters(examples: list[tuple[Record, dict]]) -> _Measured:
    """Without a tokenizer: characters and words of what the example says (not of a template)."""
    out = _Measured(records=[record for record, _ in examples])
    for _, example in examples:
        if "chosen" in example:
            sides = [_contents(example[name]) for name in ("chosen", "rejected")]
            out.chosen.append(sum(map(len, sides[0])))
            out.rejected.append(sum(map(len, sides[1])))
            out.lengths.append(max(out.chosen[-1], out.rejected[-1]))
            out.words.append(max(map(_words, sides)))
            continue
        parts = [example["text"]] if "text" in example else _contents(example.get("messages") or example["prompt_messages"])
        out.lengths.append(sum(map(len, parts)))
        out.words.append(_words(parts))
        if "messages" in example:
            out.supervised.append(sum(map(len, _contents(example["messages"], ("assistant",)))))
    return out


def _fill(report: StatsReport, measured: _Measured, longest: int) -> None:
    report.examples = len(measured.lengths)
    report.lengths = Summary.of(measured.lengths)
    report.histogram = Histogram.of(measured.lengths)
    for name in ("supervised", "words", "chosen", "rejected"):
        setattr(report, name, Summary.of(getattr(measured, name)))
    if measured.supervised and report.lengths is not None and report.lengths.total:
        report.supervised_share = sum(measured.supervised) / report.lengths.total
    if report.max_length is not None and report.unit == "tokens":  # max_length counts tokens, not characters
        report.over_max_length = sum(1 for n in measured.lengths if n > report.max_length)
    order = sorted(range(len(measured.lengths)), key=lambda i: -measured.lengths[i])[:longest]
    report.longest = [LongExample(measured.records[i].where, measured.records[i].line, measured.lengths[i]) for i in order]


# ----------------------------------------------------------------------------- picture


def save_histogram(report: StatsReport, png_path: str | Path) -> Path:
    """Draw the report's length histogram (and the max_length line, if the report has one) into a
    PNG file."""
    if report.histogram is None:
        raise TunelabError(f"{report.path} has no {report.kind} to draw (see the report's findings); nothing was written to {png_path}.")
    # The figure is drawn on an Agg canvas of its own: no pyplot, no display, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.stairs(report.histogram.counts, report.histogram.edges, fill=True, color="#4c78a8")
    if report.over_max_length is not None:
        label = f"max_length={report.max_length:,} ({report.over_max_length:,} above)"
        axes.axvline(report.max_length, color="#e45756", linestyle="--", label=label)
        axes.legend()
    axes.set_xlabel(f"{report.unit} per {report._each()}")
    axes.set_ylabel(report.kind)
    axes.set_title(f"{Path(report.path).name} ({report.format}, {report.examples:,} {report.kind})")
    figure.tight_layout()
    figure.savefig(png_path, format="png")
    return png_path
