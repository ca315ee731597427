"""Files -> tokenized train and validation datasets, with a report of what was dropped."""

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets

from tunelab.config.schema import DataConfig
from tunelab.data.blocks import BlockStats, build_blocks
from tunelab.data.constants import IGNORE_INDEX
from tunelab.data.formats import to_example
from tunelab.data.mixture import MixtureReport, build_mixture
from tunelab.data.readers import read_records
from tunelab.data.tokenize import tokenize_batch, tokenize_completion_pairs_batch, tokenize_pairs_batch, tokenize_prompts_batch
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
    dropped_identical: int = 0
    """Preference pairs whose two sides are the same tokens (nothing to prefer)."""
    supervised_tokens: int = 0
    tokens: int = 0


@dataclass
class DataReport:
    train: SplitReport = field(default_factory=SplitReport)
    val: SplitReport = field(default_factory=SplitReport)
    mixture: MixtureReport | None = None
    """data.sources: the mix per source (the engine's sampler draws epochs from it)."""
    sources: dict = field(default_factory=dict)
    """data.sources: each source's own report, by name."""

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


def _tokenizer_function(examples: list[dict], max_length: int, cfg: DataConfig, max_prompt_length: int | None):
    """The ``datasets.map`` function and its options for these examples."""
    options = {"max_length": max_length, "overlong": cfg.overlong}
    if "prompt_messages" in examples[0]:
        return tokenize_prompts_batch, options
    if "chosen" not in examples[0]:
        return tokenize_batch, options
    if max_prompt_length is None:
        return tokenize_pairs_batch, options
    return tokenize_completion_pairs_batch, {**options, "max_prompt_length": max_prompt_length}


