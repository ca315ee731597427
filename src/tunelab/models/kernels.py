"""Training kernels that transformers does not ship for CPU and plain-PyTorch GPUs.

- ``packed_sdpa``: attention over a packed row (several examples concatenated, positions
  restarting at 0 for each). The row's example boundaries come from the collator as
  ``cu_seq_lens_q``; each example attends causally to itself only, through PyTorch's
  scaled_dot_product_attention, so no work is spent on pairs of tokens from different examples.
  Without boundaries it is exactly transformers' sdpa attention.
- ``linear_cross_entropy``: the output projection and cross-entropy of the given hidden states,
  computed in chunks of rows with the gradient formed on the way, so the logits of the full
  vocabulary never exist for more than one chunk and are never kept for the backward pass.
"""

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PACKED_ATTENTION = "tunelab_packed_sdpa"


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, cu_seq_lens_q=None, **kwargs):
    """transformers attention-interface function (query/key/value: batch, heads, tokens, head_dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: share each key/value head across its query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    bounds = cu_seq_lens_q.tolist()
    outputs = [
        F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], dropout_p=dropout, scale=scaling, is_causal=True
        )
        for start, end in zip(bounds[:-1], bounds[1:])
        if end > start
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register_packed_attention() -> str:
    """Make ``PACKED_ATTENTION`` a valid ``attn_implementation`` (masks are built as for sdpa)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa)
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


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), with the gradient computed during the forward pass.

    Rows go through the matmuls ``chunk_rows`` at a time; the softmax and its gradient are formed
    in blocks of ``SOFTMAX_ROWS`` rows that stay in cache, in float32, written over the chunk's
    logits. The weight's gradient is one matmul per chunk.
    """

    SOFTMAX_ROWS = 32

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, compute_dtype: torch.dtype):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_grad = need_hidden or need_weight
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            for start in range(0, hidden.shape[0], chunk_rows):
                h = hidden[start : start + chunk_rows].to(compute_dtype)
                target = targets[start : start + chunk_rows]
                logits = h @ w.T
                for row in range(0, len(target), _LinearCrossEntropy.SOFTMAX_ROWS):
                    block = slice(row, row + _LinearCrossEntropy.SOFTMAX_ROWS)
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
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` (rows, hidden) -> scalar.

    The matmuls run in the autocast dtype when autocast is on (as ``nn.Linear`` would), and the
    softmax in float32.
    """
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        compute_dtype = torch.get_autocast_dtype(device)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if hidden.shape[0] == 0:
        return (hidden.sum() + weight.sum()) * 0.0  # keeps the graph (and DDP) whole when nothing is supervised
    return _LinearCrossEntropy.apply(hidden, weight, targets, max(1, chunk_rows), compute_dtype)
