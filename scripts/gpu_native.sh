#!/usr/bin/env bash
# Native engine on one GPU: rl bench generate (all engines that run there), a profile, a kernel sweep.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
ENGINES=${ENGINES:-hf,hf-static,native}
timeout 400 python3 -m rl.cli bench generate --preset llama_1b --dtype bf16 --batch 256 \
  --prompt-len 128 --new-tokens 256 --engines "$ENGINES" 2>&1 | tail -12 | tee "$OUT/bench_generate.txt"
[ "${PROFILE:-1}" = 1 ] && timeout 300 python3 scripts/profile_native.py --out "$OUT" > "$OUT/profile_log.txt" 2>&1; head -1 "$OUT/profile_log.txt"
[ "${TUNE:-1}" = 1 ] && timeout 300 python3 scripts/tune_decode_attention.py 2>&1 | tee "$OUT/tune.txt" | tail -8
[ "${TESTS:-1}" = 1 ] && timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_native_engine.py tests/test_decode_attention.py 2>&1 | tail -6 | tee "$OUT/gpu_tests.txt"
