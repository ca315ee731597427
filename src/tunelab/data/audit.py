"""See what training learns from a data file: examples rendered with their supervised tokens
highlighted, and checks on every example that a model trained on it can stop and is prompted at
inference the way it was trained.

The checks, each a ``Finding`` with the example's line:

- ``eot_unsupervised`` (error): the token right after an assistant reply in the rendered text
  (the template's end-of-turn token, ``<|im_end|>`` for ChatML) is not supervised, or nothing
  follows the reply at all. A model that never learns that token never stops talking.
- ``prompt_mismatch`` (error): the conversation up to its last user turn, rendered with
  ``add_generation_prompt=True`` (what inference feeds the model), is not a prefix of the training
  rendering: the model is trained on one prompt format and asked in another.
- ``chat_template`` (error): the template fails on the conversation, or renders it differently
  from its own prefixes so that training cannot locate the replies (training raises on it).
- ``no_supervised_tokens`` (error): nothing in the example carries loss; training drops it.
- ``truncated_supervision`` (warning): the example is longer than max_length and the cut (or the
  drop, with data.overlong=drop) loses supervised tokens.
"""

import html
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jinja2 import TemplateError

from tunelab.config.schema import DataConfig
from tunelab.data.constants import IGNORE_INDEX
from tunelab.data.files import Finding, scan_file
from tunelab.data.readers import Record
from tunelab.data.stats import CHUNK, conversation_spans, encode_batched, format_records, supervised_count
from tunelab.data.tokenize import supervision_labels
from tunelab.data.tokenize import render, shared_prefix
from tunelab.errors import TunelabError

CHECKS = ("eot_unsupervised", "prompt_mismatch", "chat_template", "no_supervised_tokens", "truncated_supervision")


@dataclass
class Piece:
    """One token as shown: the characters it adds to the rendered text."""

    text: str
    id: int | None  # None for characters no token's offsets claim
    supervised: bool
    special: bool


@dataclass
class AuditedExample:
    where: str
    line: int | None
    side: str | None  # "chosen" or "rejected" for a preference pair
    pieces: list[Piece]  # empty when the example could not be tokenized as training does
    tokens: int
    supervised: int  # as training counts it (the first token is never a target)
    findings: list[Finding]


@dataclass
class AuditReport:
    path: str
    format: str
    tokenizer: str
    max_length: int | None
    overlong: str
    records: int = 0
    unreadable: int = 0
    schema_failures: int = 0
    examples: int = 0  # conversations checked (a preference pair has two)
    counts: dict[str, int] = field(default_factory=dict)  # check -> examples it flagged
    end_of_turn: dict[str, int] = field(default_factory=dict)  # token found after replies -> how often
    findings: list[Finding] = field(default_factory=list)
    shown: list[AuditedExample] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def to_dict(self) -> dict:
        out = asdict(self)
        for example in out["shown"]:  # compact: [text, id, supervised, special] per token
            example["pieces"] = [[p["text"], p["id"], p["supervised"], p["special"]] for p in example["pieces"]]
        out["ok"] = self.ok
        return out

    def summary_lines(self) -> list[str]:
        lines = [
            f"Audit of {self.path} (data.format={self.format}, tokenizer {self.tokenizer})",
            f"  {self.records:,} records read · {self.unreadable:,} unreadable · {self.schema_failures:,} failing the format"
            f" → {self.examples:,} examples checked",
        ]
        if self.end_of_turn:
            found = " · ".join(f"{token!r} ×{count:,}" for token, count in self.end_of_turn.items())
            lines.append(f"  token after assistant replies (end of turn): {found}")
        lines.append("  " + " · ".join(f"{check} {count:,}" for check, count in self.counts.items()))
        warnings = sum(f.severity == "warning" for f in self.findings)
        lines.append(("  no errors" if self.ok else "  ERRORS: see the findings") + (f" ({warnings:,} warnings)" if warnings else ""))
        return lines

    def render_terminal(self, color: bool = True, max_findings: int = 20) -> str:
        """The shown examples (supervised tokens on green, the rest dim, special tokens bold; with
        ``color=False`` supervised runs are marked ⟦…⟧), then the summary and the findings."""
        blocks = [_legend(color)] + [_example_terminal(e, color) for e in self.shown]
        tail = self.summary_lines()
        if self.findings:
            shown = self.findings[:max_findings]
            tail.append(f"  findings ({len(shown)} of {len(self.findings)}):" if len(shown) < len(self.findings) else "  findings:")
            tail += ["    " + f.render() for f in shown]
        return "\n\n".join(blocks + ["\n".join(tail)])

    def render_html(self, max_findings: int = 200) -> str:
        """A self-contained HTML page (inline CSS, no scripts) of the summary and the shown examples."""
        return _page(self, max_findings)


