"""Conversation / text -> input_ids and labels (tunelab.data.tokenize)."""

import copy

import pytest

from tunelab.data import IGNORE_INDEX, render, tokenize_conversation, tokenize_text
from tunelab.data.tokenize import FALLBACK_CHAT_TEMPLATE, tokenize_batch

CONVERSATION = [
    {"role": "system", "content": "You are a careful tutor."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 equals 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "3+3 equals 6."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]
REPLIES = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
PROMPTS = [m["content"] for m in CONVERSATION if m["role"] != "assistant"]


def supervised_runs(labels: list[int]) -> list[list[int]]:
    """Contiguous runs of supervised label ids."""
    runs, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    if current:
        runs.append(current)
    return runs


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    """The same tokenizer without a chat template (a base model's)."""
    copied = copy.deepcopy(tokenizer)
    copied.chat_template = None
    return copied


def test_tokenizer_shares_pad_and_eos(tokenizer):
    # The EOS tests below only mean something because pad and EOS are the same token.
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


def test_labels_are_input_ids_or_ignore(tokenizer):
    ids, labels = tokenize_conversation(tokenizer, CONVERSATION)
    assert len(ids) == len(labels)
    assert all(label in (token, IGNORE_INDEX) for token, label in zip(ids, labels))
    assert labels[0] == IGNORE_INDEX  # the conversation starts with the system turn


def test_every_assistant_turn_is_supervised_and_nothing_else(tokenizer):
    ids, labels = tokenize_conversation(tokenizer, CONVERSATION)
    runs = [tokenizer.decode(run) for run in supervised_runs(labels)]
    # Exactly one supervised span per assistant turn: its content and its end-of-turn token.
    assert runs == [reply + "<|im_end|>" for reply in REPLIES]
    unsupervised = tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE_INDEX])
    for prompt in PROMPTS:
        assert prompt in unsupervised
    for reply in REPLIES:
        assert reply not in unsupervised
    assert "assistant" in unsupervised  # the role header is the prompt's, not the model's to say


def test_end_of_turn_token_after_each_reply_is_supervised(tokenizer):
    """EOS supervision: <|im_end|> is also the pad token, yet the model must learn to emit it
    after every reply (and only there)."""
    ids, labels = tokenize_conversation(tokenizer, CONVERSATION)
    eos = tokenizer.eos_token_id
    eos_positions = [i for i, token in enumerate(ids) if token == eos]
    # system, 3 user and 3 assistant turns each end with <|im_end|>
    assert len(eos_positions) == 7
    supervised_eos = [i for i in eos_positions if labels[i] == eos]
    assert len(supervised_eos) == len(REPLIES) == 3
    for position in supervised_eos:
        assert labels[position - 1] != IGNORE_INDEX  # it directly follows the reply's last token
    # The ones that end system and user turns carry no loss.
    assert all(labels[i] == IGNORE_INDEX for i in set(eos_positions) - set(supervised_eos))
    # The final token of the conversation (a newline after the last <|im_end|>) is not supervised.
    assert ids[-1] != eos and labels[-1] == IGNORE_INDEX


def test_default_system_prompt_of_the_template_is_not_supervised(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    text = render(tokenizer, messages)
    assert "SmolLM" in text  # the ChatML template adds its own system prompt
    ids, labels = tokenize_conversation(tokenizer, messages)
    assert [tokenizer.decode(r) for r in supervised_runs(labels)] == ["Hello.<|im_end|>"]


def test_conversation_opening_with_assistant_supervises_only_replies(tokenizer):
    messages = [
        {"role": "assistant", "content": "Welcome!"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    _, labels = tokenize_conversation(tokenizer, messages)
    assert [tokenizer.decode(r) for r in supervised_runs(labels)] == ["Welcome!<|im_end|>", "Hello.<|im_end|>"]


def test_text_supervises_every_token_and_ends_with_eos(tokenizer):
    ids, labels = tokenize_text(tokenizer, "The quick brown fox jumps over the lazy dog.")
    assert labels == ids
    assert ids[-1] == tokenizer.eos_token_id
    assert ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(ids) == "The quick brown fox jumps over the lazy dog.<|im_end|>"


def test_text_already_ending_with_eos_gets_no_second_one(tokenizer):
    ids, _ = tokenize_text(tokenizer, "Done.<|im_end|>")
    assert ids[-1] == tokenizer.eos_token_id
    assert ids[-2] != tokenizer.eos_token_id


def test_fallback_template_without_chat_template(tokenizer, plain_tokenizer):
    assert tokenizer.chat_template, "the deepcopy must not touch the shared fixture"
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    text = render(plain_tokenizer, messages)
    assert text == plain_tokenizer.apply_chat_template(messages, chat_template=FALLBACK_CHAT_TEMPLATE, tokenize=False)
    assert text.startswith("user: Name a colour.")
    assert "assistant: Blue.<|im_end|>" in text

    ids, labels = tokenize_conversation(plain_tokenizer, messages)
    runs = supervised_runs(labels)
    assert len(runs) == 1
    assert plain_tokenizer.decode(runs[0]).strip() == "Blue.<|im_end|>"
    eos = plain_tokenizer.eos_token_id
    assert runs[0][-1] == eos  # the reply's EOS is supervised
    assert "Name a colour" in plain_tokenizer.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX])


def test_fallback_template_puts_each_turn_on_its_own_line(plain_tokenizer):
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    assert render(plain_tokenizer, messages) == "user: Name a colour.\nassistant: Blue.<|im_end|>\n"
    assert render(plain_tokenizer, messages[:1], add_generation_prompt=True) == "user: Name a colour.\nassistant: "


def test_fallback_template_multi_turn(plain_tokenizer):
    ids, labels = tokenize_conversation(plain_tokenizer, CONVERSATION)
    runs = [plain_tokenizer.decode(run).strip() for run in supervised_runs(labels)]
    assert runs == [reply + "<|im_end|>" for reply in REPLIES]


def test_tokenize_batch_statuses(tokenizer):
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    long_reply = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 200}]
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "Yes."}]
    batch = {"messages": [short, long_reply, long_prompt]}

    out = tokenize_batch(batch, tokenizer, max_length=64, overlong="truncate")
    assert out["status"] == ["ok", "truncated", "unsupervised"]
    assert all(len(ids) <= 64 for ids in out["input_ids"])
    assert len(out["input_ids"][1]) == len(out["labels"][1]) == 64
    assert out["labels"][1][-1] != IGNORE_INDEX  # truncated inside the reply: still supervised

    out = tokenize_batch(batch, tokenizer, max_length=64, overlong="drop")
    assert out["status"] == ["ok", "overlong", "overlong"]


def test_tokenize_batch_text(tokenizer):
    out = tokenize_batch({"text": ["one two three", "four"]}, tokenizer, max_length=3, overlong="truncate")
    assert out["status"] == ["truncated", "ok"]
    assert out["labels"] == out["input_ids"]
    assert len(out["input_ids"][0]) == 3
