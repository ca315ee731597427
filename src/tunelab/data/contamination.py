"""Training examples that leak evaluation examples: a shared run of n words, or a near duplicate.

A training example is contaminated by an evaluation example when

- they share a word n-gram (``n=13`` by default, as in the GPT-3 and Llama 2 contamination
  studies: long enough that common phrases do not match, short enough to catch a question
  pasted inside a longer prompt); words are lowercase runs of letters and digits, so
  punctuation and spacing do not matter. An evaluation example of fewer than n words matches
  when all of its words appear, in order and together, inside a training example; or
- their character-shingle MinHashes (the ones ``clean`` uses for near duplicates) estimate a
  Jaccard similarity of ``near_threshold`` or more: the same example reworded a little.

Evaluation n-grams are kept as hashes in one dictionary, so each training n-gram costs one
lookup; a hit is confirmed against the words themselves before it is reported.
"""

import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunelab.data.clean import best_match, lsh_index, text_minhashes
from tunelab.data.files import Finding, ScannedFile, record_text, scan_file, write_records
from tunelab.errors import TunelabError

_WORD = re.compile(r"\w+")


@dataclass
class ContaminatedPair:
    """One training example and one evaluation example it leaks."""

    train_where: str  # "train.jsonl line 12"
    train_line: int | None
    eval_path: str
    eval_where: str
    eval_line: int | None
    kind: str  # "ngram" (a shared run of words) or "near" (a near duplicate)
    shared: str | None = None  # kind "ngram": the shared words (the first run found)
    jaccard: float | None = None  # kind "near": the estimated Jaccard similarity

    def render(self) -> str:
        evidence = f'shares "{self.shared}"' if self.kind == "ngram" else f"near duplicate, estimated Jaccard {self.jaccard:.2f}"
        return f"{self.train_where} leaks {self.eval_where}: {evidence}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ContaminationReport:
    """What ``find_contamination`` found; ``remove_contaminated`` writes the training set without it."""

    train_path: Path
    eval_paths: list[Path]
    n: int
    near_threshold: float | None  # None: near duplicates not checked
    train_records: int
    eval_records: int
    pairs: list[ContaminatedPair] = field(default_factory=list)
    unreadable: list[Finding] = field(default_factory=list)  # lines of the train or eval files left out of the check
    seconds: float = 0.0
    contaminated_indices: list[int] = field(default_factory=list)  # positions among the train file's readable records
    train_stamp: tuple[int, int] = (0, 0)  # the train file's size and mtime when checked
    text_field: str = "text"  # how the train file was read (plain-text files)

    @property
    def contaminated(self) -> int:
        """How many training examples leak at least one evaluation example."""
        return len(self.contaminated_indices)

    @property
    def findings(self) -> list[Finding]:
        leaks = [Finding(p.train_where, p.train_line, f"contamination_{p.kind}", "warning", p.render()) for p in self.pairs]
        return self.unreadable + leaks

    def render(self, limit: int = 50) -> str:
        checks = f"shared {self.n}-grams" + (f", near duplicates (Jaccard >= {self.near_threshold})" if self.near_threshold else "")
        lines = [f"{self.train_path}: {self.contaminated} of {self.train_records} training examples leak evaluation examples "
                 f"({len(self.pairs)} pairs; {self.eval_records} evaluation examples in {len(self.eval_paths)} file(s); "
                 f"{checks}; {self.seconds:.1f} s)"]  # fmt: skip
        by_file = Counter(p.eval_path for p in self.pairs)
        lines += [f"  {n:>6} pairs with {path}" for path, n in by_file.most_common()]
        lines += [f.render() for f in self.unreadable[:limit]]
        lines += [p.render() for p in self.pairs[: max(0, limit - len(self.unreadable))]]
        hidden = len(self.unreadable) + len(self.pairs) - limit
        if hidden > 0:
            lines.append(f"... and {hidden} more (raise the limit or read the JSON report)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "train_path": str(self.train_path), "eval_paths": [str(p) for p in self.eval_paths], "n": self.n,
            "near_threshold": self.near_threshold, "train_records": self.train_records, "eval_records": self.eval_records,
            "contaminated": self.contaminated, "seconds": round(self.seconds, 3), "pairs": [p.to_dict() for p in self.pairs],
            "unreadable": [f.to_dict() for f in self.unreadable],
        }  # fmt: skip


@dataclass
class _EvalExample:
    path: Path
    where: str
    line: int | None
    words: list[str]
    text: str  # for near duplicates: casefolded, whitespace collapsed


def words(text: str) -> list[str]:
    """The words n-grams are made of: lowercase runs of letters and digits (punctuation dropped)."""
    return _WORD.findall(text.casefold())


def _collapsed(text: str) -> str:
    return " ".join(text.casefold().split())  # as clean compares near duplicates


