"""(bench/peft_families.py: not peft.py, which would shadow the peft package on sys.path.)

Every adapter family on one model and one data set: trainable parameters, speed, memory and
held-out loss before and after (the measured "PEFT method comparison").

Each family trains SmolLM2-135M-Instruct with tunelab's parameter-efficient SFT
(method=lm_finetune/peftfinetune_sft) on the same GSM8K chats, in the same order, for the same
steps and batch size, each in its own process, at that family's usual learning rate. Held-out loss
is computed afterwards by one fp32 function on the reloaded adapter (peft's loader, or tunelab's for
bottleneck adapters), so a row is what a user gets from the saved folder. QLoRA reloads onto the
4-bit base it trained on.

    python bench/peft_families.py                            # every family, about 30 min on 2 cores
    python bench/peft_families.py --runs lora,qlora --steps 4
"""

import argparse
import csv
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/ is not a package: share bench/sft.py's helpers by plain import

from sft import DEFAULT_DATA, add_shared_arguments, combine, heldout_loss, load_rows, peak_memory_gib, prepare, run_in_turn, run_names, throughput  # noqa: E402

TARGETS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
LORA = f"_target_:peft.LoraConfig,task_type:CAUSAL_LM,r:16,lora_alpha:32,lora_dropout:0.0,target_modules:{TARGETS}"
# name -> the adapter node, its learning rate, extra overrides, what it is
RUNS = {
    "lora": {"node": LORA, "lr": 2e-4, "about": "LoRA r=16, all linear layers"},
    "dora": {"node": LORA + ",use_dora:true", "lr": 2e-4, "about": "DoRA (weight-decomposed LoRA) r=16"},
    "rslora": {"node": LORA + ",use_rslora:true", "lr": 2e-4, "about": "rank-stabilised LoRA r=16"},
    "pissa": {"node": LORA + ",init_lora_weights:pissa_niter_4", "lr": 2e-4, "about": "LoRA r=16 initialised from the principal singular vectors (PiSSA, fast SVD)"},
    "olora": {"node": LORA + ",init_lora_weights:olora", "lr": 2e-4, "about": "LoRA r=16 with orthonormal (QR) initialisation (OLoRA)"},
    "qlora": {"node": LORA, "lr": 2e-4, "overrides": ["modelpool.quantization=nf4"], "about": "LoRA r=16 on the NF4 base (double quantisation; bf16 compute where native, else fp32)"},
    "ia3": {"node": f"_target_:peft.IA3Config,task_type:CAUSAL_LM,target_modules:[k_proj,v_proj,down_proj],feedforward_modules:[down_proj]",
            "lr": 3e-3, "about": "IA3 (learned rescaling of keys, values and the MLP input)"},
    "loha": {"node": f"_target_:peft.LoHaConfig,task_type:CAUSAL_LM,r:8,alpha:16,target_modules:{TARGETS}", "lr": 2e-4, "about": "LoHa r=8"},
    "lokr": {"node": f"_target_:peft.LoKrConfig,task_type:CAUSAL_LM,r:8,alpha:16,target_modules:{TARGETS}", "lr": 2e-4, "about": "LoKr r=8"},
    "prompt": {"node": "_target_:peft.PromptTuningConfig,task_type:CAUSAL_LM,num_virtual_tokens:20", "lr": 3e-2,
               "about": "prompt tuning, 20 virtual tokens, random init"},
    "prompt-text": {"node": "_target_:peft.PromptTuningConfig,task_type:CAUSAL_LM,num_virtual_tokens:20,prompt_tuning_init:TEXT,"
                            "prompt_tuning_init_text:'Solve the math problem step by step and end with #### and the answer.'",
                    "lr": 3e-2, "about": "prompt tuning, 20 virtual tokens initialised from a task description"},
    "prefix": {"node": "_target_:peft.PrefixTuningConfig,task_type:CAUSAL_LM,num_virtual_tokens:20", "lr": 1e-2, "about": "prefix tuning, 20 tokens"},
    "prefix-projection": {"node": "_target_:peft.PrefixTuningConfig,task_type:CAUSAL_LM,num_virtual_tokens:20,prefix_projection:true,encoder_hidden_size:256",
                          "lr": 1e-3, "about": "prefix tuning through a two-layer projection (hidden 256)"},
    "bottleneck": {"node": "_target_:tunelab.models.bottleneck.BottleneckConfig,size:64", "lr": 1e-3,
                   "about": "bottleneck (Houlsby) adapters, width 64, after attention and MLP"},
}  # fmt: skip


# ----------------------------------------------------------------------------- workers
def base_model(spec: dict, quantized: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.models.pool import quantization_config

    extra = {"quantization_config": quantization_config("nf4")} if quantized else {}
    return AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, **extra)


