"""Raw text -> pretraining blocks: every token once and in order, documents continuing across
blocks, attention kept inside documents, lazy readers, the cached memory-mapped file."""

import json

import pytest
import torch

from tunelab.config import DataConfig
from tunelab.data import BlockCollator, build_text_blocks, group_blocks, iter_documents, tokenize_documents
from tunelab.data.constants import IGNORE_INDEX
from tunelab.errors import TunelabError

DOCS = [list(range(100, 107)), list(range(200, 203)), list(range(300, 312)), [400]]


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("block_size", [2, 4, 5, 23, 64])
def test_blocks_keep_every_token_once_in_order(block_size, separate):
    blocks = list(group_blocks(DOCS, block_size, separate))
    flat = [t for b in blocks for t in b["input_ids"]]
    assert flat == [t for d in DOCS for t in d]
    assert all(len(b["input_ids"]) == block_size for b in blocks[:-1]) and 0 < len(blocks[-1]["input_ids"]) <= block_size
    assert all(sum(b["segments"]) == len(b["input_ids"]) for b in blocks)
    if not separate:
        assert all(len(b["segments"]) == 1 for b in blocks)


def test_a_document_longer_than_a_block_continues_in_the_next():
    blocks = list(group_blocks(DOCS, 5, separate_documents=True))
    # 7 + 3 + 12 + 1 = 23 tokens: [5] [2, 3] [5] [5] [2, 1]
    assert [b["segments"] for b in blocks] == [[5], [2, 3], [5], [5], [2, 1]]
    assert blocks[2]["input_ids"] == [300, 301, 302, 303, 304] and blocks[4]["input_ids"] == [310, 311, 400]


def test_documents_end_with_eos(tokenizer):
    docs = list(tokenize_documents(["First Citizen:\nSpeak.", "All:\nResolved."], tokenizer, batch=1))
    assert all(d[-1] == tokenizer.eos_token_id for d in docs)
    assert tokenizer.decode(docs[0][:-1]) == "First Citizen:\nSpeak."


