#!/usr/bin/env bash
# Scaling run on a 4-GPU machine (issue 6): ~1B Llama pretraining at 1 GPU and at tp2 x dp2 (4 GPUs):
# first-step loss parity, tokens/s per GPU, MFU and scaling efficiency. Writes $OUT/scaling.txt.
# Needs the wheels the GPU image lacks, carried in .whl (see scripts/gpu_check.sh).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-20}
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpus.txt"
run() {  # name, visible devices, extra overrides
  local name=$1 devices=$2; shift 2
  CUDA_VISIBLE_DEVICES=$devices timeout 420 python3 -m rl.cli pretrain configs/pretrain_1b_gpu.yaml \
    run.dir=/tmp/$name train.max_steps=$STEPS train.log_every=1 "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$?"; tail -2 "$OUT/$name.log"
}
run gpu1 0
run tp2dp2 0,1,2,3 parallel.tp=2 parallel.dp=2
python3 - "$STEPS" <<'PY' | tee "$OUT/scaling.txt"
import json, sys
from core.models import preset
from rl.bench.train import flops_per_token
steps = int(sys.argv[1])
cfg = preset("llama_1b")
fpt = flops_per_token(cfg, 2048)
peak = 989e12
rows = {}
for name, gpus in (("gpu1", 1), ("tp2dp2", 4)):
    try:
        rows[name] = ([json.loads(l) for l in open(f"/tmp/{name}/metrics.jsonl")], gpus)
    except OSError as e:
        print(name, "missing:", e)
base = None
for name, (m, gpus) in rows.items():
    loss = [r["train/loss"] for r in m if "train/loss" in r]
    tps = [r["perf/tokens_per_s"] for r in m if "perf/tokens_per_s" in r][3:]  # skip warm-up steps
    per_gpu = sum(tps) / len(tps) / gpus if tps else float("nan")
    base = base or per_gpu
    print(f"{name:8s} gpus {gpus}  tokens/s/GPU {per_gpu:9,.0f}  MFU {per_gpu * fpt / peak:6.1%}  scaling eff {per_gpu / base:6.1%}")
    print("   loss steps 1-5:", " ".join(f"{x:.5f}" for x in loss[:5]))
if len(rows) == 2:
    a, b = ([r["train/loss"] for r in rows[k][0] if "train/loss" in r] for k in ("gpu1", "tp2dp2"))
    print("max |loss diff| over the first 5 steps (bf16):", max(abs(x - y) for x, y in zip(a[:5], b[:5])))
PY
