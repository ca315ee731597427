"""Raw file -> records. Each record keeps where it came from, for error messages."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError


@dataclass
class Record:
    fields: dict[str, Any]
    where: str  # "train.jsonl line 12", "data.json item 3", "data.csv row 5"
    line: int | None = None  # the line in the file, where it is known (JSON lines; CSV rows)


def read_records(path: Path, text_field: str = "text") -> list[Record]:
    """Read JSON lines, a JSON array, Parquet, CSV or plain text (one record per blank-line
    separated paragraph) into records."""
    suffix = path.suffix.lower()
    if suffix != ".parquet":
        check_text_file(path)
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix in (".parquet", ".csv"):
        return _read_tabular(path, suffix[1:])
    if suffix in (".txt", ".md"):
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
        return [Record({text_field: p}, f"{path.name} paragraph {i + 1}") for i, p in enumerate(paragraphs) if p]
    raise TunelabError(
        f"Data file '{path}' has the extension '{suffix}', which tunelab does not read. "
        "Use .jsonl, .json, .parquet, .csv or .txt."
    )


def parse_json(text: str):
    """``json.loads``, with nesting deeper than Python's parser recurses reported as the JSON error
    it is (``json.loads`` raises RecursionError there)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested deeper than the JSON reader allows (about 1,000 levels)", text, 0) from None


def check_text_file(path: Path) -> None:
    """A clear error for a file that is not UTF-8 text: a binary file (NUL bytes near its start),
    or bytes that do not decode, named by their byte offset and line with the re-encoding command."""
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise TunelabError(
            f"Data file '{path}' is a binary file, not text (it holds NUL bytes near its start). Give a "
            ".jsonl, .json, .csv or .txt file saved as UTF-8 text, or a .parquet file with that extension."
        )
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise TunelabError(
            f"Data file '{path}' is not UTF-8 text: byte {err.start} (line {line}) is {data[err.start:err.start + 1]!r} ({err.reason}). "
            f"Re-encode it, e.g. iconv -f latin1 -t utf-8 '{path}' > fixed{path.suffix}, or run "
            f"`tunelab data validate {path} --fix FIXED{path.suffix}` to replace the bad bytes."
        ) from None


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = parse_json(line)
            except json.JSONDecodeError as err:
                raise TunelabError(
                    f"Data file '{path}' line {number} is not valid JSON ({err.msg} at column {err.colno}). "
                    "Each line of a .jsonl file must be one complete JSON object; fix or delete that line."
                ) from None
            if not isinstance(value, dict):
                raise TunelabError(
                    f"Data file '{path}' line {number} is a JSON {type(value).__name__}, not an object. "
                    "Each line must be an object such as {\"prompt\": ..., \"completion\": ...}."
                )
            records.append(Record(value, f"{path.name} line {number}", number))
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        value = parse_json(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TunelabError(
            f"Data file '{path}' is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}). "
            "A .json file must hold one JSON array of objects; use .jsonl for one object per line."
        ) from None
    if isinstance(value, dict):
        # {"data": [...]} and similar single-key wrappers
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise TunelabError(f"Data file '{path}' holds a JSON object; it must hold an array of records.")
        value = lists[0]
    if not isinstance(value, list):
        raise TunelabError(f"Data file '{path}' must hold a JSON array of records.")
    records = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise TunelabError(f"Data file '{path}' item {index} is not a JSON object; every item must be one.")
        records.append(Record(item, f"{path.name} item {index}"))
    return records


def _read_tabular(path: Path, kind: str) -> list[Record]:
    if kind == "csv":
        import csv

        # Every cell stays a string: type guessing would turn an answer such as "4" into an int.
        records = []
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            try:
                for i, row in enumerate(reader):
                    records.append(Record(dict(row), f"{path.name} row {i + 2}", i + 2))
            except csv.Error as err:
                raise TunelabError(
                    f"Data file '{path}' line {reader.line_num + 1} cannot be read as CSV ({err}). Check its quoting, "
                    "or save the data as JSON lines, which has no limit on a field's length."
                ) from None
        return records
    import datasets

    try:
        table = datasets.Dataset.from_parquet(str(path))
    except Exception as err:
        raise TunelabError(f"Data file '{path}' could not be read as Parquet: {err}") from None
    return [Record(row, f"{path.name} row {i}") for i, row in enumerate(table)]
