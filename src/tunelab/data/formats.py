"""Record -> a conversation (a list of {role, content} messages) or a raw text.

Every format ends as one of those two shapes, so one tokenizer path renders them all.
"""

import json
from typing import Any

from tunelab.config.schema import DataConfig
from tunelab.data.preference import parse_transcript, to_preference
from tunelab.data.readers import Record
from tunelab.errors import TunelabError

_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bot": "assistant", "model": "assistant",
    "system": "system",
}  # fmt: skip
_OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


def _fail(record: Record, message: str) -> TunelabError:
    return TunelabError(f"Data {record.where}: {message}")


def _field(record: Record, name: str, option: str, kind: type = str, optional: bool = False) -> Any:
    if name not in record.fields or record.fields[name] is None:
        if optional:
            return None
        present = ", ".join(sorted(record.fields)) or "none"
        raise _fail(
            record,
            f"the record has no field '{name}' ({option}). Its fields are: {present}. "
            f"Set {option}=FIELD to the right name, or choose another data.format.",
        )
    value = record.fields[name]
    if not isinstance(value, kind):
        raise _fail(record, f"field '{name}' must be a {kind.__name__}, got {type(value).__name__}.")
    return value


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}] + messages
    return messages


def _alpaca(record: Record, cfg: DataConfig) -> list[dict]:
    instruction = _field(record, "instruction", "the alpaca field 'instruction'")
    extra = _field(record, "input", "the alpaca field 'input'", optional=True)
    output = _field(record, "output", "the alpaca field 'output'")
    messages = []
    for turn in _field(record, "history", "the alpaca field 'history'", kind=list, optional=True) or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise _fail(record, "every item of 'history' must be a [question, answer] pair of strings.")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return _with_system(messages, _field(record, "system", "the alpaca field 'system'", optional=True) or cfg.system_prompt)


def _turns(record: Record, cfg: DataConfig, default_field: str, role_key: str, text_key: str, roles: dict) -> list[dict]:
    field = cfg.messages_field or default_field
    turns = _field(record, field, "data.messages_field", kind=list)
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise _fail(record, f"{field}[{i}] must be an object with '{role_key}' and '{text_key}'.")
        role = roles.get(str(turn[role_key]).lower())
        if role is None:
            raise _fail(
                record,
                f"{field}[{i}] has {role_key}={turn[role_key]!r}; expected one of {', '.join(sorted(roles))}.",
            )
        if not isinstance(turn[text_key], str):
            raise _fail(record, f"{field}[{i}].{text_key} must be a string.")
        messages.append({"role": role, "content": turn[text_key]})
    return _with_system(messages, cfg.system_prompt)


def _prompt_completion(record: Record, cfg: DataConfig) -> list[dict]:
    prompt = _field(record, cfg.prompt_field, "data.prompt_field")
    completion = _field(record, cfg.completion_field, "data.completion_field")
    return _with_system([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], cfg.system_prompt)


def _hh_prompt(text: str) -> list[dict] | None:
    """'\\n\\nHuman: ...\\n\\nAssistant:' (an HH-RLHF prompt, ending with the turn to answer) -> messages."""
    end = "\n\nAssistant:"
    if not (text.startswith("\n\nHuman: ") and text.rstrip().endswith(end)):
        return None
    return parse_transcript(text.rstrip()[: -len(end)])


def _pair_prompt(record: Record, cfg: DataConfig) -> list[dict]:
    """The prompt of a preference pair (HH-RLHF's chosen/rejected transcripts, say): the messages
    the two conversations share, up to the answer they differ in."""
    pair = to_preference(record, None)
    chosen, rejected = pair["chosen"], pair["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1]["role"] == "assistant":  # end on the user's turn
        shared -= 1
    if not shared:
        raise _fail(record, "its chosen and rejected conversations share no prompt to generate from; give a prompt field (data.prompt_field).")
    return chosen[:shared]


def _prompt_only(record: Record, cfg: DataConfig) -> dict:
    """A prompt to generate from (online RL): its messages, and every other field of the record
    (JSON-encoded) for the reward functions, e.g. GSM8K's reference 'answer'. A preference record
    with no prompt field gives the prompt its chosen and rejected answers share."""
    if cfg.prompt_field not in record.fields and {"chosen", "rejected"} <= set(record.fields):
        columns = {k: v for k, v in record.fields.items() if k not in ("chosen", "rejected")}
        return {"prompt_messages": _with_system(_pair_prompt(record, cfg), cfg.system_prompt), "columns": json.dumps(columns)}
    value = _field(record, cfg.prompt_field, "data.prompt_field", kind=object)
    if isinstance(value, str):
        messages = _hh_prompt(value) or [{"role": "user", "content": value}]
    elif isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
    else:
        raise _fail(record, f"field '{cfg.prompt_field}' (data.prompt_field) must be a string or a non-empty list of {{role, content}} messages.")
    if messages[-1]["role"] == "assistant":
        raise _fail(record, f"the prompt in '{cfg.prompt_field}' ends with an assistant message; a prompt to answer ends with the user's turn.")
    columns = {k: v for k, v in record.fields.items() if k != cfg.prompt_field}
    return {"prompt_messages": _with_system(messages, cfg.system_prompt), "columns": json.dumps(columns)}


def to_example(record: Record, cfg: DataConfig) -> dict:
    """``{"messages": [...]}`` for chat formats, ``{"text": ...}`` for the text format,
    ``{"chosen": [...], "rejected": [...]}`` for preference pairs, ``{"prompt_messages": [...],
    "columns": "{...}"}`` for prompts to generate from."""
    if cfg.format == "text":
        return {"text": _field(record, cfg.text_field, "data.text_field")}
    if cfg.format == "preference":
        return to_preference(record, cfg.system_prompt)
    if cfg.format == "alpaca":
        return {"messages": _alpaca(record, cfg)}
    if cfg.format == "sharegpt":
        return {"messages": _turns(record, cfg, "conversations", "from", "value", _SHAREGPT_ROLES)}
    if cfg.format == "openai":
        return {"messages": _turns(record, cfg, "messages", "role", "content", _OPENAI_ROLES)}
    if cfg.format == "prompt_completion":
        return {"messages": _prompt_completion(record, cfg)}
    if cfg.format == "prompt":
        return _prompt_only(record, cfg)
    raise TunelabError(
        f"data.format={cfg.format!r} is not a known format: use alpaca, sharegpt, openai, prompt_completion, text, preference or prompt."
    )
