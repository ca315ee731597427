"""``tunelab data validate`` as a library: what in a data file would stop training or teach the model
garbage, a repaired copy (``--fix``), and the cheap part of the checks that ``tunelab train`` runs
before it loads a model.

Severities follow ``files.Finding``: an *error* is a record training cannot use or would learn
garbage from (unreadable, wrong schema, an empty answer, no assistant turn, an answer truncated
away); a *warning* is something worth a look that training copes with (an empty prompt, roles
that do not alternate, a degenerate loop, control characters, an over-length example).

Decisions on turn order. A conversation without an assistant turn is an error: nothing in it is
supervised (training drops it silently) and it usually means the roles are mapped wrongly. A
system message after the start, two turns of one role in a row, a first turn by the assistant or
a user turn after the last answer are warnings: the loss mask handles them, and ChatML-style
templates render them, though some templates (Llama 2, Mistral, Gemma) refuse them.
"""

import dataclasses
import json
import logging
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.config.schema import DataConfig
from tunelab.data.constants import IGNORE_INDEX
from tunelab.data.files import Finding, check_input, scan_file, write_records
from tunelab.data.formats import to_example
from tunelab.data.readers import Record, parse_json
from tunelab.data.tokenize import FALLBACK_CHAT_TEMPLATE, tokenize_conversation
from tunelab.errors import TunelabError
from tunelab.resources import resolve_path

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
ROLES = ("system", "user", "assistant")
# A degenerate loop repeats one span many times, so few of its n-grams are distinct. Templated
# reasoning (GSM8K's "Then find ... = <<...>>" lines) repeats 4-grams too, covering up to 74% of an
# answer, but keeps >= 64% of its 4-grams distinct across GSM8K, Alpaca, ShareGPT and HH-RLHF;
# loops measured 2-36%. Both conditions must hold.
NGRAM = 4
NGRAM_MIN_COUNT = 4  # some 4-gram occurs at least this often
NGRAM_MIN_COVERAGE = 0.5  # and the 4-grams occurring that often cover at least half the words
NGRAM_MAX_DISTINCT = 0.5  # and at most half of the answer's 4-grams are distinct
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # category Cc less \t \n \r
REPLACEMENT = "\ufffd"
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


# ----------------------------------------------------------------------------------- reports


def _counts(findings: list[Finding]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for f in findings:
        by_severity = counts.setdefault(f.severity, {})
        by_severity[f.check] = by_severity.get(f.check, 0) + 1
    return counts


def _render_findings(findings: list[Finding], limit: int) -> list[str]:
    ordered = sorted(findings, key=lambda f: SEVERITY_ORDER.get(f.severity, 3))  # stable: file order within a severity
    lines = [f.render() for f in ordered[:limit]]
    if len(ordered) > limit:
        lines.append(f"... and {len(ordered) - limit} more (the JSON report lists them all)")
    return lines


def _summary_lines(findings: list[Finding]) -> list[str]:
    counts = _counts(findings)
    return [
        f"  {severity}s: " + ", ".join(f"{check} {n}" for check, n in sorted(counts[severity].items(), key=lambda kv: -kv[1]))
        for severity in sorted(counts, key=lambda s: SEVERITY_ORDER.get(s, 3))
    ]


@dataclass
class ValidationReport:
    """What ``validate_file`` found in one file, in file order."""

    path: Path
    format: str
    records: int  # records read (lines that could not be read are findings, not records)
    findings: list[Finding] = field(default_factory=list)
    checked_length: bool = False  # whether a tokenizer and max_length were given (over-length checked)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def render(self, limit: int = 50) -> str:
        head = (f"{self.path} (format {self.format}): {self.records} records checked, "
                f"{len(self.errors)} errors, {len(self.warnings)} warnings")  # fmt: skip
        if not self.checked_length:
            head += " (over-length not checked: give a tokenizer and max_length)"
        if not self.findings:
            return head + "\nNo problems found."
        return "\n".join([head, *_summary_lines(self.findings), *_render_findings(self.findings, limit)])

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "format": self.format, "records": self.records, "ok": self.ok,
            "errors": len(self.errors), "warnings": len(self.warnings), "checked_length": self.checked_length,
            "counts": _counts(self.findings), "findings": [f.to_dict() for f in self.findings],
        }  # fmt: skip


