"""Conversation or text -> input_ids and labels, with -100 wherever no loss is taken.

Conversations are rendered with the tokenizer's chat template. The supervised spans are found
in characters (each assistant reply through its end-of-turn token) and mapped onto tokens with
the tokenizer's offsets, so labels never depend on which id the pad token happens to share.
"""

from typing import Any

from tunelab.data.constants import IGNORE_INDEX
from tunelab.errors import TunelabError

# For tokenizers without a chat template (base models): plain role prefixes, EOS ends each reply.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    template = tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of every assistant reply."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        upto = render(tokenizer, messages[: i + 1])
        if i == 0:  # templates cannot render an empty prefix: find the reply inside its own turn
            reply_end = upto.rfind(message["content"]) + len(message["content"]) if message["content"] else len(upto)
            before = upto[: reply_end - len(message["content"])]
        else:
            before = render(tokenizer, messages[:i], add_generation_prompt=True)
        if not (text.startswith(before) and text.startswith(upto)):
            raise TunelabError(
                "The tokenizer's chat template renders a conversation differently from its own "
                "prefixes, so assistant turns cannot be located for the loss mask. Use a model whose "
                "template is prefix-stable (ChatML, Llama 3, ...) or set a simpler template."
            )
        # The reply runs through its end-of-turn token; the newline after it is not the model's to say.
        spans.append((len(before), len(upto.rstrip())))
    return text, spans


def tokenize_conversation(tokenizer, messages: list[dict], from_message: int = 0) -> tuple[list[int], list[int]]:
    """Token ids and labels; the assistant replies at or after message ``from_message`` are supervised."""
    text, spans = assistant_spans(tokenizer, messages)
    starts = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = [span for i, span in zip(starts, spans) if i >= from_message]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), supervision_labels(encoded["input_ids"], encoded["offset_mapping"], spans)


def supervision_labels(ids: list[int], offsets: list, spans: list[tuple[int, int]]) -> list[int]:
    """A token is supervised (its label is itself) when its characters overlap a supervised span,
    else IGNORE_INDEX. Spans are sorted and disjoint and token offsets never go backwards, so one
    pass over both suffices (the data toolkit labels whole files with it)."""
    labels, k = [], 0
    for token, (start, end) in zip(ids, offsets):
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        inside = k < len(spans) and spans[k][0] < end and start < spans[k][1]
        labels.append(token if inside else IGNORE_INDEX)
    return labels


def tokenize_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return ids, list(ids)


def tokenize_batch(batch: dict[str, list], tokenizer: Any, max_length: int, overlong: str) -> dict[str, list]:
    """``datasets.map`` function for conversations and texts: adds input_ids, labels and a status per example
    (ok, truncated, overlong, unsupervised); examples not ok or truncated are filtered out later."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "status": []}
    rows = batch["messages"] if "messages" in batch else batch["text"]
    for row in rows:
        ids, labels = tokenize_conversation(tokenizer, row) if "messages" in batch else tokenize_text(tokenizer, row)
        status = "ok"
        if len(ids) > max_length:
            status = "truncated" if overlong == "truncate" else "overlong"
            ids, labels = ids[:max_length], labels[:max_length]
        # The first label is never predicted (nothing comes before it), so it does not count.
        if status != "overlong" and all(label == IGNORE_INDEX for label in labels[1:]):
            status = "unsupervised"
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["status"].append(status)
    return out


# ----------------------------------------------------------------------------- preference pairs
# A pair is two conversations, chosen and rejected (``preference.to_preference``). Reward models
# read each side whole; DPO-style methods score only the completion, the replies after the
# messages both sides share.


def tokenize_pair(tokenizer, pair: dict, max_length: int) -> tuple[list[int], list[int], bool]:
    """Token ids of both sides, whole. Overlong sides keep their last ``max_length`` tokens: the
    replies that differ sit at the end, and a reward model reads its score at the last token."""
    ids = [tokenizer(render(tokenizer, pair[n]), add_special_tokens=False)["input_ids"] for n in ("chosen", "rejected")]
    truncated = any(len(x) > max_length for x in ids)
    chosen, rejected = (x[-max_length:] for x in ids)
    return chosen, rejected, truncated


def shared_prefix(chosen: list[dict], rejected: list[dict]) -> int:
    """How many leading messages the two sides share: the prompt. The completion is the rest."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return n


