"""Reshape data files: split one into train/validation/test, convert between the conversation
formats, mix several into one.

Every function reads leniently (``scan_file``: broken lines become findings, not crashes),
builds everything in memory, and only then writes (atomically, never over an input), so a
failure leaves no partial output behind.

Conversion goes through the messages training sees (``to_example``) and back, so a converted
file trains exactly like its source. Training joins an alpaca record's instruction and input
into one user turn (``"{instruction}\\n\\n{input}"``); to split that turn again, a record
converted from alpaca with a non-empty input carries ``"alpaca": {"instruction": ...}``.
Converting back to alpaca uses it while the user turn still starts with that instruction
(otherwise the whole turn becomes the instruction), so alpaca -> sharegpt/openai/prompt_completion
-> alpaca gives back the same instruction, input, output, system and history. Training ignores
the extra field.
"""

import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config.schema import DataConfig
from tunelab.data.files import WRITABLE, Finding, ScannedFile, scan_file, write_records
from tunelab.data.formats import to_example
from tunelab.data.mixture import MIXING, allocate, mixture_shares
from tunelab.data.readers import Record
from tunelab.errors import TunelabError

FORMATS = ("alpaca", "sharegpt", "openai", "prompt_completion")
SPLIT_NAMES = ("train", "validation", "test")
ALPACA_META = "alpaca"
_SHAREGPT_FROM = {"user": "human", "assistant": "gpt", "system": "system"}


# ---------------------------------------------------------------- shared


def _scan(path: str | Path) -> ScannedFile:
    scanned = scan_file(path)
    if not scanned.records:
        found = f" ({len(scanned.findings)} unreadable lines, first: {scanned.findings[0].render()})" if scanned.findings else ""
        raise TunelabError(f"Data file '{scanned.path}' holds no records{found}; there is nothing to reshape.")
    return scanned


def _fields_present(records: list[Record]) -> str:
    return ", ".join(sorted({k for r in records for k in r.fields})) or "none"


def findings_lines(findings: list[Finding], limit: int = 50) -> list[str]:
    """Findings as indented lines for a report, the first ``limit`` of them."""
    lines = [f"  {f.render()}" for f in findings[:limit]]
    if len(findings) > limit:
        lines.append(f"  ... and {len(findings) - limit} more (to_dict() lists them all)")
    return lines


def _require_field(scanned: ScannedFile, name: str, option: str) -> None:
    """A field that no record has is a wrong field mapping, not a few bad records: say so once."""
    if not any(name in r.fields for r in scanned.records):
        raise TunelabError(
            f"No record of '{scanned.path}' has the field '{name}' ({option}). The records' fields are: "
            f"{_fields_present(scanned.records)}. Set {option} to one of them, or choose the file's real format."
        )


# ---------------------------------------------------------------- split


@dataclass
class SplitReport:
    source: Path
    outputs: dict[str, Path]
    ratios: dict[str, float]
    counts: dict[str, int]
    """Records written to each split."""
    stratify: str | None = None
    strata: dict[str, dict[str, int]] = field(default_factory=dict)
    """With ``stratify``: each value of the field (JSON for non-strings) -> records per split."""
    findings: list[Finding] = field(default_factory=list)
    """Lines that could not be read (left out of every split)."""
    seed: int = 0

    def render(self, limit: int = 50) -> str:
        how = f", stratified by '{self.stratify}'" if self.stratify else ""
        lines = [f"{self.source}: {sum(self.counts.values())} records split (seed {self.seed}{how})"]
        width = max(len(name) for name in self.outputs)
        lines += [f"  {name:<{width}}  {self.counts[name]:>7,} records ({self.ratios[name]:g}) -> {self.outputs[name]}" for name in self.outputs]
        for value, per_split in list(self.strata.items())[:limit]:
            lines.append(f"  {self.stratify}={value}: " + ", ".join(f"{name} {count:,}" for name, count in per_split.items()))
        if len(self.strata) > limit:
            lines.append(f"  ... and {len(self.strata) - limit} more values")
        if self.findings:
            lines += [f"{len(self.findings)} unreadable lines were left out of every split:", *findings_lines(self.findings, limit)]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "source": str(self.source), "outputs": {k: str(v) for k, v in self.outputs.items()}}