@dataclass
class FixReport:
    """What ``fix_file`` changed and dropped (info findings, each with the source line)."""

    path: Path
    out: Path
    format: str
    records_in: int  # records and unreadable lines of the input
    records_out: int  # records written
    findings: list[Finding] = field(default_factory=list)

    @property
    def dropped(self) -> list[Finding]:
        return [f for f in self.findings if f.check == "dropped"]

    @property
    def changed(self) -> list[Finding]:
        return [f for f in self.findings if f.check != "dropped"]

    def render(self, limit: int = 50) -> str:
        head = (f"{self.path} -> {self.out}: {self.records_out} of {self.records_in} records written, "
                f"{len(self.dropped)} dropped, {len(self.changed)} changes")  # fmt: skip
        if not self.findings:
            return head + "\nNothing needed fixing."
        return "\n".join([head, *_summary_lines(self.findings), *_render_findings(self.findings, limit)])

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "out": str(self.out), "format": self.format, "records_in": self.records_in,
            "records_out": self.records_out, "dropped": len(self.dropped), "changed": len(self.changed),
            "counts": _counts(self.findings), "findings": [f.to_dict() for f in self.findings],
        }  # fmt: skip


# ------------------------------------------------------------------------------ reading


def utf8_findings(path: Path) -> list[Finding]:
    """An error for every line of a file that is not UTF-8, read in 1 MiB pieces cut after a
    newline (a large text corpus is never held whole, and no character is split): a piece that
    decodes passes at C speed, only a failing piece is decoded line by line to name its lines."""
    findings: list[Finding] = []
    line, offset, buffer = 1, 0, bytearray()
    with path.open("rb") as f:
        while True:
            chunk = f.read(1 << 20)
            buffer += chunk
            newline = chunk.rfind(b"\n")
            if chunk and newline < 0:
                continue  # a line longer than the piece: read on
            cut = len(buffer) - len(chunk) + newline + 1 if chunk else len(buffer)
            piece = bytes(buffer[:cut])
            del buffer[:cut]
            try:
                piece.decode("utf-8")
            except UnicodeDecodeError:
                findings += _bad_lines(path, piece, line, offset)
            line += piece.count(b"\n")
            offset += len(piece)
            if not chunk:
                return findings


def _bad_lines(path: Path, piece: bytes, first_line: int, offset: int) -> list[Finding]:
    findings = []
    for number, raw in enumerate(piece.split(b"\n"), start=first_line):  # not splitlines: a lone \r ends no line
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            findings.append(Finding(f"{path.name} line {number}", number, "encoding", "error", (
                f"byte {offset + err.start} of the file ({err.reason}) is not UTF-8; re-encode the file as UTF-8 "
                "(for example with iconv -f latin1 -t utf-8), or --fix replaces the bad bytes")))  # fmt: skip
        offset += len(raw) + 1
    return findings


def _paragraph_records(path: Path, text_field: str) -> list[Record]:
    """A text file's records as training reads them (``read_records``: paragraphs separated by an
    empty line), each with the line it starts on; bad bytes become U+FFFD."""
    records, lines, start = [], [], 1
    text = path.read_bytes().decode("utf-8", errors="replace")
    for number, line in enumerate(text.split("\n") + [""], start=1):
        if line:
            start = number if not lines else start
            lines.append(line)
            continue
        paragraph = "\n".join(lines).strip()
        if paragraph:
            records.append(Record({text_field: paragraph}, f"{path.name} line {start}", start))
        lines = []
    return records


def _read(path: str | Path, cfg: DataConfig) -> tuple[Path, list[Record], list[Finding]]:
    """Records and reading findings; a file that cannot be read at all raises."""
    path = check_input(path)
    if path.suffix.lower() in TEXT_SUFFIXES:
        return path, _paragraph_records(path, cfg.text_field), utf8_findings(path)
    scanned = scan_file(path, cfg.text_field)
    return path, scanned.records, scanned.findings


# ----------------------------------------------------------------------- record checks


def _finding(record: Record, check: str, severity: str, message: str) -> Finding:
    return Finding(record.where, record.line, check, severity, message)


