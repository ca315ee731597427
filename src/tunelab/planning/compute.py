"""``tunelab plan compute``: will a run fit, and how long will it take, before any weight is loaded.

The model is built on PyTorch's meta device from its config alone (a shipped model pool, a model
folder, or one of the well-known shapes below), with the adapter the method adds, and the engine's
own estimate (``estimate_run``) reads its parameter counts and shape. The device is this machine
(its matmul speed measured) or a named GPU (its datasheet's dense bf16 speed, of which matmuls
reach ``MATMUL_REACH``: 790 of 989 TFLOP/s measured on an H200). Memory on a GPU adds what the
CUDA context and the allocator's slack take (``GPU_MARGIN_GIB``) before it is compared with the
card's.

The estimate's constants are checked against the runs the benchmarks measured here
(``bench/calibration.json``, tested: within 25% for memory and step time).
"""

from dataclasses import dataclass

import torch

from tunelab.errors import UsageError

# Llama-family shapes (their published configs) to plan for models that are not on this machine.
MODEL_SHAPES = {
    "llama2-7b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 32, "vocab_size": 32000},
    "llama2-13b": {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
                   "num_key_value_heads": 40, "vocab_size": 32000},
    "llama3-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 128256},
    "llama3-70b": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
                   "num_key_value_heads": 8, "vocab_size": 128256},
    "mistral-7b": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "vocab_size": 32000},
}  # fmt: skip
# name -> (memory in GiB as sold, dense bf16 tensor TFLOP/s from the datasheet)
GPUS = {"h200": (141, 989), "h100": (80, 989), "a100-80g": (80, 312), "a100-40g": (40, 312), "l40s": (48, 362), "rtx-4090": (24, 165),
        "l4": (24, 121), "a10g": (24, 70), "t4": (16, 65)}  # fmt: skip
MATMUL_REACH = 0.8  # bf16 matmuls reach this share of the datasheet (790 of 989 measured on an H200)
GPU_MARGIN_GIB = 1.5  # the CUDA context and the caching allocator's slack, on top of what tensors take
NF4_BITS = 4.127  # 4-bit NormalFloat with double quantisation: 4 bits, plus 8-bit block scales (64) quantised in blocks of 256
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Plan:
    model: str
    method: str
    device: str
    estimate: object  # RunEstimate
    fits: dict  # GPU name -> bool

    def render(self) -> str:
        e = self.estimate
        memory = "peak RSS" if self.device == "cpu" else "GPU memory"
        lines = [
            f"{self.model}, {self.method}: {e.parameters / 1e9:.2f}B parameters, {e.trainable / 1e6:.1f}M trainable",
            f"  weights        {e.weights_gib:8.2f} GiB",
            f"  gradients      {e.gradients_gib:8.2f} GiB",
            f"  optimizer      {e.optimizer_gib:8.2f} GiB  (AdamW: two fp32 moments per trainable parameter)",
            f"  activations    {e.activations_gib:8.2f} GiB  (the largest micro-batch)",
            f"  output head    {e.head_gib:8.2f} GiB",
            f"  {memory:14s} {e.peak_gib:8.2f} GiB" + ("" if self.device == "cpu" else f"  (with {GPU_MARGIN_GIB} GiB for the CUDA context and allocator)"),
            f"Time on {self.device}: {e.tokens_per_step:.0f} tokens a step, {e.flops_per_step / 1e12:.1f} TFLOP, matmuls at {e.matmul_tflops:.3g} TFLOP/s: "
            f"about {e.seconds_per_step:.2f} s a step, {e.total_seconds / 3600:.1f} h for the run",
            "Fits on: " + (", ".join(f"{g} ({GPUS[g][0]} GB)" for g, ok in self.fits.items() if ok) or "none of the GPUs known here (try qlora, "
                           "--checkpointing, a smaller batch or a sharded run)"),
        ]  # fmt: skip
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"model": self.model, "method": self.method, "device": self.device, "estimate": self.estimate.as_dict(), "fits": self.fits}


