"""Load on ``tunelab serve``: concurrent clients across several adapters for a fixed time.

Each run starts ``tunelab serve`` in its own process with the base and ``--adapters`` LoRA adapters,
then ``--clients`` client threads (the official ``openai`` client) each ask one GSM8K question after
another for ``--duration`` seconds, rotating over the adapters (and the base with ``--with-base``),
greedy, up to ``--max-tokens`` tokens. A request that starts within the time is waited for; the
rates are counted over the whole time to the last answer. Two runs by default, the same load:

- ``batched``: up to ``--max-batch`` requests in the running batch (joining and leaving between
  steps, the adapters mixed);
- ``batched-peft``: the same with ``--mixed-lora peft`` (peft's mixed-adapter batches, the
  reference for tunelab's stacked LoRA update);
- ``sequential``: ``--max-batch 1``, one request at a time.

It reports requests/s, completion tokens/s, p50/p95 latency, failed requests and the server's
batch counts, and writes ``results.json`` and a table (``--table``, default
``bench/RESULTS-serve.md``).

    python bench/serve.py                                    # SmolLM2-135M-Instruct, 4 adapters, 16 clients, 60 s a run
    python bench/serve.py --model tiny-llama --duration 10   # a quick look
    python bench/serve.py --adapter gsm8k=runs/a/checkpoints/step-000040 --adapter alpaca=runs/b/...   # trained adapters

Without ``--adapter`` it makes ``--adapters`` LoRA adapters (rank 16 on every linear layer, random
non-zero updates): serving costs the same whatever the weights hold.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUESTIONS = HERE.parent / "src" / "tunelab" / "demo_data" / "gsm8k_demo.jsonl"


def make_adapters(model: str, count: int, folder: Path) -> dict[str, str]:
    """``count`` LoRA adapters of ``model`` with random non-zero updates, saved as peft folders."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunelab.evaluation.models import load_eval_model

    base = load_eval_model(model, device="cpu").model
    adapters = {}
    for k in range(count):
        torch.manual_seed(k)
        config = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # fmt: skip
        peft = get_peft_model(base, config)
        for name, parameter in peft.named_parameters():
            if "lora_B" in name:  # small updates: the answers change, and stay language
                parameter.data.mul_(0.05)
        peft.save_pretrained(folder / f"adapter{k}")
        base = peft.unload()
        adapters[f"adapter{k}"] = str(folder / f"adapter{k}")
    return adapters


def start_server(args, adapters: dict[str, str], max_batch: int, port: int, log: Path, mixed_lora: str = "stacked") -> subprocess.Popen:
    command = [sys.executable, "-m", "tunelab", "serve", "--model", args.model, "--name", "base", "--port", str(port),
               "--max-batch", str(max_batch), "--queue-size", str(args.queue_size), "--max-resident", str(max(len(adapters), 1)),
               "--max-tokens", str(args.max_tokens), "--dtype", args.dtype, "--mixed-lora", mixed_lora]  # fmt: skip
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env={k: v for k, v in os.environ.items() if k != "TUNELAB_API_KEY"})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server stopped while starting (exit {server.returncode}); its log: {log}\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return server
        except OSError:
            time.sleep(1)
    server.kill()
    raise SystemExit(f"the server did not answer within 600 s; its log: {log}")