def _strings(value, path: str):
    """(field path, string) for every string inside a record's value: answer, conversations[2].value."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]")


def _character_findings(record: Record) -> list[Finding]:
    findings = []
    for path, text in _strings(record.fields, ""):
        match = CONTROL.search(text)
        if match:
            n = len(CONTROL.findall(text))
            findings.append(_finding(record, "control_char", "warning", (
                f"{path} has {n} control character{'s' if n > 1 else ''}: U+{ord(match.group()):04X} at character "
                f"{match.start() + 1}{' and more' if n > 1 else ''}; --fix removes them")))  # fmt: skip
        at = text.find(REPLACEMENT)
        if at >= 0:
            n = text.count(REPLACEMENT)
            findings.append(_finding(record, "replacement_char", "warning", (
                f"{path} has {n} U+FFFD replacement character{'s' if n > 1 else ''} (text that was not valid when the "
                f"data was made), the first at character {at + 1}; check the source's encoding")))  # fmt: skip
    return findings


def _text_finding(record: Record, text_field: str) -> Finding | None:
    """The text format: the field must hold a string (worded as the pretraining reader says it)."""
    value = record.fields.get(text_field)
    if not isinstance(value, str):
        present = ", ".join(sorted(record.fields)) or "no fields"
        return _finding(record, "schema", "error", (
            f"no text field '{text_field}' (data.text_field) holding a string; the record has: {present}. "
            "Set data.text_field=FIELD."))  # fmt: skip
    if not value.strip():
        return _finding(record, "empty_field", "warning", f"field '{text_field}' is empty")
    return None


def _turn_labels(fields: dict, cfg: DataConfig, side: str, messages: list[dict]) -> list[str]:
    """How a finding names each message: the field or list item it came from."""
    n = len(messages)
    if cfg.format == "prompt_completion":
        labels = [f"field '{cfg.prompt_field}'", f"field '{cfg.completion_field}'"]
    elif cfg.format == "alpaca":
        labels = ["field 'system'"] if messages and messages[0]["role"] == "system" else []
        for i in range(len(fields.get("history") or [])):
            labels += [f"history[{i}][0]", f"history[{i}][1]"]
        labels += ["field 'instruction'", "field 'output'"]
    elif cfg.format in ("sharegpt", "openai"):
        name = cfg.messages_field or ("conversations" if cfg.format == "sharegpt" else "messages")
        labels = [f"{name}[{i}]" for i in range(n)]
    elif cfg.format == "preference" and isinstance(fields.get(side), str) and isinstance(fields.get("prompt"), str):
        labels = ["field 'prompt'", f"field '{side}'"]
    else:  # parsed transcripts and message lists
        labels = [f"'{side}' turn {i + 1}" for i in range(n)]
    return labels if len(labels) == n else [f"turn {i + 1}" for i in range(n)]


def _sides(example: dict) -> list[tuple[str, list[dict]]]:
    if "messages" in example:
        return [("messages", example["messages"])]
    if "chosen" in example:
        return [("chosen", example["chosen"]), ("rejected", example["rejected"])]
    return [("prompt", example["prompt_messages"])]


def _answer(side: str, messages: list[dict], index: int) -> bool:
    """Whether a message is an answer the model learns to say: every assistant turn of SFT, the
    final answer of a preference pair's chosen side; nothing of a prompt."""
    if messages[index]["role"] != "assistant":
        return False
    return side == "messages" or (side == "chosen" and index == len(messages) - 1)


def _empty_findings(record, cfg, side, messages, labels) -> list[Finding]:
    findings = []
    for i, message in enumerate(messages):
        content = message["content"]
        if isinstance(content, str) and content.strip():
            continue
        what = "empty" if not content else "only whitespace"
        # SFT learns to say an empty answer. A pair may prefer silence (HH-RLHF's harmless set has
        # chosen answers that are empty, preferred to harmful ones), so there it is a warning.
        if side == "messages" and _answer(side, messages, i):
            findings.append(_finding(record, "empty_field", "error", (
                f"{labels[i]} (the supervised answer) is {what}: training would teach the model to answer with "
                "nothing; fill it in or drop the record (--fix drops it)")))  # fmt: skip
        else:
            findings.append(_finding(record, "empty_field", "warning", f"{labels[i]} ({message['role']} turn) is {what}"))
    return findings


def _order_findings(record, cfg, messages, labels) -> list[Finding]:
    warn = lambda message: _finding(record, "turn_order", "warning", message)  # noqa: E731
    findings = []
    for i, message in enumerate(messages):
        if message["role"] not in ROLES:
            findings.append(_finding(record, "unknown_role", "error", (
                f"{labels[i]} has role {message['role']!r}; use system, user or assistant (only assistant turns are "
                "trained on)")))  # fmt: skip
    turns = [(i, m["role"]) for i, m in enumerate(messages)]
    for i, role in turns:
        if role == "system" and i > 0:
            findings.append(warn(f"{labels[i]} is a system message after the start; chat templates expect it first (some refuse it elsewhere)"))
    dialogue = [(i, role) for i, role in turns if role != "system"]
    if dialogue and dialogue[0][1] == "assistant":
        findings.append(warn(f"{labels[dialogue[0][0]]} opens the conversation with an assistant turn; a conversation starts with the user"))
    for (_, before), (i, role) in zip(dialogue, dialogue[1:]):
        if role == before:
            findings.append(warn(f"{labels[i]} is a second {role} turn in a row; merge the two (some chat templates refuse roles that do not alternate)"))
    if cfg.format == "prompt":
        return findings  # a prompt ends with the user's turn by design (to_example checks it)
    answers = [i for i, role in dialogue if role == "assistant"]
    if not answers:
        findings.append(_finding(record, "no_assistant_turn", "error", (
            f"the conversation has no assistant turn, so nothing in it is trained on; check data.format={cfg.format} "
            "and the role names, or drop the record (--fix drops it)")))  # fmt: skip
    elif dialogue[-1][0] != answers[-1]:
        i, role = dialogue[-1]
        findings.append(warn(f"the conversation ends with a {role} turn ({labels[i]}) after its last answer; "
                             "nothing after the last assistant turn is trained on"))
    return findings


