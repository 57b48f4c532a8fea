#!/usr/bin/env bash
# Render a run's report.html and chosen executed notebooks in headless Chromium and save screenshots, as a reader
# sees them; print report.html's size and its render time.
#
#   bash scripts/screenshots.sh [RUN] [STAGE ...]      # default: run "default", stages analysis_bandit analysis_lm rl_lm
#
# Needs Debian's `chromium` (installed here with apt-get when missing and run as root; otherwise install it:
# `sudo apt-get install chromium`). Writes runs/<RUN>/screenshots/: report.png (top of the page), report_cards.png
# (the first shard cards), <stage>.png (the executed notebook converted to HTML by nbconvert), and timing.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${1:-default}"
shift || true
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(analysis_bandit analysis_lm rl_lm)
PY="${PYTHON:-.venv/bin/python}"
RUN_DIR="runs/$RUN"
OUT="$RUN_DIR/screenshots"

if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium fonts-dejavu-core >/dev/null
  else
    echo "error: chromium is not installed; install it (sudo apt-get install chromium) and run this again" >&2
    exit 1
  fi
fi
[ -f "$RUN_DIR/report.html" ] || "$PY" -m shardlib report --run "$RUN" >/dev/null
mkdir -p "$OUT"

shot() {  # shot URL PNG HEIGHT: one headless render, its wall time in seconds on stdout
  local t0 t1
  t0=$(date +%s.%N)
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="1280,$3" \
    --screenshot="$2" "$1" >/dev/null 2>&1
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc
}

report="file://$(realpath "$RUN_DIR/report.html")"
t_report=$(shot "$report" "$OUT/report.png" 2400)
# the cards of the first analysis stage, on a page of their own (a #fragment does not scroll a headless screenshot)
"$PY" -c '
import sys
from pathlib import Path

from shardlib.browse import cards_page, stage_dirs
from shardlib.io import load_results

run_dir = Path(sys.argv[1])
for stage in ("analysis_bandit", "analysis_lm", "analysis_text"):
    if (run_dir / stage / "results.nc").exists():
        shards_dir = stage_dirs(load_results(run_dir / stage / "results.nc"), run_dir)
        Path(sys.argv[2]).write_text(cards_page(shards_dir, run_dir / stage, title=f"{shards_dir.name} ({stage})"))
        break
' "$RUN_DIR" "$OUT/cards.html"
[ -f "$OUT/cards.html" ] && shot "file://$(realpath "$OUT/cards.html")" "$OUT/report_cards.png" 2400 >/dev/null
for stage in "${STAGES[@]}"; do
  nb="$RUN_DIR/$stage/notebook.ipynb"
  [ -f "$nb" ] || { echo "skipped $stage: no $nb"; continue; }
  "$PY" -m jupyter nbconvert --to html --log-level=ERROR --output-dir "$OUT" --output "$stage" "$nb"
  shot "file://$(realpath "$OUT/$stage.html")" "$OUT/$stage.png" 1600 >/dev/null
done
size=$(stat -c %s "$RUN_DIR/report.html")
printf 'report.html: %.1f MB, rendered by headless Chromium in %.1f s\n' "$(echo "$size / 1048576" | bc -l)" "$t_report" \
  | tee "$OUT/timing.txt"
ls "$OUT"/*.png
