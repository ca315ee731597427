"""Clean a data file: normalise text, redact personal data, filter by length, repetition and
language, and remove exact and near duplicates; write what is kept to a new file and report every
change and removal with its line.

Cleaning works on the string values of a record wherever they are (alpaca fields, chat turns'
contents, nested values); keys and structure are kept. The steps run in this order: normalise,
redact, filter, exact duplicates, near duplicates. Duplicates are found after redaction, so that
two records differing only in an e-mail address do not both survive as identical lines, and
after the filters, so that a removed duplicate always names a line that was kept.

Near duplicates are found with MinHash LSH over character 5-grams of the casefolded,
whitespace-collapsed text. Character shingles rather than word 5-grams: in a 40-word question
(GSM8K's typical length) changing three words removes up to 15 of the 36 word 5-grams (Jaccard
near 0.5, far under any useful threshold), while it touches only about a tenth of the
character 5-grams. On GSM8K, three changed words in a question give a character-5-gram Jaccard
of 0.88 on average over the whole record, while the most similar pair of distinct records among
1500 reaches 0.64, so the default threshold 0.8 sits between the two.
"""

import hashlib
import re
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasketch import MinHash, MinHashLSH

from tunelab.data.files import Finding, record_text, scan_file, write_records
from tunelab.data.pii import PII_KINDS, PLACEHOLDERS, check_kinds, redact
from tunelab.data.readers import Record
from tunelab.errors import TunelabError

NUM_PERM = 128
SHINGLE_CHARS = 5
REMOVAL_REASONS = ("unreadable", "too_short", "too_long", "repetitive", "language", "exact_duplicate", "near_duplicate")
NORMALIZATIONS = ("unicode NFC", "control characters removed", "runs of spaces collapsed", "trailing whitespace stripped")

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")  # keeps \t and \n (\r is turned into \n first)
_SPACE_RUN = re.compile(r"(?<=\S)[ \t]{2,}")  # runs after text only: leading indentation (code) keeps its meaning
# An HH-RLHF transcript's turns start "\n\nHuman: " and "\n\nAssistant: "; the space after an
# empty turn's marker is markup, not trailing whitespace (the parser splits on it).
_TRAILING = re.compile(r"(?<!\n\nHuman:)(?<!\n\nAssistant:)[ \t]+$", re.MULTILINE)
_TURN_MARKERS = ("\n\nHuman:", "\n\nAssistant:")
_PRIME = np.uint64(1099511628211)  # FNV's 64-bit prime: an odd multiplier for the rolling shingle hash


@dataclass
class CleanReport:
    """What ``clean_file`` kept, changed and removed, and why (findings in file order)."""

    path: Path
    out: Path | None  # None: nothing written (a dry run)
    records_in: int  # records read plus lines that could not be read
    records_out: int
    removed: Counter = field(default_factory=Counter)  # reason -> records removed
    changed: Counter = field(default_factory=Counter)  # "normalized", "pii" -> records changed
    pii: Counter = field(default_factory=Counter)  # kind -> values replaced
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    def render(self, limit: int = 50) -> str:
        target = f" -> {self.out}" if self.out else " (dry run, nothing written)"
        lines = [f"{self.path}{target}: {self.records_out} of {self.records_in} records kept, "
                 f"{sum(self.removed.values())} removed, {sum(self.changed.values())} changes ({self.seconds:.1f} s)"]  # fmt: skip
        lines += [f"  removed {self.removed[reason]:>6}  {reason}" for reason in REMOVAL_REASONS if self.removed[reason]]
        lines += [f"  changed {n:>6}  {reason}" for reason, n in self.changed.most_common()]
        lines += [f"  redacted {n:>5}  {kind} -> {PLACEHOLDERS[kind]}" for kind, n in self.pii.most_common()]
        lines += [f.render() for f in self.findings[:limit]]
        if len(self.findings) > limit:
            lines.append(f"... and {len(self.findings) - limit} more (raise the limit or read the JSON report)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "out": str(self.out) if self.out else None, "records_in": self.records_in,
            "records_out": self.records_out, "removed": dict(self.removed), "changed": dict(self.changed),
            "pii": dict(self.pii), "seconds": round(self.seconds, 3), "findings": [f.to_dict() for f in self.findings],
        }  # fmt: skip


@dataclass
class _Item:
    record: Record
    fields: dict  # the record's fields after the changes made so far


