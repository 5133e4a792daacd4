#!/usr/bin/env bash
# Issue 16 items 1 and 3 on one GPU: the fault-policy and checkpoint-I/O tests with the model on CUDA (an
# async save on CUDA writes the state of its step while training goes on; a NaN step is skipped), then
# `rl bench checkpoint` (sync vs async stall) for llama_tiny and llama_1b. Writes $OUT/*.txt.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; df -h "$PWD" /tmp | tail -2; } | tee "$OUT/gpu.txt"
timeout 240 python3 - <<'PY' 2>&1 | grep -v -i "warn\|return func" | tee "$OUT/gpu_checks.txt"
import sys, tempfile
from pathlib import Path
sys.path.insert(0, "tests")
import pytest, torch
import test_checkpoint_io as io, test_faults_numeric as fn
from core.checkpoint.sharded import load_full_state
for m in (io, fn):
    m.FAST = [x for x in m.FAST if not x.startswith("train.device")] + ["train.device=cuda"]
tmp = Path(tempfile.mkdtemp())
mp = pytest.MonkeyPatch()
t = io.trainer(tmp / "a", "train.async_save=true", "train.max_steps=6")
io.write_after_the_next_step(mp, t)
t.advance(); t.advance()
assert next(t.engine.chunks[0].parameters()).is_cuda
want = {k: v.detach().cpu().clone() for k, v in t.engine.sharded_state().items() if torch.is_tensor(v)}
t.save(); t.advance(); t.checkpoints.wait()
got = load_full_state(tmp / "a/checkpoints/step_2/model")
bad = [k for k, v in want.items() if not torch.equal(v, got[k])]
print("cuda async save == state at its step:", not bad, len(want), "tensors", bad[:3])
mp.undo()
with pytest.MonkeyPatch.context() as m:
    fn.test_a_nan_step_is_skipped_and_the_run_goes_on_and_converges(tmp / "nan", m)
print("cuda nan step skipped, run converged: ok")
PY
for preset in llama_tiny llama_1b; do
  timeout 300 python3 -m rl.cli bench checkpoint --preset $preset --repeats 2 --dir "$PWD" 2>&1 | grep -v -i "warn\|return func"
done | tee "$OUT/bench_checkpoint.txt"
