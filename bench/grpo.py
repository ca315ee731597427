"""Side-by-side GRPO benchmark: tunelab against TRL's GRPOTrainer.

Both trainers get the same GSM8K prompts (in file order, no shuffling), the same model, reward
functions (``tunelab.rewards``: GSM8K final-number match plus the '#### <n>' format), group size,
completion length, sampling settings, learning rate, clipping, batch and step count, each in its own
process. The table reports completions/s over the whole step, generation tokens/s (completion
tokens over the time spent generating) and training tokens/s (prompt + completion tokens over the
rest of the step), all after the first step; the peak RSS (GPU: peak allocated memory); and the
held-out mean reward before and after training, on problems neither trained on, from one shared
function: greedy completions of the same length limit, scored by the same rewards.

    python bench/grpo.py                                   # tunelab, trl (about 30 min on 2 cores)
    python bench/grpo.py --runs tunelab,trl --steps 20 --repeat 2
    python bench/grpo.py --warm-start-steps 8              # both start from a short SFT on the answer format

``--warm-start-steps N`` first fine-tunes the model (tunelab SFT, N steps of 8 worked GSM8K
solutions that are neither training prompts nor held out) and every run, the untrained baseline
included, starts from that checkpoint: the base model writes the '#### <n>' line about 2% of the
time, too rarely for 8 completions a step to see a reward at all, while after a few SFT steps a
group usually holds some completions with the format and some without, which is what GRPO learns from.
    python bench/grpo.py --model-config tiny --prompts 8 --heldout 4 --steps 2 --max-completion-length 8   # smoke test

The TRL peer is optional: ``pip install -e .[bench]``; a run whose peer is missing is reported as
skipped, not failed.
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/ is not a package: share bench/sft.py's helpers by plain import

from sft import add_shared_arguments, gsm8k_records, launch, load_rows, model_and_tokenizer, peak_memory_gib, run_in_turn, run_names  # noqa: E402

DEFAULT_DATA = HERE.parent / ".." / "shared" / "data" / "gsm8k" / "train.jsonl"
INSTRUCTION = "Solve the problem step by step, then give the final answer on a last line of the form '#### <number>'."
RUNS = {
    "tunelab": {"kind": "tunelab", "about": "tunelab GRPO, full weights"},
    "trl": {"kind": "trl", "about": "TRL GRPOTrainer, full weights"},
}


def prompt_messages(question: str) -> list[dict]:
    return [{"role": "user", "content": f"{question}\n\n{INSTRUCTION}"}]


def reward_functions():
    """The rewards both trainers optimise and the held-out score sums: match + format."""
    from tunelab.rewards import RegexFormat, gsm8k_exact_match

    return [gsm8k_exact_match, RegexFormat()]


# ----------------------------------------------------------------------------- held-out reward
def heldout_reward(model, tokenizer, rows: list[dict], spec: dict, batch_size: int = 8) -> dict:
    """Mean total reward (and each function's) of greedy completions for ``rows``, fp32."""
    import torch
    from transformers import GenerationConfig

    model = model.float().to(spec["device"]).eval()
    tokenizer.padding_side = "left"
    config = GenerationConfig(do_sample=False, max_new_tokens=spec["max_completion_length"], eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, repetition_penalty=1.0)  # fmt: skip
    functions = reward_functions()
    totals = [0.0] * len(functions)
    for first in range(0, len(rows), batch_size):
        chunk = rows[first : first + batch_size]
        texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in chunk]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(spec["device"])
        with torch.inference_mode():
            out = model.generate(**encoded, generation_config=config)
        completions = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, fn in enumerate(functions):
            totals[i] += sum(fn([r["prompt"] for r in chunk], completions, answer=[r["answer"] for r in chunk]))
    scores = {f"reward_{i}": t / len(rows) for i, t in enumerate(totals)}
    return {"reward": sum(totals) / len(rows), **scores}


