"""A memory and time estimate for a run, made before it starts and checked after it ends.

Memory: weights, gradients and optimizer state from the parameter counts; activations from the
model's shape and the tokens of an average and of the largest batch; the head's logits from how
the loss is computed (chunked over supervised tokens, or full logits for every position).
Time: the run's floating-point operations (6 per parameter per token for full fine-tuning, 4 when
the weights are frozen, plus attention and the head) over this device's measured matmul speed,
at the efficiency tunelab's benchmark measured on this kind of device.
"""

import logging
import time
from dataclasses import asdict, dataclass

import torch

log = logging.getLogger(__name__)

GiB = 2**30
# Fraction of the measured matmul speed that whole training steps reached in bench/sft.py
# (SmolLM2-135M, bf16 autocast, packed rows): small matrices, elementwise work and the optimizer
# make up the rest. CPU: 0.5 from bench/calibration.json (full fine-tuning and LoRA both measured
# 0.49-0.50 on 2026-11-27); CUDA: an assumption, not yet calibrated (no GPU run has recorded its
# estimate next to its measurement).
STEP_EFFICIENCY = {"cpu": 0.5, "cuda": 0.45}
RUNTIME_OVERHEAD_GIB = {"cpu": 0.9, "cuda": 0.0}  # Python, torch, tokenizers, datasets in the process


