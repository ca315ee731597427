"""Training kernels that transformers does not ship for CPU and plain-PyTorch GPUs.

- ``packed_sdpa``: attention over a packed row (several examples concatenated, positions
  restarting at 0 for each). The row's example boundaries come from the collator as
  ``cu_seq_lens_q``; each example attends causally to itself only, so no work is spent on pairs of
  tokens from different examples: on CUDA through PyTorch's variable-length flash attention (one
  kernel for the whole row, no wait for the device), on CPU through ``segment_attention``, and
  otherwise through scaled_dot_product_attention per example. Without boundaries it is exactly
  transformers' sdpa attention.
- ``rms_norm``, ``silu_mul``, ``rotary_in_compute_dtype``: Llama's norm, MLP activation and rotary
  embedding with less kept for the backward pass and no float32 detours under autocast.
- ``linear_cross_entropy``: the output projection and cross-entropy of the given hidden states,
  computed in chunks of rows with the gradient formed on the way, so the logits of the full
  vocabulary never exist for more than one chunk and are never kept for the backward pass.
- ``linear_log_probs``: the same head, returning each row's log-probability of its target (what
  preference losses sum per sequence); its backward recomputes the logits chunk by chunk.
"""

import logging
import os
import shutil
import sys

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PACKED_ATTENTION = "tunelab_packed_sdpa"


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on this device type, or None when autocast is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None

# segment_attention forms one example's (heads, length, length) scores at a time; longer examples
# than this allows (about 2,700 tokens at 9 heads) go through flash attention instead.
SEGMENT_SCORES_LIMIT = 64 * 2**20


@torch.compiler.disable  # compiled layers call it eagerly: its loop depends on each batch's boundaries
def packed_sdpa(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, cu_seq_lens_q=None, max_length_q=None, **kwargs
):
    """transformers attention-interface function (query/key/value: batch, heads, tokens, head_dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    plain = not (dropout and module.training) and getattr(module, "sliding_window", None) is None
    if query.is_cuda and plain:
        out = varlen_attention(query, key, value, cu_seq_lens_q, max_length_q, scaling)
        if out is not None:
            return out, None
    bounds = cu_seq_lens_q.tolist()
    segments_cover_row = bounds[0] == 0 and bounds[-1] == query.shape[2]
    longest = max(end - start for start, end in zip(bounds[:-1], bounds[1:]))
    scores_fit = query.shape[1] * longest**2 <= SEGMENT_SCORES_LIMIT
    if query.device.type == "cpu" and plain and segments_cover_row and scores_fit:
        return segment_attention(query, key, value, bounds, scaling), None
    gqa = query.shape[1] != key.shape[1]  # grouped-query attention: sdpa shares each key/value head itself
    outputs = [
        F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], dropout_p=dropout, scale=scaling,
            is_causal=True, enable_gqa=gqa,
        )
        for start, end in zip(bounds[:-1], bounds[1:])
        if end > start
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


# ----------------------------------------------------------------------------- CUDA: varlen flash
# On a GPU, one flash-attention call covers the whole packed row: the kernel reads the example
# boundaries from the device (``cu_seq_lens``) and takes the longest example as a plain int from the
# collator, so no layer waits for the device. PyTorch ships it as torch.nn.attention.varlen (2.10+);
# its keyword arguments changed between releases, so they are read off its signature once.

_varlen = {}  # "fn", "causal" (keyword arguments that make it causal), "gqa", "scale": what this torch offers


def _varlen_api() -> dict | None:
    if "fn" not in _varlen:
        try:
            import inspect

            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _varlen["fn"] = None
            return None
        params = inspect.signature(varlen_attn).parameters
        causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True} if "is_causal" in params else None
        _varlen.update(fn=varlen_attn if causal is not None else None, causal=causal, gqa="enable_gqa" in params, scale="scale" in params)
    return _varlen if _varlen["fn"] is not None else None


def varlen_attention(query, key, value, cu_seq_lens, max_length, scaling=None) -> torch.Tensor | None:
    """Causal attention within each example of one packed row through PyTorch's variable-length
    flash attention. query (1, q_heads, tokens, head_dim), key/value (1, kv_heads, tokens, head_dim);
    returns (1, tokens, q_heads, head_dim), or None where that kernel cannot run (no CUDA, a torch
    without it, float32 outside autocast, or a failure it reports), for the caller's fallback."""
    api = _varlen_api()
    dtype = autocast_dtype(query.device.type) or query.dtype
    if api is None or not query.is_cuda or dtype not in (torch.float16, torch.bfloat16) or "failed" in _varlen:
        return None
    try:
        with torch.autocast(query.device.type, enabled=False):
            return call_varlen(api, query.to(dtype), key.to(dtype), value.to(dtype), cu_seq_lens, max_length, scaling)
    except (RuntimeError, ValueError, TypeError) as error:
        _varlen["failed"] = True
        log.warning("Variable-length flash attention failed (%s); packed rows use one sdpa call per example instead", error)
        return None


