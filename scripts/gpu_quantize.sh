#!/usr/bin/env bash
# Issue 13 on one GPU: the CUDA-only ModelOpt formats (w4a8_awq, nvfp4) next to the CPU ones, from a tiny
# pretrain made on the spot (400 steps, as the README's CPU table). The GPU machines have no ModelOpt:
# carry .whl (pydantic, omegaconf, datasets, ...) and .carry/modelopt_site.tar.xz (the installed ModelOpt
# tree with rich, pulp without its solver binaries, nvidia-ml-py, markdown-it, mdurl, pygments). Output
# under $OUT: report.md, each format's hf_quant_config.json, the log.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || exit 1
tar -C /tmp/site -xJf .carry/modelopt_site.tar.xz || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
R=/tmp/runs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import modelopt.torch.quantization, scipy; print('modelopt', modelopt.__version__)" 2>&1 | tail -2 | tee -a "$OUT/gpu.txt"
{
  timeout "${PRETRAIN_S:-200}" python3 -m rl.cli pretrain configs/pretrain_tiny.yaml run.dir=$R/pretrain_tiny \
    train.max_steps=400 train.eval_every=400 train.save_every=400 2>&1 | grep -v -i warn | tail -4
  timeout "${QUANTIZE_S:-300}" python3 -m rl.cli quantize configs/quantize_tiny.yaml run.dir=$R/quantize_tiny \
    model.init_from=$R/pretrain_tiny/checkpoints/step_400 calibration.path=$R/pretrain_tiny/data/train.jsonl \
    eval.path=$R/pretrain_tiny/data/eval.jsonl "quantize.formats=${FORMATS:-[fp8,int8_sq,int4_awq,w4a8_awq,nvfp4]}" \
    2>&1 | grep -v -i warn | tail -30
} 2>&1 | tee "$OUT/quantize.log"
cp $R/quantize_tiny/report.md "$OUT/" 2>/dev/null
for d in $R/quantize_tiny/*/hf; do f=$(basename "$(dirname "$d")"); cp "$d/hf_quant_config.json" "$OUT/$f.hf_quant_config.json" 2>/dev/null; done
true
