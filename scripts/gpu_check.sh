#!/usr/bin/env bash
# GPU checks on the device machine (2 GPUs): NCCL parity tests and rl pretrain layouts vs one GPU.
# Needs the wheels the CPU venv has but the GPU image lacks, carried in .whl (see the device README).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
TESTS=${TESTS:-tests/test_distributed.py tests/test_pipeline.py tests/test_expert_parallel.py tests/test_native_engine.py tests/test_refit_transport.py tests/test_decode_attention.py tests/test_checkpoint_reshard.py}
timeout 360 python3 -m pytest -q -m gpu -p no:cacheprovider $TESTS 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
FAST="model.hidden_size=64 model.num_layers=2 model.num_attention_heads=2 model.num_kv_heads=2 model.ffn_hidden_size=128 data.seq_len=32
 data.synthetic.n_train=2000 data.synthetic.n_eval=50 eval.num_problems=20 train.global_batch_size=16
 train.micro_batch_size=8 train.log_every=1 train.eval_every=0 train.progress_bar=false optim.warmup_steps=2
 train.max_steps=6 train.save_every=3 precision.dtype=fp32"
# LAYOUTS: shell words, each one run's overrides ("" = 1 GPU, the reference).
DEFAULT_LAYOUTS='"" "parallel.tp=2" "parallel.dp=2" "parallel.pp=2" "parallel.cp=2" "parallel.tp=2 train.compile=true" "parallel.dp=2 train.compile=true"'
LAYOUTS=${LAYOUTS:-$DEFAULT_LAYOUTS}
eval "set -- $LAYOUTS"
for lay in "$@"; do
  name=run$(echo "$lay" | tr -dc 'a-z0-9')
  timeout 200 python3 -m rl.cli pretrain configs/pretrain_tiny.yaml $FAST run.dir=/tmp/$name $lay > "/tmp/$name.log" 2>&1
  echo "$name rc=$?"; tail -2 "/tmp/$name.log"
done
python3 - <<'PY' | tee "$OUT/pretrain_layouts.txt"
import glob, json, os
curves = {}
for path in sorted(glob.glob("/tmp/run*/metrics.jsonl"), key=os.path.getmtime):
    curves[path.split("/")[2]] = [json.loads(l)["train/loss"] for l in open(path)]
ref = curves.get("run")
for name, c in curves.items():
    print(f"{name:30s}", " ".join(f"{x:.6f}" for x in c), " max|diff| vs 1 GPU:", max(abs(a - b) for a, b in zip(c, ref)) if ref else "n/a")
PY
# ~1B on 2 GPUs: tp2 with compiled layers and plain causal attention (tokens/s, MFU of the whole job).
if [ "${BIG:-1}" = 1 ]; then
  timeout 300 python3 -m rl.cli pretrain configs/pretrain_1b_gpu.yaml run.dir=/tmp/big_tp2 train.max_steps=12 \
    train.log_every=1 parallel.tp=2 train.compile=true data.reset_attention_mask=false > "$OUT/big_tp2.log" 2>&1
  echo "big_tp2 rc=$?"
  python3 - <<'PY' | tee "$OUT/big_tp2.txt"
import json
rows = [json.loads(l) for l in open("/tmp/big_tp2/metrics.jsonl")]
tps = [r["perf/tokens_per_s"] for r in rows][4:]
mfu = [r["perf/mfu"] for r in rows][4:]
print(f"1B tp2 compiled: {sum(tps)/len(tps):,.0f} tokens/s (job), MFU {sum(mfu)/len(mfu):.1%}; losses", [round(r["train/loss"], 4) for r in rows[:4]])
PY
fi
