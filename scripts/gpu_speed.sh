#!/usr/bin/env bash
# Issue 15 on one GPU, in one call: `rl bench train --engine` (ModelEngine vs the bare GPTModel vs
# transformers; then 4 packed documents per row through flex_attention, compiled) and `rl bench grpo` at
# the 0.37B shape of ENVIRONMENT.md's TRL baseline (8 prompts x 8 samples x 256 tokens, bf16, beta 0.04).
# GRPO=0, PLAIN=0, DOCS=0 skip a section; ACCUM=N: micro-batches per optimizer step (rl pretrain's
# pretrain_1b_gpu.yaml: global batch 16 / mbs 4 = 4).
# Needs .whl carried (pydantic, omegaconf, trl, datasets, dill, multiprocess for Python 3.12).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
B="python3 -m rl.cli bench train --preset llama_1b --seq-len 2048 --micro-batch-size 4 --engine --steps 6 --warmup 3 --grad-accum ${ACCUM:-1}"
run() { echo "== $*"; timeout "$1" "${@:2}" 2>&1 | grep -v -i -E "warn|^\{" | tail -6; }
{
  [ "${GRPO:-1}" = 1 ] && run 200 python3 -m rl.cli bench grpo --preset llama_370m --prompts 8 --n 8 --prompt-len 64 --new-tokens 256 --steps 3 --warmup 1
  [ "${PLAIN:-1}" = 1 ] && run 150 $B
  [ "${DOCS:-1}" = 1 ] && run 220 $B --documents 4 --no-baseline --compile
  [ -n "${MORE:-}" ] && run 100 $B --documents 4 --no-baseline --recompute selective
  [ -n "${MORE:-}" ] && timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_recompute_flex.py 2>&1 | tail -3
} | tee "$OUT/speed.txt"
