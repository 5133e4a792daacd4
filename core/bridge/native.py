"""Our own checkpoint format: model_config.json ({"arch", "config"}) + model.safetensors in our names.

A single-process (gathered) state; sharded training checkpoints are core/checkpoint's business.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from core.bridge.convert import resolve_architecture
from core.bridge.hf import default_dtype, read_json
from core.errors import InputError
from core.models import Architecture, get_architecture
from core.transformer.config import TransformerConfig
from core.transformer.model import GPTModel

CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "model.safetensors"


def save_native(model: GPTModel, path: str | Path, arch: Architecture | str | None = None) -> None:
    """arch: the HF architecture this model converts to (None: inferred from the config)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arch = resolve_architecture(arch, model.config)
    # named_parameters lists a tied output head once, under the embedding's name.
    tensors = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()}
    save_file(tensors, path / WEIGHTS_FILE, metadata={"format": "pt"})
    meta = {"arch": arch.name, "config": model.config.to_dict() | {"fp8": "off"}}  # fp8: a compute choice
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_native(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[GPTModel, Architecture]:
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"model directory not found: {path}")
    if not (path / CONFIG_FILE).is_file():
        raise InputError(f"no {CONFIG_FILE} in {path} (not a converted checkpoint; is it an HF directory?)")
    meta = read_json(path / CONFIG_FILE)
    try:
        arch, config = get_architecture(meta["arch"]), TransformerConfig.from_dict(meta["config"])
    except (KeyError, TypeError) as e:
        raise InputError(f"{path / CONFIG_FILE}: missing or bad field {e}") from e
    except InputError as e:
        raise InputError(f"{path / CONFIG_FILE}: {e}") from e
    with default_dtype(dtype):
        model = GPTModel(config)
    state = load_file(path / WEIGHTS_FILE)
    expected = dict(model.named_parameters())
    if set(state) != set(expected):
        diff = sorted(set(state) ^ set(expected))[:5]
        raise InputError(f"{path / WEIGHTS_FILE}: parameter names do not match the config, e.g. {diff}")
    with torch.no_grad():
        for name, p in expected.items():
            if state[name].shape != p.shape:
                raise InputError(
                    f"{path / WEIGHTS_FILE}: {name} has shape {tuple(state[name].shape)}, expected {tuple(p.shape)}"
                )
            p.copy_(state[name])
    return model, arch
