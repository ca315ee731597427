"""Side-by-side DPO benchmark: tunelab against TRL's DPOTrainer.

Every trainer gets the same preference pairs (Anthropic HH harmless, in file order, no shuffling),
the same model, beta, learning rate, clipping, batch of pairs and step count, each in its own
process. The table reports tokens/s and pairs/s (measured after the first, warm-up step), the
process's peak RSS (GPU: peak allocated memory) and the held-out implicit-reward accuracy after
training, computed by one shared fp32 function for every trainer.

    python bench/dpo.py                                     # tunelab, tunelab-lora, trl, trl-lora
    python bench/dpo.py --runs tunelab,trl --repeat 2       # interleaved rounds, median speeds
    python bench/dpo.py --model-config tiny --train-pairs 16 --heldout 8 --steps 2   # quick smoke test

Only the first steps x batch-size pairs are trained on (12 x 4 = 48 by default). tokens/s counts,
for each of those pairs, the chat-template tokens of its chosen and its rejected conversation (the
prompt cut from the left to --max-prompt-length, the whole to --max-length, through the reply's
end-of-turn token): one count, made here, for every run, whatever each trainer counts itself
(TRL and tunelab also feed the newline the template puts after <|im_end|>: one token a sequence).

Held-out accuracy: for each of the last --heldout pairs, the implicit reward of a reply is
beta * (log p_policy(reply | prompt) - log p_reference(reply | prompt)), summed over the reply's
tokens through its <|im_end|>; a pair counts as right when the chosen reply's reward is higher
(ties count as wrong). The reference (the starting model) is scored once and cached in --workdir.

--precision auto (the default) trains every run under bf16 autocast where the device computes bf16
natively (CUDA, CPUs with AVX512-BF16 or AMX) and in fp32 elsewhere: on an AVX2-only CPU, bf16
matmuls are emulated and run several times slower than fp32, for every trainer alike. Scoring is
always fp32.

--resume continues an interrupted comparison in --workdir (the settings must be the same): a run
that finished is kept, and a run cut short goes on from its last checkpoint (written every
--checkpoint-every steps, the last two kept, optimizer state included, for tunelab and TRL alike).
A run's speed then spans several processes: each step's seconds are kept as the step ends, and a
step longer than 5x the median (the machine was paused, or the process was restarted mid-step) is
counted at the median, and the table says how many were. This is how the 1600-pair comparison runs
on 2 CPU cores, over several sessions:

    python bench/dpo.py --steps 400 --resume --workdir outputs/bench-dpo-1600 --output bench/RESULTS-dpo-1600.md

The TRL peer is optional: ``pip install -e .[bench]``. A run whose peer is missing is reported as
skipped, not failed.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/ is not a package: share bench/sft.py's helpers by plain import

from sft import LORA_TARGETS, MODEL_CONFIGS, add_shared_arguments, combine, launch, load_rows, peak_memory_gib, run_in_turn, run_names, throughput, training_precision  # noqa: E402

DEFAULT_DATA = HERE.parent / ".." / "shared" / "data" / "hh-rlhf" / "harmless_pairs.jsonl"
END_OF_TURN = "<|im_end|>"  # SmolLM2's chat template closes every turn with this token

# name -> how the run is configured. kind: which trainer; lora: train a LoRA adapter instead of all weights.
RUNS = {
    "tunelab": {"kind": "tunelab", "about": "tunelab DPO, full weights"},
    "tunelab-lora": {"kind": "tunelab", "lora": True, "about": "tunelab DPO, LoRA"},
    "trl": {"kind": "trl", "about": "TRL DPOTrainer, full weights"},
    "trl-lora": {"kind": "trl", "lora": True, "about": "TRL DPOTrainer + peft LoRA"},
}


def peer_of(name: str) -> str:
    """The TRL run a row's speed and memory are divided by."""
    return "trl-lora" if RUNS[name].get("lora") else "trl"


# ----------------------------------------------------------------------------- preference pairs
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def hh_messages(transcript: str) -> list[dict]:
    """An HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as chat messages."""
    parts = HH_TURN.split(transcript)
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": text} for who, text in zip(parts[1::2], parts[2::2])]


