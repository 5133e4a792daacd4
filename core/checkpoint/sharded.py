"""Distributed checkpoints that reshard across parallel layouts (TP, PP, DP, EP), on torch.distributed.checkpoint.

A checkpoint stores every parameter and optimizer-state tensor in its GLOBAL (unsharded) shape, keyed by a name
that no layout changes:
    <param name>                      e.g. layers.3.mlp.linear_fc1.weight (GPTModel names use global layer
                                      indices, so they are the same for every pipeline split)
    optim.<param name>.<state key>    e.g. optim.layers.3.mlp.linear_fc1.weight.exp_avg; tensors shaped like
                                      the parameter are sharded like it, 0-dim ones (step) are replicated
    optim.param_groups                tuple of per-group hyperparameters (lr, betas, ...; no param lists)
Each rank hands DCP its LOCAL shards wrapped with their place in the global tensor (DTensor over a DeviceMesh
made from our own tp / ep process groups). DCP writes each global element once (replicas over dp, cp, edp,
the other tp ranks of a replicated param, or the two copies of a tied embedding have the same key and offsets
and are deduplicated), and on load each rank reads the regions of the stored chunks that overlap its own
shards: loading with another layout is resharding. Nothing is gathered; no rank holds more than its shards.

Sharding contract for a parameter (what every producer of ParamShard must guarantee):
    tp_dim  the local tensor is the tp_rank-th of tp_size equal contiguous chunks along tp_dim (None: replicated
            over tp). The fused QKV and gate/up layouts are TP-invariant (core.tensor_parallel), so this holds.
    ep_dim  the local tensor is the ep_rank-th of ep_size equal contiguous chunks along ep_dim (experts
            [ep_rank * E/ep, (ep_rank + 1) * E/ep)); None: not an expert parameter.
A tied output layer on a pipeline stage without the embedding holds its own copy of the embedding: it is
stored under the embedding's name, so that a tied model has one weight in the checkpoint whatever the split
(the copies must be equal, which the training loop's embedding-grad all-reduce ensures).

Why DTensor and not ShardedTensor: DTensor is DCP's supported sharded type; ShardedTensor (torch.distributed.
_shard) is deprecated. DeviceMesh.from_group wraps our existing groups without creating new ones, and
DTensor.from_local(run_check=False) does no communication: the mesh only tells DCP each shard's global offset.

Optimizer plug-in: any optimizer that can give and take its state as "named state" (full over dp, tp/ep-sharded
like the parameters) works with sharded_named_optimizer_state (save) and read_named_optimizer_state (load):
    {"state": {param name: {state key: tensor}}, "param_groups": [{hyperparameters..., "params": [names]}]}
That is the format of core.distributed.DistributedOptimizer.full_state_dict / load_full_state_dict; for a plain
torch optimizer named_optimizer_state / load_named_optimizer_state convert.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from core.parallel.dims import Groups, members

OPTIM_PREFIX = "optim."
PARAM_GROUPS_KEY = "optim.param_groups"
_TIED_OUTPUT = "output_layer.weight"
_EMBEDDING = "embedding.word_embeddings.weight"

PathLike = str | Path


class ParamShard(NamedTuple):
    """One parameter as this rank holds it: its checkpoint name, local shard and the dims it is sharded on."""

    name: str
    local: torch.Tensor
    tp_dim: int | None
    ep_dim: int | None


# ---- model ------------------------------------------------------------------------------------------------


def _checkpoint_name(chunk: nn.Module, name: str) -> str:
    """The tied output weight of a stage without the embedding is stored as the embedding it copies."""
    config = getattr(chunk, "config", None)
    if (
        name == _TIED_OUTPUT
        and getattr(config, "tie_embeddings", False)
        and not getattr(chunk, "pre_process", True)
    ):
        return _EMBEDDING
    return name


def checkpoint_names(model_chunks: Sequence[nn.Module]) -> dict[nn.Parameter, str]:
    """Checkpoint name of every parameter of this rank's model chunks (an optimizer keys its named state by it).

    Raises ValueError if two chunks hold the same name (chunks must hold disjoint global layers).
    """
    names: dict[nn.Parameter, str] = {}
    seen: set[str] = set()
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():  # a parameter tied within one chunk comes once
            ckpt_name = _checkpoint_name(chunk, name)
            if ckpt_name in seen:
                raise ValueError(f"parameter {ckpt_name!r} is in more than one model chunk of this rank")
            seen.add(ckpt_name)
            names[p] = ckpt_name
    return names


def model_named_shards(model_chunks: Sequence[nn.Module]) -> list[ParamShard]:
    """ParamShards of this rank's model chunks (e.g. its pipeline stages' GPTModels), read from each parameter's
    `tp_dim` and `ep_dim` attributes. The local tensors are the parameters themselves (loading writes into them)."""
    return [
        ParamShard(name, p, getattr(p, "tp_dim", None), getattr(p, "ep_dim", None))
        for p, name in checkpoint_names(model_chunks).items()
    ]


class _Meshes:
    """DeviceMeshes over this rank's tp and ep groups (and the 2-D ep x tp mesh), made once per device type."""

    def __init__(self, groups: Groups | None):
        self.groups = groups
        self._cache: dict[tuple[str, str], DeviceMesh] = {}

    def sizes(self) -> tuple[int, int]:
        """(tp size, ep size); (1, 1) without groups."""
        return (self.groups.tp_size, self.groups.ep_size) if self.groups else (1, 1)

    def get(self, axes: str, device_type: str) -> DeviceMesh:
        key = (axes, device_type)
        if key not in self._cache:
            self._cache[key] = self._build(axes, device_type)
        return self._cache[key]

    def _build(self, axes: str, device_type: str) -> DeviceMesh:
        g = self.groups
        assert g is not None
        if axes == "tp":
            return DeviceMesh.from_group(g.tp_group, device_type)
        if axes == "ep":
            return DeviceMesh.from_group(g.ep_group, device_type)
        # Experts sharded over ep and tp: mesh[e][t] is the global rank at ep rank e and tp rank t.
        mesh = [members(g.dims, "tp", ep_member) for ep_member in g.ranks["ep"]]
        return DeviceMesh.from_group(
            [g.ep_group, g.tp_group], device_type, mesh=torch.tensor(mesh), mesh_dim_names=("ep", "tp")
        )


