"""Files -> tokenized train and validation datasets, with a report of what was dropped."""

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets

from tunelab.config.schema import DataConfig
from tunelab.data.formats import to_example
from tunelab.data.readers import read_records
from tunelab.data.tokenize import tokenize_batch
from tunelab.errors import TunelabError
from tunelab.resources import cache_dir, resolve_path

log = logging.getLogger(__name__)


@dataclass
class SplitReport:
    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_unsupervised: int = 0
    supervised_tokens: int = 0
    tokens: int = 0


@dataclass
class DataReport:
    train: SplitReport = field(default_factory=SplitReport)
    val: SplitReport = field(default_factory=SplitReport)

    def as_dict(self) -> dict:
        return asdict(self)


def _examples(path_option: str, path: str, cfg: DataConfig) -> list[dict]:
    file = resolve_path(path, path_option)
    if file.is_dir():
        raise TunelabError(f"{path_option} '{path}' is a folder; give one data file (.jsonl, .json, .parquet, .csv, .txt).")
    return [to_example(record, cfg) for record in read_records(file, cfg.text_field)]


def _tokenizer_signature(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha1(f"{type(tokenizer).__name__}{tokenizer.chat_template}{vocab}".encode()).hexdigest()


def _tokenize(examples: list[dict], tokenizer, max_length: int, cfg: DataConfig, report: SplitReport) -> datasets.Dataset:
    report.records = len(examples)
    if not examples:
        return datasets.Dataset.from_dict({"input_ids": [], "labels": []})
    key = hashlib.sha1(
        json.dumps([examples, max_length, cfg.overlong, _tokenizer_signature(tokenizer)]).encode()
    ).hexdigest()
    folder = cache_dir("datasets") if cfg.cache_dir is None else Path(cfg.cache_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    raw = datasets.Dataset.from_list(examples)
    tokenized = raw.map(
        tokenize_batch,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "overlong": cfg.overlong},
        batched=True,
        batch_size=64,
        num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
        remove_columns=raw.column_names,
        cache_file_name=str(folder / f"{key}.arrow"),
        new_fingerprint=key,
        desc="Tokenizing",
    )
    status = tokenized["status"]
    report.truncated = status.count("truncated")
    report.dropped_overlong = status.count("overlong")
    report.dropped_unsupervised = status.count("unsupervised")
    kept = [i for i, s in enumerate(status) if s in ("ok", "truncated")]
    tokenized = tokenized.select(kept).remove_columns("status")
    report.examples = len(tokenized)
    if "labels" in tokenized.column_names:
        report.tokens = sum(len(ids) for ids in tokenized["input_ids"])
        report.supervised_tokens = sum(sum(1 for t in labels[1:] if t != -100) for labels in tokenized["labels"])
    else:  # preference pairs: every token of both sides is read, none is a target
        report.tokens = sum(len(a) + len(b) for a, b in zip(tokenized["chosen_input_ids"], tokenized["rejected_input_ids"]))
    return tokenized


def load_examples(cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """Read, format and split the records: (training examples, validation examples)."""
    if not cfg.path:
        raise TunelabError(
            "No training data: set data.path=FILE (JSON lines, JSON array, Parquet, CSV or text) "
            "and data.format=alpaca|sharegpt|openai|prompt_completion|text."
        )
    examples = _examples("data.path", cfg.path, cfg)
    if cfg.max_samples is not None:
        examples = examples[: cfg.max_samples]
    val_examples: list[dict] = []
    if cfg.val_path:
        val_examples = _examples("data.val_path", cfg.val_path, cfg)
    elif cfg.val_fraction > 0:
        if not 0 < cfg.val_fraction < 1:
            raise TunelabError(f"data.val_fraction={cfg.val_fraction} must be between 0 and 1.")
        order = list(range(len(examples)))
        random.Random(cfg.seed).shuffle(order)
        held = set(order[: max(1, round(len(examples) * cfg.val_fraction))])
        val_examples = [e for i, e in enumerate(examples) if i in held]
        examples = [e for i, e in enumerate(examples) if i not in held]
    if cfg.max_val_samples is not None:
        val_examples = val_examples[: cfg.max_val_samples]
    return examples, val_examples


def build_datasets(cfg: DataConfig, tokenizer, max_length: int) -> tuple[datasets.Dataset, datasets.Dataset | None, DataReport]:
    """Read, format, split and tokenize; raise if nothing is left to train on."""
    examples, val_examples = load_examples(cfg)
    report = DataReport()
    train = _tokenize(examples, tokenizer, max_length, cfg, report.train)
    val = _tokenize(val_examples, tokenizer, max_length, cfg, report.val) if val_examples else None
    t = report.train
    log.info(
        "Data: %d training examples (%d tokens, %d supervised) from %d records; %d truncated to %d tokens, "
        "%d dropped as longer than %d (data.overlong=drop), %d dropped with no supervised token (or identical pair)",
        t.examples, t.tokens, t.supervised_tokens, t.records, t.truncated, max_length,
        t.dropped_overlong, max_length, t.dropped_unsupervised,
    )  # fmt: skip
    if val is not None:
        log.info("Validation: %d examples", report.val.examples)
    if t.examples == 0:
        raise TunelabError(
            f"The training set is empty after filtering: {t.records} records read from '{cfg.path}', "
            f"{t.dropped_overlong} longer than max_length={max_length} were dropped and "
            f"{t.dropped_unsupervised} had no supervised (assistant) token. Check data.format and its "
            "field names, raise method.max_length, or use data.overlong=truncate."
        )
    return train, val, report
