"""Where a training step's time goes, per configuration of tunelab's SFT fast paths, on the work
folder that ``bench/sft.py`` leaves (its model, its tokenized examples, its batch size).

Each variant loads the same model, applies ``FullFinetuneSFT.prepare_model`` with its options,
trains a few warm-up steps (compiling where it compiles), times the next ``--steps`` steps, and
records one step under ``torch.profiler``: the kernels that took the time, as text tables in
``OUT/kernels.txt``, beside the timings in ``OUT/profile.json``. The
engine's loop is not used (no Fabric, no checkpoints), so the numbers are the step alone, for
comparing variants with each other, not with ``bench/sft.py``'s table.

Written for issue 19's open question: padded batches (``method.packing=false``) ran 2x slower
than tunelab's plain path on an H200, and the cause had not been profiled. A work folder of
``bench/pretrain.py`` (``train_blocks.json``) profiles ``CausalLMPretrain`` instead, with the
``pt-*`` variants: where a pretraining step goes when its blocks all have the same length.

    python bench/sft.py --device cuda --model-config 1b ... --workdir /tmp/bench     # the work folder first
    python bench/gpu_profile.py --workdir /tmp/bench --variants nopack,nopack-attention-eager --out outputs/profile
    python bench/gpu_profile.py --workdir /tmp/bench/pretrain --variants pt-defaults,pt-rows-in-graph --out outputs/profile
"""

import argparse
import json
import time
from pathlib import Path

VARIANTS = {
    "defaults": ({}, "tunelab defaults (packed rows)"),
    "nopack": ({"packing": False}, "padded batches, otherwise defaults"),
    "nopack-attention-eager": ({"packing": False, "attention_eager": True}, "padded batches, attention outside the compiled layers"),
    "nopack-eager": ({"packing": False, "compile": False}, "padded batches, no torch.compile"),
    "nopack-nofused": ({"packing": False, "fused_kernels": False}, "padded batches, transformers' RMSNorm/MLP"),
    "nopack-pad64": ({"packing": False, "pad_multiple": 64}, "padded batches, rows padded to a multiple of 64"),
    "reference": ({"packing": False, "compile": False, "fused_kernels": False, "chunked_loss": False}, "the plain path"),
    # bench/pretrain.py's work folder: full blocks, every one block_size tokens
    "pt-defaults": ({}, "pretraining defaults (on a GPU: full blocks as plain rows)"),
    "pt-chunk4096": ({"loss_chunk_size": 4096}, "pretraining defaults, loss chunks of 4096 rows"),
    "pt-chunk16384": ({"loss_chunk_size": 16384}, "pretraining defaults, loss chunks of 16384 rows"),
    "pt-eager": ({"compile": False}, "pretraining defaults without torch.compile"),
    "pt-nochunk": ({"chunked_loss": False}, "pretraining defaults with full logits"),
    "pt-rows": ({"packing": False}, "one row per block (no padding), attention outside the compiled layers"),
    "pt-rows-in-graph": ({"packing": False, "attention_in_graph": True, "no_mask": True},
                         "one row per block, no mask: causal sdpa inside the compiled layers"),
    "pt-rows-static": ({"packing": False, "attention_in_graph": True, "no_mask": True, "static": True},
                       "the same, layers compiled for static shapes"),
    "pt-reference": ({"packing": False, "compile": False, "fused_kernels": False, "chunked_loss": False}, "the plain path"),
}


