"""Data file -> evaluation items: what the model is asked (a conversation up to the user's last
turn, or a raw text), the reference answer, and the record's other fields (for user metrics).

Formats are the training formats (``data.format``), guessed from the fields when not given, so a
file that trains also evaluates: a chat record's last assistant reply is its reference.
"""

import json
from dataclasses import dataclass, field

from tunelab.errors import TunelabError

REFERENCE_FIELDS = ("answer", "completion", "reference", "response", "output", "target")


@dataclass
class EvalItem:
    id: int  # the record's position in the file (0-based)
    prompt: list[dict] | str  # messages ending with the user's turn, or a raw text
    reference: str | None
    messages: list[dict] | None = None  # the whole conversation (chat formats: perplexity scores its replies)
    columns: dict = field(default_factory=dict)
    where: str = ""

    def prompt_text(self) -> str:
        """The question as a person reads it: the last user message (or the text)."""
        if isinstance(self.prompt, str):
            return self.prompt
        users = [m["content"] for m in self.prompt if m["role"] == "user"]
        return users[-1] if users else self.prompt[-1]["content"]


def data_config(path: str, format: str | None = None, **options):
    """A DataConfig for ``path``; the format and its fields guessed from the records when not given."""
    from tunelab.config import DataConfig
    from tunelab.data.files import guess_format, scan_file

    options = {k: v for k, v in options.items() if v is not None}
    if format is None:
        format, guessed = guess_format(scan_file(path, options.get("text_field", "text")))
        options = {**guessed, **options}
    return DataConfig(path=path, format=format, **options)


def load_items(path: str, format: str | None = None, limit: int | None = None, start: int = 0, reference_field: str | None = None, **options) -> list[EvalItem]:
    """Items of rows ``start`` .. ``start + limit`` of a data file."""
    from tunelab.data import to_example
    from tunelab.data.files import scan_file
    from tunelab.resources import resolve_path

    path = str(resolve_path(path, "--data")) if path.startswith("pkg://") else path
    cfg = data_config(path, format, **options)
    scanned = scan_file(path, cfg.text_field)
    if scanned.findings:
        first = scanned.findings[0]
        raise TunelabError(f"Data file '{path}' cannot be read at {first.where}: {first.message}. Run `tunelab data validate {path}` to see every problem.")
    records = scanned.records[start : start + limit if limit is not None else None]
    if not records:
        raise TunelabError(f"Data file '{path}' has no records to evaluate (from row {start}, {len(scanned.records)} rows in all).")
    items = []
    for i, record in enumerate(records, start=start):
        example = to_example(record, cfg)
        columns = dict(record.fields)
        if "text" in example:
            items.append(EvalItem(i, example["text"], None, None, columns, record.where))
        elif "messages" in example:
            messages = example["messages"]
            last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if last is None:
                raise TunelabError(f"Data {record.where}: the conversation has no assistant turn to compare a generation with.")
            items.append(EvalItem(i, messages[:last], messages[last]["content"], messages, columns, record.where))
        elif "prompt_messages" in example:
            reference = _reference(columns, reference_field, record.where)
            items.append(EvalItem(i, example["prompt_messages"], reference, None, columns, record.where))
        else:
            raise TunelabError(f"data format '{cfg.format}' gives no prompt to evaluate; use a chat format, prompt or text.")
    return items


def _reference(columns: dict, reference_field: str | None, where: str) -> str | None:
    if reference_field:
        if reference_field not in columns:
            raise TunelabError(f"Data {where}: no field '{reference_field}' (--reference-field); its fields are {', '.join(sorted(columns))}.")
        value = columns[reference_field]
        return value if isinstance(value, str) else json.dumps(value)
    for name in REFERENCE_FIELDS:
        if isinstance(columns.get(name), str):
            return columns[name]
    return None
