#!/usr/bin/env bash
# How much general ability GSM8K fine-tuning costs SmolLM2-135M-Instruct, and how much replay and
# EWC win back. Three SFT runs on the same GSM8K problems and held-out sets:
#   plain  - GSM8K only;
#   replay - GSM8K with REPLAY_RATIO of every step drawn from Alpaca (data.replay_ratio);
#   ewc    - GSM8K only, with elastic weight consolidation (Fisher information of Alpaca examples).
# Every run evaluates the GSM8K held-out problems (the task) and Alpaca examples no run trains on
# (the general set, a source with role: eval) before and after; summary.json's heldout_by_source
# has both, and TABLE.md the comparison.
#   bash examples/forgetting_gsm8k.sh [OUT]      (needs ../shared/data)
set -euo pipefail
OUT=${1:-runs/forgetting}
DATA=${DATA:-../shared/data}
TASK=${TASK:-160}            # GSM8K problems trained on (lines 1..TASK); the last 50 of the file are held out
STEPS=${STEPS:-20}
BATCH=${BATCH:-8}
LR=${LR:-2e-4}
REPLAY_RATIO=${REPLAY_RATIO:-0.25}
EWC_LAMBDA=${EWC_LAMBDA:-3000}
RUNS=${RUNS:-plain replay ewc}
mkdir -p "$OUT/data"
head -n "$TASK" "$DATA/gsm8k/train.jsonl" > "$OUT/data/gsm8k_train.jsonl"
tail -n 50 "$DATA/gsm8k/train.jsonl" > "$OUT/data/gsm8k_heldout.jsonl"
python - "$DATA/alpaca/alpaca_cleaned_1000.json" "$OUT/data" <<'PY'
import json, sys
records = json.load(open(sys.argv[1]))
for name, rows in (("alpaca_replay", records[:800]), ("alpaca_general", records[900:1000])):
    with open(f"{sys.argv[2]}/{name}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
PY
TASK_SOURCE="{name: gsm8k, path: '$OUT/data/gsm8k_train.jsonl', val_path: '$OUT/data/gsm8k_heldout.jsonl', format: prompt_completion, prompt_field: question, completion_field: answer}"
GENERAL="{name: general, path: '$OUT/data/alpaca_general.jsonl', format: alpaca, role: eval}"
REPLAY="{name: alpaca, path: '$OUT/data/alpaca_replay.jsonl', format: alpaca, role: replay}"
common=(method=lm_finetune/fullfinetune_sft modelpool=CausalLMPool/smollm2-135m data=mixture
  method.max_length=384 method.dataloader_kwargs.batch_size="$BATCH" method.max_steps="$STEPS" method.max_epochs=-1
  method.optimizer.lr="$LR" method.lr_scheduler.warmup_steps=2 method.lr_scheduler.min_lr="$LR"
  taskpool=heldout-loss taskpool.every_n_steps=0 taskpool.batch_size=8 method.save_ckpt_type=hf overwrite=true)
for run in $RUNS; do
  case $run in
    plain)  extra=("data.sources=[$TASK_SOURCE, $GENERAL]") ;;
    replay) extra=("data.sources=[$TASK_SOURCE, $REPLAY, $GENERAL]" data.replay_ratio="$REPLAY_RATIO") ;;
    ewc)    extra=("data.sources=[$TASK_SOURCE, $GENERAL]"
                   "method.ewc={lambda: $EWC_LAMBDA, fisher_data: '$OUT/data/alpaca_replay.jsonl', fisher_format: alpaca, fisher_batches: 64}") ;;
    *) echo "unknown run $run (plain, replay, ewc)"; exit 2 ;;
  esac
  tunelab train "${common[@]}" "${extra[@]}" output_dir="$OUT/$run"
done
python - "$OUT" $RUNS <<'PY'
import json, sys
out, runs = sys.argv[1], sys.argv[2:]
lines = ["| run | GSM8K held-out loss (before -> after) | general (Alpaca) held-out loss (before -> after) | forgot (general loss change) |",
         "| --- | --- | --- | ---: |"]
for run in runs:
    s = json.load(open(f"{out}/{run}/summary.json"))["heldout_by_source"]
    t, g = s["gsm8k"], s["general"]
    lines.append(f"| {run} | {t['loss_before']:.4f} -> {t['loss_after']:.4f} | {g['loss_before']:.4f} -> {g['loss_after']:.4f} | {g['change']:+.4f} |")
open(f"{out}/TABLE.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