def split_pair(pair: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """A pair as chat messages: (shared prompt, chosen completion, rejected completion).

    The prompt is what both transcripts share, short of each one's last message. In this data that
    is everything before the final assistant reply, except in two transcripts with a "Human:" left
    inside a reply, whose chosen completion then holds two assistant messages.
    """
    chosen, rejected = hh_messages(pair["chosen"]), hh_messages(pair["rejected"])
    if not chosen or not rejected or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise ValueError(f"a transcript that does not end with an assistant turn: {pair['chosen'][-80:]!r}")
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def trl_example(pair: dict) -> dict:
    """TRL's conversational preference format: a shared prompt, then the completions as messages."""
    prompt, chosen, rejected = split_pair(pair)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def encode_completion(tokenizer, prompt: list[dict], completion: list[dict], max_prompt_length: int, max_length: int) -> tuple[list[int], int]:
    """Token ids of ``prompt`` + ``completion`` as the chat template renders them, and where the completion starts.

    The sequence ends with the completion's end-of-turn token; the prompt keeps its last
    ``max_prompt_length`` tokens, then the whole keeps its first ``max_length``.
    """
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not text.startswith(head):
        raise ValueError("the chat template renders the prompt differently on its own; cannot locate the completion")
    text = text[: text.rindex(END_OF_TURN) + len(END_OF_TURN)]  # what follows the last end of turn is not scored
    # One tokenization of the whole text, split at the completion by character offsets, so that the
    # tokens at the boundary are the ones the model sees in the full sequence.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start = next(i for i, (begin, _) in enumerate(encoded["offset_mapping"]) if begin >= len(head))
    prompt_ids = encoded["input_ids"][:start][-max_prompt_length:]
    return (prompt_ids + encoded["input_ids"][start:])[:max_length], len(prompt_ids)


def pair_sequences(tokenizer, pairs: list[dict], spec: dict) -> list[tuple[list[int], int]]:
    """chosen, rejected, chosen, rejected, ... each as (token ids, completion start)."""
    sequences = []
    for pair in pairs:
        prompt, *completions = split_pair(pair)
        sequences += [encode_completion(tokenizer, prompt, c, spec["max_prompt_length"], spec["max_length"]) for c in completions]
    return sequences


# ----------------------------------------------------------------------------- held-out scoring
def completion_logps(model, sequences: list[tuple[list[int], int]], pad_id: int, device: str, batch_size: int = 8) -> list[float]:
    """Summed log-probability of each sequence's completion tokens given what precedes them, in fp32."""
    import torch

    model = model.float().to(device).eval()
    logps = [0.0] * len(sequences)
    # Batches of similar lengths pad little; the order depends only on the sequences, so every model is scored alike.
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    with torch.inference_mode():
        for first in range(0, len(order), batch_size):
            chunk = order[first : first + batch_size]
            longest = max(len(sequences[i][0]) for i in chunk)
            ids = torch.full((len(chunk), longest), pad_id)
            mask = torch.zeros((len(chunk), longest), dtype=torch.long)
            for row, i in enumerate(chunk):
                tokens = sequences[i][0]
                ids[row, : len(tokens)], mask[row, : len(tokens)] = torch.tensor(tokens), 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            for row, i in enumerate(chunk):
                tokens, start = sequences[i]
                predicted = logits[row, start - 1 : len(tokens) - 1].float().log_softmax(-1)  # position t predicts t + 1
                target = torch.tensor(tokens[start:], device=predicted.device)
                logps[i] = float(predicted.gather(1, target[:, None]).sum())
    return logps


def heldout_sequences(spec: dict):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    return pair_sequences(tokenizer, load_rows(Path(spec["workdir"]) / "heldout.jsonl"), spec), tokenizer.pad_token_id


def reward_accuracy(model, spec: dict) -> dict:
    """Held-out implicit-reward accuracy of a trained policy, with its 95% Wilson interval."""
    from tunelab.evaluation.taskpool import wilson_interval

    sequences, pad_id = heldout_sequences(spec)
    policy = completion_logps(model, sequences, pad_id, spec["device"])
    reference = json.loads(Path(spec["reference_file"]).read_text())["logps"]
    rewards = [spec["beta"] * (p - r) for p, r in zip(policy, reference)]
    margins = [chosen - rejected for chosen, rejected in zip(rewards[0::2], rewards[1::2])]
    accuracy = sum(m > 0 for m in margins) / len(margins)
    low, high = wilson_interval(accuracy, len(margins))
    return {"accuracy": accuracy, "accuracy_low": low, "accuracy_high": high, "reward_margin": sum(margins) / len(margins),
            "heldout_pairs": len(margins)}  # fmt: skip


def reference_key(spec: dict) -> dict:
    """What the cached reference log-probs depend on."""
    heldout = (Path(spec["workdir"]) / "heldout.jsonl").read_bytes()
    # "scoring": bump it when split_pair, encode_completion or completion_logps change what is scored.
    return {"model_dir": spec["model_dir"], "model_config": spec["model_config"], "heldout_sha256": hashlib.sha256(heldout).hexdigest(),
            "max_length": spec["max_length"], "max_prompt_length": spec["max_prompt_length"], "scoring": 1}  # fmt: skip


# ----------------------------------------------------------------------------- workers
def steady(seconds: list[float]) -> tuple[list[float], int]:
    """A resumed run's step times with the steps over 5x the median (a pause, a restart mid-step)
    counted at the median; and how many were."""
    if len(seconds) < 5:
        return seconds, 0
    median = statistics.median(seconds[1:])
    kept = [seconds[0]] + [s if s <= 5 * median else median for s in seconds[1:]]
    return kept, sum(1 for s in seconds[1:] if s > 5 * median)


def timed_steps(seconds: list[float], spec: dict) -> list[dict]:
    """Step records for sft.throughput: step i trained pairs [i * batch, (i + 1) * batch), in file order.

    "supervised" holds pairs, so throughput's supervised_tokens_per_s is pairs/s here, as in
    tunelab's own TrainResult for a pair-level loss.
    """
    pair_tokens = json.loads((Path(spec["workdir"]) / "train_pair_tokens.json").read_text())
    size = spec["batch_size"]
    return [{"seconds": s, "tokens": sum(pair_tokens[i * size : (i + 1) * size]), "supervised": size, "examples": size}
            for i, s in enumerate(seconds)]  # fmt: skip


def segments(run_dir: Path, memory: float | None = None, wall: float | None = None) -> dict:
    """The processes a --resume run took: each one's peak memory and wall time, kept in the run's
    folder (a run started afresh forgets the earlier ones). Returns the peak over all and their sum."""
    path = run_dir / "segments.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    if memory is not None:
        rows.append({"peak_memory_gib": memory, "wall_s": wall, "cpu": cpu_model()})
        path.write_text(json.dumps(rows))
    return {"peak_memory_gib": max(r["peak_memory_gib"] for r in rows), "train_wall_s": sum(r["wall_s"] for r in rows),
            "processes_finished": len(rows), "cpus": sorted({r.get("cpu") or "?" for r in rows})}  # fmt: skip


def cpu_model() -> str:
    """The machine a process ran on (runs resumed in another session may land on another CPU)."""
    try:
        line = next(line for line in open("/proc/cpuinfo") if line.startswith("model name"))
        return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except (OSError, StopIteration):
        return "?"


def speed(seconds: list[float], spec: dict) -> dict:
    """throughput over the trained steps; for a --resume run, with paused steps at the median."""
    replaced = 0
    if spec.get("checkpoint_every"):
        seconds, replaced = steady(seconds)
    return {**throughput(timed_steps(seconds, spec)), "steps_at_median": replaced}


def left_cut_prompts(collate, max_prompt_length: int):
    """TRL 1.x has no max_prompt_length: keep each prompt's last tokens before its collator cuts to max_length."""

    def collate_cut(examples: list[dict]) -> dict:
        return collate([{**e, "prompt_ids": e["prompt_ids"][-max_prompt_length:]} for e in examples])

    return collate_cut


def run_trl(name: str, run: dict, spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    dataset = Dataset.from_list([trl_example(pair) for pair in load_rows(Path(spec["workdir"]) / "train.jsonl")])
    run_dir = Path(spec["workdir"]) / "runs" / name
    clock_file = run_dir / "step_seconds.json"  # --resume: every step's seconds, kept across processes
    seconds: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if spec.get("checkpoint_every") and clock_file.exists():  # resumed: the steps the checkpoint holds
                seconds.extend(json.loads(clock_file.read_text())[: state.global_step])
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            seconds.append(now - self.last)
            self.last = now
            if spec.get("checkpoint_every"):
                clock_file.write_text(json.dumps(seconds))

    class InOrderDPO(DPOTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    config = DPOConfig(
        output_dir=str(Path(spec["workdir"]) / "runs" / name), per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"], learning_rate=spec["lora_lr"] if run.get("lora") else spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=spec["beta"], loss_type=["sigmoid"],
        # Truncation is left to the collator below; with max_length set here TRL would also drop the
        # pairs whose prompt alone exceeds it, which tunelab and the scoring keep (cut from the left).
        max_length=None, precompute_ref_log_probs=False, eval_strategy="no", logging_steps=1,
        save_strategy="steps" if spec.get("checkpoint_every") else "no", save_steps=spec.get("checkpoint_every") or 500, save_total_limit=2,
        report_to=[], bf16=spec["precision"] == "bf16", gradient_checkpointing=False, dataloader_num_workers=0, seed=0,
        use_cpu=spec["device"] == "cpu", disable_tqdm=True,
    )  # fmt: skip
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=spec["max_length"], truncation_mode="keep_start")
    peft_config = None
    if run.get("lora"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    trainer = InOrderDPO(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
                         data_collator=left_cut_prompts(collator, spec["max_prompt_length"]), callbacks=[StepClock()])  # fmt: skip
    last = None
    if spec.get("checkpoint_every") and run_dir.is_dir():
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(run_dir))
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    wall = time.perf_counter() - started
    memory = peak_memory_gib(spec["device"])
    spans = segments(run_dir, memory, wall) if spec.get("checkpoint_every") else {"peak_memory_gib": memory, "train_wall_s": wall}
    # trl-lora: trainer.model is the base model with the trained adapter (a PeftModel), as a saved adapter would load.
    return {**speed(seconds, spec), **spans, **reward_accuracy(trainer.model, spec), "steps": len(seconds)}


def tunelab_overrides(name: str, run: dict, spec: dict) -> list[str]:
    """The same setup as the TRL runs, in tunelab's config overrides."""
    workdir = Path(spec["workdir"])
    if run.get("lora"):
        lora = (f"{{_target_:peft.LoraConfig,task_type:CAUSAL_LM,r:16,lora_alpha:32,lora_dropout:0.0,"
                f"target_modules:[{','.join(LORA_TARGETS)}]}}")  # fmt: skip
        # ++ sets the key whether or not the method's config already declares it.
        method = [f"++method.peft_config={lora}", f"method.optimizer.lr={spec['lora_lr']}", "method.save_ckpt_type=peft"]
    else:
        # TRL trains every weight; SmolLM2 ties the embeddings to the output head, so they must not be frozen.
        method = [f"method.optimizer.lr={spec['lr']}", "method.save_ckpt_type=hf", "method.fix_token_embedding=false"]
    precision = "bf16-mixed" if spec["precision"] == "bf16" else "32-true"
    return [
        "method=lm_finetune/dpo", "modelpool=CausalLMPool/smollm2-135m", f"modelpool.model_path={spec['model_dir']}",
        f"+modelpool.tokenizer_path={spec['tokenizer_dir']}", f"data.path={workdir / 'train.jsonl'}", "data.format=preference",
        "data.shuffle=false", f"method.beta={spec['beta']}", "method.optimizer.weight_decay=0.0", "method.lr_scheduler=null",
        f"method.dataloader_kwargs.batch_size={2 * spec['batch_size']}",  # counts sequences: a pair is two
        f"method.max_steps={spec['steps']}", "method.max_epochs=-1", f"method.max_length={spec['max_length']}",
        f"method.max_prompt_length={spec['max_prompt_length']}", "method.gradient_clip_val=1.0", f"fabric.precision={precision}",
        f"fabric.accelerator={spec['device']}", "gradient_checkpointing=false", "taskpool=dummy", f"output_dir={workdir / 'runs' / name}",
        "overwrite=true", "progress_bar=false", "log_every_n_steps=1", "seed=0",
    ] + method + resume_overrides(workdir / "runs" / name, spec)  # fmt: skip


def resume_overrides(run_dir: Path, spec: dict) -> list[str]:
    """--resume: a checkpoint every --checkpoint-every steps (the last two kept), and, where the run
    was cut short, go on from its latest (without overwrite=true, which would clear the folder)."""
    if not spec.get("checkpoint_every"):
        return []
    every = ["method.checkpoint_save_interval=step", f"method.checkpoint_save_frequency={spec['checkpoint_every']}",
             "method.save_optimizer_state=true", "method.keep_last_checkpoints=2"]  # fmt: skip
    if (run_dir / "checkpoints" / "latest").is_file():
        every += [f"method.ckpt_path={run_dir / 'checkpoints'}", "overwrite=false"]
    return every


def run_tunelab(name: str, run: dict, spec: dict) -> dict:
    import csv

    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.config import compose_config
    from tunelab.engine import train

    run_dir = Path(spec["workdir"]) / "runs" / name
    overrides = tunelab_overrides(name, run, spec)
    if "overwrite=false" in overrides:
        overrides.remove("overwrite=true")
        overrides.remove("overwrite=false")
    elif spec.get("checkpoint_every") and (run_dir / "segments.json").exists():
        (run_dir / "segments.json").unlink()  # started afresh: earlier processes do not count
    started = time.perf_counter()
    result = train(compose_config(overrides))
    wall = time.perf_counter() - started
    memory = peak_memory_gib(spec["device"])
    spans = segments(run_dir, memory, wall) if spec.get("checkpoint_every") else {"peak_memory_gib": memory, "train_wall_s": wall}
    with open(run_dir / "metrics.csv") as f:  # one row a step (log_every_n_steps=1)
        seconds = [float(r["train/step_seconds"]) for r in csv.DictReader(f) if r.get("train/step_seconds")]
    if run.get("lora"):
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(result.final_checkpoint))
    else:
        model = AutoModelForCausalLM.from_pretrained(result.final_checkpoint, dtype=torch.float32)
    return {**speed(seconds, spec), **spans, **reward_accuracy(model, spec), "steps": len(seconds), "own_tokens_per_s": result.tokens_per_s}


def run_reference(spec: dict) -> dict:
    """Log-probs of the held-out replies under the starting model, shared by every run's scoring."""
    import torch
    from transformers import AutoModelForCausalLM

    sequences, pad_id = heldout_sequences(spec)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    return {"key": reference_key(spec), "logps": completion_logps(model, sequences, pad_id, spec["device"])}


def worker(name: str, spec: dict) -> None:
    if name == "reference":
        result = run_reference(spec)
    else:
        run = RUNS[name]
        result = run_tunelab(name, run, spec) if run["kind"] == "tunelab" else run_trl(name, run, spec)
    (Path(spec["workdir"]) / f"{name}.json").write_text(json.dumps(result, indent=2))


# ----------------------------------------------------------------------------- driver
def model_folders(args, workdir: Path) -> tuple[str, str]:
    """The model folder and the tokenizer folder every run loads (a random-init model with --model-config)."""
    from tunelab.models import CausalLMPool

    pool = CausalLMPool(model_path=args.model)
    tokenizer = pool.load_tokenizer()
    tokenizer_dir = workdir / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    if not args.model_config:
        return str(pool._hf_dir(args.model, "--model", "model")), str(tokenizer_dir)  # GGUF: dequantized once, cached
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)  # saved once, so every run (and the reference) starts from the same weights
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **MODEL_CONFIGS[args.model_config])
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(workdir / "model")
    return str(workdir / "model"), str(tokenizer_dir)