# ----------------------------------------------------------------------------- auditing


@dataclass
class _Conversation:
    item: int  # index of the record among the formatted ones
    record: Record
    side: str | None
    messages: list[dict]
    from_message: int  # replies before this message are context (a pair's shared prompt)

    @property
    def where(self) -> str:
        return f"{self.record.where} ({self.side})" if self.side else self.record.where


def audit_file(
    path: str | Path, cfg: DataConfig, tokenizer, n: int = 5, seed: int = 0, lines: list[int] | None = None, max_length: int | None = None
) -> AuditReport:
    """Check every example of a chat (or preference) file as training tokenizes it, and keep
    ``n`` of them (drawn with ``seed``, or those at ``lines``) to show.

    ``lines`` are the line numbers of a JSON lines file (rows of a CSV) or, for a JSON array, the
    item numbers its findings name ("data.json item 3" is 3).

    A preference pair is checked side by side, supervised as DPO supervises it (the replies after
    the prompt both sides share); its truncation check is a cut at ``max_length`` from the right
    (DPO's left cut of a prompt longer than max_prompt_length is not modelled).
    """
    if cfg.format in ("text", "prompt"):
        raise TunelabError(
            f"audit shows which tokens of a conversation carry loss; data.format={cfg.format} has no assistant replies "
            "(text trains on every token, prompt on none). Use `tunelab data stats` for such a file."
        )
    scanned = scan_file(path, cfg.text_field)
    report = AuditReport(str(path), cfg.format, _tokenizer_name(tokenizer), max_length, cfg.overlong)
    report.records, report.unreadable = len(scanned.records), len(scanned.findings)
    report.findings = list(scanned.findings)
    formatted, failures = format_records(scanned.records, cfg)
    report.schema_failures = len(failures)
    report.findings += failures
    conversations, positions = [], []
    for index, record, example in formatted:
        conversations += _conversations(len(positions), record, example)
        positions.append(record.line if record.line is not None else index)
    show = _pick(positions, n, seed, lines, report)
    special = _special_ids(tokenizer)
    eot = Counter()
    for start in range(0, len(conversations), CHUNK):
        chunk = conversations[start : start + CHUNK]
        for conversation, example in zip(chunk, _check_chunk(tokenizer, chunk, max_length, cfg.overlong, special, eot, show)):
            report.findings += example.findings
            if conversation.item in show:
                report.shown.append(example)
    report.examples = len(conversations)
    found = Counter(f.check for f in report.findings)
    report.counts = {check: found.get(check, 0) for check in CHECKS} | {c: k for c, k in found.items() if c not in CHECKS}
    report.end_of_turn = dict(eot.most_common())
    return report


def _tokenizer_name(tokenizer) -> str:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    # A local folder (such as one converted from a GGUF file) is named by its folder, not its full path.
    parts = [p for p in Path(name).parts if p != "tokenizer"]
    return parts[-1] if Path(name).is_absolute() and parts else name


def _conversations(item: int, record: Record, example: dict) -> list[_Conversation]:
    if "messages" in example:
        return [_Conversation(item, record, None, example["messages"], 0)]
    # A pair trains (DPO) on the replies after the prompt both sides share.
    prompt = shared_prefix(example["chosen"], example["rejected"])
    return [_Conversation(item, record, side, example[side], prompt) for side in ("chosen", "rejected")]


def _pick(positions: list[int], n: int, seed: int, lines: list[int] | None, report: AuditReport) -> set[int]:
    """Indices (among the formatted records) of the examples to show."""
    if lines is None:
        return set(random.Random(seed).sample(range(len(positions)), min(n, len(positions))))
    index = {position: i for i, position in enumerate(positions)}
    missing = [line for line in lines if line not in index]
    if missing:
        why = [f.render() for f in report.findings if f.line in missing][:3]
        span = f"the examples are at {min(positions)}..{max(positions)}" if positions else "the file has no example"
        raise TunelabError(
            f"{report.path}: no example to show at line/item {', '.join(map(str, missing))}; {span}"
            + (f". Those that did not read: {'; '.join(why)}" if why else "")
            + ". Pick other lines, or leave lines out to draw examples at random."
        )
    return {index[line] for line in lines}