def repeated_ngrams(text: str) -> str | None:
    """A description of a degenerate loop in ``text`` (see the NGRAM thresholds), or None."""
    words = text.lower().split()
    if len(words) < NGRAM + NGRAM_MIN_COUNT - 1:
        return None
    # Each distinct word but the last three starts a distinct n-gram: an answer with many distinct
    # words cannot be a loop, and counting words is cheaper than counting n-grams.
    if len(set(words)) - (NGRAM - 1) > NGRAM_MAX_DISTINCT * (len(words) - NGRAM + 1):
        return None
    grams = [tuple(words[i : i + NGRAM]) for i in range(len(words) - NGRAM + 1)]
    counts = Counter(grams)
    top, top_count = counts.most_common(1)[0]
    distinct = len(counts) / len(grams)
    if top_count < NGRAM_MIN_COUNT or distinct > NGRAM_MAX_DISTINCT:
        return None
    covered = bytearray(len(words))
    for i, gram in enumerate(grams):
        if counts[gram] >= NGRAM_MIN_COUNT:
            covered[i : i + NGRAM] = b"\x01" * NGRAM
    coverage = sum(covered) / len(words)
    if coverage < NGRAM_MIN_COVERAGE:
        return None
    return (f"'{' '.join(top)}' occurs {top_count} times; repeated {NGRAM}-grams cover {coverage:.0%} of its "
            f"{len(words)} words and only {distinct:.0%} of its {NGRAM}-grams are distinct (a degenerate loop?)")  # fmt: skip


def _answer_findings(record, cfg, side, messages, labels, min_answer_words: int) -> list[Finding]:
    findings = []
    for i, message in enumerate(messages):
        content = message["content"]
        if not _answer(side, messages, i) or not isinstance(content, str) or not content.strip():
            continue  # an empty answer is an empty_field finding
        words = len(content.split())
        if words < min_answer_words:
            plural = "s" if words > 1 else ""
            findings.append(_finding(record, "short_answer", "warning", f"{labels[i]} has {words} word{plural}, fewer than {min_answer_words}"))
        loop = repeated_ngrams(content)
        if loop:
            findings.append(_finding(record, "repeated_ngram", "warning", f"{labels[i]} repeats itself: {loop}"))
    return findings


def _schema_message(err: TunelabError, record: Record) -> str:
    message = str(err)
    prefix = f"Data {record.where}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _check_record(record: Record, cfg: DataConfig, min_answer_words: int = 1, thorough: bool = True) -> tuple[list[Finding], dict | None]:
    """The findings of one record and its example (``to_example``; None when the schema fails).
    ``thorough=False`` keeps the cheap checks (schema, empty fields, roles and order) that run
    before training."""
    findings = _character_findings(record) if thorough else []
    if cfg.format == "text":
        problem = _text_finding(record, cfg.text_field)
        failed = problem is not None and problem.severity == "error"
        return findings + ([problem] if problem else []), None if failed else {"text": record.fields[cfg.text_field]}
    try:
        example = to_example(record, cfg)
        # Findings name the record's own turns, so a system prompt added by data.system_prompt is left out.
        own = to_example(record, dataclasses.replace(cfg, system_prompt=None)) if cfg.system_prompt else example
    except TunelabError as err:
        return findings + [_finding(record, "schema", "error", _schema_message(err, record))], None
    seen = {(f.check, f.message) for f in findings}
    for side, messages in _sides(own):
        labels = _turn_labels(record.fields, cfg, side, messages)
        side_findings = _empty_findings(record, cfg, side, messages, labels) + _order_findings(record, cfg, messages, labels)
        if thorough:
            side_findings += _answer_findings(record, cfg, side, messages, labels, min_answer_words)
        for f in side_findings:  # the two sides of a pair share their prompt: name its problems once
            if (f.check, f.message.replace("'rejected'", "'chosen'")) not in seen:
                seen.add((f.check, f.message.replace("'rejected'", "'chosen'")))
                findings.append(f)
    if "chosen" in own and own["chosen"] == own["rejected"]:
        findings.append(_finding(record, "identical_pair", "warning",
                                 "chosen and rejected are the same conversation: there is nothing to prefer (training drops the pair)"))
    return findings, example


# ------------------------------------------------------------------------------- lengths


def _render_all(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool = False) -> list[str]:
    """Every conversation rendered with the chat template as training renders it (``tokenize.render``),
    in one call: the template is compiled once."""
    if not conversations:
        return []
    template = tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(conversations, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt)