def model_config(spec: str):
    """A transformers config for ``spec``: a shape above, a shipped model pool or a model folder."""
    from transformers import AutoConfig

    if spec in MODEL_SHAPES:
        options = dict(MODEL_SHAPES[spec])
        return AutoConfig.for_model(options.pop("model_type"), **options)
    from pathlib import Path

    from tunelab.evaluation.models import _shipped_pool

    pool = _shipped_pool(spec)
    if pool is not None:
        if pool.model_path is None:
            options = dict(pool.config)
            options.setdefault("vocab_size", len(pool.load_tokenizer()))
            return AutoConfig.for_model(options.pop("model_type", "llama"), **options)
        return AutoConfig.from_pretrained(pool._hf_dir(pool.model_path, "modelpool.model_path", "model"))
    if (Path(spec) / "config.json").is_file():
        return AutoConfig.from_pretrained(spec)
    raise UsageError(f"--model {spec!r} is not a shipped model pool (smollm2-135m, small-llama, tiny-llama), a model folder with config.json, "
                     f"or a known shape ({', '.join(MODEL_SHAPES)}).")  # fmt: skip


def meta_model(config, method: str, lora_r: int):
    """The model on the meta device (no memory, no weights), with the method's adapter."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if method in ("lora", "qlora"):
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    return model


def plan_compute(model: str, method: str = "full", batch_size: int = 8, max_length: int = 512, mean_length: int | None = None,
                 supervised_share: float = 0.5, steps: int = 1000, gpu: str | None = None, precision: str = "bf16-mixed",
                 checkpointing: bool = False, lora_r: int = 16, packing: bool = True, matmul_tflops: float | None = None,
                 config: dict | None = None, longest_batch_tokens: int | None = None) -> Plan:  # fmt: skip
    """Memory and time of a run of ``method`` (full, lora, qlora) on ``model``, on this machine or
    ``gpu``. ``matmul_tflops``: this machine's matmul speed as measured before (default: measure
    it). ``config``: the model's config as a dict (``model_type`` and its fields) instead of
    looking ``model`` up. ``longest_batch_tokens``: the real tokens of the largest batch, when
    known (default: ``batch_size`` examples of ``max_length``, the worst case)."""
    from tunelab.planning.estimate import estimate_run

    if method not in ("full", "lora", "qlora"):
        raise UsageError(f"--method {method!r}: choose full, lora or qlora.")
    if gpu is not None and gpu not in GPUS:
        raise UsageError(f"--gpu {gpu!r}: choose one of {', '.join(GPUS)} (or leave it out for this machine).")
    if not 0 < supervised_share <= 1:
        raise UsageError(f"--supervised-share {supervised_share}: give a share in (0, 1].")
    mean_length = mean_length or max_length // 2
    if not 0 < mean_length <= max_length:
        raise UsageError(f"--mean-length {mean_length}: give a length from 1 to --max-length {max_length}.")
    if config is not None:
        from transformers import AutoConfig

        options = dict(config)
        config = AutoConfig.for_model(options.pop("model_type", "llama"), **options)
    net = meta_model(config or model_config(model), method, lora_r)
    # the examples: one batch of the longest, the rest at the mean length
    longest = -(-(longest_batch_tokens or batch_size * max_length) // batch_size)
    lengths = [longest] * batch_size + [mean_length] * (50 * batch_size)
    supervised = [max(int(n * supervised_share), 1) for n in lengths]
    device = torch.device("cuda" if gpu else "cpu")
    tflops = GPUS[gpu][1] * MATMUL_REACH if gpu else matmul_tflops
    estimate = estimate_run(net, precision=precision, lengths=lengths, supervised=supervised, batch_size=batch_size, packing=packing,
                            steps=steps, accumulate=1, chunked_loss=True, loss_chunk_size=1024, device=device, fused_kernels=True,
                            matmul_tflops=tflops, gradient_checkpointing=checkpointing,
                            weight_bits=NF4_BITS if method == "qlora" else None)  # fmt: skip
    from tunelab.planning.estimate import RUNTIME_OVERHEAD_GIB

    # on a GPU: the tensors, and the context and allocator's slack; planned here, the process's own overhead goes
    gpu_peak = estimate.peak_gib + GPU_MARGIN_GIB - (0 if gpu else RUNTIME_OVERHEAD_GIB["cpu"])
    if gpu:
        estimate.peak_gib = gpu_peak
    fits = {name: gpu_peak <= memory * 1e9 / 2**30 for name, (memory, _) in GPUS.items()}
    return Plan(model, method, gpu or "cpu (this machine)", estimate, fits)
