#!/usr/bin/env bash
# The registry and the server end to end on SmolLM2-135M-Instruct: three LoRA adapters trained by
# tunelab on GSM8K (the slice shipped with the demo), two registered as versions of one name and
# promoted (production, staging), the server answering the openai client for the base and both,
# a third adapter hot-loaded and answering, a promotion and a rollback changing what
# gsm8k@production serves without a restart. The session is written to OUT/session.md.
#   bash examples/serve_registry.sh [OUT]          (about 10 min on 2 cores; pip install -e '.[serve]')
set -euo pipefail
OUT=${1:-runs/serve-registry}
PORT=${PORT:-8437}
STEPS=${STEPS:-30}
DATA=$(python -c "import tunelab, pathlib; print(pathlib.Path(tunelab.__file__).parent / 'demo_data' / 'gsm8k_demo.jsonl')")
export TUNELAB_REGISTRY_URL="sqlite:///$OUT/registry.db"
mkdir -p "$OUT"

train() {  # NAME LR SEED: a LoRA adapter, saved as peft checkpoints
  if [ ! -f "$OUT/$1/summary.json" ]; then
    tunelab train method=lm_finetune/peftfinetune_sft modelpool=CausalLMPool/smollm2-135m \
      data.path="$DATA" data.format=prompt_completion data.prompt_field=question data.completion_field=answer \
      taskpool=dummy method.max_steps="$STEPS" method.dataloader_kwargs.batch_size=4 method.max_length=320 \
      method.optimizer.lr="$2" seed="$3" method.save_ckpt_type=peft output_dir="$OUT/$1" overwrite=true
  fi
}
train gsm8k-v1 2e-4 1
train gsm8k-v2 6e-4 2
train hotfix 4e-4 3

rm -f "$OUT/registry.db"
tunelab registry register gsm8k "$OUT/gsm8k-v1"
tunelab registry register gsm8k "$OUT/gsm8k-v2" --parent 1
tunelab registry promote gsm8k 1
tunelab registry promote gsm8k 2 --stage staging
tunelab registry list gsm8k

tunelab serve --model smollm2-135m --name smollm2 --registry-url "$TUNELAB_REGISTRY_URL" --adapter-dir "$OUT" \
  --port "$PORT" --api-key e2e-key > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null' EXIT
python - "$OUT" "$PORT" <<'EOF'
import json, subprocess, sys, time, urllib.request
from pathlib import Path

import openai

out, port = Path(sys.argv[1]), sys.argv[2]
base = f"http://127.0.0.1:{port}/v1"
for _ in range(300):
    try:
        urllib.request.urlopen(urllib.request.Request(f"{base}/models", headers={"Authorization": "Bearer e2e-key"}), timeout=2)
        break
    except OSError:
        time.sleep(1)
client = openai.OpenAI(base_url=base, api_key="e2e-key", max_retries=0)
question = "A baker makes 24 muffins and sells 3 boxes of 4 muffins. How many muffins are left?"
log = [f"# tunelab serve and the registry, end to end\n\nQuestion (greedy, 96 tokens): {question}\n"]


def ask(model: str, note: str = "") -> str:
    raw = client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": question}], max_tokens=96, temperature=0)
    reply = raw.parse()
    served = raw.headers.get("x-tunelab-model")
    answer = reply.choices[0].message.content
    log.append(f"## `{model}`{note}\n\nserved by: `{served}`, {reply.usage.completion_tokens} tokens, finish: {reply.choices[0].finish_reason}\n\n> "
               + answer.replace("\n", "\n> ") + "\n")
    print(f"{model}{note} -> {served}: {answer[:100]!r}", flush=True)
    return answer


def registry(*args: str) -> None:
    result = subprocess.run(["tunelab", "registry", *args], capture_output=True, text=True, check=True)
    log.append(f"```\n$ tunelab registry {' '.join(args)}\n{result.stdout.strip()}\n```\n")
    print(result.stdout.strip(), flush=True)


models = [m.id for m in client.models.list().data]
log.append(f"`GET /v1/models`: {models}\n")
answers = {"base": ask("smollm2"), "v1": ask("gsm8k@production", " (v1 in production)"), "v2": ask("gsm8k@staging", " (v2 in staging)")}
checkpoint = json.loads((out / "hotfix" / "summary.json").read_text())["final_checkpoint"]
request = urllib.request.Request(f"{base}/adapters", data=json.dumps({"name": "hotfix", "path": checkpoint}).encode(), method="POST",
                                 headers={"Authorization": "Bearer e2e-key", "Content-Type": "application/json"})
loaded = json.loads(urllib.request.urlopen(request, timeout=120).read())
log.append(f"`POST /v1/adapters {{\"name\": \"hotfix\", \"path\": \"{checkpoint}\"}}` -> {loaded}\n")
answers["hotfix"] = ask("hotfix", " (hot-loaded)")
registry("promote", "gsm8k", "2")
answers["promoted"] = ask("gsm8k@production", " (after promote gsm8k 2)")
registry("rollback", "gsm8k")
answers["rolled back"] = ask("gsm8k@production", " (after rollback)")
registry("history", "gsm8k")
checks = {"the base and the three adapters answer differently": len({answers[k] for k in ("base", "v1", "v2", "hotfix")}) == 4,
          "promote: production serves v2": answers["promoted"] == answers["v2"],
          "rollback: production serves v1 again": answers["rolled back"] == answers["v1"]}
log.append("## Checks\n\n" + "\n".join(f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()) + "\n")
(out / "session.md").write_text("\n".join(log))
print("\n".join(f"{'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()))
sys.exit(0 if all(checks.values()) else 1)
EOF
echo "session: $OUT/session.md"
