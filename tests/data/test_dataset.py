"""Files -> tokenized datasets and their report; the sampler; the collator."""

import json
from pathlib import Path

import pytest
import torch

from conftest import shared_data

from tunelab.config import DataConfig
from tunelab.data import IGNORE_INDEX, PadCollator, ResumableSampler, build_datasets
from tunelab.errors import TunelabError



def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _qa(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"What is {i} plus one?", "completion": f"It is {i + 1}."} for i in range(start, start + n)]


def _cfg(tmp_path, path, **kwargs) -> DataConfig:
    return DataConfig(path=str(path), cache_dir=str(tmp_path), **kwargs)


def test_build_datasets_basic(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "train.jsonl", _qa(5))
    train, val, report = build_datasets(_cfg(tmp_path, path), tokenizer, max_length=256)
    assert val is None
    assert len(train) == 5
    assert set(train.column_names) == {"input_ids", "labels"}
    assert report.train.records == report.train.examples == 5
    assert report.train.truncated == report.train.dropped_overlong == report.train.dropped_unsupervised == 0
    assert report.train.tokens == sum(len(ids) for ids in train["input_ids"])
    first = train[0]
    supervised = [t for t in first["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "It is 1.<|im_end|>"
    assert report.train.supervised_tokens == sum(
        sum(1 for t in labels[1:] if t != IGNORE_INDEX) for labels in train["labels"]
    )


def test_tokenized_data_is_cached_in_data_cache_dir(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "train.jsonl", _qa(3))
    cache = tmp_path / "cache"
    cache.mkdir()
    build_datasets(DataConfig(path=path, cache_dir=str(cache)), tokenizer, max_length=128)
    assert list(cache.glob("*.arrow"))


def test_data_cache_dir_is_created_when_missing(tmp_path, tokenizer):
    # Regression: data.cache_dir used to go through resolve_path(), which required it to exist.
    path = _jsonl(tmp_path / "train.jsonl", _qa(3))
    cache = tmp_path / "new" / "cache"
    build_datasets(DataConfig(path=path, cache_dir=str(cache)), tokenizer, max_length=128)
    assert list(cache.glob("*.arrow"))


def test_overlong_truncate_truncates_and_counts(tmp_path, tokenizer):
    rows = _qa(3) + [{"prompt": "Tell me a long story.", "completion": "once " * 300}]
    path = _jsonl(tmp_path / "train.jsonl", rows)
    train, _, report = build_datasets(_cfg(tmp_path, path, overlong="truncate"), tokenizer, max_length=96)
    assert len(train) == 4
    assert report.train.truncated == 1
    assert report.train.dropped_overlong == 0
    assert max(len(ids) for ids in train["input_ids"]) == 96
    assert len(train[3]["labels"]) == 96


def test_overlong_drop_drops_and_counts(tmp_path, tokenizer):
    rows = _qa(3) + [{"prompt": "Tell me a long story.", "completion": "once " * 300}]
    path = _jsonl(tmp_path / "train.jsonl", rows)
    train, _, report = build_datasets(_cfg(tmp_path, path, overlong="drop"), tokenizer, max_length=96)
    assert len(train) == 3
    assert report.train.records == 4
    assert report.train.dropped_overlong == 1
    assert report.train.truncated == 0
    assert all(len(ids) <= 96 for ids in train["input_ids"])


def test_reply_entirely_truncated_away_is_dropped_as_unsupervised(tmp_path, tokenizer):
    rows = _qa(2) + [{"prompt": "word " * 300, "completion": "Short answer."}]
    path = _jsonl(tmp_path / "train.jsonl", rows)
    train, _, report = build_datasets(_cfg(tmp_path, path, overlong="truncate"), tokenizer, max_length=96)
    assert len(train) == 2
    assert report.train.dropped_unsupervised == 1
    assert report.train.truncated == 0  # counted once, as unsupervised
    for labels in train["labels"]:
        assert any(t != IGNORE_INDEX for t in labels[1:])


def test_empty_after_filtering_raises(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "train.jsonl", [{"prompt": "word " * 300, "completion": "x"}] * 2)
    with pytest.raises(TunelabError) as info:
        build_datasets(_cfg(tmp_path, path, overlong="drop"), tokenizer, max_length=32)
    message = str(info.value)
    assert "training set is empty" in message
    assert "2 records" in message
    assert "max_length=32" in message


def test_no_path_raises(tmp_path, tokenizer):
    with pytest.raises(TunelabError, match=r"data\.path"):
        build_datasets(DataConfig(cache_dir=str(tmp_path)), tokenizer, max_length=64)


def test_missing_file_names_path(tmp_path, tokenizer):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(TunelabError) as info:
        build_datasets(_cfg(tmp_path, missing), tokenizer, max_length=64)
    assert str(missing) in str(info.value)
    assert "data.path" in str(info.value)


def test_max_samples_takes_the_first_n(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "train.jsonl", _qa(10))
    train, _, report = build_datasets(_cfg(tmp_path, path, max_samples=3), tokenizer, max_length=128)
    assert report.train.records == 3
    replies = [tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) for labels in train["labels"]]
    assert replies == ["It is 1.<|im_end|>", "It is 2.<|im_end|>", "It is 3.<|im_end|>"]


def _replies(tokenizer, dataset) -> list[str]:
    return [tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) for labels in dataset["labels"]]


