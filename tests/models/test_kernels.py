"""Packed attention and the chunked supervised-only loss give the reference path's numbers."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.data import IGNORE_INDEX, pack_collate, pad_collate
from tunelab.methods.fullfinetune_sft import causal_lm_loss, chunked_causal_lm_loss, supports_chunked_loss
from tunelab.models.kernels import PACKED_ATTENTION, linear_cross_entropy, use_packed_attention

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip


def tiny_pair() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """Two copies of one random model: the reference (sdpa) and one switched to packed attention."""
    torch.manual_seed(0)
    reference = LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation="sdpa"))
    packed = LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation="sdpa"))
    packed.load_state_dict(reference.state_dict())
    assert use_packed_attention(packed) and packed.config._attn_implementation == PACKED_ATTENTION
    return reference, packed


def examples(lengths=(7, 12, 5, 9), seed=1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(0, TINY["vocab_size"], (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]})
    return rows


def per_example(row_logits: torch.Tensor, bounds: list[int]) -> list[torch.Tensor]:
    return [row_logits[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


def test_pack_collate_restarts_positions_and_masks_each_first_token():
    batch = pack_collate(examples((3, 4)))
    assert batch["input_ids"].shape == (1, 7) and "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 7] and batch["max_length_q"] == 4
    assert batch["labels"][0, 0] == IGNORE_INDEX and batch["labels"][0, 3] == IGNORE_INDEX


def test_pack_collate_pads_the_row_end_inside_the_last_example():
    from tunelab.data import batch_tokens

    batch = pack_collate(examples((3, 4)), multiple_of=8)
    assert batch["input_ids"].shape == (1, 8) and batch["pad_tokens"] == 1 and batch_tokens(batch) == 7
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 8] and batch["max_length_q"] == 5
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]  # the pad continues the last example
    assert batch["labels"][0, 7] == IGNORE_INDEX  # and is never a target
    assert batch["labels"][0, :7].tolist() == pack_collate(examples((3, 4)))["labels"][0].tolist()
    exact = pack_collate(examples((3, 5)), multiple_of=8)
    assert exact["input_ids"].shape == (1, 8) and exact["pad_tokens"] == 0


def test_packed_logits_equal_unpacked_logits():
    reference, packed = tiny_pair()
    rows = examples()
    padded, row = pad_collate(rows, 0), pack_collate(rows)
    bounds = row["cu_seq_lens_q"].tolist()
    with torch.no_grad():
        unpacked = reference(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
        ours = packed(input_ids=row["input_ids"], position_ids=row["position_ids"], cu_seq_lens_q=row["cu_seq_lens_q"], use_cache=False).logits[0]
        # transformers' own sdpa isolates packed examples from the positions alone, but only with
        # no attention mask and no cache; it is the check that our packed rows mean the same thing
        theirs = reference(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits[0]
        leaky = reference(input_ids=row["input_ids"], use_cache=False).logits[0]  # no positions: attention crosses examples
    for i, (a, b) in enumerate(zip(per_example(ours, bounds), per_example(theirs, bounds))):
        n = len(rows[i]["input_ids"])
        torch.testing.assert_close(a, unpacked[i, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b, unpacked[i, :n], atol=1e-5, rtol=1e-5)
    assert (leaky[bounds[1] :] - ours[bounds[1] :]).abs().max() > 1e-3  # the test can tell isolation from its absence


def test_chunked_loss_equals_full_logits_loss_and_gradients():
    reference, packed = tiny_pair()
    rows = examples()
    loss, units, _ = causal_lm_loss(reference, pad_collate(rows, 0))
    chunked, chunked_units, _ = chunked_causal_lm_loss(packed, pack_collate(rows), chunk_rows=3)
    loss.backward()
    chunked.backward()
    assert units == chunked_units == sum(len(r["input_ids"]) - len(r["input_ids"]) // 2 for r in rows)
    torch.testing.assert_close(chunked, loss, atol=1e-5, rtol=1e-6)
    for (name, a), b in zip(reference.named_parameters(), packed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("collate", ["pad", "pack", "blocks"])
def test_the_collators_supervised_index_gives_the_masked_loss_and_gradients(collate):
    """The index the collator finds on the host selects the same rows and targets as the boolean
    mask on the device (which makes the host wait), for padded, packed and block batches."""
    from tunelab.data import BlockCollator, PackCollator, PadCollator

    reference, packed = tiny_pair()
    rows = examples()
    if collate == "blocks":  # full blocks of one document each: every token but a row's first is a target
        rows = [{"input_ids": r["input_ids"][:5], "labels": r["input_ids"][:5], "segments": [5]} for r in rows]
        batch = BlockCollator(0, packing=False)(rows)
        model = reference
    else:
        batch, model = (PadCollator(0)(rows), reference) if collate == "pad" else (PackCollator()(rows), packed)
    expected_units = sum(1 for r in rows for t in r["labels"][1:] if t != IGNORE_INDEX)
    assert batch["supervised_index"].numel() == expected_units
    masked = {k: v for k, v in batch.items() if k != "supervised_index"}
    loss, units, _ = chunked_causal_lm_loss(model, masked, chunk_rows=3)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    indexed, indexed_units, _ = chunked_causal_lm_loss(model, batch, chunk_rows=3)
    indexed.backward()
    assert int(units) == indexed_units == expected_units
    torch.testing.assert_close(indexed, loss, atol=1e-6, rtol=1e-6)
    for (name, p), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5, msg=name)


def test_chunked_loss_under_bf16_autocast_matches_reference():
    reference, packed = tiny_pair()
    rows = examples()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = causal_lm_loss(reference, pad_collate(rows, 0))[0]
        chunked = chunked_causal_lm_loss(packed, pack_collate(rows))[0]
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, loss, rtol=1e-3, atol=1e-3)


def test_linear_cross_entropy_frozen_head_and_nothing_supervised():
    torch.manual_seed(0)
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8)  # frozen head: no gradient formed for it
    targets = torch.randint(0, 11, (5,))
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=2)
    loss.backward()
    expected = torch.nn.functional.cross_entropy(hidden.detach() @ weight.T, targets, reduction="sum")
    torch.testing.assert_close(loss, expected)
    reference = hidden.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(reference @ weight.T, targets, reduction="sum").backward()
    torch.testing.assert_close(hidden.grad, reference.grad)
    empty = linear_cross_entropy(hidden[:0], weight.requires_grad_(True), targets[:0])
    empty.backward()
    assert empty.item() == 0.0 and weight.grad is not None and weight.grad.abs().sum() == 0


def test_linear_cross_entropy_under_no_grad_forms_no_head_gradient():
    """Evaluation (no_grad) of a trainable head: autograd's needs_input_grad still says the weight
    wants a gradient, which made the kernel build a vocabulary x hidden float32 buffer per call."""
    torch.manual_seed(0)
    vocab, width = 4096, 64
    hidden = torch.randn(6, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    targets = torch.randint(0, vocab, (6,))
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=2)
    expected = torch.nn.functional.cross_entropy(hidden.detach() @ weight.detach().T, targets, reduction="sum")
    torch.testing.assert_close(loss, expected)
    largest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    assert largest < vocab * width * 4 / 4, f"an allocation of {largest} bytes: a head-sized gradient buffer"


def test_adapter_on_the_output_head_falls_back_to_the_plain_loss():
    from peft import LoraConfig, get_peft_model

    model = LlamaForCausalLM(LlamaConfig(**TINY))
    assert supports_chunked_loss(model)
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert not supports_chunked_loss(wrapped)


@pytest.mark.parametrize("precision", ["auto"])
def test_auto_precision_is_bf16_only_with_native_bf16(monkeypatch, precision):
    from tunelab.engine import trainer

    monkeypatch.setattr(trainer.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: True)
    assert trainer.resolve_precision(precision) == "bf16-mixed"
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: False)
    assert trainer.resolve_precision(precision) == "32-true"
    assert trainer.resolve_precision("bf16-true") == "bf16-true"


def _saved_bytes(model, batch) -> int:
    """Bytes of distinct storages the autograd graph keeps for the backward pass."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch, use_cache=False).logits.float().sum()
    return sum(storages.values())


