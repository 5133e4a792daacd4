"""Our own checkpoint format: model_config.json ({"arch", "config"}) + model.safetensors in our names.

A single-process (gathered) state; sharded training checkpoints are core/checkpoint's business.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
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


def check_native_weights(path: str | Path) -> tuple[Architecture, TransformerConfig]:
    """model_config.json against the safetensors header, without reading a weight: InputError (one line)
    naming a missing or unknown tensor, or one of another shape than the config makes."""
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
    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in GPTModel(config).named_parameters()}
    weights = path / WEIGHTS_FILE
    try:
        with safe_open(weights, framework="pt") as f:
            stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, FileNotFoundError) as e:
        raise InputError(f"{weights}: not a readable safetensors file ({e})") from None
    missing, unknown = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unknown:
        raise InputError(
            f"{weights}: tensors do not match {CONFIG_FILE}: missing {missing[:5]}, unknown {unknown[:5]}"
        )
    for name, want in expected.items():
        if stored[name] != want:
            raise InputError(
                f"{weights}: tensor {name} has shape {stored[name]}, but {CONFIG_FILE} makes it {want}"
            )
    return arch, config


def load_native(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[GPTModel, Architecture]:
    path = Path(path)
    arch, config = check_native_weights(path)
    with default_dtype(dtype):
        model = GPTModel(config)
    state = load_file(path / WEIGHTS_FILE)  # names and shapes checked above
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name])
    return model, arch