def split_file(
    path: str | Path,
    outputs: Mapping[str, str | Path] | None = None,
    *,
    out_dir: str | Path | None = None,
    names: Sequence[str] | None = None,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    stratify: str | None = None,
    seed: int = 0,
) -> SplitReport:
    """Split a data file's records into files in the given ``ratios``.

    Give ``outputs`` ({split name: path}) or ``out_dir`` (default: the input's folder); each split
    then goes to ``out_dir/<name><suffix>``, in the input's format when tunelab writes it, else
    JSON lines, with ``names`` defaulting to train, validation, test. ``ratios`` pairs with the split names
    in order. The split depends only on the file's records and ``seed``; each split keeps the
    records in file order. With ``stratify``, each value of that field is split on its own, so
    every split keeps the field's proportions (each value within one record of its exact share).
    """
    path = Path(path)
    outputs = _split_outputs(path, outputs, out_dir, names)
    shares = _check_ratios(ratios, list(outputs))
    scanned = _scan(path)
    records = scanned.records
    keys = _strata_keys(scanned, stratify) if stratify else [""] * len(records)
    groups: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    ordered = [groups[k] for k in sorted(groups)]  # sorted, never hash order: the same split in every process
    parts = _assign(ordered, shares, random.Random(seed))
    report = SplitReport(path, outputs, dict(zip(outputs, shares)), {}, stratify, findings=list(scanned.findings), seed=seed)
    names = list(outputs)
    for name, part in zip(names, parts):
        report.counts[name] = len(part)
    if stratify:
        member = {i: name for name, part in zip(names, parts) for i in part}
        for key in sorted(groups):
            report.strata[key] = {name: sum(member[i] == name for i in groups[key]) for name in names}
    for name, part in zip(names, parts):
        write_records(outputs[name], [records[i].fields for i in sorted(part)], inputs=[path])
    return report


def _split_outputs(path: Path, outputs, out_dir, names) -> dict[str, Path]:
    if outputs is not None and out_dir is not None:
        raise TunelabError("Give either the split files (outputs={name: path}) or a folder (out_dir) to write the splits into, not both.")
    if outputs is None:
        suffix = path.suffix.lower() if path.suffix.lower() in WRITABLE else ".jsonl"
        folder = Path(out_dir) if out_dir is not None else path.parent
        outputs = {name: folder / f"{name}{suffix}" for name in names or SPLIT_NAMES}
    outputs = {str(name): Path(p) for name, p in outputs.items()}
    if not outputs:
        raise TunelabError("Give at least one split to write.")
    seen: dict[Path, str] = {}
    for name, target in outputs.items():
        if target.suffix.lower() not in WRITABLE:
            raise TunelabError(f"Split '{name}' goes to '{target}', whose extension tunelab cannot write; use {', '.join(WRITABLE)}.")
        resolved = target.resolve()
        if resolved in seen:
            raise TunelabError(f"Splits '{seen[resolved]}' and '{name}' would both be written to '{target}'; give each split its own file.")
        seen[resolved] = name
    return outputs


def _check_ratios(ratios: Sequence[float], names: list[str]) -> list[float]:
    ratios = list(ratios)
    if len(ratios) != len(names):
        raise TunelabError(
            f"{len(ratios)} ratios ({', '.join(map(str, ratios))}) for {len(names)} splits ({', '.join(names)}): give one ratio per split, "
            "in the same order (leave a split out rather than giving it 0)."
        )
    for name, ratio in zip(names, ratios):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
            raise TunelabError(f"The ratio of split '{name}' is {ratio!r}; every ratio must be a positive number (leave a split out rather than giving it 0).")
    if abs(sum(ratios) - 1) > 1e-6:
        raise TunelabError(f"The split ratios {', '.join(map(str, ratios))} sum to {sum(ratios):g}, not 1; e.g. 0.8, 0.1, 0.1.")
    return [float(r) for r in ratios]


