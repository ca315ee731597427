"""Tokenized examples -> a batch: padded rows, or one packed row without padding.

Token lists become tensors through numpy: ``torch.tensor`` of 16 lists of 1,024 ints takes 2.6 ms
on this project's CPU, numpy 0.6 ms; on a GPU step of 90 ms that is the difference between the
data loader mattering or not.
"""

from itertools import chain

import numpy as np
import torch

from tunelab.data.constants import IGNORE_INDEX


def pad_rows(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to the longest with ``value``; returns (ids, attention_mask)."""
    longest = max(len(r) for r in rows)
    ids = np.full((len(rows), longest), value, dtype=np.int64)
    attention_mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        attention_mask[i, : len(row)] = 1
    return torch.from_numpy(ids), torch.from_numpy(attention_mask)


def _flat_long(rows: list[list[int]], total: int) -> torch.Tensor:
    return torch.from_numpy(np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=total))


def pad_collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding has attention_mask 0 and label -100."""
    input_ids, attention_mask = pad_rows([e["input_ids"] for e in examples], pad_token_id)
    labels, _ = pad_rows([e["labels"] for e in examples], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def supervised_index(labels: torch.Tensor) -> torch.Tensor:
    """The positions, in the batch's rows laid end to end, whose next token is a target, found on
    the host. The chunked loss gathers them with it; a boolean mask on the device would make the
    host wait for the device to count them, twice a step (forward and backward)."""
    rows, columns = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * labels.shape[1] + columns


def with_supervised_index(batch: dict) -> dict:
    batch["supervised_index"] = supervised_index(batch["labels"])
    return batch


class PadCollator:
    """Picklable collate_fn (dataloader workers need one); adds ``supervised_index``."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return with_supervised_index(pad_collate(examples, self.pad_token_id))


def pack_collate(examples: list[dict], multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Concatenate the examples into one row without padding (padding-free packing).

    Positions restart at 0 for every example, and ``cu_seq_lens_q``/``cu_seq_lens_k`` hold the
    example boundaries, so an attention that honours them (tunelab's packed sdpa, flash
    attention's varlen kernels, or transformers' own mask built from the positions) keeps each
    example to itself. The first token of every example gets label -100: it must not be learned
    as the continuation of the example before it.

    ``multiple_of`` > 1 lengthens the row to a multiple of that many tokens with pad tokens (label
    -100) after the last example, inside its segment: causal attention keeps them from changing
    anything before them. The row then takes a few lengths instead of one per batch, and kernels
    that are built and cached per shape (oneDNN's, under bf16 on a CPU) stay few. ``pad_tokens``
    says how many were added.
    """
    lengths = [len(e["input_ids"]) for e in examples]
    pad = -sum(lengths) % multiple_of
    rows = [e["input_ids"] for e in examples] + [[0] * pad]
    targets = [e["labels"] for e in examples] + [[IGNORE_INDEX] * pad]
    lengths[-1] += pad
    input_ids = _flat_long(rows, sum(lengths))[None]
    labels = _flat_long(targets, sum(lengths))[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    bounds = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    labels[0, bounds[:-1].long()] = IGNORE_INDEX
    return {
        "input_ids": input_ids, "labels": labels, "position_ids": position_ids, "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
        "max_length_q": max(lengths), "max_length_k": max(lengths), "pad_tokens": pad,
    }  # fmt: skip


def real_tokens(batch: dict) -> torch.Tensor | int:
    """Real (non-pad) tokens in a padded or packed batch, without waiting for the device (a
    padded batch's count stays a tensor on it)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return batch["input_ids"].numel() - batch.get("pad_tokens", 0)


def batch_tokens(batch: dict) -> int:
    """Real (non-pad) tokens in a padded or packed batch, as a number."""
    return int(real_tokens(batch))


class PackCollator:
    """Picklable collate_fn for padding-free packing (rows to a multiple of ``multiple_of``
    tokens, see ``pack_collate``); adds ``supervised_index``."""

    def __init__(self, multiple_of: int = 1):
        self.multiple_of = multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return with_supervised_index(pack_collate(examples, self.multiple_of))


def pair_collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Reward-model pairs -> right-padded batch of 2B rows: the B chosen sequences, then the B
    rejected ones."""
    rows = [e["chosen_input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
    input_ids, attention_mask = pad_rows(rows, pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class PairCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return pair_collate(examples, self.pad_token_id)


REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
"""Per-pair reference log-probabilities, when they were computed before training."""


class CompletionPairCollator:
    """DPO pairs -> one batch of 2B sequences with completion-only labels: the B chosen sequences,
    then the B rejected ones, packed into one row (``pack_collate``, to a multiple of
    ``multiple_of`` tokens) or right-padded. Reference log-probabilities computed before training
    ride along as float tensors."""

    def __init__(self, pad_token_id: int, packing: bool, multiple_of: int = 1):
        self.pad_token_id, self.packing, self.multiple_of = pad_token_id, packing, multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": e[f"{side}_input_ids"], "labels": e[f"{side}_labels"]} for side in ("chosen", "rejected") for e in examples]
        batch = pack_collate(rows, self.multiple_of) if self.packing else pad_collate(rows, self.pad_token_id)
        for name in REFERENCE_COLUMNS:
            if name in examples[0]:
                batch[name] = torch.tensor([e[name] for e in examples], dtype=torch.float32)
        return batch


class PromptCollator:
    """Prompts to generate from -> left-padded ids and mask (generation appends on the right),
    plus the prompt messages and record fields (JSON strings) for the reward functions."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        rows = [e["input_ids"] for e in examples]
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, longest - len(row) :] = torch.as_tensor(row)
            mask[i, longest - len(row) :] = 1
        return {"prompt_ids": ids, "prompt_mask": mask, "prompt": [e["prompt"] for e in examples], "columns": [e["columns"] for e in examples]}


class BlockCollator:
    """Pretraining blocks -> a batch where every token but the first of each segment is a target.

    Packed (``packing``): every block's segments are concatenated into one row, positions restart
    at each segment and ``cu_seq_lens`` keep attention inside it (``pack_collate``); a block with
    one segment attends across the documents in it. Padded: one row per block, which needs blocks
    of one segment (attention cannot be cut inside a padded row here).

    ``plain_rows`` (what a GPU gets): a packed batch whose blocks are all of one length and one
    segment (every full block, with cross-document attention) goes as one row per block with
    neither padding nor mask: the same tokens, targets and attention, as plain causal attention that
    the compiled layers take whole.
    """

    def __init__(self, pad_token_id: int, packing: bool, plain_rows: bool = False):
        self.pad_token_id, self.packing, self.plain_rows = pad_token_id, packing, plain_rows

    def __call__(self, blocks: list[dict]) -> dict[str, torch.Tensor]:
        if self.plain_rows and self.packing and len({len(b["input_ids"]) for b in blocks}) == 1 and all(len(b["segments"]) == 1 for b in blocks):
            ids = torch.from_numpy(np.array([b["input_ids"] for b in blocks], dtype=np.int64))
            # a row's first token is never a target (labels shift by one)
            return with_supervised_index({"input_ids": ids, "labels": ids.clone()})
        if not self.packing:
            return with_supervised_index(pad_collate([{"input_ids": b["input_ids"], "labels": b["input_ids"]} for b in blocks], self.pad_token_id))
        pieces = []
        for block in blocks:
            start = 0
            for length in block["segments"]:
                ids = block["input_ids"][start : start + length]
                pieces.append({"input_ids": ids, "labels": ids})
                start += length
        return with_supervised_index(pack_collate(pieces))