def _global_shape(
    local: torch.Tensor, tp_dim: int | None, ep_dim: int | None, sizes: tuple[int, int]
) -> list[int]:
    shape = list(local.shape)
    if tp_dim is not None:
        shape[tp_dim] *= sizes[0]
    if ep_dim is not None:
        shape[ep_dim] *= sizes[1]
    return shape


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))


def _wrap(local: torch.Tensor, tp_dim: int | None, ep_dim: int | None, meshes: _Meshes) -> torch.Tensor:
    """`local` (detached, sharing its storage) as DCP should see it: a DTensor placed in the global tensor, or
    the plain tensor when it is whole (replicated, or sharded over axes of size 1)."""
    local = local.detach()
    tp_size, ep_size = meshes.sizes()
    tp_dim = tp_dim if tp_size > 1 else None
    ep_dim = ep_dim if ep_size > 1 else None
    if tp_dim is None and ep_dim is None:
        return local
    if tp_dim is not None and tp_dim == ep_dim:
        raise ValueError(f"a parameter cannot be sharded over tp and ep on the same dim ({tp_dim})")
    if ep_dim is None:
        axes, placements = "tp", [Shard(tp_dim)]
    elif tp_dim is None:
        axes, placements = "ep", [Shard(ep_dim)]
    else:
        axes, placements = "ep_tp", [Shard(ep_dim), Shard(tp_dim)]
    shape = _global_shape(local, tp_dim, ep_dim, (tp_size, ep_size))
    return DTensor.from_local(
        local,
        meshes.get(axes, local.device.type),
        placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=_contiguous_stride(shape),
    )