def batches(rows: list[dict], batch_size: int, packing: bool, pad_token_id: int, pad_multiple: int):
    import torch

    from tunelab.data.collate import pack_collate, pad_collate
    from tunelab.data.constants import IGNORE_INDEX

    for start in range(0, len(rows) - batch_size + 1, batch_size):
        chunk = rows[start : start + batch_size]
        if packing:
            yield pack_collate(chunk)
            continue
        longest = max(len(r["input_ids"]) for r in chunk)
        target = -(-longest // pad_multiple) * pad_multiple
        batch = pad_collate(chunk, pad_token_id)
        if target > longest:  # widen with padding: mask 0, no label
            extra = target - longest
            batch["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, extra), value=pad_token_id)
            batch["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, extra), value=0)
            batch["labels"] = torch.nn.functional.pad(batch["labels"], (0, extra), value=IGNORE_INDEX)
        yield batch


def block_batches(blocks: list[list[int]], batch_size: int, packing: bool, pad_token_id: int, no_mask: bool):
    from tunelab.data import BlockCollator

    import torch

    collate = BlockCollator(pad_token_id, packing, plain_rows=torch.cuda.is_available())
    for start in range(0, len(blocks) - batch_size + 1, batch_size):
        batch = collate([{"input_ids": b, "segments": [len(b)]} for b in blocks[start : start + batch_size]])
        if no_mask:  # equal-length rows: no padding to hide, attention is plain causal
            batch.pop("attention_mask", None)
        yield batch


def device_busy_ms(prof) -> float | None:
    """The step's total kernel time on the device (against its wall time: the rest is the host)."""
    events = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            return sum(getattr(e, key) for e in events) / 1e3
        except AttributeError:
            continue
    return None


def profile_table(prof) -> str:
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            return prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=90)
        except (AttributeError, KeyError, RuntimeError):
            continue
    return "(no profiler table)"


def run_variant(name: str, spec: dict, rows: list[dict], args, out: Path) -> dict:
    import torch

    from tunelab.methods import CausalLMPretrain
    from tunelab.methods.fullfinetune_sft import FullFinetuneSFT
    from tunelab.models.kernels import use_packed_attention
    from transformers import AutoModelForCausalLM

    options, _ = VARIANTS[name]
    options = dict(options)
    attention_eager, pad_multiple = options.pop("attention_eager", False), options.pop("pad_multiple", 1)
    in_graph, no_mask, static = options.pop("attention_in_graph", False), options.pop("no_mask", False), options.pop("static", False)
    pretraining = name.startswith("pt-")
    device = torch.device(spec["device"])
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).to(device)
    if attention_eager:  # the packed attention function falls back to sdpa for padded rows, outside the compiled graph
        use_packed_attention(model)
    method = (CausalLMPretrain(block_size=spec["block_size"], **options) if pretraining
              else FullFinetuneSFT(fix_token_embedding=False, **options))  # fmt: skip
    if in_graph or static:  # the variant compiles the layers itself
        method.compile = False
    model = method.prepare_model(model)
    if in_graph:
        model.set_attn_implementation("sdpa")
    if in_graph or static:
        from tunelab.models.kernels import compile_decoder_layers

        if static:
            for layer in [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]:
                layer.compile(dynamic=False)
        else:
            compile_decoder_layers(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"], fused=device.type == "cuda")
    pad_id = model.config.pad_token_id or 0
    data = list(
        block_batches(rows, spec["batch_size"], method.packing, pad_id, no_mask) if pretraining
        else batches(rows, spec["batch_size"], method.packing, pad_id, pad_multiple)
    )  # fmt: skip

    def step(batch):
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16):
            result = method.loss(model, batch)
        (result.loss / result.units).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    for i in range(args.warmup):
        step(data[i % len(data)])
    sync()
    warmup_s = time.perf_counter() - started
    timed, tokens, supervised = [], 0, 0
    for i in range(args.warmup, args.warmup + args.steps):
        batch = data[i % len(data)]
        t0 = time.perf_counter()
        step(batch)
        sync()
        timed.append(time.perf_counter() - t0)
        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        supervised += int((batch["labels"][:, 1:] != -100).sum())
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        step(data[(args.warmup + args.steps) % len(data)])
        sync()
    with open(out / "kernels.txt", "a") as f:  # one file for every variant (the GPU machine returns few files)
        f.write(f"## {name}: {VARIANTS[name][1]}\n\n{profile_table(prof)}\n\n")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del model, optimizer
    return {
        "step_s": sum(timed) / len(timed), "supervised_tokens_per_s": supervised / sum(timed), "tokens_per_s": tokens / sum(timed),
        "warmup_s": warmup_s, "peak_gib": peak, "profiled_step_device_ms": device_busy_ms(prof), "about": VARIANTS[name][1],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="bench/sft.py's work folder (spec.json, train_tokens.jsonl, model)")
    parser.add_argument("--variants", default="nopack,nopack-attention-eager,nopack-eager,reference", help=f"from: {', '.join(VARIANTS)}")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="outputs/profile")
    args = parser.parse_args()
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    spec = json.loads(Path(args.workdir, "spec.json").read_text())
    blocks = Path(args.workdir, "train_blocks.json")
    if blocks.exists() != all(n.startswith("pt-") for n in names):
        raise SystemExit(f"{args.workdir} is {'bench/pretrain.py' if blocks.exists() else 'bench/sft.py'}'s work folder: "
                         f"its variants are {'' if blocks.exists() else 'not '}the pt-* ones")  # fmt: skip
    if blocks.exists():
        rows = json.loads(blocks.read_text())
    else:
        rows = [json.loads(line) for line in Path(args.workdir, "train_tokens.jsonl").read_text().splitlines() if line.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.txt").write_text("")
    results = {}
    for name in names:
        try:
            results[name] = run_variant(name, spec, rows, args, out)
        except Exception as error:  # one variant failing must not lose the others' numbers
            results[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
        print(name, json.dumps(results[name]), flush=True)
        (out / "profile.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
