#!/usr/bin/env bash
# Paged native engine on one GPU: the gpu tests of the engine, the paged cache and the decode kernel; then
# rl bench generate at (a) the short sampled shape and (b) the long GRPO-style shape (n samples of a
# prompt, thousands of tokens each; transformers cannot hold its KV cache, so its rows say why).
# Sections: TESTS=0, BENCH_A=0, BENCH_B=0 skip one; each fits a 10-minute device call on its own (B alone
# takes most of one: ~2M new tokens at a KV pool of 80% of the free memory, which preempts). Output under $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
if [ "${TESTS:-1}" = 1 ]; then
  timeout "${TESTS_S:-300}" python3 -m pytest -q -m gpu -p no:cacheprovider ${TEST_FILES:-tests/test_native_engine.py \
    tests/test_decode_attention.py tests/test_paged_kv.py tests/test_top_p.py} > "$OUT/gpu_tests_full.txt" 2>&1
  tail -15 "$OUT/gpu_tests_full.txt" | tee "$OUT/gpu_tests.txt"
fi
if [ "${BENCH_A:-1}" = 1 ]; then
  timeout "${BENCH_A_S:-420}" python3 -m rl.cli bench generate --preset llama_1b --dtype bf16 --batch 256 --prompt-len 128 \
    --new-tokens 256 --temperature 1 --top-p 0.95 --engines "${ENGINES_A:-hf,hf-static,native}" \
    --baseline hf-static 2>&1 | tail -12 | tee "$OUT/bench_a.txt"
fi
if [ "${BENCH_B:-1}" = 1 ]; then
  # One run of ~2M new tokens: the warmup is shorter (the 4k/8k kv buckets' graphs are captured in the
  # timed run, a few seconds of it).
  timeout "${BENCH_B_S:-590}" python3 -m rl.cli bench generate --preset llama_1b --dtype bf16 --batch 64 --n 8 \
    --prompt-len 1024 --new-tokens 4096 --temperature 1 --top-p 0.95 --engines "${ENGINES_B:-hf,hf-static,native}" \
    --warmup-new-tokens "${WARMUP_B:-256}" 2>&1 | tail -12 | tee "$OUT/bench_b.txt"
fi