def _may_exceed(text: str, max_length: int) -> bool:
    # A token of a byte-level BPE, byte-fallback SentencePiece or WordPiece tokenizer covers at
    # least one byte of the text, so a text of n bytes has at most n tokens (+ BOS, EOS and a
    # SentencePiece prefix): shorter texts need no tokenizing, which is most of a file.
    return len(text.encode("utf-8")) + 4 > max_length


def _token_counts(tokenizer, texts: list[str], max_length: int, special: bool) -> list[int]:
    """Token counts of the texts that may exceed max_length (0 for the others), in one batched call."""
    todo = [i for i, text in enumerate(texts) if _may_exceed(text, max_length)]
    counts = [0] * len(texts)
    if todo:
        encoded = tokenizer([texts[i] for i in todo], add_special_tokens=special, return_attention_mask=False)["input_ids"]
        for i, ids in zip(todo, encoded):
            # tokenize_text appends EOS to a text unless the tokenizer already did
            eos = special and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id)
            counts[i] = len(ids) + int(eos)
    return counts


def _policy(cfg: DataConfig, max_length: int, keeps: str) -> str:
    if cfg.overlong == "drop":
        return "training drops it (data.overlong=drop)"
    return f"training keeps {keeps} {max_length} tokens (data.overlong=truncate)"


def _conversation_length_finding(record, cfg, tokenizer, messages, tokens: int, max_length: int) -> Finding:
    head = f"{tokens} tokens rendered, longer than max_length={max_length}: "
    if cfg.overlong == "drop":
        return _finding(record, "overlong", "warning", head + _policy(cfg, max_length, "the first"))
    _, labels = tokenize_conversation(tokenizer, messages)
    supervised = sum(1 for t in labels[1:] if t != IGNORE_INDEX)
    kept = sum(1 for t in labels[1:max_length] if t != IGNORE_INDEX)
    if kept == 0:
        return _finding(record, "overlong", "error", head + (
            f"cut to {max_length} tokens it keeps none of its {supervised} supervised tokens, so training drops it; "
            "raise method.max_length, shorten the prompt, or drop the record (--fix with a tokenizer drops it)"))  # fmt: skip
    lost = f", losing {supervised - kept} of its {supervised} supervised tokens"
    return _finding(record, "overlong", "warning", head + _policy(cfg, max_length, "the first") + lost)


def _length_findings(checked: list[tuple[Record, dict]], cfg: DataConfig, tokenizer, max_length: int) -> dict[int, list[Finding]]:
    """Over-length findings by index into ``checked``: each conversation rendered once, all
    tokenized in one batched call (only those long enough in bytes to exceed max_length)."""
    out: dict[int, list[Finding]] = {}
    kinds: dict[str, list[tuple[int, list[dict] | str]]] = {"messages": [], "prompt": [], "text": [], "pair": []}
    for index, (_, example) in enumerate(checked):
        if "messages" in example:
            kinds["messages"].append((index, example["messages"]))
        elif "text" in example:
            kinds["text"].append((index, example["text"]))
        elif "prompt_messages" in example:
            kinds["prompt"].append((index, example["prompt_messages"]))
        else:
            kinds["pair"] += [(index, example["chosen"]), (index, example["rejected"])]
    for kind, items in kinds.items():
        if not items:
            continue
        if kind == "text":
            texts = [text for _, text in items]
        else:
            texts = _render_all(tokenizer, [m for _, m in items], add_generation_prompt=kind == "prompt")
        counts = _token_counts(tokenizer, texts, max_length, special=kind == "text")
        if kind == "pair":
            _pair_lengths(checked, items, counts, cfg, max_length, out)
            continue
        for (index, value), tokens in zip(items, counts):
            if tokens <= max_length:
                continue
            record = checked[index][0]
            if kind == "messages":
                finding = _conversation_length_finding(record, cfg, tokenizer, value, tokens, max_length)
            else:
                keeps = "the last" if kind == "prompt" else "the first"
                finding = _finding(record, "overlong", "warning", f"{tokens} tokens, longer than max_length={max_length}: {_policy(cfg, max_length, keeps)}")
            out.setdefault(index, []).append(finding)
    return out


def _pair_lengths(checked, items, counts, cfg, max_length, out) -> None:
    what = ("training drops the pair (data.overlong=drop)" if cfg.overlong == "drop" else
            "training cuts it (data.overlong=truncate): reward models keep each side's last max_length tokens, DPO "
            "cuts the prompt to method.max_prompt_length, then the end of the answers")  # fmt: skip
    for k in range(0, len(items), 2):
        long = [f"{side} {n} tokens" for side, n in (("chosen", counts[k]), ("rejected", counts[k + 1])) if n > max_length]
        if long:
            index = items[k][0]
            message = f"{' and '.join(long)} rendered, longer than max_length={max_length}: {what}"
            out.setdefault(index, []).append(_finding(checked[index][0], "overlong", "warning", message))