def _special_ids(tokenizer) -> set[int]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}


def _check_chunk(
    tokenizer, chunk: list[_Conversation], max_length, overlong, special: set[int], eot: Counter, show: set[int]
) -> list[AuditedExample]:
    """Render a chunk, tokenize the renderable ones in one call, and run the checks on each."""
    prepared = [_prepare(tokenizer, conversation) for conversation in chunk]
    texts = [text for text, spans, _, _ in prepared if spans is not None]
    encoded = iter(encode_batched(tokenizer, texts, offsets=True))
    examples = []
    for conversation, (text, spans, starts, findings) in zip(chunk, prepared):
        record = conversation.record
        if spans is None:
            examples.append(AuditedExample(conversation.where, record.line, conversation.side, [], 0, 0, findings))
            continue
        ids, offsets = next(encoded)
        labels = supervision_labels(ids, offsets, spans)
        findings += _token_checks(conversation, text, starts, ids, offsets, labels, max_length, overlong, eot)
        pieces = _pieces(text, ids, offsets, labels, special) if conversation.item in show else []
        count = supervised_count(labels)
        examples.append(AuditedExample(conversation.where, record.line, conversation.side, pieces, len(ids), count, findings))
    return examples


def _finding(conversation: _Conversation, check: str, severity: str, message: str) -> Finding:
    return Finding(conversation.where, conversation.record.line, check, severity, message)


def _prepare(tokenizer, conversation: _Conversation):
    """(text, supervised spans, reply starts, findings); spans are None where training could not
    tokenize the example."""
    messages = conversation.messages
    try:
        text, spans, starts = conversation_spans(tokenizer, messages, conversation.from_message)
        failure = None
    except (TunelabError, TemplateError) as err:
        text, spans, starts, failure = None, None, None, err
    try:
        if text is None:
            text = render(tokenizer, messages)
        mismatch = _prompt_mismatch(tokenizer, messages, text)
    except TemplateError as err:  # the template itself refuses the conversation (raise_exception)
        return "", None, None, [_finding(conversation, "chat_template", "error", f"the chat template fails on it: {err}")]
    if mismatch:
        return text, None if failure else spans, starts, [_finding(conversation, "prompt_mismatch", "error", mismatch)]
    if failure:
        return text, None, None, [_finding(conversation, "chat_template", "error", str(failure))]
    return text, spans, starts, []


def _prompt_mismatch(tokenizer, messages: list[dict], text: str) -> str | None:
    """Where the inference prompt (up to the last user turn, generation prompt added) stops being
    a prefix of the training text, or None."""
    asked = [i for i in range(len(messages) - 1) if messages[i]["role"] == "user" and messages[i + 1]["role"] == "assistant"]
    if not asked:
        return None
    prompt = render(tokenizer, messages[: asked[-1] + 1], add_generation_prompt=True)
    if text.startswith(prompt):
        return None
    at = next((i for i, (a, b) in enumerate(zip(text, prompt)) if a != b), min(len(text), len(prompt)))
    return (
        f"training prompt differs from inference prompt at character {at} (after {text[max(0, at - 25) : at]!r}): training "
        f"has {text[at : at + 30]!r}, inference (add_generation_prompt=True) has {prompt[at : at + 30]!r}. The model would "
        "be asked in a format it was not trained on; fix the chat template (model pool config)"
    )


def _token_checks(conversation, text, starts, ids, offsets, labels, max_length, overlong, eot: Counter) -> list[Finding]:
    findings = []
    problems = _end_of_turn(conversation, text, starts, offsets, labels, eot)
    if problems:
        message = "; ".join(problems) + ": a model trained on it never learns to end its turn (check the chat template)"
        findings.append(_finding(conversation, "eot_unsupervised", "error", message))
    supervised = supervised_count(labels)
    if supervised == 0:
        message = "no token carries loss (is there an assistant reply?); training drops it"
        findings.append(_finding(conversation, "no_supervised_tokens", "error", message))
    elif max_length is not None and len(ids) > max_length:
        lost = sum(1 for label in labels[max_length:] if label != IGNORE_INDEX)
        longer = f"{len(ids):,} tokens > max_length={max_length:,}"
        if overlong == "drop":
            message = f"{longer}: data.overlong=drop drops it with its {supervised:,} supervised tokens"
            findings.append(_finding(conversation, "truncated_supervision", "warning", message))
        elif lost:
            message = (
                f"{longer}: truncation cuts {lost:,} of its {supervised:,} supervised tokens, so the reply it cuts never shows "
                "the model how to end; raise max_length or shorten the example"
            )
            findings.append(_finding(conversation, "truncated_supervision", "warning", message))
    return findings


