#!/usr/bin/env bash
# Issue 15 item 1 on one GPU: ModelEngine vs the bare model. `rl bench train --engine` rows (plain; 4 packed
# documents per row through flex_attention, eager and compiled; selective recompute), GPU tests of
# flex/recompute, then a profile (profile_engine.py: phase split + top kernels). Writes $OUT/*.txt.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
B="python3 -m rl.cli bench train --preset llama_1b --seq-len 2048 --micro-batch-size 4 --engine --steps 6 --warmup 3"
run() { echo "== $*"; timeout "$1" $B "${@:2}" 2>&1 | grep -v -i warn | tail -5; }
{
  run 120
  run 200 --documents 4 --no-baseline --compile
  run 90 --documents 4 --no-baseline
  run 90 --documents 4 --no-baseline --recompute selective
} | tee "$OUT/bench_train.txt"
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu ${TESTS:-tests/test_recompute_flex.py} 2>&1 | tail -4 | tee "$OUT/gpu_tests.txt"
timeout 120 python3 scripts/profile_engine.py --out "$OUT" ${PROFILE_ARGS:-} 2>&1 | grep -v -i warn | head -90
