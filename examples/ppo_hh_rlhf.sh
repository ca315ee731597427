#!/usr/bin/env bash
# RLHF on HH-RLHF's harmless pairs with SmolLM2-135M-Instruct, on CPU: a Bradley-Terry reward model
# on the first pairs, then PPO on prompts from later pairs, held out on the last ones. Each stage's
# size is set by the variables below (the defaults take about an hour on 2 cores).
#   bash examples/ppo_hh_rlhf.sh [OUT]       (needs ../shared/data, or PAIRS=your_pairs.jsonl)
set -euo pipefail
OUT=${1:-runs/ppo-hh}
PAIRS=${PAIRS:-../shared/data/hh-rlhf/harmless_pairs.jsonl}
RM_PAIRS=${RM_PAIRS:-400}        # reward model: pairs 1..RM_PAIRS
RM_STEPS=${RM_STEPS:-100}        # 4 pairs a step
PPO_STEPS=${PPO_STEPS:-30}       # PPO_PROMPTS prompts a step
PPO_PROMPTS=${PPO_PROMPTS:-8}
PPO_LR=${PPO_LR:-1e-5}
VALUE_LR=${VALUE_LR:-null}       # the shared value head's own learning rate (null: PPO_LR)
LAM=${LAM:-0.95}                 # GAE lambda
MISSING_EOS_PENALTY=${MISSING_EOS_PENALTY:-null}  # subtracted from the score of completions that never end
KL_COEF=${KL_COEF:-0.05}
KL_HORIZON=${KL_HORIZON:-1000}   # completions over which kl_coef closes the gap to KL_TARGET
KL_TARGET=${KL_TARGET:-4}        # nats per completion the adaptive kl_coef steers toward
KL_BOUND=${KL_BOUND:-null}       # nats per completion: a PPO epoch that takes the KL past it (and higher) is undone
mkdir -p "$OUT/data"
head -n "$RM_PAIRS" "$PAIRS" > "$OUT/data/rm_train.jsonl"
sed -n '1601,1700p' "$PAIRS" > "$OUT/data/rm_val.jsonl"
sed -n '801,1600p' "$PAIRS" > "$OUT/data/ppo_prompts.jsonl"
sed -n '1701,1764p' "$PAIRS" > "$OUT/data/ppo_heldout.jsonl"

if [ ! -f "$OUT/rm/summary.json" ]; then
  tunelab train method=lm_finetune/bradley_terry_rm modelpool=SequenceClassificationModelPool/reward_model \
    data.path="$OUT/data/rm_train.jsonl" data.val_path="$OUT/data/rm_val.jsonl" data.format=preference \
    taskpool=reward_accuracy taskpool.every_n_steps=0 method.max_length=256 method.dataloader_kwargs.batch_size=8 \
    method.max_steps="$RM_STEPS" method.optimizer.lr=2e-5 method.lr_scheduler.warmup_steps=10 method.lr_scheduler.min_lr=2e-6 \
    method.save_ckpt_type=hf output_dir="$OUT/rm" overwrite=true
fi
RM=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['final_checkpoint'])" "$OUT/rm/summary.json")

tunelab train method=lm_finetune/ppo modelpool=CausalLMPool/smollm2-135m \
  data.path="$OUT/data/ppo_prompts.jsonl" data.val_path="$OUT/data/ppo_heldout.jsonl" data.format=prompt \
  method.reward_model_path="$RM" method.value_model=shared method.value_lr="$VALUE_LR" method.lam="$LAM" \
  method.max_prompt_length=128 method.max_completion_length=48 method.dataloader_kwargs.batch_size="$PPO_PROMPTS" \
  method.ppo_epochs=2 method.optimizer.lr="$PPO_LR" method.kl_coef="$KL_COEF" method.kl_target="$KL_TARGET" method.kl_bound="$KL_BOUND" \
  method.kl_horizon="$KL_HORIZON" method.missing_eos_penalty="$MISSING_EOS_PENALTY" method.max_steps="$PPO_STEPS" method.save_ckpt_type=hf method.log_samples_every_n_steps=5 \
  taskpool=heldout-reward taskpool.greedy=false taskpool.every_n_steps=10 taskpool.batch_size=32 \
  output_dir="$OUT/ppo" overwrite=true
echo "PPO run: $OUT/ppo (metrics.csv, reward_curve.png, samples.jsonl, summary.json)"
