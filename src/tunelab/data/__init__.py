from tunelab.data.collate import PackCollator, PadCollator, batch_tokens, pack_collate, pad_collate
from tunelab.data.dataset import DataReport, build_datasets, load_examples
from tunelab.data.formats import to_example
from tunelab.data.readers import Record, read_records
from tunelab.data.sampler import ResumableSampler
from tunelab.data.tokenize import IGNORE_INDEX, render, tokenize_conversation, tokenize_text

__all__ = [
    "IGNORE_INDEX",
    "DataReport",
    "PackCollator",
    "PadCollator",
    "Record",
    "ResumableSampler",
    "batch_tokens",
    "build_datasets",
    "load_examples",
    "pack_collate",
    "pad_collate",
    "read_records",
    "render",
    "to_example",
    "tokenize_conversation",
    "tokenize_text",
]