def clean_file(
    path: str | Path,
    out: str | Path | None,
    *,
    normalize: bool = True,
    exact_dedup: bool = True,
    near_dedup: bool = True,
    near_threshold: float = 0.8,
    pii=PII_KINDS,
    min_chars: int | None = None,
    max_chars: int | None = None,
    max_repetition: float | None = None,
    repetition_ngram: int = 3,
    language: str | list[str] | None = None,
    language_model: str | Path | None = None,
    text_field: str = "text",
) -> CleanReport:
    """Clean ``path`` into ``out`` (never in place; ``out=None`` only reports).

    ``pii``: the kinds to redact (``PII_KINDS`` names; None or () for none). ``min_chars`` and
    ``max_chars`` bound the length of a record's text. ``max_repetition``: the largest share of a
    record's word ``repetition_ngram``-grams that may repeat an earlier one in the same record.
    ``language``: the language code(s) to keep (needs ``langdetect``, or ``fasttext`` with
    ``language_model``, the path of a language-identification model such as lid.176.bin).
    """
    started = time.perf_counter()
    kinds = check_kinds(pii) if pii else ()
    _check_options(near_threshold, min_chars, max_chars, max_repetition, repetition_ngram)
    detect = _language_detector(language_model) if language else None
    scanned = scan_file(path, text_field)
    report = CleanReport(scanned.path, Path(out) if out is not None else None, len(scanned.records) + len(scanned.findings), 0)
    report.findings += [_dropped_line(f) for f in scanned.findings]
    if scanned.findings:
        report.removed["unreadable"] = len(scanned.findings)
    items = [_Item(r, r.fields) for r in scanned.records]
    for item in items:
        if normalize:
            _normalize_item(item, report)
        if kinds:
            _redact_item(item, kinds, report)
    items = _filter(items, report, min_chars, max_chars, max_repetition, repetition_ngram, _languages(language), detect)
    if exact_dedup:
        items = _drop_exact_duplicates(items, report)
    if near_dedup:
        items = _drop_near_duplicates(items, near_threshold, report)
    if out is not None:
        write_records(out, [item.fields for item in items], inputs=[scanned.path])
    report.records_out = len(items)
    position = {r.where: i for i, r in enumerate(scanned.records)}  # file order where lines are unknown (JSON arrays)
    report.findings.sort(key=lambda f: f.line if f.line is not None else position.get(f.where, 0))
    report.seconds = time.perf_counter() - started
    return report


def _check_options(near_threshold, min_chars, max_chars, max_repetition, repetition_ngram) -> None:
    if not 0 < near_threshold <= 1:
        raise TunelabError(
            f"near_threshold={near_threshold} must be in (0, 1]: the Jaccard similarity from which two records are near duplicates (0.8 is usual)."
        )
    if min_chars is not None and max_chars is not None and min_chars > max_chars:
        raise TunelabError(f"min_chars={min_chars} is above max_chars={max_chars}; every record would be removed.")
    if max_repetition is not None and not 0 <= max_repetition <= 1:
        raise TunelabError(f"max_repetition={max_repetition} must be a share in [0, 1] (for example 0.3).")
    if repetition_ngram < 1:
        raise TunelabError(f"repetition_ngram={repetition_ngram} must be 1 or more (words per n-gram).")


def _dropped_line(finding: Finding) -> Finding:
    return Finding(finding.where, finding.line, finding.check, finding.severity, finding.message + "; the line is left out of the output")


def place(record: Record) -> str:
    """How a report names a record: ``line 12`` where the line is known, else its ``where``."""
    return f"line {record.line}" if record.line is not None else record.where


def _finding(item: _Item, check: str, message: str) -> Finding:
    return Finding(item.record.where, item.record.line, check, "info", message)


# Normalisation -------------------------------------------------------------------------------


def normalize_text(text: str) -> tuple[str, list[str]]:
    """``text`` in NFC, without control characters (tabs and newlines stay, \\r becomes \\n), runs
    of spaces and tabs inside lines collapsed to one space, and trailing whitespace stripped from
    each line and from both ends; and what of that changed something. An HH-RLHF transcript
    keeps its markup: the leading "\\n\\nHuman: " and the space after an empty turn's marker."""
    changes = []
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
        changes.append("unicode NFC")
    fixed = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    if fixed != text:
        changes.append("control characters removed")
        text = fixed
    for change, fix in (("runs of spaces collapsed", lambda t: _SPACE_RUN.sub(" ", t)),
                        ("trailing whitespace stripped", lambda t: _strip_field(_TRAILING.sub("", t)))):  # fmt: skip
        fixed = fix(text)
        if fixed != text:
            changes.append(change)
            text = fixed
    return text, changes


def _strip_field(text: str) -> str:
    stripped = text.rstrip()
    if stripped.endswith(_TURN_MARKERS) and text[len(stripped) :].startswith(" "):
        stripped += " "
    return stripped if stripped.startswith(_TURN_MARKERS[0]) else stripped.lstrip()