# ----------------------------------------------------------------------------- workers
def run_trl(name: str, spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    train_rows = load_rows(Path(spec["workdir"]) / "train.jsonl")
    dataset = Dataset.from_list(train_rows)
    generation = {"seconds": 0.0, "tokens": 0}
    real_generate = model.generate

    def timed_generate(*args, **kwargs):  # TRL generates through the model's own generate
        started = time.perf_counter()
        out = real_generate(*args, **kwargs)
        generation["seconds"] += time.perf_counter() - started
        prompt = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
        completion = out[:, prompt:]
        generation["tokens"] += int((completion != tokenizer.pad_token_id).sum())
        return out

    model.generate = timed_generate

    def text_rewards(fn):
        def reward(prompts, completions, answer, **_):  # conversational prompts: completions are message lists
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return fn(prompts, texts, answer=answer)

        reward.__name__ = getattr(fn, "__name__", type(fn).__name__).split("(")[0]
        return reward

    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started, self.generated = time.perf_counter(), dict(generation)

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.started
            steps.append({"seconds": seconds, "generation_seconds": generation["seconds"] - self.generated["seconds"],
                          "completion_tokens": generation["tokens"] - self.generated["tokens"]})  # fmt: skip

    config = GRPOConfig(
        output_dir=str(Path(spec["workdir"]) / "runs" / name), per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to=[], bf16=spec["precision"] == "bf16", use_cpu=spec["device"] == "cpu", seed=0, disable_tqdm=True,
        num_generations=spec["num_generations"], max_completion_length=spec["max_completion_length"], temperature=1.0, top_p=1.0,
        top_k=0, beta=0.0, loss_type="dapo", scale_rewards="group", shuffle_dataset=False, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=[text_rewards(f) for f in reward_functions()], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimer()])  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    memory = peak_memory_gib(spec["device"])
    prompt_tokens = spec["prompt_tokens_per_step"]
    rows = [{**s, "tokens": s["completion_tokens"] + prompt_tokens} for s in steps]
    model.generate = real_generate
    after = heldout_reward(trainer.model, tokenizer, load_rows(Path(spec["workdir"]) / "heldout.jsonl"), spec)
    return {**speeds(rows, spec), "peak_memory_gib": memory, "heldout": after, "train_wall_s": wall, "steps": len(rows)}


def run_tunelab(name: str, spec: dict) -> dict:
    import csv

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.config import compose_config
    from tunelab.engine import train

    out = Path(spec["workdir"]) / "runs" / name
    overrides = [
        "method=lm_finetune/grpo", "modelpool=CausalLMPool/smollm2-135m", f"modelpool.model_path={spec['model_dir']}",
        f"+modelpool.tokenizer_path={spec['tokenizer_dir']}", f"data.path={Path(spec['workdir']) / 'train.jsonl'}", "data.format=prompt",
        "data.shuffle=false", f"method.max_steps={spec['steps']}", "method.max_epochs=-1", f"method.dataloader_kwargs.batch_size={spec['batch_size']}",
        f"method.num_generations={spec['num_generations']}", f"method.max_completion_length={spec['max_completion_length']}",
        f"method.max_prompt_length={spec['max_prompt_length']}", f"method.optimizer.lr={spec['lr']}", "method.optimizer.weight_decay=0.0",
        "method.gradient_clip_val=1.0", "method.fix_token_embedding=false", "method.save_ckpt_type=hf", "method.log_samples_every_n_steps=0",
        "method.reward_funcs=[{_target_:tunelab.rewards.gsm8k_exact_match},{_target_:tunelab.rewards.RegexFormat}]",
        "method.checkpoint_save_interval=step", f"method.checkpoint_save_frequency={spec['steps'] + 1}",
        "taskpool=dummy", f"output_dir={out}", "overwrite=true", "progress_bar=false", "seed=0", f"fabric.accelerator={spec['device']}",
        f"fabric.precision={'bf16-mixed' if spec['precision'] == 'bf16' else '32-true'}",
    ]  # fmt: skip
    started = time.perf_counter()
    result = train(compose_config(overrides))
    wall = time.perf_counter() - started
    memory = peak_memory_gib(spec["device"])
    with open(out / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("train/step_seconds")]
    completions = spec["batch_size"]
    rows = [{"seconds": float(r["train/step_seconds"]), "generation_seconds": float(r["train/timing/generation_seconds"]),
             "completion_tokens": float(r["train/completions/mean_length"]) * completions,
             "tokens": float(r["train/completions/mean_length"]) * completions + spec["prompt_tokens_per_step"]} for r in logged]  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    model = AutoModelForCausalLM.from_pretrained(result.final_checkpoint, dtype=torch.float32)
    after = heldout_reward(model, tokenizer, load_rows(Path(spec["workdir"]) / "heldout.jsonl"), spec)
    return {**speeds(rows, spec), "peak_memory_gib": memory, "heldout": after, "train_wall_s": wall, "steps": len(rows)}