def test_block_collator_restarts_positions_and_masks_each_segment_start():
    blocks = [{"input_ids": [1, 2, 3, 4, 5], "segments": [2, 3]}, {"input_ids": [6, 7, 8], "segments": [3]}]
    batch = BlockCollator(pad_token_id=0, packing=True)(blocks)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 2]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 2, 5, 8]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, IGNORE_INDEX, 4, 5, IGNORE_INDEX, 7, 8]]
    padded = BlockCollator(pad_token_id=0, packing=False)([{"input_ids": [1, 2, 3], "segments": [3]}, {"input_ids": [4], "segments": [1]}])
    assert padded["labels"].tolist() == [[1, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]] and padded["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_full_blocks_go_as_plain_rows_with_the_packed_loss(tokenizer):
    """plain_rows (the GPU's collation): full one-segment blocks of one length become rows without
    mask or boundaries, with the same loss and gradient as the packed row; anything else packs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.methods.fullfinetune_sft import chunked_causal_lm_loss
    from tunelab.models.kernels import use_packed_attention

    generator = torch.Generator().manual_seed(0)
    blocks = [{"input_ids": torch.randint(0, len(tokenizer), (24,), generator=generator).tolist(), "segments": [24]} for _ in range(3)]
    rows = BlockCollator(tokenizer.pad_token_id, packing=True, plain_rows=True)(blocks)
    packed = BlockCollator(tokenizer.pad_token_id, packing=True)(blocks)
    assert set(rows) == {"input_ids", "labels", "supervised_index"} and rows["input_ids"].shape == (3, 24)
    assert rows["supervised_index"].tolist() == [r * 24 + t for r in range(3) for t in range(23)]  # all but each row's last
    assert int((rows["labels"][:, 1:] != IGNORE_INDEX).sum()) == int((packed["labels"][:, 1:] != IGNORE_INDEX).sum()) == 3 * 23
    for other in ([blocks[0], {"input_ids": blocks[1]["input_ids"][:20], "segments": [20]}],  # a shorter last block
                  [{"input_ids": blocks[0]["input_ids"], "segments": [10, 14]}, blocks[1]]):  # two documents kept apart
        assert "cu_seq_lens_q" in BlockCollator(tokenizer.pad_token_id, packing=True, plain_rows=True)(other)

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa"))  # fmt: skip
    assert use_packed_attention(model)
    results = []
    for batch in (rows, packed):
        model.zero_grad()
        loss, units, _ = chunked_causal_lm_loss(model, batch, chunk_rows=16)
        loss.backward()
        results.append((loss.detach(), int(units), [p.grad.clone() for p in model.parameters()]))
    assert results[0][1] == results[1][1]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-4)
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_attention_inside_documents_equals_each_document_alone(tokenizer):
    """A block holding the end of one document and a whole second one, packed with
    cross-document attention off, gives every position the logits of its document run alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.models.kernels import use_packed_attention

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")).eval()  # fmt: skip
    docs = list(tokenize_documents(["To be, or not to be, that is the question.", "All: Speak, speak."], tokenizer))
    blocks = list(group_blocks(docs, block_size=len(docs[0]) + len(docs[1]) - 4, separate_documents=True))
    first = blocks[0]
    assert len(first["segments"]) == 2
    batch = BlockCollator(tokenizer.pad_token_id, packing=True)([first])
    assert use_packed_attention(model)
    names = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    with torch.no_grad():
        packed = model(**{k: batch[k] for k in names}).logits[0]
        start = 0
        for length in first["segments"]:
            alone = model(torch.tensor([first["input_ids"][start : start + length]])).logits[0]
            torch.testing.assert_close(packed[start : start + length], alone, rtol=1e-4, atol=1e-4)
            start += length
        crossing = model(batch["input_ids"]).logits[0]  # the whole block as one sequence differs in the second document
        assert not torch.allclose(crossing[first["segments"][0] :], packed[first["segments"][0] :], atol=1e-3)


def test_readers_give_the_same_documents_lazily(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["First paragraph,\nover two lines.", "Second.", "Third one."]
    (tmp_path / "c.txt").write_text("\n\n".join(texts) + "\n\n\n")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    pq.write_table(pa.table({"body": texts}), tmp_path / "c.parquet")
    assert [t for t, _ in iter_documents(tmp_path / "c.txt")] == texts
    assert [t for t, _ in iter_documents(tmp_path / "c.jsonl")] == texts
    assert [t for t, _ in iter_documents(tmp_path / "c.parquet", "body")] == texts
    assert [t for t, _ in iter_documents(tmp_path / "c.txt", limit=2)] == texts[:2]
    assert [w for _, w in iter_documents(tmp_path / "c.txt")] == ["c.txt line 1", "c.txt line 4", "c.txt line 6"]


def test_reader_errors_name_the_file_line_and_field(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(TunelabError, match=r"bad.jsonl line 2: no text field 'text' \(data.text_field\).*body"):
        list(iter_documents(tmp_path / "bad.jsonl"))
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(TunelabError, match="is not UTF-8.*iconv"):
        list(iter_documents(tmp_path / "latin.txt"))


def test_build_text_blocks_holds_out_the_tail_and_is_cached(tmp_path, tokenizer):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: " + "word " * (i % 7 + 3) for i in range(60)))
    cfg = DataConfig(path=str(corpus), format="text", val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    train, val, report = build_text_blocks(cfg, tokenizer, block_size=32)
    whole, _, _ = build_text_blocks(DataConfig(path=str(corpus), format="text", cache_dir=str(tmp_path / "cache")), tokenizer, block_size=32)
    assert list(train["input_ids"]) + list(val["input_ids"]) == list(whole["input_ids"])  # the held-out blocks are the tail
    assert len(val) == round(len(whole) * 0.2) and report.train.records == 60
    assert report.train.examples == len(train) and report.val.examples == len(val)
    assert len(list((tmp_path / "cache").glob("blocks-*.arrow"))) == 1  # one file, reused by the second call
    all_tokens = [t for d in tokenize_documents((t for t, _ in iter_documents(corpus)), tokenizer) for t in d]
    assert [t for ids in whole["input_ids"] for t in ids] == all_tokens