def _map_strings(value, fn, path: str = ""):
    """``value`` with ``fn(string, path)`` applied to every string inside; keys and structure kept.
    Paths read like ``messages[2].content``."""
    if isinstance(value, str):
        return fn(value, path)
    if isinstance(value, dict):
        return {k: _map_strings(v, fn, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _normalize_item(item: _Item, report: CleanReport) -> None:
    changes: dict[str, None] = {}
    paths: list[str] = []

    def fix(text: str, path: str) -> str:
        fixed, made = _normalize_fast(text)
        if made:
            changes.update(dict.fromkeys(made))
            paths.append(path)
        return fixed

    fields = _map_strings(item.fields, fix)
    if changes:
        item.fields = fields
        report.changed["normalized"] += 1
        made = [c for c in NORMALIZATIONS if c in changes]
        report.findings.append(_finding(item, "normalized", f"{', '.join(made)} (fields: {', '.join(paths)})"))


def _normalize_fast(text: str) -> tuple[str, list[str]]:
    # Most strings of a clean file need nothing; this test is much cheaper than the full pass.
    if text.isascii() and text.isprintable() and "  " not in text and text == text.strip():
        return text, []
    return normalize_text(text)


# PII -----------------------------------------------------------------------------------------


def _redact_item(item: _Item, kinds: tuple[str, ...], report: CleanReport) -> None:
    found: dict[str, Counter] = {}

    def fix(text: str, path: str) -> str:
        fixed, counts = redact(text, kinds)
        for kind, n in counts.items():
            found.setdefault(kind, Counter())[path] += n
        return fixed

    fields = _map_strings(item.fields, fix)
    if not found:
        return
    item.fields = fields
    report.changed["pii"] += 1
    for kind, where in found.items():
        report.pii[kind] += sum(where.values())
        report.findings.append(_finding(item, f"pii_{kind}", f"{sum(where.values())} {kind.replace('_', ' ')} value(s) replaced by "
                                        f"{PLACEHOLDERS[kind]} (fields: {', '.join(where)})"))  # fmt: skip


# Quality filters ------------------------------------------------------------------------------


def repetition(text: str, n: int = 3) -> float:
    """The share of the word n-grams of ``text`` that repeat an earlier one (0 for texts of fewer
    than n words): 0.0 for ordinary prose, towards 1.0 for text that loops."""
    words = text.casefold().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def _languages(language) -> set[str]:
    if language is None:
        return set()
    return {language} if isinstance(language, str) else set(language)


def _filter(items, report, min_chars, max_chars, max_repetition, repetition_ngram, languages, detect) -> list[_Item]:
    kept = []
    for item in items:
        text = record_text(item.fields)
        reason = _quality_problem(text, min_chars, max_chars, max_repetition, repetition_ngram, languages, detect)
        if reason is None:
            kept.append(item)
            continue
        check, message = reason
        report.removed[check] += 1
        report.findings.append(_finding(item, check, f"removed: {message}"))
    return kept


def _quality_problem(text, min_chars, max_chars, max_repetition, n, languages, detect) -> tuple[str, str] | None:
    if min_chars is not None and len(text) < min_chars:
        return "too_short", f"{len(text)} characters, under min_chars={min_chars}"
    if max_chars is not None and len(text) > max_chars:
        return "too_long", f"{len(text)} characters, over max_chars={max_chars}"
    if max_repetition is not None:
        share = repetition(text, n)
        if share > max_repetition:
            return "repetitive", f"{share:.0%} of its word {n}-grams repeat, over max_repetition={max_repetition}"
    if detect is not None:
        found = detect(text)
        if found is not None and found not in languages:
            return "language", f"language detected as '{found}', not {' or '.join(sorted(languages))}"
    return None


def _language_detector(language_model):
    """A function text -> language code (None where undecided), from langdetect or fasttext."""
    try:
        from langdetect import DetectorFactory, detect
    except ImportError:
        return _fasttext_detector(language_model)
    DetectorFactory.seed = 0  # langdetect samples at random; a fixed seed makes cleaning repeatable

    def detect_language(text: str) -> str | None:
        try:
            return detect(text)
        except Exception:  # langdetect raises on text without letters; such a record is kept
            return None

    return detect_language


def _fasttext_detector(language_model):
    try:
        import fasttext
    except ImportError:
        raise TunelabError(
            "Filtering by language needs a language detector, and neither langdetect nor fasttext is installed. "
            "Install one: pip install langdetect (or pip install fasttext and give language_model= the path of a "
            "language-identification model such as lid.176.bin), or leave language unset."
        ) from None
    if language_model is None or not Path(language_model).is_file():
        raise TunelabError(
            f"Filtering by language with fasttext needs its model file; language_model={language_model!r} is not a file. "
            "Download lid.176.bin (fasttext.cc, language identification) and pass its path, or pip install langdetect."
        )
    model = fasttext.load_model(str(language_model))

    def detect_language(text: str) -> str | None:
        labels, _ = model.predict(" ".join(text.split()))  # fasttext predicts one line at a time
        return labels[0].removeprefix("__label__") if labels else None

    return detect_language


# Duplicates -----------------------------------------------------------------------------------


def content_text(fields: dict) -> str:
    """A record's text as duplicates are compared: casefolded, whitespace collapsed."""
    return " ".join(record_text(fields).casefold().split())


def _drop_exact_duplicates(items: list[_Item], report: CleanReport) -> list[_Item]:
    first: dict[bytes, _Item] = {}
    kept = []
    for item in items:
        key = hashlib.blake2b(content_text(item.fields).encode("utf-8"), digest_size=16).digest()
        if key in first:
            report.removed["exact_duplicate"] += 1
            report.findings.append(_finding(item, "exact_duplicate", f"removed: same content as {place(first[key].record)} (kept)"))
            continue
        first[key] = item
        kept.append(item)
    return kept


def shingle_hashes(text: str, width: int = SHINGLE_CHARS) -> np.ndarray:
    """The distinct 32-bit hashes of the ``width``-character shingles of ``text`` (a text shorter
    than ``width`` is one shingle; an empty text has none). A polynomial hash over code points,
    computed with numpy: deterministic across processes, unlike Python's ``hash`` of a string."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    width = min(width, len(codes))
    if width == 0:
        return np.zeros(0, dtype=np.uint32)
    count = len(codes) - width + 1
    hashes = np.zeros(count, dtype=np.uint64)
    for offset in range(width):
        hashes = hashes * _PRIME + codes[offset : offset + count]
    return np.unique((hashes ^ (hashes >> np.uint64(32))).astype(np.uint32))


def text_minhashes(texts: list[str]) -> list[MinHash | None]:
    """The MinHash (128 permutations) of each text's character shingles; None for an empty text,
    whose MinHash would match every other empty one with Jaccard 1."""
    seed = MinHash(num_perm=NUM_PERM, hashfunc=int)  # the shingles are hashed already
    found = []
    for text in texts:
        shingles = shingle_hashes(text)
        if len(shingles) == 0:
            found.append(None)
            continue
        minhash = seed.copy()
        minhash.update_batch(shingles.tolist())
        found.append(minhash)
    return found


def lsh_index(threshold: float) -> MinHashLSH:
    # The index only proposes candidates; each is then checked against the threshold itself.
    # Banded for the threshold asked, it would propose a pair at exactly that Jaccard only 40% of
    # the time (0.8: 9 bands of 13 rows); banded for 0.2 less (0.6: 18 bands of 7 rows), 98.6%
    # of the time, for a few more candidates to check.
    return MinHashLSH(threshold=max(0.05, threshold - 0.2), num_perm=NUM_PERM)


def best_match(lsh: MinHashLSH, minhash: MinHash, minhashes: dict[int, MinHash], threshold: float) -> tuple[int, float] | None:
    """The key (an int) in ``lsh`` whose MinHash (``minhashes[key]``) is most similar to ``minhash``, with
    its estimated Jaccard, if that reaches ``threshold``."""
    scored = [(minhash.jaccard(minhashes[key]), -key) for key in lsh.query(minhash)]
    if not scored:
        return None
    jaccard, key = max(scored)  # the most similar; of equals, the first in the file
    return (-key, jaccard) if jaccard >= threshold else None


def _drop_near_duplicates(items: list[_Item], threshold: float, report: CleanReport) -> list[_Item]:
    lsh = lsh_index(threshold)
    kept_hashes: dict[int, MinHash] = {}
    kept = []
    for index, (item, minhash) in enumerate(zip(items, text_minhashes([content_text(i.fields) for i in items]))):
        match = best_match(lsh, minhash, kept_hashes, threshold) if minhash is not None else None
        if match is None:
            if minhash is not None:
                lsh.insert(index, minhash)
                kept_hashes[index] = minhash
            kept.append(item)
            continue
        other, jaccard = match
        report.removed["near_duplicate"] += 1
        report.findings.append(_finding(item, "near_duplicate", f"removed: near duplicate of {place(items[other].record)} (kept), "
                                        f"estimated Jaccard {jaccard:.2f} over character {SHINGLE_CHARS}-grams"))  # fmt: skip
    return kept