def test_fused_norm_and_mlp_match_transformers_and_keep_less_for_backward():
    """fp32: the same logits and gradients as transformers' modules. bf16 autocast: the same
    logits, gradients as close to the fp32 ones as transformers' own bf16 path, and at least a
    fifth less kept for the backward pass."""
    from tunelab.models.kernels import use_fused_norm_and_mlp

    reference, fused = tiny_pair()
    assert use_fused_norm_and_mlp(fused) == 2 * 2 + 1 + 2  # two norms and an MLP per layer, the final norm
    reference.set_attn_implementation(PACKED_ATTENTION)
    row = pack_collate(examples())
    inputs = {k: row[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q")}

    def run(model, autocast):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(**inputs, use_cache=False).logits.float()
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    exact_logits, exact = run(reference, False)
    logits, grads = run(fused, False)
    torch.testing.assert_close(logits, exact_logits, atol=1e-5, rtol=1e-5)
    for name, grad in exact.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)

    bf16_logits, bf16 = run(reference, True)
    logits, grads = run(fused, True)
    torch.testing.assert_close(logits, bf16_logits, atol=0, rtol=0)
    for name, grad in exact.items():
        ours, theirs = (grads[name] - grad).norm() / grad.norm(), (bf16[name] - grad).norm() / grad.norm()
        assert ours <= 1.5 * theirs + 1e-3, (name, ours.item(), theirs.item())
    long_row = pack_collate(examples((300, 200, 250)))  # enough tokens for activations to outweigh the weights
    long_inputs = {k: long_row[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q")}
    assert _saved_bytes(fused, long_inputs) < 0.8 * _saved_bytes(reference, long_inputs)


def _sdpa_segments(q, k, v, bounds, scale=None):
    return torch.cat(
        [torch.nn.functional.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, enable_gqa=True, scale=scale)
         for s, e in zip(bounds[:-1], bounds[1:]) if e > s], dim=2,
    ).transpose(1, 2)  # fmt: skip


def test_segment_attention_matches_sdpa_per_segment():
    """The CPU packed-attention kernel: same outputs and gradients as PyTorch's sdpa run on each
    segment (fp32), grouped-query heads, a one-token and an empty segment included; under bf16
    autocast it computes in bf16 and is no further from fp32 than sdpa's own bf16 path."""
    from tunelab.models.kernels import segment_attention

    torch.manual_seed(0)
    bounds = [0, 5, 17, 18, 18, 40]
    q, k, v = (torch.randn(1, heads, 40, 16, requires_grad=True) for heads in (6, 2, 2))
    grad_out = torch.randn(1, 40, 6, 16)

    def run(fn, autocast=False):
        for t in (q, k, v):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(q, k, v, bounds)
        out.float().backward(grad_out)
        return out, [out.detach().float()] + [t.grad.clone() for t in (q, k, v)]

    _, exact = run(_sdpa_segments)
    out, ours = run(segment_attention)
    assert out.shape == (1, 40, 6, 16) and out.is_contiguous()
    for a, b in zip(ours, exact):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    out, ours = run(segment_attention, autocast=True)
    _, theirs = run(_sdpa_segments, autocast=True)
    assert out.dtype == torch.bfloat16
    for a, b, ref in zip(ours, theirs, exact):
        assert (a - ref).norm() <= 1.5 * (b - ref).norm() + 1e-3 * ref.norm()


def test_packed_rows_use_the_segment_kernel_on_cpu(monkeypatch):
    import tunelab.models.kernels as kernels

    calls = []
    real = kernels.segment_attention
    monkeypatch.setattr(kernels, "segment_attention", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))
    _, packed = tiny_pair()
    row = pack_collate(examples())
    packed(input_ids=row["input_ids"], position_ids=row["position_ids"], cu_seq_lens_q=row["cu_seq_lens_q"], use_cache=False)
    assert calls == [row["cu_seq_lens_q"].tolist()] * TINY["num_hidden_layers"]


def test_rotary_in_compute_dtype_only_under_autocast():
    """cos/sin reach attention in bf16 under autocast (fp32 otherwise), and the model's bf16
    logits stay as close to its fp32 logits as transformers' own bf16 path."""
    from tunelab.models.kernels import rotary_in_compute_dtype

    reference, ours = tiny_pair()
    assert rotary_in_compute_dtype(ours) == 1
    x, positions = torch.randn(1, 4, TINY["hidden_size"]), torch.arange(4)[None]
    assert ours.model.rotary_emb(x, positions)[0].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours.model.rotary_emb(x, positions)[0].dtype == torch.bfloat16
    row = pack_collate(examples())
    inputs = {k: row[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q")}
    with torch.no_grad():
        exact = reference(**inputs, use_cache=False).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs, mine = (m(**inputs, use_cache=False).logits.float() for m in (reference, ours))
    assert (mine - exact).norm() <= 1.5 * (theirs - exact).norm() + 1e-3 * exact.norm()


class _AutocastForward(torch.nn.Module):
    """Autocast around the model's forward only, as Fabric's bf16-mixed module wrapper does."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.module(**kwargs)


def test_chunked_loss_head_runs_in_the_forwards_precision(monkeypatch):
    """Bug: with autocast around the forward only (Fabric), the head ran in float32."""
    import tunelab.models.kernels as kernels

    _, packed = tiny_pair()
    batch = pack_collate(examples())
    dtypes = []
    apply = kernels._LinearCrossEntropy.apply
    monkeypatch.setattr(kernels._LinearCrossEntropy, "apply", lambda *a: dtypes.append(a[-1]) or apply(*a))
    wrapped, _, _ = chunked_causal_lm_loss(_AutocastForward(packed), batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        everywhere, _, _ = chunked_causal_lm_loss(packed, batch)
    plain, _, _ = chunked_causal_lm_loss(packed, batch)
    assert dtypes == [torch.bfloat16, torch.bfloat16, torch.float32]
    torch.testing.assert_close(wrapped, everywhere, atol=0, rtol=0)
    assert wrapped != plain


def test_long_examples_go_through_flash_attention(monkeypatch):
    """Past SEGMENT_SCORES_LIMIT the per-example scores would be large: sdpa takes those rows."""
    import tunelab.models.kernels as kernels

    reference, packed = tiny_pair()
    row = pack_collate(examples())
    inputs = {k: row[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q")}
    monkeypatch.setattr(kernels, "segment_attention", lambda *a, **kw: pytest.fail("segment kernel used"))
    monkeypatch.setattr(kernels, "SEGMENT_SCORES_LIMIT", 4 * 11**2)  # 4 heads; the longest example has 12 tokens
    with torch.no_grad():
        ours = packed(**inputs, use_cache=False).logits
        theirs = reference(**inputs, use_cache=False).logits  # transformers' sdpa isolates examples by position
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def _fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window_size=None, is_causal=None, enable_gqa=False, scale=None):
    """A CPU stand-in for torch's varlen flash attention with the same calling convention
    ((tokens, heads, head_dim) in and out), built from sdpa per segment."""
    assert cu_q.dtype == torch.int32 and cu_q is cu_k and max_q == max_k
    assert window_size == (-1, 0) or is_causal is True
    bounds = cu_q.tolist()
    assert max_q == max(e - s for s, e in zip(bounds[:-1], bounds[1:]))
    out = [
        torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=True, enable_gqa=enable_gqa, scale=scale,
        ).transpose(0, 1)
        for s, e in zip(bounds[:-1], bounds[1:])
    ]  # fmt: skip
    return torch.cat(out)


@pytest.mark.parametrize("gqa,scale", [(True, True), (False, False)])
def test_varlen_layout_matches_sdpa_per_segment(gqa, scale):
    """The layout work around the CUDA varlen kernel (transposes, grouped-query heads repeated
    for a kernel without enable_gqa, a custom scale folded into the queries for one without a
    scale argument), checked on CPU against a stand-in kernel; the real kernel is tested on a GPU
    (tests/gpu)."""
    from tunelab.models.kernels import call_varlen

    torch.manual_seed(0)
    bounds = [0, 5, 17, 18, 40]
    q, k, v = (torch.randn(1, heads, 40, 16, requires_grad=True) for heads in (6, 2, 2))
    api = {"fn": _fake_varlen, "causal": {"window_size": (-1, 0)} if gqa else {"is_causal": True}, "gqa": gqa, "scale": scale}
    for scaling in (None, 0.1):
        out = call_varlen(api, q, k, v, torch.tensor(bounds, dtype=torch.int32), 22, scaling)
        expected = _sdpa_segments(q, k, v, bounds, scaling)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        out.sum().backward()
        assert q.grad is not None and k.grad.shape == k.shape


def test_chunked_loss_with_whole_chunk_softmax_blocks(monkeypatch):
    """On a GPU each chunk's softmax is one block (not 8-row blocks): the same numbers and gradients."""
    import tunelab.models.kernels as kernels
    from tunelab.models.kernels import linear_log_probs

    monkeypatch.setattr(kernels, "softmax_block_rows", lambda device, chunk_rows: chunk_rows)
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    ref_h, ref_w = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(ref_h @ ref_w.T, targets, reduction="sum")
    expected.backward()
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(hidden.grad, ref_h.grad)
    torch.testing.assert_close(weight.grad, ref_w.grad)
    hidden.grad = weight.grad = ref_h.grad = ref_w.grad = None
    log_probs = linear_log_probs(hidden, weight, targets, chunk_rows=16)
    reference = torch.log_softmax(ref_h @ ref_w.T, -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(log_probs, reference)
    scale = torch.randn(37)
    (log_probs * scale).sum().backward()
    (reference * scale).sum().backward()
    torch.testing.assert_close(hidden.grad, ref_h.grad)
    torch.testing.assert_close(weight.grad, ref_w.grad)


@pytest.mark.parametrize("cuda, compile, expected", [(True, True, PACKED_ATTENTION), (False, True, "sdpa"), (True, False, "sdpa")])
def test_padded_rows_keep_attention_out_of_compiled_layers_on_cuda(monkeypatch, cuda, compile, expected):
    """With packing off, compiled layers on a GPU route attention through the packed attention
    function, which runs sdpa eagerly (inductor's masked sdpa made the step 11x slower on an H200);
    on CPU, or uncompiled, the model keeps transformers' sdpa. Padded rows give the same logits."""
    from tunelab.methods.fullfinetune_sft import FullFinetuneSFT

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    reference, _ = tiny_pair()
    model = LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation="sdpa"))
    model.load_state_dict(reference.state_dict())
    model = FullFinetuneSFT(packing=False, compile=compile, fused_kernels=False).prepare_model(model)
    assert model.config._attn_implementation == expected
    if expected == PACKED_ATTENTION:
        for layer in model.model.layers:  # the check is about the attention function, not compiling on CPU
            layer._compiled_call_impl = None
        batch = pad_collate(examples(), pad_token_id=0)
        real = batch["attention_mask"].bool()
        with torch.no_grad():
            ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            theirs = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(ours[real], theirs[real])


def test_softmax_minus_one_hot_is_the_cross_entropy_and_its_gradient():
    """The function the chunked loss compiles on a GPU (run eagerly here): the summed loss in
    float32 and d(loss)/d(logits) in the logits' dtype."""
    from tunelab.models.kernels import _softmax_minus_one_hot

    torch.manual_seed(0)
    logits = (torch.randn(37, 500) * 4).requires_grad_(True)
    targets = torch.randint(0, 500, (37,))
    loss, grad = _softmax_minus_one_hot(logits.detach().bfloat16(), targets)
    expected = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    expected.backward()
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=0.0)  # the logits were rounded to bf16
    torch.testing.assert_close(grad.float(), logits.grad, rtol=0.0, atol=2e-2)
    exact_loss, exact_grad = _softmax_minus_one_hot(logits.detach(), targets)
    torch.testing.assert_close(exact_loss, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(exact_grad, logits.grad, rtol=1e-5, atol=1e-6)