def sharded_model_state(
    named_params: Iterable[ParamShard | tuple], groups: Groups | None
) -> dict[str, torch.Tensor]:
    """{name: DTensor or Tensor} for dcp.save / dcp.load (in place: loading writes into the local tensors).

    named_params: (name, local tensor, tp_dim, ep_dim) per parameter, as model_named_shards gives. groups: this
    rank's process groups (None: a single process, every tensor whole). Communication-free; every rank of the
    world then calls dcp.save / dcp.load with its own dict.
    """
    meshes = _Meshes(groups)
    return {
        name: _wrap(local, tp_dim, ep_dim, meshes)
        for name, local, tp_dim, ep_dim in map(ParamShard._make, named_params)
    }


def load_sharded_model_state(
    checkpoint_id: PathLike, named_params: Iterable[ParamShard | tuple], groups: Groups | None
) -> None:
    """Fill every local tensor of named_params from the checkpoint, whatever layout wrote it. Collective."""
    dcp.load(sharded_model_state(named_params, groups), checkpoint_id=str(checkpoint_id))


# ---- optimizer ----------------------------------------------------------------------------------------------


def _optim_key(name: str, state_key: str) -> str:
    if "." in state_key:
        raise ValueError(
            f"optimizer state key {state_key!r} of {name!r} contains '.': keys must be plain names"
        )
    return f"{OPTIM_PREFIX}{name}.{state_key}"


def _hyperparameters(param_groups: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], ...]:
    """Per-group hyperparameters without the parameter lists (those depend on the layout).

    A tuple, so that DCP stores it as one object rather than flattening it."""
    return tuple({k: v for k, v in group.items() if k != "params"} for group in param_groups)


def sharded_named_optimizer_state(
    named_state: Mapping[str, Any], named_params: Iterable[ParamShard | tuple], groups: Groups | None
) -> dict[str, Any]:
    """The optimizer-plug-in save: named state (see the module doc) -> {"optim.<name>.<key>": ..., param groups}.

    A state tensor shaped like its parameter's local shard is sharded like the parameter; a 0-dim one (step) is
    replicated. Any other shape raises ValueError (its sharding is unknown), as does a name with no parameter.
    """
    shards = {s.name: s for s in map(ParamShard._make, named_params)}
    meshes = _Meshes(groups)
    out: dict[str, Any] = {}
    for name, entry in named_state["state"].items():
        if name not in shards:
            raise ValueError(
                f"optimizer state for {name!r}, which is not a parameter of this rank's model chunks"
            )
        shard = shards[name]
        for state_key, value in entry.items():
            out[_optim_key(name, state_key)] = _wrap_state(shard, state_key, value, meshes)
    out[PARAM_GROUPS_KEY] = _hyperparameters(named_state["param_groups"])
    return out


def _wrap_state(shard: ParamShard, state_key: str, value: Any, meshes: _Meshes) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"optimizer state {shard.name}.{state_key} is a {type(value).__name__}, not a tensor")
    if value.shape == shard.local.shape:
        return _wrap(value, shard.tp_dim, shard.ep_dim, meshes)
    if value.dim() == 0:
        return value.detach()
    raise ValueError(
        f"optimizer state {shard.name}.{state_key} has shape {tuple(value.shape)}, neither its parameter's "
        f"{tuple(shard.local.shape)} nor a scalar: cannot tell how it is sharded"
    )


def _stored_optimizer_entries(metadata: Metadata) -> dict[str, dict[str, TensorStorageMetadata]]:
    """{param name: {state key: stored tensor metadata}} of the optimizer tensors in a checkpoint."""
    entries: dict[str, dict[str, TensorStorageMetadata]] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if fqn.startswith(OPTIM_PREFIX) and isinstance(md, TensorStorageMetadata):
            name, state_key = fqn[len(OPTIM_PREFIX) :].rsplit(".", 1)
            entries.setdefault(name, {})[state_key] = md
    return entries


