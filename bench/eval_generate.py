"""Generation throughput of `tunelab eval generate` against a plain transformers `generate` loop.

Both answer the same GSM8K problems with the same model, batch size, greedy decoding and token
limit, in one process, one after the other (in alternating order over rounds, so neither always
runs on a warm or a cold cache). The plain loop is what a user writes: batches in file order, left
padding, ``model.generate(..., do_sample=False)``, answers cut at the end-of-sequence token.
tunelab's path is the library call behind the command (``LocalModel.generate``: prompts batched by
length, tunelab's decoding loop with a reserved key/value cache). Completion tokens are counted
the same way for both (through the first end-of-sequence token), and both answers are scored with
the GSM8K metric, so the table also shows that the speed costs no accuracy.

    python bench/eval_generate.py                      # 64 problems, batch 16, 256 new tokens: ~15 min on 2 cores
    python bench/eval_generate.py --problems 16 --max-new-tokens 64 --rounds 1
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def plain_generate(model, tokenizer, prompts: list, batch_size: int, max_new_tokens: int, eos: list[int]) -> tuple[list[str], int]:
    """The reference loop: file order, left padding, transformers' generate."""
    tokenizer.padding_side = "left"
    texts, tokens = [], 0
    for start in range(0, len(prompts), batch_size):
        rendered = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts[start : start + batch_size]]
        inputs = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        for row in out[:, inputs["input_ids"].shape[1] :].tolist():
            ends = [k for k, t in enumerate(row) if t in eos]
            tokens += ends[0] + 1 if ends else len(row)
            texts.append(tokenizer.decode(row[: ends[0]] if ends else row, skip_special_tokens=True).strip())
    return texts, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--start", type=int, default=7273, help="first row (default: the last 200 rows of GSM8K train)")
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not Path(args.data).exists():
        print(f"{args.data} is absent: give --data (GSM8K rows with question and answer)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE.parent / "src"))
    from tunelab.evaluation.items import load_items
    from tunelab.evaluation.metrics import gsm8k
    from tunelab.evaluation.models import load_eval_model

    torch.set_num_threads(torch.get_num_threads())
    items = load_items(args.data, limit=args.problems, start=args.start)
    model = load_eval_model(args.model, device="cpu")
    prompts, references = [i.prompt for i in items], [i.reference for i in items]
    results = {"tunelab": [], "transformers": []}
    outputs = {}
    for round_ in range(args.rounds):
        order = ["tunelab", "transformers"] if round_ % 2 == 0 else ["transformers", "tunelab"]
        for name in order:
            began = time.perf_counter()
            if name == "tunelab":
                generated = model.generate(prompts, args.max_new_tokens, batch_size=args.batch_size)
                texts, tokens = [g.text for g in generated], sum(g.tokens for g in generated)
            else:
                texts, tokens = plain_generate(model.model, model.tokenizer, prompts, args.batch_size, args.max_new_tokens, model.eos_token_ids)
            seconds = time.perf_counter() - began
            results[name].append({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})
            outputs[name] = texts
            print(f"round {round_ + 1} {name:<13} {tokens:>7,} tokens in {seconds:7.1f} s = {tokens / seconds:7.1f} tokens/s", flush=True)
    summary = {}
    for name, runs in results.items():
        best = max(r["tokens_per_s"] for r in runs)
        accuracy = sum(gsm8k(outputs[name], references)) / len(references)
        summary[name] = {"best_tokens_per_s": best, "rounds": runs, "gsm8k": accuracy}
    same = sum(a == b for a, b in zip(outputs["tunelab"], outputs["transformers"]))
    ratio = summary["tunelab"]["best_tokens_per_s"] / summary["transformers"]["best_tokens_per_s"]
    print(f"\n| path | best tokens/s | x transformers | GSM8K accuracy |\n| --- | ---: | ---: | ---: |")
    for name in ("transformers", "tunelab"):
        s = summary[name]
        print(f"| {name} | {s['best_tokens_per_s']:.1f} | {s['best_tokens_per_s'] / summary['transformers']['best_tokens_per_s']:.2f}x | {s['gsm8k']:.3f} |")
    print(f"\n{same} of {len(items)} answers identical; {args.problems} problems from row {args.start}, batch {args.batch_size}, "
          f"max {args.max_new_tokens} new tokens, greedy, {torch.get_num_threads()} threads")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary, "ratio": ratio, "identical_answers": same}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