# ------------------------------------------------------------------------------ validate


def _check_records(records, cfg, tokenizer, max_length, min_answer_words) -> list[Finding]:
    per_record: list[list[Finding]] = []
    checked: list[tuple[Record, dict]] = []
    owners: list[int] = []
    for record in records:
        findings, example = _check_record(record, cfg, min_answer_words)
        per_record.append(findings)
        if example is not None:
            checked.append((record, example))
            owners.append(len(per_record) - 1)
    if tokenizer is not None and max_length:
        for index, findings in _length_findings(checked, cfg, tokenizer, max_length).items():
            per_record[owners[index]] += findings
    return [f for findings in per_record for f in findings]


def _in_file_order(findings: list[Finding]) -> list[Finding]:
    # Reading findings (broken lines) and record findings interleave by line; items of a JSON
    # array have no line and stay in item order.
    return sorted(findings, key=lambda f: f.line if f.line is not None else 0)


def validate_file(
    path: str | Path, cfg: DataConfig, tokenizer=None, max_length: int | None = None, min_answer_words: int = 1
) -> ValidationReport:
    """Every problem of a data file in ``cfg.format``, with its line: unreadable lines, schema,
    empty fields, roles and turn order, short answers, degenerate loops, control characters and,
    with a tokenizer and ``max_length``, examples longer than max_length (rendered with the
    tokenizer's chat template, as training renders them). A file that cannot be read at all (a
    broken JSON array) is one error."""
    try:
        path, records, findings = _read(path, cfg)
    except TunelabError as err:
        if not Path(path).is_file():
            raise
        return ValidationReport(Path(path), cfg.format, 0, [Finding(Path(path).name, None, "unreadable", "error", str(err))])
    findings = findings + _check_records(records, cfg, tokenizer, max_length, min_answer_words)
    _refuse_a_mapping_that_matches_nothing(path, cfg, records, findings)
    return ValidationReport(path, cfg.format, len(records), _in_file_order(findings), checked_length=tokenizer is not None and bool(max_length))


def _refuse_a_mapping_that_matches_nothing(path: Path, cfg: DataConfig, records: list, findings: list[Finding]) -> None:
    """A format or field option that fits no record is one mistake of the command, not a problem on
    every line: say it once, with the fields the records do have."""
    failed = {f.line for f in findings if f.check == "schema"}
    if not records or len(failed) < len(records):
        return
    first = next(f for f in findings if f.check == "schema")
    fields = sorted(set().union(*(set(r.fields) for r in records[:50])))
    raise TunelabError(
        f"No record of '{path}' fits data.format={cfg.format} with these field options ({first.where}: {first.message}). "
        f"The records' fields are: {', '.join(fields)}. Give the matching --format and field options (e.g. --prompt-field, "
        "--completion-field), or leave --format out to have them guessed."
    )


# ----------------------------------------------------------------------------------- fix


def _clean_string(text: str, path: str, changes: dict[str, list[str]]) -> str:
    removed = CONTROL.findall(text)
    if removed:
        text = CONTROL.sub("", text)
        codes = ", ".join(sorted({f"U+{ord(c):04X}" for c in removed}))
        changes.setdefault("control_char", []).append(f"{path} ({len(removed)}: {codes})")
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
        changes.setdefault("unicode_nfc", []).append(path)
    # An HH-RLHF transcript is left as it is: its "\n\nHuman: " start and an empty last answer's
    # "\n\nAssistant: " end are markup, and stripping them would change the turns it parses into.
    stripped = text if text.startswith("\n\nHuman:") else text.strip()
    if stripped != text:
        changes.setdefault("whitespace", []).append(path)
    return stripped


def _clean(value, path: str, changes: dict[str, list[str]]):
    if isinstance(value, str):
        return _clean_string(value, path, changes)
    if isinstance(value, dict):
        return {key: _clean(item, f"{path}.{key}" if path else str(key), changes) for key, item in value.items()}
    if isinstance(value, list):
        return [_clean(item, f"{path}[{i}]", changes) for i, item in enumerate(value)]
    return value


_CHANGE_WORDS = {
    "control_char": "removed control characters from",
    "unicode_nfc": "normalised to Unicode NFC",
    "whitespace": "stripped leading/trailing whitespace of",
}


def _reading_change(finding: Finding) -> Finding:
    if finding.check == "encoding":
        return dataclasses.replace(finding, severity="info", message=f"replaced bytes that are not UTF-8 with U+FFFD ({finding.message.split(';')[0]})")
    return dataclasses.replace(finding, check="dropped", severity="info", message=f"dropped the line ({finding.check}: {finding.message})")