def run_family(name: str, spec: dict) -> dict:
    from transformers import AutoTokenizer

    from tunelab.config import compose_config
    from tunelab.engine import train

    run = RUNS[name]
    out = Path(spec["workdir"]) / "runs" / name
    overrides = [
        "method=lm_finetune/peftfinetune_sft", "modelpool=CausalLMPool/smollm2-135m", f"modelpool.model_path={spec['model_dir']}",
        f"+modelpool.tokenizer_path={spec['tokenizer_dir']}", "~method.peft_config", f"+method.peft_config={{{run['node']}}}",
        f"method.optimizer.lr={run['lr'] * spec.get('lr_scale', 1.0):g}", "method.save_ckpt_type=peft", f"data.path={Path(spec['workdir']) / 'train.jsonl'}",
        "data.format=openai", "data.shuffle=false", f"method.max_steps={spec['steps']}", "method.max_epochs=-1",
        f"method.dataloader_kwargs.batch_size={spec['batch_size']}", f"method.max_length={spec['max_length']}",
        "method.optimizer.weight_decay=0.0", "method.lr_scheduler=null", "method.gradient_clip_val=1.0", "taskpool=dummy",
        f"output_dir={out}", "overwrite=true", "progress_bar=false", "seed=0", "method.checkpoint_save_interval=step",
        f"method.checkpoint_save_frequency={spec['steps'] + 1}", f"fabric.accelerator={spec['device']}", *run.get("overrides", []),
    ]  # fmt: skip
    started = time.perf_counter()
    result = train(compose_config(overrides))
    wall = time.perf_counter() - started
    memory = peak_memory_gib(spec["device"])
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/step_seconds")]
    steps = [{"seconds": float(r["train/step_seconds"]), "tokens": float(r["train/tokens"]),
              "supervised": float(r["train/supervised_tokens"]), "examples": spec["batch_size"]} for r in rows]  # fmt: skip
    folder = result.final_checkpoint
    base = base_model(spec, quantized=name == "qlora")
    if (folder / "bottleneck_config.json").exists():
        from tunelab.models.bottleneck import load_bottleneck_adapters

        model = load_bottleneck_adapters(base, folder)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(folder))
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    loss = heldout_loss(model.to(spec["device"]) if name != "qlora" else model, load_rows(Path(spec["workdir"]) / "heldout_tokens.jsonl"),
                        tokenizer.pad_token_id, spec["device"])  # fmt: skip
    return {**throughput(steps), "peak_memory_gib": memory, "heldout_loss": loss, "train_wall_s": wall, "steps": len(steps),
            "trainable_parameters": summary["trainable_parameters"], "total_parameters": summary["total_parameters"]}  # fmt: skip


def worker(name: str, spec: dict) -> None:
    if name == "base":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
        rows = load_rows(Path(spec["workdir"]) / "heldout_tokens.jsonl")
        result = {"heldout_loss": heldout_loss(base_model(spec), rows, tokenizer.pad_token_id, spec["device"]),
                  "heldout_loss_nf4": heldout_loss(base_model(spec, quantized=True), rows, tokenizer.pad_token_id, spec["device"])}  # fmt: skip
    else:
        result = run_family(name, spec)
    (Path(spec["workdir"]) / f"{name}.json").write_text(json.dumps(result, indent=2))


# ----------------------------------------------------------------------------- driver
def table(results: dict, spec: dict) -> str:
    done = {k: v for k, v in results.items() if k != "base" and "error" not in v and "skipped" not in v}
    lora = done.get("lora", {})
    memory = "peak GPU memory" if spec["device"] == "cuda" else "peak RSS"
    lines = [
        f"| family | trainable parameters | share of the model | supervised tokens/s | x LoRA | {memory} (GiB) | x LoRA | held-out loss | x LoRA | what |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, value in results.items():
        if name == "base":
            continue
        if name not in done:
            lines.append(f"| {name} | - | - | - | - | - | - | - | - | {RUNS[name]['about']}: **{value.get('skipped') or 'failed: ' + value.get('error', '')}** |")
            continue

        def ratio(key):
            return f"{value[key] / lora[key]:.2f}x" if lora.get(key) else "-"

        lines.append(
            f"| {name} | {value['trainable_parameters']:,} | {value['trainable_parameters'] / value['total_parameters']:.3%} | "
            f"{value['supervised_tokens_per_s']:.1f} | {ratio('supervised_tokens_per_s')} | {value['peak_memory_gib']:.2f} | "
            f"{ratio('peak_memory_gib')} | {value['heldout_loss']:.4f} | {ratio('heldout_loss')} | {RUNS[name]['about']} |"
        )
    base = results.get("base", {})
    before = f"{base['heldout_loss']:.4f} (on the NF4 base: {base['heldout_loss_nf4']:.4f})" if "heldout_loss" in base else "-"
    lines += ["", f"Held-out loss before training: {before}. {spec['steps']} steps of {spec['batch_size']} examples, each family at its own learning rate" + (f" times {spec['lr_scale']:g}" if spec.get("lr_scale", 1.0) != 1.0 else "") + "."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from: {', '.join(RUNS)}")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="GSM8K-style jsonl (question/answer)")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr-scale", type=float, default=1.0, help="multiply every family's learning rate (a sweep: run with 1, 2.5, 5)")
    add_shared_arguments(parser, "outputs/bench-peft")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, json.loads(Path(args.workdir, "spec.json").read_text()))
        return
    names = ["base"] + run_names(args.runs, RUNS)
    args.lr = args.lora_lr = args.peak_tflops = None  # bench/sft.py's prepare records them; each family here has its own
    spec = prepare(args)
    spec["lr_scale"] = args.lr_scale
    workdir = Path(args.workdir)
    (workdir / "spec.json").write_text(json.dumps(spec, indent=2))
    runs = {"base": {}, **RUNS}

    def write_table(results):
        if args.output:
            Path(args.output).write_text(table(results, spec) + "\n")

    results = run_in_turn(__file__, names, runs, workdir, args.repeat, combine, write_table)
    report = table(results, spec)
    print()
    print(report)
    (workdir / "results.json").write_text(json.dumps({"spec": spec, "results": results}, indent=2))
    write_table(results)


if __name__ == "__main__":
    main()
