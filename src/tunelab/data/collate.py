"""Tokenized examples -> a padded batch."""

import torch

from tunelab.data.tokenize import IGNORE_INDEX


def pad_rows(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to the longest with ``value``; returns (ids, attention_mask)."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), value, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row)
        attention_mask[i, : len(row)] = 1
    return ids, attention_mask


def pad_collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding has attention_mask 0 and label -100."""
    input_ids, attention_mask = pad_rows([e["input_ids"] for e in examples], pad_token_id)
    labels, _ = pad_rows([e["labels"] for e in examples], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PadCollator:
    """Picklable collate_fn (dataloader workers need one)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return pad_collate(examples, self.pad_token_id)