def fix_file(
    path: str | Path, cfg: DataConfig, out: str | Path, tokenizer=None, max_length: int | None = None, min_answer_words: int = 1
) -> FixReport:
    """Write a repaired copy of a data file to ``out`` (never the input itself): lines that cannot
    be read and records with an error (schema, an empty answer, no assistant turn; with a
    tokenizer and max_length, an answer truncated away) are dropped; bytes that are not UTF-8
    become U+FFFD; control characters are removed; strings are put in Unicode NFC and stripped of
    leading and trailing whitespace. Every change and drop is an info finding with its source
    line. Nothing is written when the input cannot be read at all or no record survives."""
    path, records, reading = _read(path, cfg)
    findings = [_reading_change(f) for f in reading]
    cleaned = []
    for record in records:
        changes: dict[str, list[str]] = {}
        fields = _clean(record.fields, "", changes)
        cleaned.append(Record(fields, record.where, record.line))
        findings += [_finding(record, check, "info", f"{_CHANGE_WORDS[check]} {', '.join(paths)}") for check, paths in changes.items()]
    first_error: dict[str, Finding] = {}
    for f in _check_records(cleaned, cfg, tokenizer, max_length, min_answer_words):
        if f.severity == "error":
            first_error.setdefault(f.where, f)
    rows = []
    for record in cleaned:
        error = first_error.get(record.where)
        if error is None:
            rows.append(record.fields)
        else:
            findings.append(_finding(record, "dropped", "info", f"dropped the record ({error.check}: {error.message})"))
    lines_in = len(records) + sum(1 for f in reading if f.check != "encoding")
    if not rows:
        raise TunelabError(f"No record of '{path}' is usable ({lines_in} read, all dropped), so nothing was written to '{out}'. "
                           f"Check data.format={cfg.format} and its field options with `tunelab data validate`.")  # fmt: skip
    written = write_records(out, rows, inputs=[path])
    return FixReport(path, written, cfg.format, lines_in, len(rows), _in_file_order(findings))


# ------------------------------------------------------------------------ before training


