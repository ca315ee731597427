"""Preference pairs: record -> (chosen, rejected) conversations -> token ids -> a batch holding
all chosen sequences, then all rejected ones."""

import re
from typing import Any

import torch

from tunelab.data.collate import pad_rows
from tunelab.data.readers import Record
from tunelab.data.tokenize import render
from tunelab.errors import TunelabError

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_transcript(text: str) -> list[dict] | None:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' (HH-RLHF style) -> messages; None if not one."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def _as_messages(value: Any, record: Record, name: str, prompt: list[dict]) -> list[dict]:
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return prompt + [{"role": m["role"], "content": m["content"]} for m in value]
    if isinstance(value, str):
        if not prompt:
            parsed = parse_transcript(value)
            if parsed is not None:
                return parsed
            raise TunelabError(
                f"Data {record.where}: field '{name}' is plain text but there is no 'prompt' field and it is not a "
                "'\\n\\nHuman: ...\\n\\nAssistant: ...' transcript. Add a 'prompt' field, or give message lists."
            )
        return prompt + [{"role": "assistant", "content": value}]
    raise TunelabError(f"Data {record.where}: field '{name}' must be a string or a list of {{role, content}} messages.")


def to_preference(record: Record, system_prompt: str | None = None) -> dict:
    """``{"chosen": messages, "rejected": messages}`` from explicit prompt/chosen/rejected fields,
    from two full transcripts sharing a prefix, or from chat message lists."""
    for name in ("chosen", "rejected"):
        if name not in record.fields:
            present = ", ".join(sorted(record.fields)) or "none"
            raise TunelabError(
                f"Data {record.where}: a preference record needs 'chosen' and 'rejected' (and optionally "
                f"'prompt'); it has no '{name}'. Its fields are: {present}."
            )
    prompt_value = record.fields.get("prompt")
    if prompt_value is None:
        prompt = []
    elif isinstance(prompt_value, str):
        prompt = [{"role": "user", "content": prompt_value}]
    else:
        prompt = _as_messages(prompt_value, record, "prompt", [])
    pair = {name: _as_messages(record.fields[name], record, name, prompt) for name in ("chosen", "rejected")}
    for name, messages in pair.items():
        if system_prompt and messages[0]["role"] != "system":
            pair[name] = [{"role": "system", "content": system_prompt}] + messages
    return pair


def tokenize_pair(tokenizer, pair: dict, max_length: int) -> tuple[list[int], list[int], bool]:
    """Token ids of both sides. Overlong sides keep their last ``max_length`` tokens: the replies
    that differ sit at the end, and the reward is read at the last token."""
    ids = [tokenizer(render(tokenizer, pair[n]), add_special_tokens=False)["input_ids"] for n in ("chosen", "rejected")]
    truncated = any(len(x) > max_length for x in ids)
    chosen, rejected = (x[-max_length:] for x in ids)
    return chosen, rejected, truncated


def tokenize_pairs_batch(batch: dict[str, list], tokenizer: Any, max_length: int, overlong: str) -> dict[str, list]:
    out: dict[str, list] = {"chosen_input_ids": [], "rejected_input_ids": [], "status": []}
    for chosen_messages, rejected_messages in zip(batch["chosen"], batch["rejected"]):
        chosen, rejected, truncated = tokenize_pair(tokenizer, {"chosen": chosen_messages, "rejected": rejected_messages}, max_length)
        status = ("truncated" if overlong == "truncate" else "overlong") if truncated else "ok"
        if status != "overlong" and chosen == rejected:
            status = "unsupervised"  # nothing left to tell the two apart
        out["chosen_input_ids"].append(chosen)
        out["rejected_input_ids"].append(rejected)
        out["status"].append(status)
    return out


def pair_collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of 2B rows: the B chosen sequences, then the B rejected ones."""
    rows = [e["chosen_input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
    input_ids, attention_mask = pad_rows(rows, pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class PairCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return pair_collate(examples, self.pad_token_id)
