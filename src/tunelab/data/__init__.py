from tunelab.data.blocks import group_blocks, iter_documents, tokenize_documents
from tunelab.data.collate import (
    REFERENCE_COLUMNS, BlockCollator, CompletionPairCollator, PackCollator, PadCollator, PairCollator, PromptCollator, batch_tokens, pack_collate, pad_collate, real_tokens,
    pair_collate,
)
from tunelab.data.constants import IGNORE_INDEX
from tunelab.data.dataset import DataReport, build_datasets, build_mixed, build_text_blocks, load_examples
from tunelab.data.formats import to_example
from tunelab.data.readers import Record, read_records
from tunelab.data.sampler import ResumableSampler
from tunelab.data.tokenize import render, tokenize_completion, tokenize_conversation, tokenize_pair, tokenize_text

# The data toolkit (``tunelab data ...``) is imported from its modules where used:
# tunelab.data.stats, validate, audit, clean, pii, contamination, transform, synth, files.

__all__ = [
    "IGNORE_INDEX",
    "REFERENCE_COLUMNS",
    "BlockCollator",
    "CompletionPairCollator",
    "DataReport",
    "PackCollator",
    "PadCollator",
    "PairCollator",
    "PromptCollator",
    "Record",
    "ResumableSampler",
    "batch_tokens",
    "build_datasets",
    "build_mixed",
    "build_text_blocks",
    "group_blocks",
    "iter_documents",
    "load_examples",
    "pack_collate",
    "real_tokens",
    "pad_collate",
    "pair_collate",
    "read_records",
    "render",
    "to_example",
    "tokenize_completion",
    "tokenize_conversation",
    "tokenize_documents",
    "tokenize_pair",
    "tokenize_text",
]