def tokenize_completion(tokenizer, messages: list[dict], prompt_messages: int, max_length: int, max_prompt_length: int):
    """One side of a pair for DPO: ids and labels (only the completion's assistant replies, each
    through its end-of-turn token, are supervised), and whether anything was cut.

    A prompt longer than ``max_prompt_length`` keeps its last tokens (the end of the conversation
    is what the reply answers); then a sequence longer than ``max_length`` loses the end of its
    completion.
    """
    ids, labels = tokenize_conversation(tokenizer, messages, from_message=prompt_messages)
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    cut = max(0, first - max_prompt_length)
    truncated = cut > 0 or len(ids) - cut > max_length
    return ids[cut : cut + max_length], labels[cut : cut + max_length], truncated


def tokenize_pairs_batch(batch: dict[str, list], tokenizer: Any, max_length: int, overlong: str) -> dict[str, list]:
    """``datasets.map`` function for reward-model pairs: both sides whole (``tokenize_pair``)."""
    out: dict[str, list] = {"chosen_input_ids": [], "rejected_input_ids": [], "status": []}
    for chosen_messages, rejected_messages in zip(batch["chosen"], batch["rejected"]):
        chosen, rejected, truncated = tokenize_pair(tokenizer, {"chosen": chosen_messages, "rejected": rejected_messages}, max_length)
        status = ("truncated" if overlong == "truncate" else "overlong") if truncated else "ok"
        if status != "overlong" and chosen == rejected:
            status = "identical"  # nothing left to tell the two apart
        out["chosen_input_ids"].append(chosen)
        out["rejected_input_ids"].append(rejected)
        out["status"].append(status)
    return out


def tokenize_completion_pairs_batch(
    batch: dict[str, list], tokenizer: Any, max_length: int, overlong: str, max_prompt_length: int
) -> dict[str, list]:
    """``datasets.map`` function for DPO pairs: ids and completion-only labels of both sides.

    A pair is dropped (by its status) when either completion has no supervised token left after
    truncation, or when the two completions are the same tokens: such a pair has no preference to
    learn, and a zero-token side turns a log-probability average into NaN.
    """
    out: dict[str, list] = {name: [] for name in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "status")}
    for chosen_messages, rejected_messages in zip(batch["chosen"], batch["rejected"]):
        prompt = shared_prefix(chosen_messages, rejected_messages)
        sides = [tokenize_completion(tokenizer, m, prompt, max_length, max_prompt_length) for m in (chosen_messages, rejected_messages)]
        (chosen, chosen_labels, cut_c), (rejected, rejected_labels, cut_r) = sides
        status = ("truncated" if overlong == "truncate" else "overlong") if (cut_c or cut_r) else "ok"
        if status != "overlong":
            if all(t == IGNORE_INDEX for t in chosen_labels[1:]) or all(t == IGNORE_INDEX for t in rejected_labels[1:]):
                status = "unsupervised"
            elif [t for t in chosen_labels if t != IGNORE_INDEX] == [t for t in rejected_labels if t != IGNORE_INDEX]:
                status = "identical"
        for name, value in zip(out, (chosen, chosen_labels, rejected, rejected_labels, status)):
            out[name].append(value)
    return out


def tokenize_prompts_batch(batch: dict[str, list], tokenizer: Any, max_length: int, overlong: str) -> dict[str, list]:
    """``datasets.map`` function for prompts to generate from (online RL): the prompt rendered
    with the chat template and the assistant's turn opened (``input_ids``; nothing is
    supervised), the prompt messages and the record's other fields kept (JSON) for the reward
    functions. A prompt longer than ``max_length`` keeps its last tokens (data.overlong=truncate)."""
    import json

    out: dict[str, list] = {"input_ids": [], "prompt": [], "columns": [], "status": []}
    for messages, columns in zip(batch["prompt_messages"], batch["columns"]):
        ids = tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        status = "ok"
        if len(ids) > max_length:
            status = "truncated" if overlong == "truncate" else "overlong"
            ids = ids[-max_length:]
        out["input_ids"].append(ids)
        out["prompt"].append(json.dumps(messages))
        out["columns"].append(columns)
        out["status"].append(status)
    return out
