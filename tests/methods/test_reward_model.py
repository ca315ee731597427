"""Bradley-Terry reward modeling: pair data, batches, the stable loss, reward position with
pad == eos, and a trained model that transformers reloads."""

import json

import pytest
import torch

from tunelab.config import compose_config
from tunelab.data import Record, pair_collate, tokenize_pair
from tunelab.data.preference import parse_transcript, to_preference
from tunelab.engine import train
from tunelab.errors import TunelabError
from tunelab.methods.bradley_terry_rm import bradley_terry_loss, rewards

HH = {
    "chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt.",
    "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: I won't help.",
}


def test_preference_records_in_every_shape():
    explicit = to_preference(Record({"prompt": "Q?", "chosen": "good", "rejected": "bad"}, "x line 1"))
    assert explicit["chosen"] == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "good"}]
    transcripts = to_preference(Record(HH, "x line 2"))
    assert transcripts["chosen"][0] == {"role": "user", "content": "How do I bake bread?"}
    assert transcripts["rejected"][-1] == {"role": "assistant", "content": "I won't help."}
    chat = to_preference(Record({"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                                 "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}]}, "x"))  # fmt: skip
    assert chat["rejected"][-1]["content"] == "go"
    assert parse_transcript("no markers here") is None
    with pytest.raises(TunelabError, match="line 3.*no 'rejected'"):
        to_preference(Record({"chosen": "a"}, "x line 3"))


def test_overlong_pairs_keep_their_ends(tokenizer):
    pair = to_preference(Record({"prompt": "word " * 300, "chosen": "yes", "rejected": "no"}, "x"))
    chosen, rejected, truncated = tokenize_pair(tokenizer, pair, max_length=32)
    assert truncated and len(chosen) == len(rejected) == 32
    assert "yes" in tokenizer.decode(chosen) and "no" in tokenizer.decode(rejected)


def test_collate_stacks_all_chosen_then_all_rejected():
    batch = pair_collate([{"chosen_input_ids": [1, 2, 3], "rejected_input_ids": [4]},
                          {"chosen_input_ids": [5], "rejected_input_ids": [6, 7]}], pad_token_id=0)  # fmt: skip
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, 0, 0], [4, 0, 0], [6, 7, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 1, 1, 2]


@pytest.fixture(scope="module")
def reward_model(tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return LlamaForSequenceClassification(config).eval()


def test_reward_is_read_at_the_last_real_token_when_pad_is_eos(tokenizer, reward_model):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    short = tokenizer("Hello there", add_special_tokens=False)["input_ids"] + [eos]  # ends with eos == pad
    long = [eos] + tokenizer("A longer sequence with eos inside", add_special_tokens=False)["input_ids"] + [eos, 42]
    batch = pair_collate([{"chosen_input_ids": short, "rejected_input_ids": long}], pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        batched = rewards(reward_model, batch)
        # each sequence alone, unpadded, scored at its final position
        alone = [reward_model.score(reward_model.model(torch.tensor([ids])).last_hidden_state)[0, -1, 0].item()
                 for ids in (short, long)]  # fmt: skip
        pooled_by_transformers = reward_model(**batch).logits[:, 0]
    assert batched.tolist() == pytest.approx(alone, abs=1e-5)
    # transformers' own pooling looks for the last non-pad token, so it misses the final eos
    assert pooled_by_transformers[0].item() != pytest.approx(alone[0], abs=1e-3)


def test_bradley_terry_loss_is_stable_and_counts_accuracy():
    class Fixed(torch.nn.Module):
        def __init__(self, values):
            super().__init__()
            self.values = values
            self.score = torch.nn.Identity()

        def forward(self, input_ids, attention_mask, use_cache=False):
            return self.score(self.values.view(-1, 1, 1).expand(-1, input_ids.shape[1], 1))

    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3, dtype=torch.long)}
    loss, pairs, extra = bradley_terry_loss(Fixed(torch.tensor([1000.0, -500.0, -1000.0, 500.0])), batch)
    assert pairs == 2 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(1000.0)  # -log σ(2000) ≈ 0, -log σ(-1000) = 1000
    assert extra == {"accuracy": 1, "margin": 1000.0}


def test_odd_batch_size_is_a_config_error(tmp_path):
    with pytest.raises(TunelabError, match="batch_size=3 is odd"):
        train(compose_config(["method=lm_finetune/bradley_terry_rm", "modelpool=SequenceClassificationModelPool/tiny-llama",
                              "method.dataloader_kwargs.batch_size=3", f"output_dir={tmp_path}"]))  # fmt: skip


def test_reward_model_trains_and_reloads_in_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = tmp_path / "pairs.jsonl"
    good = ["Mix flour, water, yeast and salt, then bake.", "Preheat the oven and knead the dough well."]
    rows = [{"prompt": f"Question {i}: how do I bake bread?", "chosen": good[i % 2], "rejected": "No."} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = train(compose_config([
        "method=lm_finetune/bradley_terry_rm", "modelpool=SequenceClassificationModelPool/tiny-llama",
        f"data.path={data}", "data.format=preference", "data.val_fraction=0.25", f"data.cache_dir={tmp_path / 'cache'}",
        "taskpool=reward_accuracy", "taskpool.every_n_steps=0", "method.optimizer.lr=3e-3",
        "method.lr_scheduler.warmup_steps=1", "method.max_epochs=3", "method.dataloader_kwargs.batch_size=4",
        "method.fix_token_embedding=false", "method.save_ckpt_type=hf", f"output_dir={tmp_path / 'rm'}", "progress_bar=false",
    ]))  # fmt: skip
    first, last = result.evaluations[0], result.evaluations[max(result.evaluations)]
    assert last["val/accuracy"] == 1.0 and last["val/loss"] < first["val/loss"]
    assert last["val/accuracy_ci95_low"] > 0.5 and last["val/pairs"] == 6
    model = AutoModelForSequenceClassification.from_pretrained(result.final_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.final_checkpoint)

    def score(reply):
        messages = [{"role": "user", "content": "Question 99: how do I bake bread?"}, {"role": "assistant", "content": reply}]
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            return model(**ids).logits[0, 0].item()

    assert score(good[0]) > score("No.")