def call_varlen(api: dict, query, key, value, cu_seq_lens, max_length, scaling=None) -> torch.Tensor:
    """The layout work around a varlen kernel ``api["fn"]`` (tokens, heads, head_dim in and out):
    transformers' (1, heads, tokens, head_dim) in, (1, tokens, heads, head_dim) out; key/value
    heads repeated where the kernel takes no grouped-query heads; a non-default scale folded into
    the queries where it takes no scale."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
    options = dict(api["causal"])
    if q.shape[1] != k.shape[1]:
        if api["gqa"]:
            options["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    head_dim = q.shape[-1]
    if scaling is not None and abs(scaling - head_dim**-0.5) > 1e-9:
        if api["scale"]:
            options["scale"] = scaling
        else:
            q = q * (scaling * head_dim**0.5)  # the kernel's own scale is head_dim ** -0.5
    if max_length is None:
        max_length = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
    cu = cu_seq_lens.to(device=q.device, dtype=torch.int32)
    return api["fn"](q, k, v, cu, cu, int(max_length), int(max_length), **options).unsqueeze(0)


# On CPU, PyTorch's flash attention is slow for what packed rows hold (many short causal segments
# of 64-dim heads): on SmolLM2 rows of ~220-token examples, it spends 1.9 s per step in forward and
# backward where the three batched matmuls per segment below take 1.2 s. Per segment and key/value
# head, the query heads that share it are stacked into one matrix, so each segment is a handful of
# bmm calls in the compute dtype with one fused softmax; the backward pass recomputes the softmax
# (nothing of size segment^2 is kept between the passes).


class _SegmentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, bounds: list[int], scale: float):
        _, q_heads, tokens, head_dim = query.shape
        kv_heads = key.shape[1]
        out = query.new_empty(1, tokens, q_heads, head_dim)
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                _, probs = _segment_probs(query, key, start, end, scale)
                seg = torch.bmm(probs, value[0, :, start:end])  # kv heads, (group, len), head_dim
                out[0, start:end] = seg.view(q_heads, end - start, head_dim).transpose(0, 1)
        ctx.save_for_backward(query, key, value)
        ctx.bounds, ctx.scale, ctx.kv_heads = bounds, scale, kv_heads
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value = ctx.saved_tensors
        _, q_heads, _, head_dim = query.shape
        kv_heads, scale = ctx.kv_heads, ctx.scale
        grad_q, grad_k, grad_v = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        for start, end in zip(ctx.bounds[:-1], ctx.bounds[1:]):
            if end == start:
                continue
            n = end - start
            queries, probs = _segment_probs(query, key, start, end, scale)
            grad_seg = grad_out[0, start:end].transpose(0, 1).reshape(kv_heads, -1, head_dim)
            grad_v[0, :, start:end] = torch.bmm(probs.transpose(1, 2), grad_seg)
            grad_probs = torch.bmm(grad_seg, value[0, :, start:end].transpose(1, 2))
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            grad_q[0, :, start:end] = (torch.bmm(grad_scores, key[0, :, start:end]) * scale).view(q_heads, n, head_dim)
            grad_k[0, :, start:end] = torch.bmm(grad_scores.transpose(1, 2), queries) * scale
        return grad_q, grad_k, grad_v, None, None


_future = {}  # device -> bool matrix, True above the diagonal (positions a causal query cannot see)


def _segment_probs(query, key, start: int, end: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One causal segment's queries stacked per kv head (kv heads, group * len, head_dim) and
    softmax(q k^T * scale) (kv heads, group * len, len)."""
    n, kv_heads, head_dim = end - start, key.shape[1], query.shape[-1]
    queries = query[0, :, start:end].reshape(kv_heads, -1, head_dim)  # the q heads sharing a kv head, stacked
    scores = torch.baddbmm(queries.new_empty(()), queries, key[0, :, start:end].transpose(1, 2), beta=0.0, alpha=scale)
    mask = _future.get(query.device)
    if mask is None or mask.shape[0] < n:
        mask = _future[query.device] = torch.ones(n, n, dtype=torch.bool, device=query.device).triu(1)
    scores.view(kv_heads, -1, n, n).masked_fill_(mask[:n, :n], float("-inf"))
    return queries, torch.softmax(scores, -1)


