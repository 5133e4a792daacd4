#!/usr/bin/env bash
# rl pretrain throughput on one GPU (configs/pretrain_1b_gpu.yaml): per-document masking (default) vs plain
# causal attention (data.reset_attention_mask=false) vs that plus train.compile=true. Prints tokens/s and MFU
# (mean of logged steps after the first 5). Needs .whl carried (see scripts/gpu_check.sh).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-20}
run() {  # name, overrides
  local name=$1; shift
  timeout 300 python3 -m rl.cli pretrain configs/pretrain_1b_gpu.yaml run.dir=/tmp/$name train.max_steps=$STEPS \
    train.log_every=1 "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$?"; tail -1 "$OUT/$name.log"
}
run docmask
run causal data.reset_attention_mask=false
run causal_compile data.reset_attention_mask=false train.compile=true
${EXTRA_RUNS:-true}
python3 - <<'PY' | tee "$OUT/pretrain_speed.txt"
import glob, json, os
for d in sorted(glob.glob("/tmp/*/metrics.jsonl"), key=os.path.getmtime):
    rows = [json.loads(l) for l in open(d)]
    tps = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r][5:]
    mfu = [r["perf/mfu"] for r in rows if "perf/mfu" in r][5:]
    loss = [r["train/loss"] for r in rows if "train/loss" in r]
    name = d.split("/")[2]
    if tps:
        print(f"{name:16s} tokens/s {sum(tps)/len(tps):9,.0f}  MFU {sum(mfu)/max(len(mfu),1):6.1%}  loss 1-3 {' '.join(f'{x:.4f}' for x in loss[:3])}  last {loss[-1]:.4f}")
PY