def optimizer_state_template(
    checkpoint_id: PathLike, named_params: Iterable[ParamShard | tuple], groups: Groups | None
) -> dict[str, Any]:
    """Empty tensors for every optimizer entry the checkpoint holds for this rank's parameters, wrapped for
    dcp.load (with the param groups key). Pass it, merged with other state if wished, to dcp.load, then
    named_state_from_template. Reads the checkpoint's metadata only (no collective)."""
    metadata = dcp.FileSystemReader(str(checkpoint_id)).read_metadata()
    stored = _stored_optimizer_entries(metadata)
    meshes = _Meshes(groups)
    template: dict[str, Any] = {}
    for shard in map(ParamShard._make, named_params):
        for state_key, md in stored.get(shard.name, {}).items():
            template[_optim_key(shard.name, state_key)] = _empty_state(shard, md, meshes)
    if isinstance(metadata.state_dict_metadata.get(PARAM_GROUPS_KEY), BytesStorageMetadata):
        template[PARAM_GROUPS_KEY] = ()
    return template


def _empty_state(shard: ParamShard, md: TensorStorageMetadata, meshes: _Meshes) -> torch.Tensor:
    """An empty local tensor for one stored state tensor: this rank's shard if it is shaped like the
    parameter's global tensor, else the whole (replicated, e.g. step) tensor on the CPU."""
    dtype = md.properties.dtype
    if list(md.size) == _global_shape(shard.local, shard.tp_dim, shard.ep_dim, meshes.sizes()):
        local = torch.empty(shard.local.shape, dtype=dtype, device=shard.local.device)
        return _wrap(local, shard.tp_dim, shard.ep_dim, meshes)
    return torch.empty(md.size, dtype=dtype)


def named_state_from_template(template: Mapping[str, Any]) -> dict[str, Any]:
    """The loaded template as named state: {"state": {name: {key: local tensor}}, "param_groups": [...]}.

    param_groups carry hyperparameters only (no "params"); an optimizer keeps its own parameter lists."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in template.items():
        if key == PARAM_GROUPS_KEY:
            continue
        name, state_key = key[len(OPTIM_PREFIX) :].rsplit(".", 1)
        state.setdefault(name, {})[state_key] = value.to_local() if isinstance(value, DTensor) else value
    return {"state": state, "param_groups": [dict(g) for g in template.get(PARAM_GROUPS_KEY, ())]}


def read_named_optimizer_state(
    checkpoint_id: PathLike, named_params: Iterable[ParamShard | tuple], groups: Groups | None
) -> dict[str, Any]:
    """The optimizer-plug-in load: this rank's shards of the stored optimizer state, as named state. Collective."""
    template = optimizer_state_template(checkpoint_id, named_params, groups)
    dcp.load(template, checkpoint_id=str(checkpoint_id))
    return named_state_from_template(template)


def named_optimizer_state(
    optimizer: torch.optim.Optimizer, model_chunks: Sequence[nn.Module]
) -> dict[str, Any]:
    """A torch optimizer's state as named state (no copies). Every optimized tensor must be a chunk parameter."""
    names = checkpoint_names(model_chunks)
    state: dict[str, dict[str, torch.Tensor]] = {}
    param_groups = []
    for group in optimizer.param_groups:
        group_names = []
        for p in group["params"]:
            if p not in names:
                raise ValueError("the optimizer holds a tensor that is not a parameter of the model chunks")
            group_names.append(names[p])
            if optimizer.state.get(p):
                state[names[p]] = dict(optimizer.state[p])
        param_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": group_names})
    return {"state": state, "param_groups": param_groups}


def load_named_optimizer_state(
    optimizer: torch.optim.Optimizer, model_chunks: Sequence[nn.Module], named_state: Mapping[str, Any]
) -> None:
    """Load named state into a torch optimizer (its own parameter lists are kept; hyperparameters are taken from
    named_state when it has them, which must then be one per param group). Parameters with no stored state start
    fresh. torch's load_state_dict casts state to each parameter's dtype and device (step stays fp32)."""
    names = checkpoint_names(model_chunks)
    hyper = named_state.get("param_groups") or [{} for _ in optimizer.param_groups]
    if len(hyper) != len(optimizer.param_groups):
        raise ValueError(
            f"checkpoint has {len(hyper)} optimizer param groups, this optimizer {len(optimizer.param_groups)}"
        )
    state: dict[int, dict[str, torch.Tensor]] = {}
    param_groups = []
    index = 0
    for group, stored in zip(optimizer.param_groups, hyper, strict=True):
        ids = list(range(index, index + len(group["params"])))
        for i, p in zip(ids, group["params"], strict=True):
            if names[p] in named_state["state"]:
                state[i] = dict(named_state["state"][names[p]])
        own = {k: v for k, v in group.items() if k != "params"}
        param_groups.append({**own, **{k: v for k, v in stored.items() if k != "params"}, "params": ids})
        index += len(ids)
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def sharded_optimizer_state(
    optimizer: torch.optim.Optimizer, model_chunks: Sequence[nn.Module], groups: Groups | None
) -> dict[str, Any]:
    """A torch optimizer's (e.g. AdamW's) state in checkpoint form, for dcp.save."""
    return sharded_named_optimizer_state(
        named_optimizer_state(optimizer, model_chunks), model_named_shards(model_chunks), groups
    )


