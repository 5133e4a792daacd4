"""Weight refit into generation engines: training shards -> full HF-named tensors -> engine.

Training side: `gather_full_params` all-gathers one parameter at a time over tp (and ep) so every
rank of a pipeline stage sees that parameter's FULL tensor, and `training_weights_to_hf` converts
each one with the bridge as it arrives. Peak extra memory is one full parameter (plus the HF views
of it), never a second copy of the model.

Pipeline parallelism: each stage streams only its own layers. Either every stage feeds its part to
an engine of its own that accepts partial loads, or (the usual case: one engine per model replica)
the stages send their parts to pp rank 0 with `gather_to_rank0_over_pp`, which yields the whole model
there. Replicas over dp/cp/edp produce identical streams; the caller picks one (e.g. dp_rank 0) to
feed the engine, but every rank of the tp/ep/pp groups must drive the stream (it is collective).

Engine side:

A bucket is the unit a producer materialises at once (gathered, cast, moved to the engine's
device) and the unit a transport ships (one safetensors shard, one object-store put, one
broadcast). The engine still receives the whole model in one `update_weights` call: vLLM fuses
q/k/v and gate/up into single parameters, so loading a bucket that ends mid-layer and letting
generation run before the rest arrives would mix versions inside one layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from core.bridge.convert import export_hf_weights
from core.checkpoint.sharded import checkpoint_names
from core.errors import InputError
from core.models import Architecture
from core.parallel.dims import Groups
from core.transformer.config import TransformerConfig
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


# ---- training side: full tensors out of any (tp, ep, pp) layout --------------------------------------


def _all_gather_cat(local: torch.Tensor, dim: int, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    """Concatenate the group's equal shards along `dim` (the inverse of `tensor.chunk(size, dim)`)."""
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def full_tensor(param: torch.Tensor, groups: Groups | None) -> torch.Tensor:
    """The global tensor of one parameter: gather over tp along `tp_dim`, then over ep along `ep_dim`.

    Undoes `core.engine.shard_of` (ep chunk first, tp chunk of it second). Collective over the
    parameter's tp and ep groups; a replicated parameter is returned as is (no copy, no traffic).
    """
    out = param.detach()
    if groups is None:
        return out
    tp_dim, ep_dim = getattr(param, "tp_dim", None), getattr(param, "ep_dim", None)
    if tp_dim is not None and groups.tp_size > 1:
        out = _all_gather_cat(out, tp_dim, groups.tp_group, groups.tp_size)
    if ep_dim is not None and groups.ep_size > 1:
        out = _all_gather_cat(out, ep_dim, groups.ep_group, groups.ep_size)
    return out


def _is_tied_output_copy(local_name: str, global_name: str) -> bool:
    """A tied output head on a stage without the embedding: the first stage yields that weight."""
    return local_name == "output_layer.weight" and global_name != local_name


def gather_full_params(chunks: Sequence[nn.Module], groups: Groups | None) -> Iterator[NamedTensor]:
    """(global name, full tensor) for each parameter of this rank's chunks, one gathered at a time.

    With pp > 1 a stage yields only its own layers; over all stages each name comes exactly once (a
    tied output head's copy on the last stage is skipped). Every rank of the tp and ep groups must
    consume the stream in step (each item is a collective). The tensors may alias the parameters.
    """
    names = checkpoint_names(chunks)
    for chunk in chunks:
        for local_name, param in chunk.named_parameters():
            global_name = names[param]
            if _is_tied_output_copy(local_name, global_name):
                continue
            yield global_name, full_tensor(param, groups)


def training_weights_to_hf(
    chunks: Sequence[nn.Module],
    groups: Groups | None,
    config: TransformerConfig,
    arch: Architecture | str | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[NamedTensor]:
    """HF-named full tensors of this rank's chunks, converted one parameter at a time (see the module
    docstring for pp). dtype casts each tensor as it is produced (e.g. fp32 masters -> bf16 engine)."""
    for name, tensor in export_hf_weights(gather_full_params(chunks, groups), config, arch):
        yield name, tensor if dtype is None else tensor.to(dtype)


def gather_to_rank0_over_pp(
    named_tensors: Iterable[NamedTensor], groups: Groups | None, device: torch.device | str = "cpu"
) -> Iterator[NamedTensor]:
    """Stream every pipeline stage's tensors to pp rank 0, which yields them all (stage order).

    Every pp rank must exhaust the returned iterator; on stages > 0 it yields nothing and sends its
    tensors point to point (one (name, shape, dtype) header, then the tensor). Stages wait their turn,
    so pp rank 0 holds one received tensor at a time, on `device` (the one the pp group's backend
    communicates on: "cpu" for gloo, the rank's GPU for NCCL). Without pp (groups None or pp_size 1) it passes through.
    """
    if groups is None or groups.pp_size == 1:
        yield from named_tensors
        return
    stages = groups.ranks["pp"]
    if groups.pp_rank == 0:
        yield from named_tensors
        for src in stages[1:]:
            yield from _recv_stage(src, groups.pp_group, torch.device(device))
    else:
        _send_stage(named_tensors, stages[0], groups.pp_group)


def _send_stage(named_tensors: Iterable[NamedTensor], dst: int, group: dist.ProcessGroup) -> None:
    for name, tensor in named_tensors:
        dist.send_object_list([(name, tuple(tensor.shape), tensor.dtype)], dst=dst, group=group)
        dist.send(tensor.contiguous(), dst=dst, group=group)
    dist.send_object_list([None], dst=dst, group=group)


def _recv_stage(src: int, group: dist.ProcessGroup, device: torch.device) -> Iterator[NamedTensor]:
    while True:
        header: list[object] = [None]
        dist.recv_object_list(header, src=src, group=group)
        if header[0] is None:
            return
        name, shape, dtype = header[0]  # type: ignore[misc]
        tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(tensor, src=src, group=group)
        yield name, tensor