def _tokenize(
    examples: list[dict], tokenizer, max_length: int, cfg: DataConfig, report: SplitReport, max_prompt_length: int | None
) -> datasets.Dataset:
    report.records = len(examples)
    if not examples:
        return datasets.Dataset.from_dict({"input_ids": [], "labels": []})
    function, options = _tokenizer_function(examples, max_length, cfg, max_prompt_length)
    key = hashlib.sha1(
        json.dumps([examples, function.__name__, options, _tokenizer_signature(tokenizer)]).encode()
    ).hexdigest()
    folder = cache_dir("datasets") if cfg.cache_dir is None else Path(cfg.cache_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    raw = datasets.Dataset.from_list(examples)
    tokenized = raw.map(
        function,
        fn_kwargs={"tokenizer": tokenizer, **options},
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
    report.dropped_identical = status.count("identical")
    kept = [i for i, s in enumerate(status) if s in ("ok", "truncated")]
    tokenized = tokenized.select(kept).remove_columns("status")
    report.examples = len(tokenized)
    sides = ("chosen_", "rejected_") if "chosen_input_ids" in tokenized.column_names else ("",)
    for side in sides:
        report.tokens += sum(len(ids) for ids in tokenized[f"{side}input_ids"])
        if f"{side}labels" in tokenized.column_names:  # reward-model pairs have none: no token is a target
            report.supervised_tokens += sum(sum(1 for t in labels[1:] if t != IGNORE_INDEX) for labels in tokenized[f"{side}labels"])
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


def describe_split(split: SplitReport, max_length: int, overlong: str) -> str:
    """One line on what became of a split's records, naming only what happened."""
    supervised = f", {split.supervised_tokens} supervised" if split.supervised_tokens else ""
    parts = [f"{split.examples} training examples ({split.tokens} tokens{supervised}) from {split.records} records"]
    if split.truncated:
        parts.append(f"{split.truncated} longer than {max_length} tokens truncated (data.overlong={overlong})")
    if split.dropped_overlong:
        parts.append(f"{split.dropped_overlong} longer than {max_length} tokens dropped (data.overlong={overlong})")
    if split.dropped_unsupervised:
        parts.append(f"{split.dropped_unsupervised} dropped with no supervised token")
    if split.dropped_identical:
        parts.append(f"{split.dropped_identical} pairs dropped whose two sides are the same")
    return "; ".join(parts)


def build_datasets(
    cfg: DataConfig, tokenizer, max_length: int, max_prompt_length: int | None = None
) -> tuple[datasets.Dataset, datasets.Dataset | None, DataReport]:
    """Read, format, split and tokenize; raise if nothing is left to train on.

    Preference pairs are tokenized whole for reward models; with ``max_prompt_length`` set they
    are tokenized for DPO: completion-only labels, the prompt kept to its last
    ``max_prompt_length`` tokens. Prompts (data.format=prompt) are tokenized up to the opened
    assistant turn, at most ``max_length`` tokens.
    """
    if cfg.sources:
        return build_mixed(cfg, lambda source: build_datasets(source, tokenizer, max_length, max_prompt_length))
    examples, val_examples = load_examples(cfg)
    report = DataReport()
    train = _tokenize(examples, tokenizer, max_length, cfg, report.train, max_prompt_length)
    val = _tokenize(val_examples, tokenizer, max_length, cfg, report.val, max_prompt_length) if val_examples else None
    t = report.train
    log.info("Data: %s", describe_split(t, max_length, cfg.overlong))
    if val is not None:
        log.info("Validation: %d examples", report.val.examples)
    if t.examples == 0:
        raise TunelabError(
            f"The training set is empty after filtering: {t.records} records read from '{cfg.path}', "
            f"{t.dropped_overlong} longer than max_length={max_length} were dropped and "
            f"{t.dropped_unsupervised} had no supervised (assistant) token, {t.dropped_identical} were pairs whose two "
            "sides are the same. Check data.format and its "
            "field names, raise method.max_length, or use data.overlong=truncate."
        )
    return train, val, report


def _blocks_of(path_option: str, path: str, tokenizer, block_size: int, cfg: DataConfig, limit: int | None, what: str):
    file = resolve_path(path, path_option)
    if file.is_dir():
        raise TunelabError(f"{path_option} '{path}' is a folder; give one text file (.txt, .md, .jsonl, .json, .parquet, .csv).")
    folder = cache_dir("datasets") if cfg.cache_dir is None else Path(cfg.cache_dir).expanduser()
    return build_blocks(
        file, tokenizer, block_size, text_field=cfg.text_field, separate_documents=not cfg.cross_document_attention,
        limit=limit, cache_folder=folder, tokenizer_signature=_tokenizer_signature(tokenizer), what=what,
    )  # fmt: skip


def _block_report(split: SplitReport, stats: BlockStats, blocks: int, of_blocks: int) -> None:
    """Counts for ``blocks`` of the file's ``of_blocks`` blocks (a held-out tail takes the rest)."""
    share = blocks / of_blocks if of_blocks else 0.0
    split.records, split.examples = stats.documents, blocks
    split.tokens, split.supervised_tokens = round(stats.tokens * share), round(stats.supervised_tokens * share)


def build_text_blocks(cfg: DataConfig, tokenizer, block_size: int) -> tuple[datasets.Dataset, datasets.Dataset | None, DataReport]:
    """Text files -> training and validation blocks (``data.blocks``) and a report.

    The validation split is ``data.val_path``'s blocks, or with ``data.val_fraction`` the last
    blocks of the training file: held-out text is a contiguous tail, so no block of it is a
    neighbour of a training block (a random split would let the model see the text around it).
    """
    if not cfg.path:
        raise TunelabError("No training text: set data.path=FILE (.txt, .md, .jsonl, .json, .parquet or .csv) and data.format=text.")
    train, stats = _blocks_of("data.path", cfg.path, tokenizer, block_size, cfg, cfg.max_samples, "Tokenizing")
    report = DataReport()
    val = None
    if cfg.val_path:
        val, val_stats = _blocks_of("data.val_path", cfg.val_path, tokenizer, block_size, cfg, None, "Tokenizing validation text")
        _block_report(report.val, val_stats, len(val), len(val))
    elif cfg.val_fraction > 0:
        if not 0 < cfg.val_fraction < 1:
            raise TunelabError(f"data.val_fraction={cfg.val_fraction} must be between 0 and 1.")
        held = max(1, round(len(train) * cfg.val_fraction))
        if held >= len(train):
            raise TunelabError(
                f"data.val_fraction={cfg.val_fraction} of {len(train)} blocks leaves none to train on: "
                "lower method.block_size or data.val_fraction, or give data.val_path."
            )
        train, val = train.select(range(len(train) - held)), train.select(range(len(train) - held, len(train)))
        _block_report(report.val, stats, held, stats.blocks)
    _block_report(report.train, stats, len(train), stats.blocks)
    if val is not None and cfg.max_val_samples is not None:
        val = val.select(range(min(cfg.max_val_samples, len(val))))
        report.val.examples = len(val)
    if len(train) == 0:
        raise TunelabError(f"The training text is empty: '{cfg.path}' holds no text in data.text_field='{cfg.text_field}'.")
    log.info(
        "Data: %d blocks of up to %d tokens (%d tokens) from %d documents%s", len(train), block_size, report.train.tokens, stats.documents,
        f"; validation: {len(val)} blocks" if val is not None else "",
    )  # fmt: skip
    return train, val, report


def _sum_splits(splits: list[SplitReport]) -> SplitReport:
    total = SplitReport()
    for split in splits:
        for name in total.__dataclass_fields__:
            setattr(total, name, getattr(total, name) + getattr(split, name))
    return total


def build_mixed(cfg: DataConfig, build_one) -> tuple[datasets.Dataset, datasets.Dataset | None, DataReport]:
    """``data.sources`` (``data.mixture``): every source built by ``build_one`` as a single file
    would be, concatenated, with the mix in ``report.mixture``."""
    train, val, reports, mixture = build_mixture(cfg, build_one)
    report = DataReport(
        train=_sum_splits([r.train for r in reports]), val=_sum_splits([r.val for r in reports]), mixture=mixture,
        sources={name: {"train": asdict(r.train), "val": asdict(r.val)} for name, r in zip(mixture.names, reports)},
    )  # fmt: skip
    for i, name in enumerate(mixture.names):
        if mixture.roles[i] == "eval":
            held = mixture.val_sizes[i] if mixture.val_sizes else 0
            log.info("Mixture: %s: evaluation only (%d held-out examples, never trained on)", name, held)
        else:
            log.info("Mixture: %s (%s): %.1f%% of each epoch, %d draws from its %d examples (%d tokens)", name, mixture.roles[i],
                     100 * mixture.shares[i], mixture.counts[i], mixture.sizes[i], mixture.tokens[i])  # fmt: skip
    return train, val, report