def _end_of_turn(conversation: _Conversation, text: str, starts: list[int], offsets, labels: list[int], eot: Counter) -> list[str]:
    """Find the end-of-turn token of each trained reply (the first token after the reply's text
    that is not whitespace) and say which are not supervised."""
    problems = []
    replies = [i for i, m in enumerate(conversation.messages) if m["role"] == "assistant"]
    for number, (i, start) in enumerate(zip(replies, starts), start=1):
        if i < conversation.from_message:
            continue
        end = _reply_end(text, conversation.messages[i]["content"], start)
        if end is None:
            continue  # the template rewrites this reply (some drop earlier reasoning): nothing to locate
        after = len(text) - len(text[end:].lstrip())
        k = next((k for k, (_, token_end) in enumerate(offsets) if token_end > after), None) if after < len(text) else None
        if k is None:
            problems.append(f"nothing follows reply {number} in the rendered text, so it has no end-of-turn token")
            continue
        token = text[offsets[k][0] : offsets[k][1]]
        eot[token] += 1
        if labels[k] == IGNORE_INDEX:
            problems.append(f"the end-of-turn token {token!r} after reply {number} is not supervised")
    return problems


def _reply_end(text: str, content: str, start: int) -> int | None:
    if not content.strip():
        return start
    for needle in (content, content.strip()):  # some templates trim replies
        at = text.find(needle, start)
        if at != -1:
            return at + len(needle)
    return None


def _pieces(text: str, ids, offsets, labels, special: set[int]) -> list[Piece]:
    """The rendered text cut at token boundaries. Tokens sharing characters (a multi-byte
    character split over several byte tokens) show them once, on the first."""
    pieces, covered = [], 0
    for token, label, (start, end) in zip(ids, labels, offsets):
        if start > covered:
            pieces.append(Piece(text[covered:start], None, False, False))
        pieces.append(Piece(text[max(start, covered) : end], token, label != IGNORE_INDEX, token in special))
        covered = max(covered, end)
    if covered < len(text):
        pieces.append(Piece(text[covered:], None, False, False))
    return pieces


# ----------------------------------------------------------------------------- terminal

_RESET = "\x1b[0m"
_STYLES = {  # (supervised, special) -> ANSI style
    (True, False): "\x1b[30;42m",  # black on green
    (True, True): "\x1b[1;30;42m",
    (False, False): "\x1b[2m",  # dim
    (False, True): "\x1b[1;35m",  # bold magenta
}


def _visible(piece: Piece) -> str:
    # A supervised newline would be invisible; an arrow shows that the model learns it.
    return piece.text.replace("\n", "↵\n") if piece.supervised else piece.text


def _header(example: AuditedExample) -> str:
    share = f" ({example.supervised / example.tokens:.0%})" if example.tokens else ""
    return f"── {example.where} · {example.tokens:,} tokens · {example.supervised:,} supervised{share} ──"


def _example_terminal(example: AuditedExample, color: bool) -> str:
    body = _colored(example.pieces) if color else _marked(example.pieces)
    lines = [_header(example), body.rstrip("\n") if example.pieces else "(not tokenized: see the findings)"]
    lines += ["  " + f.render() for f in example.findings]
    return "\n".join(lines)


def _colored(pieces: list[Piece]) -> str:
    out, run, style = [], [], None

    def flush():
        # Styles end at each newline so a background colour never runs to the edge of the terminal.
        out.append("\n".join(f"{style}{part}{_RESET}" if part else "" for part in "".join(run).split("\n")))
        run.clear()

    for piece in pieces:
        if _STYLES[(piece.supervised, piece.special)] != style and run:
            flush()
        style = _STYLES[(piece.supervised, piece.special)]
        run.append(_visible(piece))
    if run:
        flush()
    return "".join(out)


def _marked(pieces: list[Piece]) -> str:
    out, inside = [], False
    for piece in pieces:
        if not piece.text:
            continue
        if piece.supervised != inside:
            out.append("⟦" if piece.supervised else "⟧")
            inside = piece.supervised
        out.append(piece.text)
    return "".join(out) + ("⟧" if inside else "")