def find_contamination(
    train_path: str | Path,
    eval_paths: str | Path | list[str | Path],
    n: int = 13,
    near_threshold: float | None = 0.8,
    *,
    eval_fields: list[str] | None = None,
    text_field: str = "text",
    out: str | Path | None = None,
) -> ContaminationReport:
    """Which training examples of ``train_path`` leak examples of ``eval_paths`` (see the module).

    ``eval_fields``: the fields of an evaluation record to look for (for example ["question"],
    when the evaluation prompts share a long instruction that training prompts also use); all of
    its text by default. ``near_threshold=None`` checks shared n-grams only. ``out``: also write
    the training set without the contaminated examples there (as ``remove_contaminated``).
    """
    started = time.perf_counter()
    if n < 1:
        raise TunelabError(f"n={n} must be 1 or more (words per shared n-gram; 13 is usual).")
    if near_threshold is not None and not 0 < near_threshold <= 1:
        raise TunelabError(f"near_threshold={near_threshold} must be in (0, 1], or None to skip near duplicates.")
    train = scan_file(train_path, text_field)
    evals = [scan_file(p, text_field) for p in ([eval_paths] if isinstance(eval_paths, (str, Path)) else eval_paths)]
    _check_distinct(train, evals)
    examples = _eval_examples(evals, eval_fields)
    train_texts = [record_text(r.fields) for r in train.records]
    pairs = _ngram_pairs(train, train_texts, examples, n)
    if near_threshold is not None:
        pairs = _merge(pairs, _near_pairs(train, train_texts, examples, near_threshold))
    stat = train.path.stat()
    report = ContaminationReport(
        train.path, [e.path for e in evals], n, near_threshold, len(train.records), len(examples),
        pairs=[pair for _, pair in sorted(pairs.items())], unreadable=train.findings + [f for e in evals for f in e.findings],
        contaminated_indices=sorted({index for index, _ in pairs}), train_stamp=(stat.st_size, stat.st_mtime_ns),
        text_field=text_field,
    )  # fmt: skip
    if out is not None:
        remove_contaminated(report, out)
    report.seconds = time.perf_counter() - started
    return report


def remove_contaminated(report: ContaminationReport, out: str | Path) -> Path:
    """Write the training set of ``report`` without its contaminated examples to ``out`` (a new
    file; lines that could not be read are left out too)."""
    stat = report.train_path.stat()
    if (stat.st_size, stat.st_mtime_ns) != tuple(report.train_stamp):
        raise TunelabError(f"'{report.train_path}' changed since it was checked for contamination; check it again before removing.")
    train = scan_file(report.train_path, report.text_field)
    drop = set(report.contaminated_indices)
    rows = [r.fields for i, r in enumerate(train.records) if i not in drop]
    return write_records(out, rows, inputs=[report.train_path, *report.eval_paths])


def _check_distinct(train: ScannedFile, evals: list[ScannedFile]) -> None:
    if not evals:
        raise TunelabError("No evaluation file given; name the evaluation set(s) to check the training set against.")
    for scanned in evals:
        if scanned.path.resolve() == train.path.resolve():
            raise TunelabError(f"'{scanned.path}' is both the training and an evaluation file; every example would match itself.")


def _eval_examples(evals: list[ScannedFile], eval_fields: list[str] | None) -> list[_EvalExample]:
    examples = []
    for scanned in evals:
        for record in scanned.records:
            fields = record.fields if eval_fields is None else {k: v for k, v in record.fields.items() if k in eval_fields}
            text = record_text(fields)
            tokens = words(text)
            if tokens:
                examples.append(_EvalExample(scanned.path, record.where, record.line, tokens, _collapsed(text)))
    if eval_fields is not None and not examples:
        keys = sorted({k for s in evals for r in s.records for k in r.fields})
        raise TunelabError(f"No evaluation record has text in the fields {eval_fields}; the evaluation files have the fields {keys}.")
    return examples


def _ngram_index(examples: list[_EvalExample], n: int) -> dict[int, dict[int, int]]:
    """Length -> (hash of a run of that many words -> the first evaluation example with it): runs of
    n words, and whole examples shorter than n."""
    index: dict[int, dict[int, int]] = {}
    for number, example in enumerate(examples):
        size = min(n, len(example.words))
        table = index.setdefault(size, {})
        for start in range(len(example.words) - size + 1):
            table.setdefault(hash(tuple(example.words[start : start + size])), number)
    return index


def _ngram_pairs(train: ScannedFile, texts: list[str], examples: list[_EvalExample], n: int) -> dict[tuple[int, int], ContaminatedPair]:
    index = _ngram_index(examples, n)
    pairs = {}
    for position, (record, text) in enumerate(zip(train.records, texts)):
        tokens = words(text)
        for size, table in index.items():
            for start in range(len(tokens) - size + 1):
                run = tuple(tokens[start : start + size])
                number = table.get(hash(run))
                if number is None or (position, number) in pairs or not _contains(examples[number].words, run):
                    continue
                pairs[(position, number)] = _pair(record, examples[number], "ngram", shared=" ".join(run))
    return pairs


def _contains(haystack: list[str], run: tuple[str, ...]) -> bool:
    """Whether ``run`` occurs in ``haystack`` (confirms a hash hit; collisions are rare but possible)."""
    size = len(run)
    return any(tuple(haystack[i : i + size]) == run for i in range(len(haystack) - size + 1))


def _near_pairs(train: ScannedFile, texts: list[str], examples: list[_EvalExample], threshold: float) -> dict[tuple[int, int], ContaminatedPair]:
    lsh = lsh_index(threshold)
    eval_hashes = {}
    for number, minhash in enumerate(text_minhashes([e.text for e in examples])):
        if minhash is not None:
            lsh.insert(number, minhash)
            eval_hashes[number] = minhash
    pairs = {}
    train_hashes = text_minhashes([_collapsed(t) for t in texts])
    for position, (record, minhash) in enumerate(zip(train.records, train_hashes)):
        match = best_match(lsh, minhash, eval_hashes, threshold) if minhash is not None else None
        if match is not None:
            number, jaccard = match
            pairs[(position, number)] = _pair(record, examples[number], "near", jaccard=round(jaccard, 3))
    return pairs


def _merge(ngram: dict, near: dict) -> dict:
    # A pair found both ways is reported once, by its shared words: the stronger evidence.
    return {**near, **ngram}


def _pair(record, example: _EvalExample, kind: str, **evidence) -> ContaminatedPair:
    return ContaminatedPair(record.where, record.line, str(example.path), example.where, example.line, kind, **evidence)