def segment_attention(query, key, value, bounds: list[int], scaling: float | None = None) -> torch.Tensor:
    """Causal attention within each ``bounds[i]:bounds[i+1]`` token range of one packed row.
    query (1, q_heads, tokens, head_dim), key/value (1, kv_heads, tokens, head_dim) with q_heads a
    multiple of kv_heads; returns (1, tokens, q_heads, head_dim) as transformers' attention
    functions do. Under autocast it computes in the autocast dtype, like sdpa."""
    device = query.device.type
    dtype = autocast_dtype(device) or query.dtype
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    with torch.autocast(device, enabled=False):
        return _SegmentAttention.apply(query.to(dtype), key.to(dtype), value.to(dtype), bounds, scale)


def packed_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, cu_seq_lens_q=None, max_length_q=None, **kwargs
):
    """The attention function registered as ``PACKED_ATTENTION``. On a GPU, rows with neither a
    mask nor example boundaries (pretraining's full blocks, all of one length) are plain causal
    sdpa, traced into the compiled layers with the rest of the layer (an H200 step of a 286M Llama
    on 16 x 1024 tokens: 0.089 s, against 0.103 s with the attention eager between the compiled
    parts, bench/gpu_profile.py); everything else goes through ``packed_sdpa``, which the compiler
    leaves eager (its work depends on each batch's boundaries, and a masked sdpa compiled into the
    layers was 11x slower)."""
    if query.is_cuda and cu_seq_lens_q is None and attention_mask is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    return packed_sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, cu_seq_lens_q, max_length_q, **kwargs)


