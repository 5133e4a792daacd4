"""Tensors through the Ray object store as numpy arrays.

Ray serialises numpy arrays zero-copy (pickle protocol 5 out-of-band buffers) but torch tensors through
torch's own pickling, which is ~10x slower to put for large payloads (86M fp32 params: ~0.25 s vs 2-5 s).
`to_transport` replaces every tensor in a nested dict/list/tuple by a `TensorPayload` (CPU numpy array +
the torch dtype name), `from_transport` turns them back into CPU tensors. dtypes numpy lacks (bf16, fp8)
travel as same-width integer views, so every dtype round-trips bit for bit.

Contract: tensors come back on the CPU, contiguous and writable (arrays that Ray maps read-only from
shared memory are copied once); the receiver moves them to its device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Integer views for dtypes numpy has no equivalent of, keyed by element size in bytes.
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class TensorPayload:
    """One tensor in transit: its data as a numpy array and its torch dtype (e.g. "bfloat16")."""

    array: np.ndarray
    dtype: str


def _has_numpy_dtype(dtype: torch.dtype) -> bool:
    try:
        torch.empty(0, dtype=dtype).numpy()
    except (TypeError, RuntimeError):
        return False
    return True


_NUMPY_OK: dict[torch.dtype, bool] = {}


def _pack(tensor: torch.Tensor) -> TensorPayload:
    t = tensor.detach().to("cpu").contiguous()
    if t.dtype not in _NUMPY_OK:
        _NUMPY_OK[t.dtype] = _has_numpy_dtype(t.dtype)
    if not _NUMPY_OK[t.dtype]:
        t = t.view(_INT_VIEW[t.element_size()])
    return TensorPayload(array=t.numpy(), dtype=str(tensor.dtype).removeprefix("torch."))


def _unpack(payload: TensorPayload) -> torch.Tensor:
    array = payload.array if payload.array.flags.writeable else payload.array.copy()
    tensor = torch.from_numpy(array)
    dtype = getattr(torch, payload.dtype)
    return tensor if tensor.dtype == dtype else tensor.view(dtype)


def to_transport(obj: Any) -> Any:
    """Nested dicts/lists/tuples with every torch.Tensor replaced by a TensorPayload (other leaves kept)."""
    if isinstance(obj, torch.Tensor):
        return _pack(obj)
    if isinstance(obj, dict):
        return {k: to_transport(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return _rebuild(obj, [to_transport(v) for v in obj])
    return obj


def from_transport(obj: Any) -> Any:
    """Inverse of to_transport: TensorPayloads become CPU tensors again."""
    if isinstance(obj, TensorPayload):
        return _unpack(obj)
    if isinstance(obj, dict):
        return {k: from_transport(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return _rebuild(obj, [from_transport(v) for v in obj])
    return obj


def _rebuild(original: list | tuple, items: list[Any]) -> list | tuple:
    if isinstance(original, tuple) and hasattr(original, "_fields"):  # a namedtuple
        return type(original)(*items)
    return type(original)(items)
