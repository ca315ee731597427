"""Raw text -> fixed-size token blocks, for pretraining and continued pretraining.

Documents are read from the file one at a time, tokenized, each followed by EOS, and cut into
blocks of ``block_size`` tokens. A document longer than the room left in a block continues in the
next block, and the corpus's last, shorter block is kept, so every token of the corpus is in
exactly one block, in file order. A block remembers where its documents' pieces start
(``segments``: their lengths), so a batch can keep attention inside each document.

The blocks go to an Arrow file on disk as they are made, and training reads that file memory-mapped:
a corpus larger than memory is never held in it, and the blocks have fixed indices, so the
engine's sampler resumes at the exact block where a run stopped. The file is cached by the
corpus's path, size and modification time, the tokenizer and the block layout.
"""

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import datasets
from datasets.arrow_writer import ArrowWriter

from tunelab.data.readers import parse_json, read_records
from tunelab.errors import TunelabError
from tunelab.progress import progress_bar

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
BLOCK_FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")), "segments": datasets.Sequence(datasets.Value("int32"))})


@dataclass
class BlockStats:
    documents: int = 0
    blocks: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    """Tokens that are a next-token target: all but the first of each segment."""


def _paragraphs(path: Path) -> Iterator[tuple[str, str]]:
    """A text file's blank-line separated paragraphs, read a line at a time (as ``read_records``
    splits a .txt file, without reading it whole)."""
    lines: list[str] = []
    number = start = 0
    with path.open(encoding="utf-8") as f:
        try:
            for number, line in enumerate(f, start=1):
                if line in ("\n", "\r\n"):
                    text = "".join(lines).strip()
                    if text:
                        yield text, f"{path.name} line {start}"
                    lines = []
                    continue
                if not lines:
                    start = number
                lines.append(line)
        except UnicodeDecodeError as err:
            raise TunelabError(
                f"Data file '{path}' is not UTF-8 text (after line {number}: {err.reason} at byte {err.start} of the "
                "next chunk read). Re-encode it, e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`."
            ) from None
    text = "".join(lines).strip()
    if text:
        yield text, f"{path.name} line {start}"