def _strata_keys(scanned: ScannedFile, name: str) -> list[str]:
    missing = [r for r in scanned.records if name not in r.fields]
    if len(missing) == len(scanned.records):
        raise TunelabError(
            f"Cannot stratify by '{name}': no record of '{scanned.path}' has that field. The records' fields are: {_fields_present(scanned.records)}."
        )
    if missing:
        places = ", ".join(r.where for r in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise TunelabError(
            f"Cannot stratify by '{name}': {len(missing)} records lack that field ({places}; their fields: {_fields_present(missing)}). "
            "Give them a value, or split without stratify."
        )
    return [v if isinstance(v, str) else json.dumps(v, sort_keys=True, ensure_ascii=False) for v in (r.fields[name] for r in scanned.records)]


def _assign(groups: list[list[int]], shares: list[float], rng: random.Random) -> list[list[int]]:
    """Record indices per split. Each group (stratum) gets the floor of its exact share per split;
    its leftover records go to the splits furthest below their file-wide target, so each group is
    within one record of its share and the totals match the file-wide rounding (largest
    remainders, as ``allocate``). With one group this is exactly ``allocate``."""
    targets = allocate(shares, sum(len(g) for g in groups))
    assigned = [0] * len(shares)
    parts: list[list[int]] = [[] for _ in shares]
    for group in groups:
        group = list(group)
        rng.shuffle(group)
        exact = [len(group) * s for s in shares]
        counts = [math.floor(x) for x in exact]
        room = lambda k: (targets[k] - assigned[k] - counts[k], exact[k] - counts[k])  # noqa: E731
        for k in sorted(range(len(shares)), key=room, reverse=True)[: len(group) - sum(counts)]:
            counts[k] += 1
        start = 0
        for k, count in enumerate(counts):
            parts[k] += group[start : start + count]
            assigned[k] += count
            start += count
    return parts


# ---------------------------------------------------------------- convert


class Unconvertible(TunelabError):
    """A record whose conversation the target format cannot hold (reported as a finding)."""


@dataclass
class ConvertReport:
    source: Path
    out: Path
    from_format: str
    to_format: str
    records: int = 0
    """Records read."""
    converted: int = 0
    """Records written."""
    findings: list[Finding] = field(default_factory=list)
    """Unreadable lines and records that could not be converted (with their lines), and fields
    of the source that a converted field replaced."""

    @property
    def skipped(self) -> int:
        return self.records - self.converted

    def render(self, limit: int = 50) -> str:
        head = f"{self.source} ({self.from_format}) -> {self.out} ({self.to_format}): {self.converted:,} of {self.records:,} records converted"
        if not self.findings:
            return head
        return "\n".join([head + f", {self.skipped:,} left out:", *findings_lines(self.findings, limit)])

    def to_dict(self) -> dict:
        return {**asdict(self), "source": str(self.source), "out": str(self.out), "skipped": self.skipped}


def format_config(format: str, prompt_field: str = "prompt", completion_field: str = "completion", messages_field: str | None = None) -> DataConfig:
    """The data options that read (and write) records of ``format``."""
    if format not in FORMATS:
        raise TunelabError(f"Format {format!r} is not one tunelab converts: use {', '.join(FORMATS)}.")
    return DataConfig(format=format, prompt_field=prompt_field, completion_field=completion_field, messages_field=messages_field)


def _source_fields(cfg: DataConfig) -> list[tuple[str, str]]:
    """(field, the option that names it) for every field a format reads; fields without an option
    (alpaca's input, system, history) are optional."""
    if cfg.format == "alpaca":
        return [("instruction", "the alpaca field"), ("output", "the alpaca field"), ("input", ""), ("system", ""), ("history", "")]
    if cfg.format == "prompt_completion":
        return [(cfg.prompt_field, "prompt_field"), (cfg.completion_field, "completion_field")]
    default = "conversations" if cfg.format == "sharegpt" else "messages"
    return [(cfg.messages_field or default, "messages_field")]


def check_format_fields(scanned: ScannedFile, cfg: DataConfig) -> None:
    """A clear error when the file has none of the fields the format reads (a wrong mapping)."""
    for name, option in _source_fields(cfg):
        if option:
            _require_field(scanned, name, option)


def convert_record(record: Record, cfg: DataConfig, to_format: str) -> dict:
    """One record of ``cfg.format`` as a record of ``to_format`` (its other fields kept).

    Raises ``Unconvertible`` when ``to_format`` cannot hold its conversation, and TunelabError
    when the record does not read as ``cfg.format``."""
    messages = to_example(record, cfg)["messages"]
    consumed = {name for name, _ in _source_fields(cfg)}
    meta = record.fields.get(ALPACA_META) if to_format == "alpaca" and cfg.format != "alpaca" else None
    if to_format == "alpaca":
        consumed.add(ALPACA_META)
    out_cfg = format_config(to_format, cfg.prompt_field, cfg.completion_field)
    row = _from_messages(messages, out_cfg, meta)
    if cfg.format == "alpaca" and to_format != "alpaca" and record.fields.get("input"):
        row[ALPACA_META] = {"instruction": record.fields["instruction"]}
    row.update({k: v for k, v in record.fields.items() if k not in consumed and k not in row})
    return row


def _from_messages(messages: list[dict], cfg: DataConfig, meta: Any) -> dict:
    if cfg.format == "openai":
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    if cfg.format == "sharegpt":
        return {"conversations": [{"from": _SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in messages]}
    system, pairs = _system_and_pairs(messages, cfg.format)
    *history, (question, answer) = pairs
    if cfg.format == "prompt_completion":
        if system is not None:
            raise Unconvertible("it has a system message, and prompt_completion has no place for one: convert to alpaca, sharegpt or openai instead.")
        if history:
            raise Unconvertible(
                f"it has {len(pairs)} user turns, and prompt_completion holds one prompt and one answer: "
                "convert to alpaca (earlier turns become its history), sharegpt or openai instead."
            )
        return {cfg.prompt_field: question, cfg.completion_field: answer}
    instruction, extra = _unjoin(question, meta)
    row = {"instruction": instruction, "input": extra, "output": answer}
    if system is not None:
        row["system"] = system
    if history:
        row["history"] = [[q, a] for q, a in history]
    return row


def _system_and_pairs(messages: list[dict], to_format: str) -> tuple[str | None, list[tuple[str, str]]]:
    """A leading system message and (user, assistant) pairs: the one shape alpaca and
    prompt_completion hold."""
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    roles = [m["role"] for m in messages]
    if "system" in roles:
        raise Unconvertible(f"it has a system message after the first turn, which {to_format} cannot hold: convert to sharegpt or openai instead.")
    if not messages or roles != ["user", "assistant"] * (len(roles) // 2) or len(roles) % 2:
        shape = " -> ".join(roles) or "no turns"
        raise Unconvertible(f"its turns ({shape}) do not alternate user, assistant ending with the assistant, which {to_format} needs.")
    return system, [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)]


def _unjoin(question: str, meta: Any) -> tuple[str, str]:
    """Alpaca's instruction and input back out of the user turn training saw."""
    instruction = meta.get("instruction") if isinstance(meta, dict) else None
    if isinstance(instruction, str) and question.startswith(instruction + "\n\n") and len(question) > len(instruction) + 2:
        return instruction, question[len(instruction) + 2 :]
    return question, ""


def convert_file(
    path: str | Path,
    out: str | Path,
    from_format: str,
    to_format: str,
    *,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str | None = None,
) -> ConvertReport:
    """Convert a data file between alpaca, sharegpt, openai and prompt_completion.

    ``prompt_field`` and ``completion_field`` name the prompt_completion fields (on whichever side
    is prompt_completion); ``messages_field`` names the input's turns for sharegpt / openai (the
    output uses the standard conversations / messages). A record's other fields are kept.

    A record the target cannot hold (a multi-turn conversation for prompt_completion, a system
    message for prompt_completion, turns that do not alternate for alpaca) or that does not read
    as ``from_format`` is left out and reported as a finding with its line; alpaca keeps earlier
    turns as ``history``. If no record converts, nothing is written and the error says why.
    """
    cfg = format_config(from_format, prompt_field, completion_field, messages_field)
    format_config(to_format)
    scanned = _scan(path)
    check_format_fields(scanned, cfg)
    report = ConvertReport(scanned.path, Path(out), from_format, to_format, len(scanned.records), findings=list(scanned.findings))
    converted, findings = convert_records(scanned.records, cfg, to_format)
    report.findings += findings
    rows = [row for _, row in converted]
    if not rows:
        first = "; ".join(f.render() for f in findings[:3])
        raise TunelabError(f"No record of '{scanned.path}' converts from {from_format} to {to_format}, so nothing was written: {first}")
    report.converted = len(rows)
    write_records(out, rows, inputs=[path])
    return report


def convert_records(records: list[Record], cfg: DataConfig, to_format: str) -> tuple[list[tuple[Record, dict]], list[Finding]]:
    """(record, converted row) for every record that converts; a finding for every one that does not."""
    converted, findings = [], []
    consumed = {name for name, _ in _source_fields(cfg)} | ({ALPACA_META} if to_format == "alpaca" else set())
    replaced: dict[str, list[Record]] = {}
    for record in records:
        try:
            row = convert_record(record, cfg, to_format)
        except TunelabError as err:  # Unconvertible, or a record that does not read as cfg.format
            message = str(err).removeprefix(f"Data {record.where}: ")
            findings.append(Finding(record.where, record.line, "unconvertible", "error", message))
            continue
        for name in sorted(set(record.fields) - consumed):
            if name in row and row[name] != record.fields[name]:
                replaced.setdefault(name, []).append(record)
        converted.append((record, row))
    for name, hit in replaced.items():
        findings.append(Finding(
            hit[0].where, hit[0].line, "field_replaced", "warning",
            f"{len(hit)} records had their own field '{name}', which the converted {to_format} record replaces (first: {hit[0].where}); "
            "rename it in the source to keep it."))  # fmt: skip
    return converted, findings


# ---------------------------------------------------------------- mix


@dataclass
class MixSource:
    path: Path
    weight: float = 1.0
    format: str | None = None
    """The source's format: needed only to convert it (``to_format``)."""
    name: str | None = None
    """Written in each record's source field (default: the file name without extension)."""


@dataclass
class MixReport:
    out: Path
    mixing: str
    names: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    """Records each source holds (after conversion, where converted)."""
    shares: list[float] = field(default_factory=list)
    """Each source's share of the mix under ``mixing``."""
    counts: list[int] = field(default_factory=list)
    """Records drawn from each source."""
    findings: list[Finding] = field(default_factory=list)
    seed: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def repeated(self) -> list[bool]:
        """Sources drawn more often than they have records (repeated whole, then topped up)."""
        return [c > n for c, n in zip(self.counts, self.sizes)]

    def render(self, limit: int = 50) -> str:
        lines = [f"{self.out}: {self.total:,} records mixed ({self.mixing}, seed {self.seed})"]
        width = max(len(name) for name in self.names)
        for name, size, weight, share, count, again in zip(self.names, self.sizes, self.weights, self.shares, self.counts, self.repeated):
            note = " (repeated: more than it holds)" if again else ""
            lines.append(f"  {name:<{width}}  {count:>7,} of {size:>7,} records · weight {weight:g} · share {share:.1%}{note}")
        if self.findings:
            lines += ["Left out of the mix:", *findings_lines(self.findings, limit)]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "out": str(self.out), "paths": [str(p) for p in self.paths], "total": self.total, "repeated": self.repeated}


def mix_files(
    sources: Sequence[MixSource | tuple | Mapping],
    out: str | Path,
    *,
    mixing: str = "proportional",
    temperature: float = 2.0,
    size: int | None = None,
    seed: int = 0,
    to_format: str | None = None,
    source_field: str | None = "source",
    shuffle: bool = True,
) -> MixReport:
    """Mix several data files into one, with the shares training mixtures use (``data.mixing``):
    proportional (weight x size), equal (weight) or temperature ((weight x size) ** (1/T)).

    ``sources`` are MixSource, (path, weight), (path, format, weight) or {path, weight, format, name}.
    ``size`` records are drawn (default: all the sources' records once); a source asked for
    fewer records than it has gives a random part of them, one asked for more is repeated whole
    and topped up with a random part, as in training. Each record gets its source's name in
    ``source_field`` (None: no such field). Sources in different formats need ``to_format``, to
    which every record is converted (records that do not convert are reported, not drawn).
    """
    if mixing not in MIXING:
        raise TunelabError(f"mixing={mixing!r} is not one of: {', '.join(MIXING)}.")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise TunelabError(f"size={size!r} must be a positive number of records (None: every source's records once).")
    specs = _mix_sources(sources, to_format)
    report = MixReport(Path(out), mixing, seed=seed)
    pools = []
    for spec in specs:
        rows, findings = _source_rows(spec, to_format, source_field)
        report.names.append(spec.name)
        report.paths.append(spec.path)
        report.weights.append(spec.weight)
        report.sizes.append(len(rows))
        report.findings += findings
        pools.append(rows)
    report.shares = mixture_shares(report.sizes, report.weights, mixing, temperature)
    report.counts = allocate(report.shares, size or sum(report.sizes))
    rng = random.Random(seed)
    mixed = [row for rows, count in zip(pools, report.counts) for row in _draw(rows, count, rng)]
    if shuffle:
        rng.shuffle(mixed)
    write_records(out, mixed, inputs=[s.path for s in specs])
    return report


def _mix_sources(sources, to_format: str | None) -> list[MixSource]:
    if not sources:
        raise TunelabError("Give at least one source to mix.")
    if to_format is not None:
        format_config(to_format)
    specs = []
    for i, source in enumerate(sources):
        spec = _mix_source(source, i)
        if not isinstance(spec.weight, (int, float)) or isinstance(spec.weight, bool) or not math.isfinite(spec.weight) or spec.weight <= 0:
            raise TunelabError(f"Source {i} ('{spec.path}') has weight {spec.weight!r}; a weight must be a positive number (drop the source to leave it out).")
        spec.name = spec.name or spec.path.stem
        if spec.name in [s.name for s in specs]:
            spec.name = f"{spec.name}-{i}"
        specs.append(spec)
    formats = {s.format for s in specs if s.format}
    if to_format is None and len(formats) > 1:
        listing = "; ".join(f"{s.name}: {s.format}" for s in specs)
        raise TunelabError(f"The sources are in different formats ({listing}); one file trains as one format, so give to_format to convert them all.")
    if to_format is not None:
        for spec in specs:
            spec.format = spec.format or to_format
            format_config(spec.format)
    return specs


def _mix_source(source, i: int) -> MixSource:
    if isinstance(source, MixSource):
        return MixSource(Path(source.path), source.weight, source.format, source.name)
    if isinstance(source, Mapping):
        unknown = sorted(set(source) - {"path", "weight", "format", "name"})
        if "path" not in source or unknown:
            extra = f"; it has unknown keys: {', '.join(unknown)}." if unknown else "."
            raise TunelabError(f"Source {i} ({dict(source)}) must be a mapping with a path and optionally weight, format and name{extra}")
        return MixSource(Path(source["path"]), source.get("weight", 1.0), source.get("format"), source.get("name"))
    if isinstance(source, (str, Path)):
        return MixSource(Path(source))
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return MixSource(Path(source[0]), source[1])
    if isinstance(source, (tuple, list)) and len(source) == 3:
        return MixSource(Path(source[0]), source[2], source[1])
    raise TunelabError(f"Source {i} ({source!r}) must be a path, (path, weight), (path, format, weight) or {{path, weight, format, name}}.")


def _source_rows(spec: MixSource, to_format: str | None, source_field: str | None) -> tuple[list[dict], list[Finding]]:
    scanned = _scan(spec.path)
    findings = list(scanned.findings)
    if to_format is None:
        converted = [(r, dict(r.fields)) for r in scanned.records]
    else:
        cfg = format_config(spec.format)
        check_format_fields(scanned, cfg)
        converted, more = convert_records(scanned.records, cfg, to_format)
        findings += more
        if not converted:
            raise TunelabError(f"No record of source '{spec.name}' ({spec.path}) converts from {spec.format} to {to_format}: {findings[-1].render()}")
    rows = [row for _, row in converted]
    if source_field:
        clash = next((r for r, row in converted if source_field in row), None)
        if clash is not None:
            raise TunelabError(
                f"{clash.where} already has a field '{source_field}', where the mix writes each record's source; "
                "pick another name for the mix's field (source_field), or none."
            )
        for row in rows:
            row[source_field] = spec.name
    return rows, findings


def _draw(rows: list[dict], count: int, rng: random.Random) -> list[dict]:
    """``count`` rows: all of them as many whole times as fit, then a random part without repeats."""
    passes, rest = divmod(count, len(rows))
    return rows * passes + [rows[i] for i in sorted(rng.sample(range(len(rows)), rest))]
