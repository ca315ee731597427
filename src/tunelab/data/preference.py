"""Preference records -> pairs of conversations, ``{"chosen": messages, "rejected": messages}``
(the format stage; ``tokenize`` and ``collate`` take the pairs on from there)."""

import re
from typing import Any

from tunelab.data.readers import Record
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
