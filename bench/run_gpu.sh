#!/usr/bin/env bash
# The single command for one H100 device call: the HF+PEFT anchor, then bench_7b.py, in that order, in one call,
# so both run on the same GPU. Logs and the markdown come back under $OUT:
#   $OUT/anchor.log       the anchor's JSON lines (.carry/hf_peft_anchor.py: see bench/README.md)
#   $OUT/bench_7b.log     our JSON lines and the final tables
#   $OUT/RESULTS.md       this run's section, to append to bench/RESULTS.md here
# Budget: BUDGET_S seconds in all (default 540, inside the device's 600 s per command); the anchor gets at most
# ANCHOR_S (default 270) and bench_7b.py a soft deadline of whatever is left minus a margin.
# Extra arguments go to bench_7b.py (e.g. --only train,forward).
# The anchor travels in the carried .carry/ folder (bench/README.md). Wheels in a carried .whl/ (peft, if the
# device image lacks it) are installed first.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BUDGET_S=${BUDGET_S:-540}
ANCHOR_S=${ANCHOR_S:-270}
start=$(date +%s)

if [ -d .whl ] && ! python3 -c "import peft" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
df -h /tmp | tail -1 | tee -a "$OUT/gpu.txt"

[ -f .carry/hf_peft_anchor.py ] || { echo "no .carry/hf_peft_anchor.py: see bench/README.md" >&2; exit 2; }
timeout "$ANCHOR_S" python3 .carry/hf_peft_anchor.py 2>&1 | tee "$OUT/anchor.log"
echo "anchor exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/anchor.log"

left=$(( BUDGET_S - ($(date +%s) - start) ))
deadline=$(( left - 45 ))   # margin: the measurement running at the deadline, the tables, the checkpoint's removal
[ "$deadline" -lt 60 ] && deadline=60
timeout "$(( left > 90 ? left : 90 ))" python3 bench/bench_7b.py --anchor "$OUT/anchor.log" --out "$OUT/RESULTS.md" \
  --deadline-s "$deadline" "$@" 2>&1 | tee "$OUT/bench_7b.log"
echo "bench_7b exit $? after $(( $(date +%s) - start )) s in all" | tee -a "$OUT/bench_7b.log"
