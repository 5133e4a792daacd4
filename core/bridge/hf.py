"""Load a GPTModel from a local HF checkpoint and save one that transformers and vLLM load.

Only local directories with config.json and safetensors weights (single file or sharded with
model.safetensors.index.json) are read; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from core.bridge.convert import (
    expected_hf_shapes,
    export_hf_weights,
    hf_names_read,
    hf_to_ours_tensors,
    resolve_architecture,
)
from core.errors import InputError
from core.models import Architecture, architecture_of_hf_config
from core.transformer.config import TransformerConfig
from core.transformer.model import GPTModel

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)
# Token ids live in HF's config.json but not in TransformerConfig; save_hf copies them from tokenizer_dir.
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from e


def read_hf_config(path: str | Path) -> tuple[Architecture, TransformerConfig]:
    """The preset and our config of an HF checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise InputError(f"no config.json in model directory {path}")
    hf = read_json(path / "config.json")
    try:
        arch = architecture_of_hf_config(hf)
        return arch, arch.config_from_hf(hf)
    except KeyError as e:
        raise InputError(f"{path / 'config.json'}: missing key {e}") from e
    except InputError as e:
        raise InputError(f"{path / 'config.json'}: {e}") from e


class SafetensorsCheckpoint:
    """Tensors of a (possibly sharded) safetensors checkpoint by name, read lazily one at a time.

    Names are normalised to carry the base-model prefix (old GPT-2 checkpoints store "h.0..." for
    "transformer.h.0...").
    """

    def __init__(self, path: Path, base_prefix: str):
        self.path = path
        raw = self._raw_key_files(path)  # raw key -> file
        needs_prefix = not any(k.startswith(base_prefix) for k in raw)
        self._where = {
            (base_prefix + k if needs_prefix and not k.startswith("lm_head.") else k): (f, k)
            for k, f in raw.items()
        }
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}

    @staticmethod
    def _raw_key_files(path: Path) -> dict[str, Path]:
        index = path / "model.safetensors.index.json"
        if index.is_file():
            return {k: path / f for k, f in read_json(index)["weight_map"].items()}
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise InputError(f"no *.safetensors weights in model directory {path}")
        out: dict[str, Path] = {}
        for f in files:
            try:
                with safe_open(f, framework="pt") as h:
                    out.update(dict.fromkeys(h.keys(), f))
            except SafetensorError as e:
                raise InputError(f"{f}: not a readable safetensors file ({e})") from None
        return out

    def keys(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        file, key = self._locate(name)
        return self._handle(file).get_tensor(key)

    def shape(self, name: str) -> tuple[int, ...]:
        """From the file's header: no data is read."""
        file, key = self._locate(name)
        return tuple(self._handle(file).get_slice(key).get_shape())

    def _locate(self, name: str) -> tuple[Path, str]:
        if name not in self._where:
            raise InputError(f"{self.path}: checkpoint has no tensor {name!r}")
        return self._where[name]

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(file, framework="pt"))
        return self._handles[file]

    def close(self) -> None:
        self._stack.close()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> GPTModel:
    """Build a GPTModel (single process, tp=1) with the weights of a local HF checkpoint, in `dtype`."""
    path = Path(path)
    arch, config = read_hf_config(path)
    with default_dtype(dtype):
        model = GPTModel(config)
    checkpoint = SafetensorsCheckpoint(path, arch.hf_base_prefix)
    try:
        _check_keys(checkpoint, model, config, arch)
        _check_shapes(checkpoint, config, arch)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in hf_to_ours_tensors(checkpoint.get, params, config, arch):
                if tensor.shape != params[name].shape:
                    raise InputError(
                        f"{path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}"
                    )
                params[name].copy_(tensor)
    finally:
        checkpoint.close()
    return model


def _check_keys(
    checkpoint: SafetensorsCheckpoint, model: GPTModel, config: TransformerConfig, arch: Architecture
) -> None:
    """InputError for missing tensors and for unknown ones (an unsupported feature, e.g. an extra bias)."""
    needed = hf_names_read((n for n, _ in model.named_parameters()), config, arch)
    present = checkpoint.keys()
    missing = sorted(needed - present)
    unknown = sorted(k for k in present - needed if not any(re.fullmatch(p, k) for p in arch.ignore_hf))
    if missing or unknown:
        raise InputError(
            f"{checkpoint.path}: {arch.name} checkpoint mismatch: missing {missing[:5]}, unknown {unknown[:5]}"
        )


def _check_shapes(checkpoint: SafetensorsCheckpoint, config: TransformerConfig, arch: Architecture) -> None:
    """InputError naming the first tensor whose stored shape is not the one config.json makes (headers only)."""
    present = checkpoint.keys()
    for name, want in expected_hf_shapes(config, arch).items():
        if name in present and checkpoint.shape(name) != want:
            raise InputError(
                f"{checkpoint.path}: tensor {name} has shape {checkpoint.shape(name)}, but config.json makes "
                f"it {want}"
            )


def check_hf_weights(path: str | Path) -> tuple[Architecture, TransformerConfig]:
    """config.json against the safetensors headers, without reading a weight: InputError (one line) naming a
    missing or unknown tensor, or one of another shape than the config makes. Returns the preset and config."""
    path = Path(path)
    arch, config = read_hf_config(path)
    with torch.device("meta"):
        model = GPTModel(config)
    checkpoint = SafetensorsCheckpoint(path, arch.hf_base_prefix)
    try:
        _check_keys(checkpoint, model, config, arch)
        _check_shapes(checkpoint, config, arch)
    finally:
        checkpoint.close()
    return arch, config


def save_hf(
    model: GPTModel,
    path: str | Path,
    tokenizer_dir: str | Path | None = None,
    arch: Architecture | str | None = None,
) -> None:
    """Write config.json + model.safetensors (+ tokenizer files from tokenizer_dir) for AutoModelForCausalLM.

    arch: the HF architecture to write; None picks the simplest that expresses model.config.
    """
    config = model.config
    if not (model.pre_process and model.post_process and len(model.layers) == config.num_layers):
        raise ValueError("save_hf needs the whole model (all layers, pre_process and post_process)")
    arch = resolve_architecture(arch, config)
    hf_config = arch.hf_config_from(config)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # clone: HF tensors split from one fused parameter would otherwise share storage, which safetensors refuses.
    tensors = {name: t.cpu().clone() for name, t in export_hf_weights(model, config, arch)}
    hf_config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    if tokenizer_dir is not None:
        hf_config.update(_token_ids(Path(tokenizer_dir)))
        copy_tokenizer_files(tokenizer_dir, path)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


def _token_ids(tokenizer_dir: Path) -> dict[str, Any]:
    source = tokenizer_dir / "config.json"
    if not source.is_file():
        return {}
    hf = read_json(source)
    return {k: hf[k] for k in TOKEN_ID_KEYS if k in hf}


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer (and generation config) files present in src; returns their names."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise InputError(f"tokenizer directory not found: {src}")
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copyfile(src / name, dst / name)
    return copied