def load_sharded_optimizer_state(
    checkpoint_id: PathLike,
    optimizer: torch.optim.Optimizer,
    model_chunks: Sequence[nn.Module],
    groups: Groups | None,
) -> None:
    """Load a torch optimizer's state from a checkpoint written at any layout. Collective."""
    named = read_named_optimizer_state(checkpoint_id, model_named_shards(model_chunks), groups)
    load_named_optimizer_state(optimizer, model_chunks, named)


# ---- whole checkpoints ------------------------------------------------------------------------------------------


def check_expert_shards(model_chunks: Sequence[nn.Module], groups: Groups | None) -> None:
    """Raise ValueError unless every expert parameter holds num_experts / ep_size experts (the ep_dim contract):
    a model that keeps all experts under ep > 1 would otherwise be saved as ep times too many experts."""
    ep_size = groups.ep_size if groups else 1
    for chunk in model_chunks:
        num_experts = getattr(getattr(chunk, "config", None), "num_experts", 0)
        for name, p in chunk.named_parameters():
            ep_dim = getattr(p, "ep_dim", None)
            if ep_dim is not None and num_experts and p.shape[ep_dim] * ep_size != num_experts:
                raise ValueError(
                    f"{name} holds {p.shape[ep_dim]} experts on dim {ep_dim}; with ep={ep_size} and "
                    f"num_experts={num_experts} each rank must hold {num_experts // ep_size}"
                )


def save_sharded(
    path: PathLike,
    model_chunks: Sequence[nn.Module],
    optimizer: torch.optim.Optimizer | None,
    groups: Groups | None,
) -> None:
    """Write this rank's model chunks (and the optimizer's state) into one DCP checkpoint at `path`. Every rank of
    the world calls it; a single process passes groups=None."""
    check_expert_shards(model_chunks, groups)
    shards = model_named_shards(model_chunks)
    state: dict[str, Any] = sharded_model_state(shards, groups)
    if optimizer is not None:
        state |= sharded_optimizer_state(optimizer, model_chunks, groups)
    dcp.save(state, checkpoint_id=str(path))


def load_sharded(
    path: PathLike,
    model_chunks: Sequence[nn.Module],
    optimizer: torch.optim.Optimizer | None,
    groups: Groups | None,
) -> None:
    """Load a save_sharded checkpoint written at any layout into this rank's chunks (and optimizer), in place.
    Collective. Every parameter must be in the checkpoint (DCP raises naming a missing one)."""
    check_expert_shards(model_chunks, groups)
    shards = model_named_shards(model_chunks)
    template = optimizer_state_template(path, shards, groups) if optimizer is not None else {}
    dcp.load(sharded_model_state(shards, groups) | template, checkpoint_id=str(path))
    if optimizer is not None:
        load_named_optimizer_state(optimizer, model_chunks, named_state_from_template(template))


def load_full_state(path: PathLike) -> dict[str, Any]:
    """Every entry of a checkpoint as whole (global) tensors, in this process alone: no process group needed, and
    none is used if one exists (e.g. for HF export on one rank). Holds the whole checkpoint in CPU memory."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    state: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            state[fqn] = torch.empty(md.size, dtype=md.properties.dtype)
        else:
            state[fqn] = None  # an object: DCP replaces the placeholder with the stored value
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state