@dataclass
class RunEstimate:
    parameters: int
    trainable: int
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float  # largest batch
    head_gib: float
    peak_gib: float
    tokens_per_step: float  # mean
    flops_per_step: float
    matmul_tflops: float  # measured on this device, in the run's precision
    seconds_per_step: float
    total_seconds: float

    def describe(self, device: str) -> str:
        memory = "peak RSS" if device == "cpu" else "peak GPU memory"
        return (
            f"Estimate: {self.parameters / 1e6:.1f}M parameters ({self.trainable / 1e6:.1f}M trainable); weights "
            f"{self.weights_gib:.2f} GiB, gradients {self.gradients_gib:.2f}, optimizer state {self.optimizer_gib:.2f}, "
            f"activations {self.activations_gib:.2f} (largest batch), output head {self.head_gib:.2f}: {memory} about "
            f"{self.peak_gib:.1f} GiB. {self.tokens_per_step:.0f} tokens per step at {self.flops_per_step / 1e12:.2f} TFLOP; "
            f"matmuls run at {self.matmul_tflops:.2f} TFLOP/s here, so about {self.seconds_per_step:.1f} s per step, "
            f"{_duration(self.total_seconds)} in all."
        )

    def as_dict(self) -> dict:
        return asdict(self)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """Sustained speed of square matmuls in ``dtype`` on ``device`` (TFLOP/s)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    (a @ b).sum().item()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        c = a @ b
        runs += 1
    c.sum().item()  # wait for the device
    return 2 * size**3 * runs / (time.perf_counter() - started) / 1e12


def _activation_bytes_per_token(config, compute_bytes: int, fused: bool) -> float:
    """Bytes a Llama-shaped decoder layer keeps for the backward pass, per token (checked against
    autograd's saved tensors on SmolLM2: 29 KiB unfused, 17 KiB fused, in bf16 autocast).
    transformers' modules: each norm keeps its float32 input and output and each projection its
    own cast of the norm's output; q/k/v, the attention output and four MLP tensors. Fused
    (``method.fused_kernels``): each norm keeps its float32 input and one cast output; the MLP
    keeps gate, up and their product."""
    h = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * h)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) * (getattr(config, "head_dim", None) or h // heads)
    attention = compute_bytes * (h + 2 * kv + 2 * h)  # q, k, v; the attention output and o_proj's input
    if fused:
        norms = 2 * (4 * h + compute_bytes * h)
        mlp = compute_bytes * 3 * inter
        return norms + attention + mlp
    norms = 2 * 2 * 4 * h + compute_bytes * 5 * h  # fp32 input and output each; 3 + 2 projection casts
    mlp = compute_bytes * 4 * inter
    return norms + attention + mlp


def estimate_run(model, *, precision: str, lengths: list[int], supervised: list[int], batch_size: int, packing: bool,
                 steps: int, accumulate: int, chunked_loss: bool, loss_chunk_size: int, device: torch.device,
                 fused_kernels: bool = False, matmul_tflops: float | None = None, gradient_checkpointing: bool = False,
                 weight_bits: float | None = None) -> RunEstimate:  # fmt: skip
    """Estimate one rank's memory and the run's time from the training examples' token counts
    (``lengths``, ``supervised``) and the batch layout. ``matmul_tflops``: the device's matmul
    speed (default: measured here). ``gradient_checkpointing``: each layer keeps only its input,
    and the forward pass runs twice. ``weight_bits``: the frozen matrices of the body stored in
    that many bits (QLoRA's NF4), computed in bf16."""
    config = getattr(model, "config", None)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weight_bytes = 2 if precision in ("bf16-true", "16-true") else 4
    compute_bytes = 2 if precision.startswith(("bf16", "16")) or weight_bits else 4
    weights = parameters * weight_bytes
    if weight_bits:  # the frozen matrices of the decoder's layers, quantised; embeddings, head and norms as they are
        quantised = sum(p.numel() for name, p in model.named_parameters() if not p.requires_grad and p.dim() == 2 and "embed" not in name and "lm_head" not in name)
        weights = quantised * weight_bits / 8 + (parameters - quantised) * weight_bytes
    gradients = trainable * weight_bytes
    optimizer = 2 * trainable * 4
    n = max(len(lengths), 1)
    mean_length, mean_supervised = sum(lengths) / n, sum(supervised) / n
    top = sorted(lengths, reverse=True)[:batch_size]
    # The largest micro-batch: the longest examples packed together, or padded to the longest.
    longest_batch = sum(top) if packing else len(top) * max(top, default=0)
    mean_batch = batch_size * mean_length  # real tokens per micro-batch
    hidden = getattr(config, "hidden_size", 0)
    vocab = getattr(config, "vocab_size", 0)
    layers = getattr(config, "num_hidden_layers", 0)
    per_layer_token = _activation_bytes_per_token(config, compute_bytes, fused_kernels) if config is not None else 0.0
    if gradient_checkpointing:  # every layer's input, and one layer's activations while it is recomputed
        activations = longest_batch * (layers * hidden * compute_bytes + per_layer_token)
    else:
        activations = layers * longest_batch * per_layer_token
    # The head: chunked, one chunk of fp32 logits and its gradient; otherwise the full logits of the
    # largest batch in the compute dtype, in fp32 for the loss, and their gradient.
    most_supervised = sum(sorted(supervised, reverse=True)[:batch_size])
    head_rows = min(loss_chunk_size, most_supervised) if chunked_loss else longest_batch
    head = head_rows * vocab * ((4 + compute_bytes) if chunked_loss else (compute_bytes + 4 + 4))
    kind = device.type if device.type in STEP_EFFICIENCY else "cpu"
    peak = weights + gradients + optimizer + activations + head + RUNTIME_OVERHEAD_GIB[kind] * GiB

    # FLOPs per token: body matmuls at 2 per parameter forward and 4 backward when the weights
    # train (2 when only activations need gradients); causal attention over the example (padded:
    # over the padded row); the head on the tokens it covers, 6 per head parameter.
    embedding = vocab * hidden
    body = max(parameters - embedding * (1 if getattr(config, "tie_word_embeddings", False) else 2), 0)
    per_token = (6 if trainable > 0.5 * parameters else 4) * body + (2 * body if gradient_checkpointing else 0)
    if packing:
        computed, context = mean_batch, mean_length
    else:  # padded to the longest of each batch (taken in order, a fair sample when shuffled)
        batches = [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)] or [[0]]
        computed = sum(len(b) * max(b) for b in batches) / len(batches)
        context = computed / batch_size
    attention = 6 * layers * hidden * context
    head_tokens = batch_size * mean_supervised if chunked_loss else computed
    flops_per_step = accumulate * (computed * (per_token + attention) + head_tokens * 6 * embedding)
    dtype = torch.bfloat16 if compute_bytes == 2 else torch.float32
    tflops = matmul_tflops or measure_matmul_tflops(device, dtype)
    seconds = flops_per_step / (tflops * 1e12 * STEP_EFFICIENCY[kind])
    return RunEstimate(
        parameters, trainable, weights / GiB, gradients / GiB, optimizer / GiB, activations / GiB, head / GiB, peak / GiB,
        mean_batch * accumulate, flops_per_step, tflops, seconds, seconds * steps,
    )  # fmt: skip


def model_flops_per_token(config, context: float) -> float:
    """Training FLOPs per token of a Llama-shaped model as model FLOPs utilisation (MFU) counts
    them: 6 x the matmul parameters, the output head included (as if every token's logits were
    formed), plus causal attention over ``context`` tokens (the mean example or block). Work a
    trainer skips (padding, logits of unsupervised tokens) or adds (recomputation) does not
    count, so MFU compares the useful work trainers get through. ``config``: a transformers
    config or its dict."""
    get = config.get if isinstance(config, dict) else lambda name, default=None: getattr(config, name, default)
    hidden, layers, vocab = get("hidden_size"), get("num_hidden_layers"), get("vocab_size")
    heads = get("num_attention_heads")
    head_dim = get("head_dim") or hidden // heads
    q, kv = heads * head_dim, (get("num_key_value_heads") or heads) * head_dim
    per_layer = hidden * (2 * q + 2 * kv) + 3 * hidden * get("intermediate_size", 4 * hidden)
    attention = 6 * layers * q * context  # QK^T and AV: 2 x 2 x q x context per token forward, halved (causal), x3 with backward
    return 6 * (layers * per_layer + vocab * hidden) + attention


def measured_peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GiB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