def _jsonl_texts(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                value = parse_json(line)
            except json.JSONDecodeError as err:
                raise TunelabError(f"Data file '{path}' line {number} is not valid JSON ({err.msg} at column {err.colno}); fix or delete that line.") from None
            yield _text_of(value, text_field, where), where


def _parquet_texts(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as err:
        raise TunelabError(f"Data file '{path}' could not be read as Parquet: {err}") from None
    if text_field not in table.schema_arrow.names:
        raise TunelabError(
            f"Data file '{path}' has no column '{text_field}' (data.text_field). Its columns are: "
            f"{', '.join(table.schema_arrow.names)}. Set data.text_field=COLUMN."
        )
    row = 0
    for batch in table.iter_batches(batch_size=1024, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            yield _text_of({text_field: value}, text_field, f"{path.name} row {row}"), f"{path.name} row {row}"
            row += 1


def _text_of(value, text_field: str, where: str) -> str:
    if not isinstance(value, dict) or not isinstance(value.get(text_field), str):
        present = ", ".join(sorted(value)) if isinstance(value, dict) else f"a JSON {type(value).__name__}"
        raise TunelabError(
            f"Data {where}: no text field '{text_field}' (data.text_field) holding a string; the record has: {present}. "
            "Set data.text_field=FIELD."
        )
    return value[text_field]


def iter_documents(path: Path, text_field: str = "text", limit: int | None = None) -> Iterator[tuple[str, str]]:
    """(text, where) for each document of a file, without reading a large file whole: a text
    file's paragraphs, the ``text_field`` of each JSON line or Parquet row (JSON arrays and CSV
    are read whole). ``limit``: the first N documents (data.max_samples)."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        documents = _paragraphs(path)
    elif suffix in (".jsonl", ".ndjson"):
        documents = _jsonl_texts(path, text_field)
    elif suffix == ".parquet":
        documents = _parquet_texts(path, text_field)
    else:
        documents = ((_text_of(r.fields, text_field, r.where), r.where) for r in read_records(path, text_field))
    for count, document in enumerate(documents):
        if limit is not None and count >= limit:
            return
        yield document


def tokenize_documents(texts: Iterable[str], tokenizer, batch: int = 256) -> Iterator[list[int]]:
    """Token ids of each text with the tokenizer's special tokens, ending with EOS: the token
    that tells the model a document is over, and separates it from the next one in a block."""
    eos = tokenizer.eos_token_id
    pending: list[str] = []

    def flush():
        for ids in tokenizer(pending, add_special_tokens=True)["input_ids"]:
            yield ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids
        pending.clear()

    for text in texts:
        pending.append(text)
        if len(pending) == batch:
            yield from flush()
    if pending:
        yield from flush()


def group_blocks(documents: Iterable[list[int]], block_size: int, separate_documents: bool = False) -> Iterator[dict]:
    """Token lists -> ``{"input_ids": [...], "segments": [...]}`` blocks of ``block_size`` tokens
    (the last one shorter). A document continues from one block into the next; ``segments`` are
    the lengths of the document pieces in the block (one segment, the whole block, unless
    ``separate_documents``)."""
    if block_size < 2:
        raise TunelabError(f"method.block_size={block_size}: a block needs at least 2 tokens (one to read, one to predict).")
    ids: list[int] = []
    segments: list[int] = []

    def block() -> dict:
        return {"input_ids": ids, "segments": segments if separate_documents else [len(ids)]}

    for document in documents:
        while document:
            piece = document[: block_size - len(ids)]
            ids, document = ids + piece, document[len(piece) :]
            segments = segments + [len(piece)]
            if len(ids) == block_size:
                yield block()
                ids, segments = [], []
    if ids:
        yield block()


def _files_signature(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime": stat.st_mtime_ns}


def build_blocks(
    path: Path, tokenizer, block_size: int, *, text_field: str = "text", separate_documents: bool = False,
    limit: int | None = None, cache_folder: Path, tokenizer_signature: str, what: str = "Tokenizing",
) -> tuple[datasets.Dataset, BlockStats]:  # fmt: skip
    """The blocks of one file as a memory-mapped dataset (``input_ids``, ``segments``) and their
    counts; built once and cached in ``cache_folder``."""
    key = hashlib.sha1(json.dumps([
        _files_signature(path), text_field, block_size, separate_documents, limit, tokenizer_signature, tokenizer.eos_token_id, 1,
    ]).encode()).hexdigest()  # fmt: skip
    target = cache_folder / f"blocks-{key}.arrow"
    stats_file = cache_folder / f"blocks-{key}.json"
    if not (target.exists() and stats_file.exists()):
        cache_folder.mkdir(parents=True, exist_ok=True)
        stats = BlockStats()

        def texts():
            for text, _ in iter_documents(path, text_field, limit):
                stats.documents += 1
                bar.update(1)
                yield text

        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        bar = progress_bar(None, desc=f"{what} {path.name} into {block_size}-token blocks")
        try:
            with ArrowWriter(features=BLOCK_FEATURES, path=str(partial), writer_batch_size=1000) as writer:
                for item in group_blocks(tokenize_documents(texts(), tokenizer), block_size, separate_documents):
                    writer.write(item)
                    stats.blocks += 1
                    stats.tokens += len(item["input_ids"])
                    stats.supervised_tokens += len(item["input_ids"]) - len(item["segments"])
                writer.finalize()
            stats_partial = stats_file.with_name(f".{stats_file.name}.{os.getpid()}.tmp")
            stats_partial.write_text(json.dumps(stats.__dict__))
            os.replace(stats_partial, stats_file)
            os.replace(partial, target)  # published whole or not at all
        finally:
            bar.close()
            partial.unlink(missing_ok=True)
    stats = BlockStats(**json.loads(stats_file.read_text()))
    return datasets.Dataset.from_file(str(target)), stats
