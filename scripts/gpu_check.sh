#!/usr/bin/env bash
# The GPU check: the GPU study, the benchmarks that measure the device, one summary file.
#
#   bash scripts/gpu_check.sh
#
# 1. prints the device (torch, CUDA, GPU name and memory)            -> <run>/gpu_check/device.json
# 2. runs the study (configs/gpu.yaml) into <runs>/<run>/, stopped after GPU_CHECK_TIMEOUT seconds
#    (the 8-minute target), sampling the GPU's memory with nvidia-smi every 0.5 s when there is one
#                                                                    -> <run>/gpu_check/study.log, gpu_memory.log
# 3. times the RL stage's online SAE step on its own events, on the GPU and the CPU
#    (benchmarks/bench_sae_step.py)                                  -> <run>/gpu_check/sae_step.json
# 4. runs benchmarks/bench_factored.py at a few widths (CPU)         -> <run>/gpu_check/bench_factored.json
# 5. writes the summary (scripts/gpu_summary.py)                     -> <run>/gpu_check.json, <run>/gpu_check.md
# Exits non-zero when the study or a benchmark failed (the summary is written either way).
#
# Overrides (environment):
#   PYTHON=.venv/bin/python        the interpreter
#   GPU_CHECK_CONFIG=configs/gpu.yaml
#   GPU_CHECK_RUN=...              run name (default: the config's);  GPU_CHECK_RUNS_DIR=runs  where runs go
#   GPU_CHECK_SET="a.b=1 c.d=2"    extra --set overrides (whitespace-separated; no spaces inside a value)
#   GPU_CHECK_ONLY="pretrain rl_lm" run only these stages (--only)
#   GPU_CHECK_THREADS=N            CPU threads of each stage's kernel (default: all cores; the stages run one at
#                                  a time, and the first H200 run, at 1 thread of 16, spent 62 s in `planted`)
#   GPU_CHECK_TIMEOUT=480          seconds before the study is stopped (0: no limit); a stopped study
#                                  resumes where it stopped when the same command runs again
#   GPU_CHECK_BENCH=1              0: skip step 4
#   GPU_CHECK_SAE_ARGS="..."       extra arguments of benchmarks/bench_sae_step.py (e.g. --steps 3 --cpu-steps 1)
#   GPU_CHECK_BENCH_ARGS="..."     arguments of bench_factored.py (default below)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CONFIG=${GPU_CHECK_CONFIG:-configs/gpu.yaml}
RUNS_DIR=${GPU_CHECK_RUNS_DIR:-runs}
TIMEOUT=${GPU_CHECK_TIMEOUT:-480}
BENCH=${GPU_CHECK_BENCH:-1}
THREADS=${GPU_CHECK_THREADS:-$(nproc 2>/dev/null || echo 1)}
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---widths 256 512 --tokens 12 --events 16 --latents 256 --sae-batch 16 --sae-steps 3 --recovery-events 256 --recovery-epochs 5}
read -r -a SETS <<< "${GPU_CHECK_SET:-}"
read -r -a ONLY <<< "${GPU_CHECK_ONLY:-}"
read -r -a SAE_ARGS <<< "${GPU_CHECK_SAE_ARGS:-}"
read -r -a BENCH_ARGV <<< "$BENCH_ARGS"
# deterministic cuBLAS (the shard SAE trains under torch.use_deterministic_algorithms), set before any
# process starts using the GPU
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
export TOKENIZERS_PARALLELISM=false
# the stage notebooks run in their stage folders: they import this checkout's shardlib
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${GPU_CHECK_RUN:-}" ]; then
  RUN=$GPU_CHECK_RUN
else
  RUN=$("$PY" -c "import sys; from shardlib.runconfig import load_config; print(load_config(sys.argv[1], sys.argv[2:])['run'])" \
    "$CONFIG" ${SETS[@]+"${SETS[@]}"})
fi

RUN_DIR="$RUNS_DIR/$RUN"
OUT="$RUN_DIR/gpu_check"
mkdir -p "$OUT"

echo "== device"
"$PY" scripts/gpu_summary.py device | tee "$OUT/device.json"

poll_pid=""
stop_polling() {
  if [ -n "$poll_pid" ]; then
    kill "$poll_pid" 2>/dev/null || true
    wait "$poll_pid" 2>/dev/null || true
    poll_pid=""
  fi
}
trap stop_polling EXIT
: > "$OUT/gpu_memory.log"
if command -v nvidia-smi >/dev/null 2>&1; then
  (
    while true; do
      used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n 1 || true)
      if [ -n "$used" ]; then echo "$(date +%s.%N) $used"; fi
      sleep 0.5
    done
  ) >> "$OUT/gpu_memory.log" &
  poll_pid=$!
fi

echo "== study: $CONFIG -> $RUN_DIR (limit ${TIMEOUT}s)"
# one stage at a time: the GPU memory samples are attributed to the stage running when they were taken
study=(-m shardlib run --config "$CONFIG" --run "$RUN" --runs-dir "$RUNS_DIR" --quiet --jobs 1 --threads "$THREADS")
for s in ${SETS[@]+"${SETS[@]}"}; do study+=(--set "$s"); done
if [ ${#ONLY[@]} -gt 0 ]; then study+=(--only "${ONLY[@]}"); fi
limit=()
if [ "$TIMEOUT" != "0" ]; then limit=(timeout --signal=INT --kill-after=60 "$TIMEOUT"); fi
t0=$(date +%s.%N)
set +e
${limit[@]+"${limit[@]}"} "$PY" "${study[@]}" 2>&1 | tee "$OUT/study.log"
study_rc=${PIPESTATUS[0]}
set -e
study_seconds=$("$PY" -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))" "$t0" "$(date +%s.%N)")
stop_polling
echo "== study: exit $study_rc after ${study_seconds}s"

bench_rc=0
rm -f "$OUT/sae_step.json" "$OUT/bench_factored.json"
echo "== SAE step: GPU against CPU"
"$PY" benchmarks/bench_sae_step.py --run-dir "$RUN_DIR" --out "$OUT/sae_step.json" \
  ${SAE_ARGS[@]+"${SAE_ARGS[@]}"} || bench_rc=$?
if [ "$BENCH" != "0" ]; then
  echo "== benchmarks/bench_factored.py ${BENCH_ARGS}"
  "$PY" benchmarks/bench_factored.py ${BENCH_ARGV[@]+"${BENCH_ARGV[@]}"} --out "$OUT/bench_factored.json" \
    || bench_rc=$?
fi

echo "== summary"
summary=(scripts/gpu_summary.py summarize --run-dir "$RUN_DIR" --config "$CONFIG" --study-rc "$study_rc"
  --study-seconds "$study_seconds" --timeout "$TIMEOUT")
summary+=(--bench-rc "$bench_rc")
if [ ${#SETS[@]} -gt 0 ]; then summary+=(--sets "${SETS[@]}"); fi
if [ ${#ONLY[@]} -gt 0 ]; then summary+=(--only "${ONLY[@]}"); fi
"$PY" "${summary[@]}"

if [ "$study_rc" -ne 0 ]; then
  echo "gpu_check: the study did not finish (exit $study_rc); see $OUT/study.log" >&2
  exit 1
fi
if [ "$bench_rc" -ne 0 ]; then
  echo "gpu_check: a benchmark failed (exit $bench_rc)" >&2
  exit 1
fi
