#!/usr/bin/env bash
# LoRA on SmolLM2-135M-Instruct, then every export, each verified on 100 GSM8K problems the run
# never saw (the last 100 rows of the train file): the merged transformers folder (float32 and
# bfloat16), GGUF f16 and q8_0 (checked with transformers' GGUF loader and with llama.cpp through
# xllamacpp), and the adapter alone as a llama.cpp adapter file.
#   bash examples/export_gguf.sh [OUT]     (needs ../shared/data, or GSM8K=your_train.jsonl; pip install xllamacpp)
set -uo pipefail  # an export that fails verification exits 1; the others still run
OUT=${1:-runs/export-gguf}
GSM8K=${GSM8K:-../shared/data/gsm8k/train.jsonl}
mkdir -p "$OUT/data"
head -n 400 "$GSM8K" > "$OUT/data/train.jsonl"
tail -n 100 "$GSM8K" > "$OUT/data/heldout.jsonl"

if [ ! -f "$OUT/lora/summary.json" ]; then
  tunelab train method=lm_finetune/peftfinetune_sft modelpool=CausalLMPool/smollm2-135m \
    data.path="$OUT/data/train.jsonl" data.format=prompt_completion data.prompt_field=question data.completion_field=answer \
    taskpool=dummy method.max_steps=40 method.dataloader_kwargs.batch_size=8 method.max_length=384 \
    method.optimizer.lr=2e-4 method.save_ckpt_type=peft output_dir="$OUT/lora" overwrite=true
fi
VERIFY=(--verify-data "$OUT/data/heldout.jsonl" --overwrite)
tunelab export merge "$OUT/lora" -o "$OUT/merged" "${VERIFY[@]}" --json "$OUT/merged.json"
tunelab export merge "$OUT/lora" -o "$OUT/merged-bf16" --dtype bfloat16 "${VERIFY[@]}" --json "$OUT/merged-bf16.json"
tunelab export gguf "$OUT/lora" -o "$OUT/model-f16.gguf" --type f16 "${VERIFY[@]}"
tunelab export gguf "$OUT/lora" -o "$OUT/model-q8_0.gguf" --type q8_0 "${VERIFY[@]}"
tunelab export gguf "$OUT/lora" --adapter -o "$OUT/adapter-f32.gguf" "${VERIFY[@]}"