def test_val_fraction_splits_disjointly_and_reproducibly(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "train.jsonl", _qa(20))
    cfg = _cfg(tmp_path, path, val_fraction=0.25, seed=7)
    train, val, report = build_datasets(cfg, tokenizer, max_length=128)
    assert (len(train), len(val)) == (15, 5)
    assert (report.train.examples, report.val.examples) == (15, 5)
    train_replies, val_replies = set(_replies(tokenizer, train)), set(_replies(tokenizer, val))
    assert not train_replies & val_replies
    assert len(train_replies | val_replies) == 20

    again_train, again_val, _ = build_datasets(cfg, tokenizer, max_length=128)
    assert _replies(tokenizer, again_val) == _replies(tokenizer, val)
    assert _replies(tokenizer, again_train) == _replies(tokenizer, train)

    _, other_val, _ = build_datasets(_cfg(tmp_path, path, val_fraction=0.25, seed=8), tokenizer, max_length=128)
    assert set(_replies(tokenizer, other_val)) != val_replies


def test_val_fraction_out_of_range(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "train.jsonl", _qa(4))
    with pytest.raises(TunelabError, match=r"val_fraction"):
        build_datasets(_cfg(tmp_path, path, val_fraction=1.5), tokenizer, max_length=128)


def test_val_path_and_max_val_samples(tmp_path, tokenizer):
    train_path = _jsonl(tmp_path / "train.jsonl", _qa(4))
    val_path = _jsonl(tmp_path / "val.jsonl", _qa(3, start=100))
    cfg = _cfg(tmp_path, train_path, val_path=val_path, val_fraction=0.5, max_val_samples=2)
    train, val, report = build_datasets(cfg, tokenizer, max_length=128)
    assert len(train) == 4  # val_path wins over val_fraction: nothing is held out of train
    assert _replies(tokenizer, val) == ["It is 101.<|im_end|>", "It is 102.<|im_end|>"]
    assert report.val.records == 2


def test_text_format_dataset(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("Alpha beta gamma.\n\nDelta epsilon.\n", encoding="utf-8")
    train, _, report = build_datasets(_cfg(tmp_path, path, format="text"), tokenizer, max_length=64)
    assert len(train) == 2
    assert train[0]["labels"] == train[0]["input_ids"]
    assert train[0]["input_ids"][-1] == tokenizer.eos_token_id


def test_real_gsm8k_file(tmp_path, tokenizer):
    path = shared_data("gsm8k", "train.jsonl")
    cfg = _cfg(
        tmp_path, path, prompt_field="question", completion_field="answer", max_samples=16, val_fraction=0.25
    )
    train, val, report = build_datasets(cfg, tokenizer, max_length=512)
    assert report.train.records + report.val.records == 16
    assert (len(train), len(val)) == (12, 4)
    assert report.train.dropped_unsupervised == report.train.dropped_overlong == 0
    for reply in _replies(tokenizer, train) + _replies(tokenizer, val):
        assert "####" in reply  # GSM8K answers end with '#### <number>'
        assert reply.endswith("<|im_end|>")


# ---------------------------------------------------------------- collate


def test_pad_collate_masks_padding_but_keeps_eos_labels(tokenizer):
    eos = tokenizer.eos_token_id
    examples = [
        {"input_ids": [5, 6, eos], "labels": [IGNORE_INDEX, 6, eos]},
        {"input_ids": [7], "labels": [IGNORE_INDEX]},
    ]
    batch = PadCollator(tokenizer.pad_token_id)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, eos], [7, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, eos], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["input_ids"].dtype == torch.long


# ---------------------------------------------------------------- sampler


