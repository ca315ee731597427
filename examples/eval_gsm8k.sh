#!/usr/bin/env bash
# Base vs fine-tuned SmolLM2-135M-Instruct on 200 GSM8K problems neither saw in training (the
# last 200 rows of the train file): full SFT on the first TRAIN rows, then `tunelab eval generate`
# for each model, `tunelab eval compare` for the HTML report, and lm-evaluation-harness on the same
# problems as a cross-check of the accuracy.
#   bash examples/eval_gsm8k.sh [OUT]      (needs ../shared/data, or GSM8K=your_train.jsonl)
set -euo pipefail
OUT=${1:-runs/eval-gsm8k}
GSM8K=${GSM8K:-../shared/data/gsm8k/train.jsonl}
TRAIN=${TRAIN:-800}
EVAL=${EVAL:-200}
mkdir -p "$OUT/data"
head -n "$TRAIN" "$GSM8K" > "$OUT/data/train.jsonl"
tail -n "$EVAL" "$GSM8K" > "$OUT/data/heldout.jsonl"

if [ ! -f "$OUT/sft/summary.json" ]; then
  tunelab train method=lm_finetune/fullfinetune_sft modelpool=CausalLMPool/smollm2-135m \
    data.path="$OUT/data/train.jsonl" data.format=prompt_completion data.prompt_field=question data.completion_field=answer \
    data.val_fraction=0.05 taskpool=heldout-loss taskpool.every_n_steps=50 method.max_epochs=1 \
    method.dataloader_kwargs.batch_size=8 method.max_length=384 method.optimizer.lr=5e-5 method.lr_scheduler.warmup_steps=5 \
    method.save_ckpt_type=hf output_dir="$OUT/sft" overwrite=true
fi
METRICS="--metric gsm8k --metric gsm8k_flexible --metric gsm8k_format"
tunelab eval generate --model smollm2-135m --data "$OUT/data/heldout.jsonl" $METRICS -o "$OUT/eval-base"
tunelab eval generate --model "$OUT/sft" --data "$OUT/data/heldout.jsonl" $METRICS -o "$OUT/eval-tuned"
tunelab eval compare --base smollm2-135m --tuned "$OUT/sft" --data "$OUT/data/heldout.jsonl" $METRICS \
  --base-predictions "$OUT/eval-base" --tuned-predictions "$OUT/eval-tuned" -o "$OUT/compare"
if python -c "import lm_eval" 2>/dev/null; then
  tunelab eval lm-eval --model smollm2-135m --tasks gsm8k_local --data "$OUT/data/heldout.jsonl" -o "$OUT/lm-eval-base"
  tunelab eval lm-eval --model "$OUT/sft" --tasks gsm8k_local --data "$OUT/data/heldout.jsonl" -o "$OUT/lm-eval-tuned"
fi
echo "report: $OUT/compare/report.html"