def _text_quick(path: Path, cfg: DataConfig, limit: int | None) -> tuple[list[Finding], int]:
    """The text format, cheaply (findings, documents read): a text file's encoding; JSON lines
    streamed a line at a time (a pretraining corpus may not fit in memory); Parquet is left to the
    reader, which names a missing column before tokenizing."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return utf8_findings(path), 0
    if suffix == ".parquet":
        return [], 0
    if suffix not in (".jsonl", ".ndjson"):
        scanned = scan_file(path, cfg.text_field)
        records = scanned.records[:limit]
        return scanned.findings + [f for r in records for f in [_text_finding(r, cfg.text_field)] if f], len(records)
    findings, documents = [], 0
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if limit is not None and documents >= limit:
                break
            finding = _text_line(path, number, raw, cfg.text_field)
            documents += raw.strip() != b"" and (finding is None or finding.check in ("schema", "empty_field"))
            if finding:
                findings.append(finding)
    return findings, documents


def _text_line(path: Path, number: int, raw: bytes, text_field: str) -> Finding | None:
    where = f"{path.name} line {number}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return Finding(where, number, "encoding", "error", f"byte {err.start} of the line ({err.reason}) is not UTF-8; re-encode the file as UTF-8")
    if not line.strip():
        return None
    try:
        value = parse_json(line)
    except json.JSONDecodeError as err:
        return Finding(where, number, "broken_json", "error", f"not valid JSON ({err.msg} at column {err.colno})")
    if not isinstance(value, dict):
        return Finding(where, number, "not_an_object", "error", f"a JSON {type(value).__name__}, not an object")
    return _text_finding(Record(value, where, number), text_field)


def _record_quick(file: Path, cfg: DataConfig, limit: int | None) -> tuple[list[Finding], int]:
    scanned = scan_file(file, cfg.text_field)
    findings = list(scanned.findings)
    for i, record in enumerate(scanned.records):
        # Every record is formatted when training reads the file; content past max_samples is never trained on.
        content = limit is None or i < limit
        record_findings, _ = _check_record(record, cfg, thorough=False)
        findings += [f for f in record_findings if content or f.check == "schema"]
    return findings, len(scanned.records)


def _quick_check(option: str, value: str, cfg: DataConfig, limit: int | None) -> list[Finding]:
    file = resolve_path(value, option)
    if file.is_dir():
        return []  # the data builder says what a folder needs
    check = _text_quick if cfg.format == "text" else _record_quick
    findings, records = check(check_input(file), cfg, limit)
    if records and sum(f.check == "schema" for f in findings) == records:
        # Every record fails the schema: that is a choice of format or field, not a defect of the
        # data, and the method's data builder says it best (pretraining asks for data.format=text).
        findings = [f for f in findings if f.check != "schema"]
    # Name the file as the run names it: a training file and a validation file may share a name.
    return [dataclasses.replace(f, where=f"'{value}'" + f.where[len(file.name) :]) if f.where.startswith(file.name) else f for f in findings]


def _source_checks(cfg: DataConfig) -> list[Finding]:
    from tunelab.data.mixture import _source_configs

    try:
        sources = _source_configs(cfg)
    except TunelabError:
        return []  # a malformed source list: the mixture builder reports it, with the list's own rules
    findings = []
    for name, _, _, source in sources:
        if source.validate and source.path:
            findings += _quick_check(f"data.sources ({name}) path", source.path, source, source.max_samples)
    return findings


def check_before_training(cfg: DataConfig) -> list[Finding]:
    """The cheap checks of ``validate_file`` (no tokenizer: reading, schema, empty fields, roles
    and turn order) on the training file, data.val_path and every source of a mixture, each in
    its own format; a text file (.txt, .md) is checked for its encoding only. Nothing when
    ``data.validate`` is false. A missing file raises as training would."""
    if not cfg.validate:
        return []
    if cfg.sources:
        return _source_checks(cfg)
    findings = []
    for option, value, limit in (("data.path", cfg.path, cfg.max_samples), ("data.val_path", cfg.val_path, None)):
        if value:
            findings += _quick_check(option, value, cfg, limit)
    return findings


def _sentence(finding: Finding) -> str:
    # Reading findings are predicates ("not valid JSON ..."): "'train.jsonl' line 2 is not valid
    # JSON", as the training reader says it.
    joiner = " is " if finding.message.startswith(("not ", "a JSON ")) else ": "
    return f"{finding.where}{joiner}{finding.message}"


def _split_where(where: str) -> tuple[str, str]:
    """"'train.jsonl' line 12" -> ("'train.jsonl'", "line 12")."""
    parts = where.rsplit(" ", 2)
    return (parts[0], f"{parts[1]} {parts[2]}") if len(parts) == 3 and parts[2].isdigit() else (where, "")


def _grouped(findings: list[Finding], shown: int) -> list[str]:
    """One line per problem, the records that share a message (a field missing from many records)
    on one line, at most ``shown`` lines."""
    groups: dict[tuple[str, str, str], list[Finding]] = {}
    for f in findings:
        groups.setdefault((_split_where(f.where)[0], f.check, f.message), []).append(f)
    items = []
    for (file, _, message), members in groups.items():
        if len(members) == 1:
            items.append(f"  {_sentence(members[0])}")
            continue
        places = [_split_where(f.where)[1] for f in members]
        if all(p.startswith("line ") for p in places):
            places = ["lines " + places[0][5:]] + [p[5:] for p in places[1:]]
        more = f" and {len(places) - 5} more" if len(places) > 5 else ""
        items.append(f"  {file} {', '.join(places[:5])}{more} ({len(members)} records): {message}")
    return items[:shown] + ([f"  ... and {len(items) - shown} more"] if len(items) > shown else [])


def _fix_command(cfg: DataConfig, path: str) -> str:
    defaults = DataConfig()
    flags = [f"--format {cfg.format}"] + [
        f"--{name.replace('_', '-')} {getattr(cfg, name)}"
        for name in ("prompt_field", "completion_field", "messages_field", "text_field")
        if getattr(cfg, name) != getattr(defaults, name)
    ]
    stem = Path(path).stem
    return f"tunelab data validate {path} {' '.join(flags)} --fix {stem}.fixed.jsonl"


def training_refusal(errors: list[Finding], cfg: DataConfig, shown: int = 10) -> TunelabError:
    """The error that stops a run before a model loads: the first ``shown`` problems with file and
    line, how to repair the file and how to skip the check."""
    items = _grouped(errors, shown)
    files = [cfg.path] if not cfg.sources else []
    if cfg.val_path and not cfg.sources:
        files.append(cfg.val_path)
    repair = "; ".join(f"`{_fix_command(cfg, f)}`" for f in files if any(e.where.startswith(f"'{f}'") for e in errors))
    repair = repair or "`tunelab data validate FILE --format FORMAT --fix FIXED.jsonl`"
    return TunelabError(
        f"The training data has {len(errors)} problem{'s' if len(errors) > 1 else ''} that would stop or spoil training "
        "(checked before loading a model):\n" + "\n".join(items) + "\n"
        f"Repair: {repair} lists every problem and writes a copy without them; train on that copy. "
        "To train on the file as it is, set data.validate=false."
    )


def describe_warnings(warnings: list[Finding], shown: int = 5) -> str:
    """One log message for the warnings of the check before training."""
    counts = Counter(f.check for f in warnings)
    listing = "\n".join(_grouped(warnings, shown))
    return (f"Data check: {len(warnings)} warning{'s' if len(warnings) > 1 else ''} "
            f"({', '.join(f'{check} {n}' for check, n in counts.most_common())}); `tunelab data validate` lists them all:\n"
            f"{listing}")  # fmt: skip
