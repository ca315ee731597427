#!/usr/bin/env bash
# One GPU session's checks, as one command on a lent GPU machine (see ../shared/gpu/README.md):
# the CUDA tests, then bench/sft.py on the 1B configuration with its peers. Everything lands in
# $OUT (default outputs/gpu): the test report, the table after each finished run, the run logs.
#
#   source .gpu/env.sh is done here; RUNS, STEPS, TEST_TIMEOUT and PROFILE override the defaults:
#   bash bench/gpu.sh
#   RUNS=tunelab,hf-bf16 STEPS=10 bash bench/gpu.sh
#   RUNS=tunelab-nopack,tunelab-reference PROFILE=nopack,reference bash bench/gpu.sh   (then bench/gpu_profile.py)
#   RUNS=- PRETRAIN=1 bash bench/gpu.sh      (no SFT table; bench/pretrain.py on a 350M Llama, 18 steps of 16 x 1024, with the Trainer,
#                                            on .gpu/tinyshakespeare.txt: copy ../shared/data/tinyshakespeare/input.txt there)
set -u
source .gpu/env.sh || exit 1
# Extra wheels the GPU image lacks (liger-kernel for the trl-liger peer), when carried in .whl/:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5      (and name .whl in carry)
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
RUNS=${RUNS:-tunelab,hf-bf16,trl-default,trl-liger,tunelab-lora,trl-lora,tunelab-eager,trl-packed,tunelab-nochunk,tunelab-nopack,tunelab-nofused,tunelab-reference}
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tail -40 > "$OUT/gpu-tests.txt"
tail -3 "$OUT/gpu-tests.txt"
rm -rf /tmp/bench && mkdir -p /tmp/bench
export TORCH_LOGS=${TORCH_LOGS-recompiles}  # every recompilation, with its reason, in the run's log
# The run logs and each run's per-step metrics, as one archive (the GPU machine returns at most 8 files).
save_logs() { (cd /tmp/bench && tar czf "$OUT/logs.tgz.part" $(ls *.log runs/*/metrics.csv 2>/dev/null) && mv "$OUT/logs.tgz.part" "$OUT/logs.tgz") 2>/dev/null; }
(while sleep 10; do save_logs; done) &
copier=$!
if [ "$RUNS" != "-" ]; then
  python3 bench/sft.py --device cuda --model-config 1b --model "$GPU_TOKENIZER" --data "$GPU_GSM8K" --batch-size 32 \
    --steps "${STEPS:-20}" --runs "$RUNS" --workdir /tmp/bench --output "$OUT/gpu.md" --peak-tflops 790 2>&1 | tee "$OUT/bench-log.txt"
fi
if [ -n "${PRETRAIN:-}" ]; then
  python3 bench/pretrain.py --device cuda --model-config 350m --tokenizer "$GPU_TOKENIZER" --text .gpu/tinyshakespeare.txt \
    --batch-size 16 --block-size 1024 --steps "${PRETRAIN_STEPS:-18}" --workdir /tmp/bench/pretrain --peak-tflops 790 --output "$OUT/pretrain.md" 2>&1 \
    | tee "$OUT/pretrain-log.txt"
fi
kill "$copier"
save_logs
cp /tmp/bench/results.json "$OUT/" 2>/dev/null
# PROFILE=nopack,reference: bench/gpu_profile.py's variants on the same work folder, after the table.
if [ -n "${PROFILE:-}" ]; then
  mkdir -p "$OUT/profile"
  timeout "${PROFILE_TIMEOUT:-240}" python3 bench/gpu_profile.py --workdir /tmp/bench --variants "$PROFILE" --out "$OUT/profile" 2>&1 \
    | grep -v "Loading weights" | tee "$OUT/profile/log.txt"
fi