def test_sampler_same_seed_and_epoch_same_order():
    a, b = ResumableSampler(50, shuffle=True, seed=3), ResumableSampler(50, shuffle=True, seed=3)
    a.set_position(2)
    b.set_position(2)
    assert list(a) == list(b)
    assert sorted(a) == list(range(50))
    assert list(a) != list(range(50))


def test_sampler_epochs_and_seeds_differ():
    sampler = ResumableSampler(50, shuffle=True, seed=3)
    sampler.set_position(0)
    epoch0 = list(sampler)
    sampler.set_position(1)
    assert list(sampler) != epoch0
    other = ResumableSampler(50, shuffle=True, seed=4)
    assert list(other) != epoch0


def test_sampler_without_shuffle_is_in_order():
    assert list(ResumableSampler(5, shuffle=False, seed=0)) == [0, 1, 2, 3, 4]


def test_sampler_start_skips_consumed_samples():
    sampler = ResumableSampler(20, shuffle=True, seed=1)
    sampler.set_position(4)
    full = list(sampler)
    sampler.set_position(4, start=7)
    assert list(sampler) == full[7:]
    assert len(sampler) == 13


def test_sampler_two_ranks_partition_the_indices():
    ranks = [ResumableSampler(21, shuffle=True, seed=9, rank=r, world_size=2) for r in range(2)]
    for sampler in ranks:
        sampler.set_position(1)
    shares = [list(s) for s in ranks]
    assert [len(s) for s in ranks] == [len(share) for share in shares] == [10, 10]
    assert not set(shares[0]) & set(shares[1])
    assert len(set(shares[0]) | set(shares[1])) == 20  # one sample is left over so the ranks stay even
    single = ResumableSampler(21, shuffle=True, seed=9)
    single.set_position(1)
    assert set(shares[0]) | set(shares[1]) <= set(single)


def test_tokenizing_with_two_processes_gives_the_same_examples(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "train.jsonl", _qa(150))
    one, _, _ = build_datasets(_cfg(tmp_path / "a", path), tokenizer, max_length=256)
    two, _, report = build_datasets(_cfg(tmp_path / "b", path, num_proc=2), tokenizer, max_length=256)
    assert report.train.examples == 150
    assert one["input_ids"] == two["input_ids"] and one["labels"] == two["labels"]


def test_sampler_length_grouping_sorts_within_groups_and_keeps_every_index():
    lengths = [(i * 37) % 101 for i in range(50)]
    plain = list(ResumableSampler(50, shuffle=True, seed=2))
    grouped = list(ResumableSampler(50, shuffle=True, seed=2, lengths=lengths, group_size=10))
    assert sorted(grouped) == list(range(50))
    for g in range(5):  # the same examples per group as the plain shuffle, longest first
        assert sorted(grouped[10 * g : 10 * g + 10]) == sorted(plain[10 * g : 10 * g + 10])
        group_lengths = [lengths[i] for i in grouped[10 * g : 10 * g + 10]]
        assert group_lengths == sorted(group_lengths, reverse=True)


def test_sampler_length_grouping_cuts_padding_and_resumes(tmp_path):
    lengths = [(i * 37) % 101 + 1 for i in range(64)]

    def padded(order, batch=4):
        return sum(batch * max(lengths[i] for i in order[k : k + batch]) for k in range(0, len(order), batch))

    plain = list(ResumableSampler(64, shuffle=True, seed=5))
    sampler = ResumableSampler(64, shuffle=True, seed=5, lengths=lengths, group_size=32)
    grouped = list(sampler)
    assert padded(grouped) < 0.8 * padded(plain)
    sampler.start = 12  # resume mid-epoch: the rest of the same grouped order
    assert list(sampler) == grouped[12:]


def test_the_data_summary_names_only_what_happened_and_the_policy_that_did_it():
    """A truncating run said '3 truncated to 384 tokens, 0 dropped as longer than 384
    (data.overlong=drop)', which read as a contradiction (issue 21)."""
    from tunelab.data.dataset import SplitReport, describe_split

    truncating = describe_split(SplitReport(records=40, examples=40, truncated=3, tokens=9000, supervised_tokens=4000), 384, "truncate")
    assert truncating == "40 training examples (9000 tokens, 4000 supervised) from 40 records; 3 longer than 384 tokens truncated (data.overlong=truncate)"
    dropping = describe_split(SplitReport(records=40, examples=37, dropped_overlong=3, tokens=8000), 384, "drop")
    assert dropping == "37 training examples (8000 tokens) from 40 records; 3 longer than 384 tokens dropped (data.overlong=drop)"
    assert "drop" not in truncating and "truncat" not in dropping