def prepare(args) -> dict:
    """Write the training and held-out pairs, and the token count of each trained pair, into the work folder."""
    from transformers import AutoTokenizer

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pairs = load_rows(Path(args.data))
    if len(pairs) < args.train_pairs + args.heldout:
        raise SystemExit(f"{args.data} has {len(pairs)} pairs; need --train-pairs + --heldout = {args.train_pairs + args.heldout}")
    if args.steps * args.batch_size > args.train_pairs:
        raise SystemExit(f"--steps x --batch-size = {args.steps * args.batch_size} pairs, more than --train-pairs {args.train_pairs}")
    train, heldout = pairs[: args.train_pairs], pairs[-args.heldout :]
    for split, rows in (("train", train), ("heldout", heldout)):
        (workdir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir, tokenizer_dir = model_folders(args, workdir)
    spec = {
        "workdir": str(workdir), "tokenizer_dir": tokenizer_dir, "model_dir": model_dir, "model_config": args.model_config,
        "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length, "max_prompt_length": args.max_prompt_length,
        "beta": args.beta, "lr": args.lr, "lora_lr": args.lora_lr, "precision": args.precision, "device": args.device,
        "reference_file": str(workdir / "reference_logps.json"),
    }  # fmt: skip
    trained = pair_sequences(AutoTokenizer.from_pretrained(tokenizer_dir), train[: args.steps * args.batch_size], spec)
    pair_tokens = [len(chosen[0]) + len(rejected[0]) for chosen, rejected in zip(trained[0::2], trained[1::2])]
    (workdir / "train_pair_tokens.json").write_text(json.dumps(pair_tokens))
    print(f"train: {len(train)} pairs, the first {len(pair_tokens)} trained on ({sum(pair_tokens)} tokens); held out: {len(heldout)} pairs")
    return spec


def ensure_reference(spec: dict) -> None:
    """Score the held-out replies under the starting model, unless the cache already holds them."""
    cache = Path(spec["reference_file"])
    if cache.exists() and json.loads(cache.read_text()).get("key") == reference_key(spec):
        print(f"reference: cached in {cache}")
        return
    started = time.perf_counter()
    print("reference: scoring the held-out pairs under the starting model ...", flush=True)
    result = launch(__file__, "reference", Path(spec["workdir"]))
    if "error" in result:
        raise SystemExit(f"reference scoring failed: {result['error']}")
    cache.write_text(json.dumps(result))
    print(f"reference: done ({time.perf_counter() - started:.0f} s)", flush=True)


def table(results: dict, spec: dict) -> str:
    def ratio(value, peer_value):
        return f"{value / peer_value:.2f}x" if peer_value else "-"

    done = {k: v for k, v in results.items() if "error" not in v and "skipped" not in v}
    memory = "peak GPU memory" if spec["device"] == "cuda" else "peak RSS"
    lines = [
        f"| run | tokens/s | pairs/s | speed x TRL | {memory} (GiB) | memory x TRL | held-out accuracy [95% CI] | reward margin | pairs | what |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for name, value in results.items():
        about = RUNS[name]["about"]
        if name not in done:
            lines.append(f"| {name} | - | - | - | - | - | - | - | - | {about}: **{value.get('skipped') or 'failed: ' + value['error']}** |")
            continue
        peer = done.get(peer_of(name), {})
        pairs_per_s = value["supervised_tokens_per_s"]  # pairs/s: see timed_steps
        lines.append(
            f"| {name} | {value['tokens_per_s']:.0f} | {pairs_per_s:.2f} | {ratio(pairs_per_s, peer.get('supervised_tokens_per_s'))} | "
            f"{value['peak_memory_gib']:.2f} | {ratio(value['peak_memory_gib'], peer.get('peak_memory_gib'))} | "
            f"{value['accuracy']:.3f} [{value['accuracy_low']:.3f}, {value['accuracy_high']:.3f}] | {value['reward_margin']:+.4f} | "
            f"{value['examples']} | {about}{'; ' + str(value['steps_at_median']) + ' paused steps at the median' if value.get('steps_at_median') else ''} |"
        )
    cpus = sorted({cpu for value in done.values() for cpu in value.get("cpus", [])})
    if len(cpus) > 1:
        lines += ["", f"**The runs ran on different machines ({'; '.join(cpus)}): the speed ratios compare the machines as well as the trainers.**"]
    lines += ["", (
        f"beta {spec['beta']}, lr {spec['lr']} (LoRA {spec['lora_lr']}, r 16, alpha 32, all 7 projections), {spec['batch_size']} pairs a step, "
        f"{spec['steps']} steps, max length {spec['max_length']} (prompt {spec['max_prompt_length']}), "
        f"{'bf16 autocast' if spec['precision'] == 'bf16' else 'fp32'}, {spec['device']}. "
        "Speeds are measured after the first step; tokens/s counts the chosen and rejected chat-template tokens of the trained pairs, "
        "the same count for every run. Held-out accuracy: share of pairs whose chosen reply gets the higher implicit reward "
        "(fp32, ties count as wrong); reward margin: its mean chosen - rejected. LoRA rows are compared with trl-lora, full rows with trl."
    )]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from: {', '.join(RUNS)}")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="HH-style jsonl of {chosen, rejected} transcripts")
    parser.add_argument("--train-pairs", type=int, default=1600, help="the first pairs of --data form the training set")
    parser.add_argument("--heldout", type=int, default=200, help="the last pairs of --data are scored after training")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step")
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=5e-7)
    parser.add_argument("--lora-lr", type=float, default=5e-5)
    # bf16 autocast is fast only where the CPU multiplies bf16 natively (AVX512-BF16, AMX); on an
    # AVX2-only CPU its matmuls run several times slower than fp32, for every trainer alike.
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="training precision of every run; auto: bf16 where the device computes it natively, else fp32")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted comparison in --workdir: finished runs are kept, the others go on from their checkpoints")
    parser.add_argument("--checkpoint-every", type=int, default=25, help="--resume: steps between checkpoints")
    add_shared_arguments(parser, "outputs/bench-dpo")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, json.loads(Path(args.workdir, "spec.json").read_text()))
        return

    names = run_names(args.runs, RUNS)
    args.precision = training_precision(args.precision, args.device)
    workdir = Path(args.workdir)
    earlier = json.loads((workdir / "spec.json").read_text()) if args.resume and (workdir / "spec.json").exists() else None
    spec = prepare(args)
    spec["checkpoint_every"] = args.checkpoint_every if args.resume else 0
    finished = workdir / "finished"
    if earlier is not None and earlier != spec:
        changed = sorted(k for k in set(earlier) | set(spec) if earlier.get(k) != spec.get(k))
        raise SystemExit(f"--resume: {workdir} holds a comparison with other settings ({', '.join(changed)}): "
                         "give the same flags, or another --workdir.")  # fmt: skip
    if not args.resume:
        shutil.rmtree(finished, ignore_errors=True)
    (workdir / "spec.json").write_text(json.dumps(spec, indent=2))
    ensure_reference(spec)
    done = {name: json.loads((finished / f"{name}.json").read_text()) for name in names if (finished / f"{name}.json").exists()}
    for name in done:
        print(f"{name}: finished earlier ({finished / (name + '.json')})")
    todo = [name for name in names if name not in done]
    finished.mkdir(exist_ok=True)

    def keep_finished(results: dict) -> None:  # after every run: a session that ends later keeps it
        for name, result in results.items():
            if "error" not in result and "skipped" not in result:
                (finished / f"{name}.json").write_text(json.dumps(result, indent=2))

    results = run_in_turn(__file__, todo, RUNS, workdir, args.repeat, combine, keep_finished)  # median speeds, highest memory peak
    results = {name: done.get(name) or results[name] for name in names}
    report = table(results, spec)
    print()
    print(report)
    (workdir / "results.json").write_text(json.dumps({"spec": spec, "results": results}, indent=2))
    if args.output:
        Path(args.output).write_text(report + "\n")


if __name__ == "__main__":
    main()
