"""Weight refit into generation engines: size-bounded buckets of HF-named tensors.

Engine-facing slice. The training side (gathering TP/PP/EP shards per parameter and converting
them with the bridge) produces the `(hf_name, tensor)` stream these functions consume.

A bucket is the unit a producer materialises at once (gathered, cast, moved to the engine's
device) and the unit a transport ships (one safetensors shard, one object-store put, one
broadcast). The engine still receives the whole model in one `update_weights` call: vLLM fuses
q/k/v and gate/up into single parameters, so loading a bucket that ends mid-layer and letting
generation run before the rest arrives would mix versions inside one layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from core.errors import InputError
from rollout.engines.base import GenerationEngine

NamedTensor = tuple[str, torch.Tensor]


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def iter_buckets(named_tensors: Iterable[NamedTensor], bucket_bytes: int) -> Iterator[list[NamedTensor]]:
    """Group tensors, in order, into lists of at most `bucket_bytes` each. A tensor larger than
    `bucket_bytes` travels alone in its own bucket; no tensor is split."""
    if bucket_bytes < 1:
        raise InputError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: list[NamedTensor] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor_bytes(tensor)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


@dataclass(frozen=True)
class RefitStats:
    num_tensors: int
    num_bytes: int
    num_buckets: int


def refit_engine(
    engine: GenerationEngine,
    named_tensors: Iterable[NamedTensor],
    version: int,
    bucket_bytes: int = 256 << 20,
) -> RefitStats:
    """Push a full set of HF-named weights into `engine` as `version`, one bucket in memory at a time.

    Each bucket is detached and made contiguous before the engine reads it (the producer may hand
    views of training buffers). Waits for in-flight generation (see `GenerationEngine`).
    """
    counts = {"tensors": 0, "bytes": 0, "buckets": 0}

    def stream() -> Iterator[NamedTensor]:
        for bucket in iter_buckets(named_tensors, bucket_bytes):
            counts["buckets"] += 1
            for name, tensor in bucket:
                counts["tensors"] += 1
                counts["bytes"] += tensor_bytes(tensor)
                yield name, tensor.detach().contiguous()

    engine.update_weights(stream(), version)
    return RefitStats(counts["tensors"], counts["bytes"], counts["buckets"])