def server_counts(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return {line.split()[0][len("tunelab_") : -len("_total")]: float(line.split()[1]) for line in lines if line.endswith(tuple("0123456789")) and "_total " in line and "{" not in line}


def drive(args, port: int, models: list[str], questions: list[str]) -> dict:
    """``args.clients`` threads asking questions for ``args.duration`` seconds; every request's outcome."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=args.request_timeout)
    records, lock = [], threading.Lock()
    start = time.perf_counter()
    stop = start + args.duration

    def client_loop(c: int) -> None:
        k = c
        while time.perf_counter() < stop:
            model, question = models[k % len(models)], questions[(k * 7 + c) % len(questions)]
            k += 1
            began = time.perf_counter()
            try:
                reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                       max_tokens=args.max_tokens, temperature=0)  # fmt: skip
                record = {"ok": True, "tokens": reply.usage.completion_tokens}
            except openai.APIError as err:
                record = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            record.update(model=model, latency=time.perf_counter() - began, done=time.perf_counter() - start)
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = max(r["done"] for r in records)
    ok = [r for r in records if r["ok"]]
    latencies = sorted(r["latency"] for r in ok)

    def quantile(q: float) -> float:
        return statistics.quantiles(latencies, n=100)[int(q * 100) - 1] if len(latencies) > 1 else (latencies or [float("nan")])[0]

    return {"requests": len(ok), "failed": len(records) - len(ok), "errors": sorted({r["error"] for r in records if not r["ok"]})[:5],
            "completion_tokens": sum(r["tokens"] for r in ok), "seconds": wall, "requests_per_s": len(ok) / wall,
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "p50_s": quantile(0.50), "p95_s": quantile(0.95)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="what tunelab serve --model takes (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", action="append", default=[], help="NAME=PATH: serve these adapters (default: make --adapters of them)")
    parser.add_argument("--adapters", type=int, default=4, help="adapters to make when no --adapter is given")
    parser.add_argument("--with-base", action="store_true", help="clients also ask the base")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per run")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16, help="the batched run's --max-batch")
    parser.add_argument("--queue-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--runs", default="batched,batched-peft,sequential")
    parser.add_argument("--port", type=int, default=8431)
    parser.add_argument("--workdir", default="runs/bench-serve")
    parser.add_argument("--table", default=str(HERE / "RESULTS-serve.md"))
    args = parser.parse_args()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.adapter:
        adapters = dict(spec.split("=", 1) for spec in args.adapter)
    else:
        print(f"making {args.adapters} LoRA adapters of {args.model} in {workdir / 'adapters'}", flush=True)
        adapters = make_adapters(args.model, args.adapters, workdir / "adapters")
    models = list(adapters) + (["base"] if args.with_base else [])
    questions = [json.loads(line)["question"] for line in QUESTIONS.read_text().splitlines() if line.strip()]
    results = {}
    for name in args.runs.split(","):
        max_batch = {"batched": args.max_batch, "batched-peft": args.max_batch, "sequential": 1}[name]
        server = start_server(args, adapters, max_batch, args.port, workdir / f"server-{name}.log", "peft" if name == "batched-peft" else "stacked")
        try:
            print(f"{name}: {args.clients} clients for {args.duration:g} s across {', '.join(models)} (--max-batch {max_batch})", flush=True)
            before = server_counts(args.port)
            results[name] = drive(args, args.port, models, questions)
            after = server_counts(args.port)
            steps = after["steps"] - before["steps"]
            results[name].update(max_batch=max_batch, steps=steps, prefill_s=after["prefill_seconds"] - before["prefill_seconds"],
                                 decode_s=after["decode_seconds"] - before["decode_seconds"], mixed_steps=after["mixed_steps"] - before["mixed_steps"],
                                 mean_batch=(after["step_rows"] - before["step_rows"]) / max(steps, 1))  # fmt: skip
            print(json.dumps(results[name]), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)
    (workdir / "results.json").write_text(json.dumps({"settings": vars(args), "adapters": adapters, "results": results}, indent=2))
    write_table(args, models, results)


def write_table(args, models: list[str], results: dict) -> None:
    reference = results.get("sequential")
    rows = ["| run | requests/s | completion tokens/s | x sequential | p50 latency (s) | p95 latency (s) | failed | mean rows per step | steps with several models |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name, r in results.items():
        ratio = f"{r['tokens_per_s'] / reference['tokens_per_s']:.2f}x" if reference else "-"
        label = f"{name} (--max-batch {r['max_batch']}{', --mixed-lora peft' if name == 'batched-peft' else ''})"
        rows.append(f"| {label} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {ratio} | {r['p50_s']:.2f} | "
                    f"{r['p95_s']:.2f} | {r['failed']} | {r['mean_batch']:.1f} | {r['mixed_steps'] / max(r['steps'], 1):.0%} of {r['steps']:.0f} |")  # fmt: skip
    command = " ".join(["python", "bench/serve.py", *sys.argv[1:]])
    text = (f"# tunelab serve under load\n\n`{command}` ({time.strftime('%Y-%m-%d')}): {args.model}, {args.dtype}, "
            f"{len(models)} served models ({', '.join(models)}), {args.clients} concurrent clients (openai client) for "
            f"{args.duration:g} s per run, greedy, up to {args.max_tokens} tokens, GSM8K questions; queue size {args.queue_size}; "
            f"{os.cpu_count()} CPU cores.\n\n" + "\n".join(rows) + "\n")  # fmt: skip
    Path(args.table).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
