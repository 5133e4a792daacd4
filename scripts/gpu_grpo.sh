#!/usr/bin/env bash
# GRPO step times on a GPU machine (issues 5 and 6): in-process on 1 GPU, and on Ray worker groups
# disaggregated (policy GPU + engine GPU) and colocated (policy ranks generate on their own weights),
# for the tiny arithmetic model and a ~1B model (tp2 x dp2 on 4 GPUs). Writes $OUT/grpo_times.txt.
# Carries .whl and .rlc_gpu (a trimmed Ray for Python 3.12; see ENVIRONMENT.md).
set -uo pipefail
mkdir -p /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || exit 1
tar -xJf .rlc_gpu/site.tar.xz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NGPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee "$OUT/gpus.txt"
Q="train.progress_bar=false eval.num_prompts=50 eval.samples=0 train.save_every=0"
step() {  # name, timeout, command...
  local name=$1 t=$2; shift 2
  local s=$SECONDS; timeout "$t" "$@" > "$OUT/$name.log" 2>&1; echo "$name rc=$? ($((SECONDS - s)) s)"; tail -1 "$OUT/$name.log" | cut -c1-300
}
step pretrain_tiny 120 python3 -m rl.cli pretrain configs/pretrain_tiny.yaml run.dir=/tmp/pt train.max_steps=300 train.eval_every=0 train.progress_bar=false
G="configs/grpo_tiny.yaml model.init_from=/tmp/pt train.max_steps=${STEPS:-6} $Q"
step tiny_1gpu 120 python3 -m rl.cli grpo $G run.dir=/tmp/g1
step tiny_disagg 150 python3 -m rl.cli grpo $G run.dir=/tmp/g2 placement.mode=disaggregated placement.pools.policy=1 placement.pools.generation=1 placement.gpus_per_bundle=1
step tiny_coloc 150 python3 -m rl.cli grpo $G run.dir=/tmp/g3 placement.mode=colocated placement.num_bundles=2 placement.gpus_per_bundle=1 parallel.dp=2
if [ "$NGPU" -ge 4 ]; then
  step pretrain_1b 200 python3 -m rl.cli pretrain configs/pretrain_1b_gpu.yaml run.dir=/tmp/p1b train.max_steps=2 data.synthetic.n_train=3000
  B="configs/grpo_tiny.yaml model.init_from=/tmp/p1b train.max_steps=${STEPS_1B:-4} $Q"
  step b1_1gpu 150 python3 -m rl.cli grpo $B run.dir=/tmp/b1
  step b1_tp2dp2_coloc 200 python3 -m rl.cli grpo $B run.dir=/tmp/b2 placement.mode=colocated placement.num_bundles=4 placement.gpus_per_bundle=1 parallel.tp=2 parallel.dp=2
  step b1_tp2_disagg 200 python3 -m rl.cli grpo $B run.dir=/tmp/b3 placement.mode=disaggregated placement.pools.policy=2 placement.pools.generation=2 placement.gpus_per_bundle=1 parallel.tp=2
fi
python3 - <<'PY' | tee "$OUT/grpo_times.txt"
import json, os
keys = ["time/step", "time/refit", "time/generate", "time/logprobs", "time/train"]
print(f"{'run':18s} steps " + " ".join(f"{k:>14s}" for k in keys) + "   reward/mean  gap_max")
for name, d in [("tiny_1gpu", "g1"), ("tiny_disagg", "g2"), ("tiny_coloc", "g3"), ("b1_1gpu", "b1"),
                ("b1_tp2dp2_coloc", "b2"), ("b1_tp2_disagg", "b3")]:
    path = f"/tmp/{d}/metrics.jsonl"
    if not os.path.exists(path):
        print(f"{name:18s} (no metrics)"); continue
    rows = [json.loads(l) for l in open(path) if '"time/step"' in l]
    later = rows[1:] or rows  # step 1 includes warm-up (compilation, first allocation)
    mean = lambda k: sum(r.get(k, 0.0) for r in later) / len(later)
    gap = max(r.get("rollout/logprob_gap_max", 0.0) for r in rows)
    print(f"{name:18s} {len(rows):5d} " + " ".join(f"{mean(k):14.3f}" for k in keys) + f"   {rows[-1]['reward/mean']:.3f}  {gap:.2e}")
PY
