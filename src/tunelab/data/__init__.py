from tunelab.data.collate import PadCollator, pad_collate
from tunelab.data.dataset import DataReport, build_datasets, load_examples
from tunelab.data.formats import to_example
from tunelab.data.readers import Record, read_records
from tunelab.data.sampler import ResumableSampler
from tunelab.data.tokenize import IGNORE_INDEX, render, tokenize_conversation, tokenize_text

__all__ = [
    "IGNORE_INDEX",
    "DataReport",
    "PadCollator",
    "Record",
    "ResumableSampler",
    "build_datasets",
    "load_examples",
    "pad_collate",
    "read_records",
    "render",
    "to_example",
    "tokenize_conversation",
    "tokenize_text",
]
