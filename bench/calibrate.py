"""The planning estimate against measured runs: ``tunelab plan compute``'s memory and step time next
to what ``bench/sft.py`` measured, written to ``bench/calibration.json`` (tests/planning replays
every entry: the estimate within 25% of the measurement).

    python bench/sft.py --runs tunelab,tunelab-lora --workdir outputs/bench-calibration
    python bench/calibrate.py outputs/bench-calibration          # appends or replaces those runs' entries

An entry holds what the plan needs (the model's config, method, batch, the longest and mean
example, the supervised share, precision, this machine's measured matmul speed) and what the run
measured: the process's peak RSS (GPU: peak allocated) and the median step time after the first
step (the first compiles).
"""

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CALIBRATION = HERE / "calibration.json"
FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
          "vocab_size", "tie_word_embeddings")  # fmt: skip


def entry(workdir: Path, name: str, spec: dict, lengths: list[int], supervised: list[int]) -> dict:
    run = workdir / "runs" / name
    summary = json.loads((run / "summary.json").read_text())
    result = json.loads((workdir / f"{name}.json").read_text()) if (workdir / f"{name}.json").is_file() else {}
    if not result and (workdir / "results.json").is_file():
        result = json.loads((workdir / "results.json").read_text())["results"].get(name, {})
    with (run / "metrics.csv").open() as rows:
        seconds = [float(r["train/step_seconds"]) for r in csv.DictReader(rows) if r.get("train/step_seconds")]
    config = json.loads((Path(spec["model_dir"]) / "config.json").read_text())
    measured_peak = result.get("peak_memory_gib") or summary["estimate"]["measured_peak_gib"]
    from omegaconf import OmegaConf

    from tunelab.engine.trainer import resolve_precision

    fabric = OmegaConf.load(run / "config.yaml").fabric
    precision = resolve_precision(fabric.get("precision", "32-true"), fabric.get("accelerator", "auto"))  # what the run trained in
    batches = [lengths[i : i + spec["batch_size"]] for i in range(0, len(lengths), spec["batch_size"])]
    return {
        "run": name, "date": summary.get("date") or "", "device": spec["device"],
        "plan": {"model_config": {k: config[k] for k in FIELDS if k in config}, "method": "lora" if "lora" in name else "full",
                 "batch_size": spec["batch_size"], "max_length": max(lengths), "longest_batch_tokens": max(sum(b) for b in batches),
                 "mean_length": round(sum(lengths) / len(lengths)),
                 "supervised_share": round(sum(supervised) / sum(lengths), 4), "precision": precision,
                 "matmul_tflops": summary["estimate"]["matmul_tflops"]},
        "measured": {"peak_gib": round(measured_peak, 3), "seconds_per_step": round(statistics.median(seconds[1:] or seconds), 4)},
        "run_estimate": {"peak_gib": round(summary["estimate"]["peak_gib"], 3), "seconds_per_step": round(summary["estimate"]["seconds_per_step"], 4)},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", help="a bench/sft.py work folder")
    parser.add_argument("--runs", default="tunelab,tunelab-lora")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent / "src"))
    from tunelab.planning.compute import plan_compute

    workdir = Path(args.workdir)
    spec = json.loads((workdir / "spec.json").read_text())
    rows = [json.loads(line) for line in (workdir / "train_tokens.jsonl").read_text().splitlines()]
    used = rows[: spec["steps"] * spec["batch_size"]]  # the examples the runs trained on (in order, no shuffling)
    lengths = [len(r["input_ids"]) for r in used]
    supervised = [sum(1 for t in r["labels"][1:] if t != -100) for r in used]
    entries = json.loads(CALIBRATION.read_text()) if CALIBRATION.is_file() else []
    for name in args.runs.split(","):
        new = entry(workdir, name, spec, lengths, supervised)
        plan = plan_compute("calibration", **{k: v for k, v in new["plan"].items() if k != "model_config"}, config=new["plan"]["model_config"],
                            steps=spec["steps"])  # fmt: skip
        new["plan_estimate"] = {"peak_gib": round(plan.estimate.peak_gib, 3), "seconds_per_step": round(plan.estimate.seconds_per_step, 4)}
        entries = [e for e in entries if not (e["run"] == name and e["device"] == new["device"])] + [new]
        print(f"{name}: peak {new['measured']['peak_gib']:.2f} GiB measured, {new['plan_estimate']['peak_gib']:.2f} planned; "
              f"{new['measured']['seconds_per_step']:.2f} s a step measured, {new['plan_estimate']['seconds_per_step']:.2f} planned")  # fmt: skip
    CALIBRATION.write_text(json.dumps(entries, indent=2) + "\n")


if __name__ == "__main__":
    main()