def speeds(rows: list[dict], spec: dict, warmup: int = 1) -> dict:
    timed = rows[warmup:] or rows
    seconds = sum(r["seconds"] for r in timed)
    generating = sum(r["generation_seconds"] for r in timed)
    return {
        "completions_per_s": spec["batch_size"] * len(timed) / seconds,
        "generation_tokens_per_s": sum(r["completion_tokens"] for r in timed) / max(generating, 1e-9),
        "training_tokens_per_s": sum(r["tokens"] for r in timed) / max(seconds - generating, 1e-9),
        "generation_share": generating / seconds, "step_seconds": seconds / len(timed),
    }


def run_base(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    return {"heldout": heldout_reward(model, tokenizer, load_rows(Path(spec["workdir"]) / "heldout.jsonl"), spec)}


def run_warm_start(spec: dict) -> dict:
    """tunelab SFT on the warm-start solutions: the checkpoint every run then starts from."""
    from tunelab.config import compose_config
    from tunelab.engine import train

    out = Path(spec["workdir"]) / "runs" / "warm-start"
    overrides = [
        "method=lm_finetune/fullfinetune_sft", "modelpool=CausalLMPool/smollm2-135m", f"modelpool.model_path={spec['model_dir']}",
        f"+modelpool.tokenizer_path={spec['tokenizer_dir']}", f"data.path={Path(spec['workdir']) / 'warm_start.jsonl'}", "data.format=openai",
        "data.shuffle=false", f"method.max_steps={spec['warm_start_steps']}", "method.max_epochs=-1", "method.dataloader_kwargs.batch_size=8",
        f"method.optimizer.lr={spec['warm_start_lr']}", "method.lr_scheduler=null", "method.save_ckpt_type=hf", "method.max_length=512",
        "taskpool=dummy", f"output_dir={out}", "overwrite=true", "progress_bar=false", "seed=0", f"fabric.accelerator={spec['device']}",
        f"fabric.precision={'bf16-mixed' if spec['precision'] == 'bf16' else '32-true'}",
    ]  # fmt: skip
    result = train(compose_config(overrides))
    return {"model_dir": str(result.final_checkpoint), "train_wall_s": result.train_seconds}


def worker(name: str, spec: dict) -> None:
    if name == "warm":
        result = run_warm_start(spec)
    else:
        result = run_base(spec) if name == "base" else (run_tunelab if RUNS[name]["kind"] == "tunelab" else run_trl)(name, spec)
    (Path(spec["workdir"]) / f"{name}.json").write_text(json.dumps(result, indent=2))


# ----------------------------------------------------------------------------- driver
def prepare(args) -> dict:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    warm_examples = 8 * args.warm_start_steps
    records = gsm8k_records(args.data, args.prompts + warm_examples + args.heldout, "--prompts + 8 x --warm-start-steps + --heldout")
    rows = [{"prompt": prompt_messages(r["question"]), "answer": r["answer"]} for r in records]
    for split, chosen in (("train", rows[: args.prompts]), ("heldout", rows[-args.heldout :])):
        (workdir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
    solutions = [  # the worked answers without GSM8K's calculator annotations (<<2*3=6>>)
        {"messages": r["prompt"] + [{"role": "assistant", "content": re.sub(r"<<[^>]*>>", "", r["answer"])}]}
        for r in rows[args.prompts : args.prompts + warm_examples]
    ]  # fmt: skip
    (workdir / "warm_start.jsonl").write_text("".join(json.dumps(r) + "\n" for r in solutions))
    tokenizer, model_dir = model_and_tokenizer(args, workdir)
    prompts_per_step = args.batch_size // args.num_generations
    lengths = [prompt_length(tokenizer, r["prompt"]) for r in rows[: args.prompts]]
    prompt_tokens = sum(lengths[: prompts_per_step * args.steps]) * args.num_generations / max(args.steps, 1)
    return {
        "workdir": str(workdir), "tokenizer_dir": str(workdir / "tokenizer"), "model_dir": model_dir, "model_config": args.model_config,
        "steps": args.steps, "batch_size": args.batch_size, "num_generations": args.num_generations, "lr": args.lr,
        "max_completion_length": args.max_completion_length, "max_prompt_length": max(lengths), "device": args.device,
        "precision": args.precision, "prompt_tokens_per_step": prompt_tokens, "warm_start_steps": args.warm_start_steps,
        "warm_start_lr": args.warm_start_lr,
    }  # fmt: skip


def prompt_length(tokenizer, messages: list[dict]) -> int:
    """Tokens of a rendered prompt. (Not ``len(apply_chat_template(...))``: transformers 5 returns
    a dict there, whose length is 2, and the prompts were cut to their last 2 tokens.)"""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def combine(rounds: list[dict]) -> dict:
    """One run over its rounds: median speeds, the highest memory peak."""
    import statistics

    result = dict(rounds[0])
    for key in [k for k in result if k.endswith("_per_s")]:
        result[key] = statistics.median(r[key] for r in rounds)
    result["peak_memory_gib"] = max(r["peak_memory_gib"] for r in rounds)
    return result


def table(results: dict) -> str:
    base = results.get("base", {}).get("heldout", {}).get("reward")
    trl = results.get("trl", {})
    lines = [
        "| run | completions/s | x TRL | generation tokens/s | training tokens/s | generation share | peak memory (GiB) | x TRL | held-out reward before -> after | what |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for name, value in results.items():
        if name == "base":
            continue
        if "error" in value or "skipped" in value:
            lines.append(f"| {name} | - | - | - | - | - | - | - | - | {RUNS[name]['about']}: **{value.get('skipped') or 'failed: ' + value['error']}** |")
            continue
        speed = f"{value['completions_per_s'] / trl['completions_per_s']:.2f}x" if "completions_per_s" in trl else "-"
        memory = f"{value['peak_memory_gib'] / trl['peak_memory_gib']:.2f}x" if "peak_memory_gib" in trl else "-"
        lines.append(
            f"| {name} | {value['completions_per_s']:.3f} | {speed} | {value['generation_tokens_per_s']:.1f} | {value['training_tokens_per_s']:.1f} | "
            f"{value['generation_share']:.0%} | {value['peak_memory_gib']:.2f} | {memory} | {base if base is None else f'{base:.3f}'} -> "
            f"{value['heldout']['reward']:.3f} | {RUNS[name]['about']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="tunelab,trl", help=f"comma-separated, from: {', '.join(RUNS)}")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="GSM8K jsonl (question/answer)")
    parser.add_argument("--prompts", type=int, default=64, help="training prompts (the first of the file)")
    parser.add_argument("--heldout", type=int, default=32, help="held-out problems (the last of the file)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8, help="completions per step")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--warm-start-steps", type=int, default=0, help="SFT steps (8 solutions each) every run starts from; 0: none")
    parser.add_argument("--warm-start-lr", type=float, default=2e-5)
    add_shared_arguments(parser, "outputs/bench-grpo")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, json.loads(Path(args.workdir, "spec.json").read_text()))
        return
    names = run_names(args.runs, RUNS)
    spec = prepare(args)
    Path(args.workdir, "spec.json").write_text(json.dumps(spec, indent=2))
    if args.warm_start_steps:
        print(f"warm start: {args.warm_start_steps} SFT steps ...", flush=True)
        warm = launch(__file__, "warm", Path(args.workdir))
        if "error" in warm:
            raise SystemExit(f"the warm start failed: {warm['error']} (log: {Path(args.workdir) / 'warm.log'})")
        spec["model_dir"] = warm["model_dir"]
        Path(args.workdir, "spec.json").write_text(json.dumps(spec, indent=2))
    write = (lambda results: Path(args.output).write_text(table(results) + "\n")) if args.output else None
    results = run_in_turn(__file__, ["base"] + names, RUNS, Path(args.workdir), args.repeat, combine, write)
    print()
    print(table(results))
    (Path(args.workdir) / "results.json").write_text(json.dumps({"spec": spec, "results": results}, indent=2))


if __name__ == "__main__":
    main()
