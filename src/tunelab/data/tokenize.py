"""Conversation or text -> input_ids and labels, with -100 wherever no loss is taken.

Conversations are rendered with the tokenizer's chat template. The supervised spans are found
in characters (each assistant reply through its end-of-turn token) and mapped onto tokens with
the tokenizer's offsets, so labels never depend on which id the pad token happens to share.
"""

from typing import Any

from tunelab.errors import TunelabError

IGNORE_INDEX = -100

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


def tokenize_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        inside = any(start < s_end and end > s_start for s_start, s_end in spans)
        labels.append(token if inside else IGNORE_INDEX)
    return list(encoded["input_ids"]), labels


def tokenize_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return ids, list(ids)


def tokenize_batch(batch: dict[str, list], tokenizer: Any, max_length: int, overlong: str) -> dict[str, list]:
    """``datasets.map`` function: adds input_ids, labels and a status per example
    (ok, truncated, overlong, unsupervised); examples not ok or truncated are filtered out later."""
    if "chosen" in batch:
        from tunelab.data.preference import tokenize_pairs_batch

        return tokenize_pairs_batch(batch, tokenizer, max_length, overlong)
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