def _legend(color: bool) -> str:
    if not color:
        return "legend: ⟦supervised tokens⟧ (trained on); everything else is context"
    sample = {"supervised": (True, False), "context": (False, False), "special token": (False, True)}
    return "legend: " + "  ".join(f"{_STYLES[k]}{name}{_RESET}" for name, k in sample.items())


# ----------------------------------------------------------------------------- HTML

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.05em; margin: 0 0 .3em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .2em .6em; text-align: left; }
.meta { color: #555; }
section { border: 1px solid #ddd; border-radius: 6px; padding: .8em 1em; margin: 1em 0; }
pre { white-space: pre-wrap; word-break: break-word; font: 13px/1.5 ui-monospace, monospace; margin: .5em 0 0; }
.t { color: #888; } .s { background: #b7e4b0; color: #000; }
pre span + span { box-shadow: inset 1px 0 rgba(0, 0, 0, .13); }  /* token boundaries */
.x { font-weight: bold; color: #a0309c; } .s.x { color: #1d4d14; }
.error { color: #b00020; } .warning { color: #9a6700; } .ok { color: #1d7a1d; }
ul { margin: .3em 0; padding-left: 1.3em; }
"""


def _html_piece(piece: Piece) -> str:
    if piece.id is None:
        return html.escape(piece.text)
    classes = ("s" if piece.supervised else "t") + (" x" if piece.special else "")
    return f'<span class="{classes}" title="token {piece.id}">{html.escape(_visible(piece))}</span>'


def _html_findings(findings: list[Finding]) -> str:
    items = "".join(
        f'<li class="{html.escape(f.severity)}">{html.escape(f.where)}: [{html.escape(f.severity)}] {html.escape(f.check)}: '
        f"{html.escape(f.message)}</li>"
        for f in findings
    )
    return f"<ul>{items}</ul>" if items else ""


def _html_example(example: AuditedExample) -> str:
    share = f" ({example.supervised / example.tokens:.0%})" if example.tokens else ""
    line = f"line {example.line} · " if example.line is not None else ""
    body = "".join(map(_html_piece, example.pieces)) if example.pieces else "(not tokenized: see the findings)"
    return (
        f"<section><h2>{html.escape(example.where)}</h2>"
        f'<div class="meta">{line}{example.tokens:,} tokens · {example.supervised:,} supervised{share}</div>'
        f"{_html_findings(example.findings)}<pre>{body}</pre></section>"
    )


def _page(report: AuditReport, max_findings: int) -> str:
    name = html.escape(Path(report.path).name)
    rows = "".join(f"<tr><td>{html.escape(check)}</td><td>{count:,}</td></tr>" for check, count in report.counts.items())
    eot = " · ".join(f"<code>{html.escape(repr(token))}</code> ×{count:,}" for token, count in report.end_of_turn.items()) or "none found"
    warnings = sum(f.severity == "warning" for f in report.findings)
    verdict = '<p class="ok">No errors' if report.ok else '<p class="error">Some examples have errors (listed below)'
    verdict += f" ({warnings:,} warnings).</p>" if warnings else ".</p>"
    listed = report.findings[:max_findings]
    more = f"<p>… and {len(report.findings) - len(listed):,} more.</p>" if len(listed) < len(report.findings) else ""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>tunelab audit: {name}</title>'
        f"<style>{_CSS}</style></head><body>\n"
        f"<h1>Audit of {name}</h1>\n"
        f'<p class="meta">data.format={html.escape(report.format)} · tokenizer {html.escape(report.tokenizer)} · '
        f"{report.records:,} records read, {report.unreadable:,} unreadable, {report.schema_failures:,} failing the format · "
        f"{report.examples:,} examples checked · max_length={report.max_length}</p>\n"
        f"{verdict}<table><tr><th>check</th><th>examples flagged</th></tr>{rows}</table>\n"
        f"<p>Token after assistant replies (end of turn): {eot}</p>\n"
        '<p>Legend: <span class="s">supervised (trained on)</span> <span class="t">context (no loss)</span> '
        '<span class="t x">special token</span> <span class="s x">supervised special token</span> '
        "(↵ marks a supervised newline; hover a token for its id)</p>\n"
        + "\n".join(_html_example(e) for e in report.shown)
        + (f"\n<h2>Findings</h2>{_html_findings(listed)}{more}" if report.findings else "")
        + "\n</body></html>\n"
    )
