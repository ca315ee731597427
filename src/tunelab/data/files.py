"""What the data toolkit shares: a lenient reader that reports broken lines instead of stopping
at the first, one finding type for every check, a writer that never edits a file in place, and the
text of a record (for deduplication, PII and contamination checks).

Training reads with ``readers.read_records``, which stops at the first problem with a clear error;
the toolkit reads with ``scan_file``, which keeps going and lists every problem with its line.
"""

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tunelab.data.readers import Record, parse_json, read_records
from tunelab.errors import TunelabError

READABLE = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".txt", ".md")
WRITABLE = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")


@dataclass
class Finding:
    """One problem (or change) at one place of a data file."""

    where: str  # "train.jsonl line 12"
    line: int | None  # 1-based line of a JSON lines file, row of a CSV (header is line 1), None elsewhere
    check: str  # short name of the check: "broken_json", "empty_field", "pii_email", ...
    severity: str  # "error" (training would fail or learn garbage), "warning", or "info" (a change made)
    message: str

    def to_dict(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        return f"{self.where}: [{self.severity}] {self.check}: {self.message}"


@dataclass
class ScannedFile:
    path: Path
    records: list[Record]  # the records that parsed, each with its line
    findings: list[Finding]  # what could not be read (broken JSON, bad bytes, non-objects)

    @property
    def lines(self) -> list[int | None]:
        return [r.line for r in self.records]


def check_input(path: str | Path) -> Path:
    """The path of an existing, readable data file, or a clear error."""
    path = Path(path)
    if not path.exists():
        raise TunelabError(f"Data file '{path}' does not exist. Check the path (relative paths start from {Path.cwd()}).")
    if path.is_dir():
        raise TunelabError(f"'{path}' is a folder; give a data file ({', '.join(READABLE)}).")
    if path.suffix.lower() not in READABLE:
        raise TunelabError(f"Data file '{path}' has the extension '{path.suffix}', which tunelab does not read. Use {', '.join(READABLE)}.")
    return path


def scan_file(path: str | Path, text_field: str = "text") -> ScannedFile:
    """Every record of a data file that can be read, and a finding for every line that cannot.

    JSON lines are read line by line: bytes that are not UTF-8 (named by line and byte offset), lines
    that are not JSON, and JSON values that are not objects become findings and the scan goes on.
    Other formats are read whole (``read_records``); a file that cannot be read at all raises.
    """
    path = check_input(path)
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        try:
            return ScannedFile(path, read_records(path, text_field), [])
        except UnicodeDecodeError as err:
            raise TunelabError(
                f"Data file '{path}' is not UTF-8 text (byte {err.start}: {err.reason}). Re-encode it, e.g. "
                f"iconv -f latin1 -t utf-8 '{path}' > fixed{path.suffix}"
            ) from None
    records, findings = [], []
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path.name} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                findings.append(Finding(where, number, "encoding", "error", (
                    f"byte {offset + err.start} of the file ({err.reason}) is not UTF-8; re-encode the file as UTF-8 "
                    "(for example with iconv -f latin1 -t utf-8), or --fix replaces the bad bytes")))  # fmt: skip
                line = raw.decode("utf-8", errors="replace")
            offset += len(raw)
            if not line.strip():
                continue
            try:
                value = parse_json(line)
            except json.JSONDecodeError as err:
                findings.append(Finding(where, number, "broken_json", "error", f"not valid JSON ({err.msg} at column {err.colno})"))
                continue
            if not isinstance(value, dict):
                findings.append(Finding(where, number, "not_an_object", "error", f"a JSON {type(value).__name__}, not an object"))
                continue
            records.append(Record(value, where, number))
    return ScannedFile(path, records, findings)


def write_records(path: str | Path, rows: Iterable[dict], inputs: Iterable[str | Path] = ()) -> Path:
    """Write rows to a new file (JSON lines, a JSON array, CSV or Parquet by the extension),
    atomically: a crash leaves either the old file or the whole new one. Refuses to overwrite any
    of ``inputs`` (the toolkit never edits a file in place)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITABLE:
        raise TunelabError(f"Output '{path}' has the extension '{path.suffix}'; write {', '.join(WRITABLE)}.")
    for source in inputs:
        if Path(source).exists() and path.exists() and path.resolve() == Path(source).resolve():
            raise TunelabError(f"Output '{path}' is the input file; tunelab never edits data in place. Give another output path.")
    if path.is_dir():
        raise TunelabError(f"Output '{path}' is a folder; give a file name ending in {', '.join(WRITABLE)}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    if suffix == ".parquet":
        import datasets

        data = datasets.Dataset.from_list(rows)
        writer = lambda tmp: data.to_parquet(tmp)  # noqa: E731
    else:
        text = _serialise(rows, suffix)
        writer = lambda tmp: Path(tmp).write_text(text, encoding="utf-8")  # noqa: E731
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _serialise(rows: list[dict], suffix: str) -> str:
    if suffix == ".json":
        return json.dumps(rows, ensure_ascii=False, indent=1) + "\n"
    if suffix == ".csv":
        fields = list(dict.fromkeys(k for row in rows for k in row))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v for k, v in row.items()})
        return out.getvalue()
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def strings_of(value: Any) -> list[str]:
    """Every string inside a record's value, in order (messages' contents, nested fields)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_of(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in strings_of(v)]
    return []


def record_text(fields: dict) -> str:
    """The text a record carries (its string values joined by newlines; role names of chat turns
    such as 'user' or 'gpt' are left out), for content hashes, PII scans and n-gram overlap."""
    skip = {"role", "from", "id"}
    parts = []
    for key, value in fields.items():
        if key in skip:
            continue
        if isinstance(value, list) and all(isinstance(t, dict) for t in value):
            parts += [s for turn in value for k, v in turn.items() if k not in skip for s in strings_of(v)]
        else:
            parts += strings_of(value)
    return "\n".join(parts)


# Field names that give a file's format away, most specific first.
_FORMAT_SIGNS = (
    ({"chosen", "rejected"}, "preference", {}),
    ({"conversations"}, "sharegpt", {}),
    ({"messages"}, "openai", {}),
    ({"instruction", "output"}, "alpaca", {}),
    ({"prompt", "completion"}, "prompt_completion", {}),
    ({"question", "answer"}, "prompt_completion", {"prompt_field": "question", "completion_field": "answer"}),
    ({"text"}, "text", {}),
)


def guess_format(scanned: ScannedFile) -> tuple[str, dict]:
    """(data.format, field options) that fit the file's records, for commands run without
    --format; a clear error when nothing fits."""
    if scanned.path.suffix.lower() in (".txt", ".md"):
        return "text", {}
    seen = [set(r.fields) for r in scanned.records[:50]]
    for needed, name, options in _FORMAT_SIGNS:
        if seen and all(needed <= keys for keys in seen):
            return name, options
    fields = ", ".join(sorted(set().union(*seen))) if seen else "none (no record could be read)"
    raise TunelabError(
        f"Cannot tell the format of '{scanned.path}' from its fields ({fields}). Give --format "
        "alpaca|sharegpt|openai|prompt_completion|text|preference, and the field options it needs "
        "(e.g. --prompt-field question --completion-field answer)."
    )
