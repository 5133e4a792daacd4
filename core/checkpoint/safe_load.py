"""Reading checkpoint files without running code from them.

A `.pt` file is a pickle, and so is DCP's `.metadata`; unpickling either can run anything the file names
(an object whose `__reduce__` calls os.system). Everything we read is loaded here with an allow-list:
  .pt files           torch.load(weights_only=True): tensors and plain containers (plus numpy arrays, as
                      older checkpoints stored numpy's RNG state)
  DCP .metadata       a restricted unpickler: DCP's own metadata classes, torch.Size, dtypes, paths
  DCP object entries  (e.g. the optimizer's param_groups) torch.load(weights_only=True) of their bytes
`verify_checkpoint` runs all three over a checkpoint directory before a run resumes from it or starts from
it, so that a tampered file is refused (InputError, one line) before torch.distributed.checkpoint itself
unpickles it; DCP reads `.metadata` with plain pickle and object entries with weights_only=False.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import InputError

DCP_METADATA = ".metadata"
# numpy arrays as numpy pickles them (RNG states written before they were stored as lists)
_NUMPY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
_NUMPY_RECONSTRUCT = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct


def load_pt(path: str | Path) -> Any:
    """torch.load with weights_only=True; InputError (one line) when the file holds anything else."""
    try:
        with torch.serialization.safe_globals([*_NUMPY_GLOBALS, _NUMPY_RECONSTRUCT]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(f"{path}: refused to load: {_unsafe_reason(e)}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise InputError(f"{path}: cannot read: {_first_line(e)}") from None


def _unsafe_reason(e: BaseException) -> str:
    """What torch's weights-only unpickler refused ("GLOBAL posix.system ..."), in one line."""
    found = re.search(r"GLOBAL (\S+)", str(e))
    what = f"it names {found.group(1)}" if found else "it holds"
    return f"{what}, more than tensors and plain values (a file this tool did not write)"


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any other global (a function to call, a foreign class) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint."):
            obj = super().find_class(module, name)
            if isinstance(obj, type):  # DCP's dataclasses and enums, never a function
                return obj
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):
            return super().find_class(module, name)
        elif module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath"):
            return super().find_class(module, name)
        elif (module, name) in (
            ("collections", "OrderedDict"),
            ("builtins", "set"),
            ("builtins", "frozenset"),
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_dcp_metadata(checkpoint_dir: str | Path) -> Any:
    """The DCP Metadata of a checkpoint directory, unpickled with the allow-list above."""
    path = Path(checkpoint_dir) / DCP_METADATA
    if not path.is_file():
        raise InputError(
            f"{checkpoint_dir}: no {DCP_METADATA} (not a torch.distributed.checkpoint directory)"
        )
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise InputError(
            f"{path}: refused to load: it names {e}, which is not checkpoint metadata (a file this tool did not write)"
        ) from None
    except (EOFError, AttributeError, ImportError, TypeError, ValueError) as e:
        raise InputError(f"{path}: cannot read: {_first_line(e)}") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        raise InputError(f"{path}: not checkpoint metadata (a {type(metadata).__name__})")
    return metadata


def verify_dcp(checkpoint_dir: str | Path) -> Any:
    """Reads a DCP directory's metadata and every object entry safely (tensor entries DCP itself reads
    with weights_only=True); returns the Metadata. InputError on anything that is not plain data."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    root = Path(checkpoint_dir).resolve()
    metadata = read_dcp_metadata(root)
    objects = {k for k, md in metadata.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)}
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn not in objects:
            continue
        where = f"{root}: entry {index.fqn!r}"
        file = (root / str(info.relative_path)).resolve()
        if file.parent != root or not file.is_file():
            raise InputError(f"{where} points at {info.relative_path}, not a file of the checkpoint")
        if getattr(info, "transform_descriptors", None):
            raise InputError(f"{where} is stored with transforms {info.transform_descriptors}, not supported")
        with open(file, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise InputError(f"{where}: refused to load: {_unsafe_reason(e)}") from None
        except (RuntimeError, EOFError) as e:
            raise InputError(f"{where}: cannot read: {_first_line(e)}") from None
    return metadata


def verify_checkpoint(path: str | Path) -> None:
    """Every .pt file and every DCP directory under a checkpoint directory loads as plain data (see the
    module docstring); InputError naming the first file that does not, before any of it is unpickled."""
    path = Path(path)
    for file in sorted(path.rglob("*.pt")):
        load_pt(file)
    for metadata in sorted(path.rglob(DCP_METADATA)):
        verify_dcp(metadata.parent)