def register_packed_attention() -> str:
    """Make ``PACKED_ATTENTION`` a valid ``attn_implementation`` (masks are built as for sdpa)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    return PACKED_ATTENTION


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch a model that uses sdpa to packed_sdpa; returns whether it now does."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == PACKED_ATTENTION:
        return True
    if current != "sdpa":
        log.info("Packing with attn_implementation=%s (not sdpa): transformers isolates the packed examples itself", current)
        return False
    register_packed_attention()
    model.set_attn_implementation(PACKED_ATTENTION)
    return True


# On CPU the softmax of a chunk is formed a few rows at a time, in blocks that stay in cache: 8 rows
# of a 49k vocabulary in float32 are 1.5 MiB and stay in L2 (32 rows did not). On a GPU the same
# loop is thousands of tiny kernel launches per step (on an H200 it made the loss several times
# slower than the model); there each chunk's softmax is one block, and where torch.compile works,
# one compiled function (``_softmax_minus_one_hot``): the eager version's ten passes over a chunk
# of float32 logits (about 2 GB per 1024 rows of a 49k vocabulary) become a read of the chunk and a
# write of its gradient.
CPU_SOFTMAX_ROWS = 8


def softmax_block_rows(device: torch.device, chunk_rows: int) -> int:
    return CPU_SOFTMAX_ROWS if device.type == "cpu" else chunk_rows


def _softmax_minus_one_hot(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the rows' cross-entropy in float32, softmax - one_hot(target) in the logits' dtype)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    picked = x.gather(1, targets[:, None])
    hit = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    grad = torch.exp(x - lse) - hit.to(x.dtype)
    return (lse - picked).sum(), grad.to(logits.dtype)


_fused_softmax = {}  # "fn": the compiled _softmax_minus_one_hot, or None once compiling failed


def fused_softmax_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``_softmax_minus_one_hot`` compiled, on CUDA; None elsewhere or where compiling fails
    (the caller then runs the eager loop)."""
    if not logits.is_cuda or _fused_softmax.get("fn", True) is None:
        return None
    if "fn" not in _fused_softmax:
        _fused_softmax["fn"] = torch.compile(_softmax_minus_one_hot, dynamic=True)
    try:
        return _fused_softmax["fn"](logits, targets)
    except Exception as error:  # noqa: BLE001 - any compiler failure: the eager loop computes the same
        _fused_softmax["fn"] = None
        log.warning("Compiling the chunked loss's softmax failed (%s); it runs eagerly", str(error).splitlines()[0][:200])
        return None


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), with the gradient computed during the forward pass.

    Rows go through the matmuls ``chunk_rows`` at a time; the softmax and its gradient are formed
    in float32 over blocks of ``softmax_block_rows`` rows, written over the chunk's logits. The
    weight's gradient is one matmul per chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, grad_enabled: bool, compute_dtype: torch.dtype):
        # needs_input_grad reflects requires_grad only, also under no_grad (evaluation of a
        # trainable head): the caller's grad mode decides whether gradients are formed at all.
        need_hidden, need_weight = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        need_grad = need_hidden or need_weight
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        block_rows = softmax_block_rows(hidden.device, chunk_rows)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            for start in range(0, hidden.shape[0], chunk_rows):
                h = hidden[start : start + chunk_rows].to(compute_dtype)
                target = targets[start : start + chunk_rows]
                logits = h @ w.T
                fused = fused_softmax_grad(logits, target) if need_grad else None
                if fused is not None:
                    chunk_loss, logits = fused
                    loss += chunk_loss
                for row in range(0, len(target) if fused is None else 0, block_rows):
                    block = slice(row, row + block_rows)
                    x = logits[block].float()
                    picked = x.gather(1, target[block, None]).squeeze(1)
                    top = x.amax(dim=-1, keepdim=True)
                    x.sub_(top).exp_()
                    total = x.sum(dim=-1, keepdim=True)
                    loss += (total.log() + top - picked[:, None]).sum()
                    if need_grad:  # d(sum CE)/d(logits) = softmax - one_hot(target)
                        x.div_(total)
                        x[torch.arange(x.shape[0], device=x.device), target[block]] -= 1
                        logits[block] = x
                if need_hidden:
                    grad_hidden[start : start + chunk_rows] = logits @ w
                if need_weight:
                    grad_weight += logits.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 1024, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` (rows, hidden) -> scalar.

    The matmuls run in ``compute_dtype``; by default in the autocast dtype when autocast is on (as
    ``nn.Linear`` would), else in the promoted dtype of the inputs. The softmax runs in float32.
    """
    device = hidden.device.type
    compute_dtype = compute_dtype or autocast_dtype(device) or torch.promote_types(hidden.dtype, weight.dtype)
    if hidden.shape[0] == 0:
        return (hidden.sum() + weight.sum()) * 0.0  # keeps the graph (and DDP) whole when nothing is supervised
    return _LinearCrossEntropy.apply(hidden, weight, targets, max(1, chunk_rows), torch.is_grad_enabled(), compute_dtype)


class _LinearLogProbs(torch.autograd.Function):
    """log softmax(hidden_i @ weight.T)[target_i] for every row, without the logits of more than one
    chunk of rows existing at a time.

    Unlike the summed cross-entropy above, a per-row result feeds a loss that is not a plain sum
    (DPO's log-sigmoid of differences of sums), so the gradient cannot be formed during the forward
    pass. The forward keeps each row's log-sum-exp; the backward recomputes a chunk's logits, turns
    them into ``g_i * (one_hot - softmax)`` in place and applies the two gradient matmuls.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, grad_enabled: bool, compute_dtype: torch.dtype):
        rows = hidden.shape[0]
        log_probs = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        block_rows = softmax_block_rows(hidden.device, chunk_rows)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            for start in range(0, rows, chunk_rows):
                logits = hidden[start : start + chunk_rows].to(compute_dtype) @ w.T
                for row in range(0, logits.shape[0], block_rows):
                    block = logits[row : row + block_rows].float()
                    at = slice(start + row, start + row + block.shape[0])
                    lse[at] = torch.logsumexp(block, dim=-1)
                    log_probs[at] = block.gather(1, targets[at, None]).squeeze(1) - lse[at]
        if grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_rows, ctx.compute_dtype = chunk_rows, compute_dtype
        return log_probs

    @staticmethod
    def backward(ctx, grad_log_probs):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_log_probs = grad_log_probs.float()
        block_rows = softmax_block_rows(hidden.device, ctx.chunk_rows)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(ctx.compute_dtype)
            for start in range(0, hidden.shape[0], ctx.chunk_rows):
                h = hidden[start : start + ctx.chunk_rows].to(ctx.compute_dtype)
                logits = h @ w.T
                for row in range(0, logits.shape[0], block_rows):
                    x = logits[row : row + block_rows].float()
                    at = slice(start + row, start + row + x.shape[0])
                    g = grad_log_probs[at, None]
                    x.sub_(lse[at, None]).exp_().mul_(-g)  # d(log p_target)/d(logits) = one_hot - softmax
                    x.scatter_add_(1, targets[at, None], g)
                    logits[row : row + x.shape[0]] = x
                if need_hidden:
                    grad_hidden[start : start + ctx.chunk_rows] = logits @ w
                if need_weight:
                    grad_weight += logits.T @ h
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None, None


def linear_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 1024, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Per-row log-probability of ``targets`` under ``softmax(hidden @ weight.T)`` (float32, one
    value per row), computed ``chunk_rows`` rows at a time: the full-vocabulary logits never exist.
    The matmuls run in ``compute_dtype`` (default: the autocast dtype, else the inputs' dtype)."""
    compute_dtype = compute_dtype or autocast_dtype(hidden.device.type) or torch.promote_types(hidden.dtype, weight.dtype)
    if hidden.shape[0] == 0:
        return (hidden.sum(dim=-1) + weight.sum() * 0).float()  # empty, and the graph (and DDP) stays whole
    return _LinearLogProbs.apply(hidden, weight, targets, max(1, chunk_rows), torch.is_grad_enabled(), compute_dtype)


# ----------------------------------------------------------------------------- RMSNorm and SwiGLU
# transformers computes RMSNorm and SwiGLU as chains of small ops, each of which keeps its input
# for the backward pass: per token and layer, two float32 copies of the hidden state per norm,
# one bf16 copy per projection that reads a norm's output (the autocast casts are not shared),
# and four intermediate MLP tensors. The two ops below give the same forward values and keep
# only their inputs, recomputing the rest in the backward pass (a few elementwise passes).


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return autocast_dtype(x.device.type) or torch.result_type(x, weight)


class _RMSNorm(torch.autograd.Function):
    """weight * (x / rms(x)), computed in float32 as transformers' Llama does, returned in the
    dtype its consumers compute in (the autocast dtype, when autocast is on), so the q/k/v (or
    gate/up) projections share one saved copy. Keeps x and 1/rms(x) for the backward pass."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, out_dtype: torch.dtype):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        normed = (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, rstd, weight)
        return (weight * normed).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, rstd, weight = ctx.saved_tensors
        normed = x.float() * rstd
        grad_out = grad_out.float()
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = grad_out * weight.float()
            grad_x = (rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps, _compute_dtype(x, weight))


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up (the MLP's projections' outputs)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        g, grad = gate.float(), grad_out.float()
        sigmoid = torch.sigmoid(g)
        silu = g * sigmoid
        grad_up = (grad * silu).to(up.dtype)
        grad_gate = (grad * up.float() * sigmoid * (1 + g * (1 - sigmoid))).to(gate.dtype)
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SiluMul.apply(gate, up)


def _norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_forward(self, x):
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _is_llama_rms_norm(module: torch.nn.Module) -> bool:
    # weight * x / rms(x) with a plain scale; Gemma-style norms (scale 1 + weight) are left alone.
    name = type(module).__name__
    return name.endswith("RMSNorm") and "Gemma" not in name and hasattr(module, "variance_epsilon") and getattr(module, "weight", None) is not None


def _is_swiglu_mlp(module: torch.nn.Module) -> bool:
    act = type(getattr(module, "act_fn", None)).__name__
    return all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) and act in ("SiLU", "SiLUActivation")


def use_fused_norm_and_mlp(model: torch.nn.Module) -> int:
    """Route the model's RMSNorm and SwiGLU MLP modules through ``rms_norm`` and ``silu_mul``
    (the modules, their weights and state-dict keys stay as they are). Returns how many modules
    were switched; models with other norms or activations are left unchanged."""
    switched = 0
    for module in model.modules():
        if _is_llama_rms_norm(module):
            module.forward = _norm_forward.__get__(module)
            switched += 1
        elif _is_swiglu_mlp(module):
            module.forward = _swiglu_forward.__get__(module)
            switched += 1
    return switched


def _rotary_to_compute_dtype(module, args, output):
    cos, sin = output
    dtype = autocast_dtype(cos.device.type)
    return (cos.to(dtype), sin.to(dtype)) if dtype else None


def rotary_in_compute_dtype(model: torch.nn.Module) -> int:
    """Under autocast, hand the rotary embedding's cos/sin to the attention layers in the autocast
    dtype. transformers returns them in the dtype of the embeddings (float32), so q*cos + rot(q)*sin
    ran in float32 on bf16 queries and keys, and sdpa cast the results back: two float32 passes and
    an extra saved copy per layer. Returns how many rotary modules were hooked."""
    hooked = 0
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            module.register_forward_hook(_rotary_to_compute_dtype)
            hooked += 1
    return hooked


def cpu_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend (inductor) would call, if it is installed."""
    return shutil.which(os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++"))


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """torch.compile each decoder layer in place (dynamic shapes, so packed rows of any length
    reuse one graph; state-dict keys stay as they are). Models without recognisable decoder
    layers are compiled whole. Returns how many modules were compiled: none, with a warning, on
    a machine without a GPU and without the C++ compiler the CPU backend needs."""
    if not torch.cuda.is_available() and cpu_compiler() is None:
        log.warning("torch.compile needs a C++ compiler on CPU (g++, or $CXX) and none was found: training uncompiled")
        return 0
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers or [model]:
        layer.compile(dynamic=True)
    return len(layers) or 1
