"""Which layers each pipeline rank builds, and the embedding shared by the first and last stage.

Layer assignment (Megatron's interleaved layout): the L layers are cut into pp * vpp equal blocks; model
chunk v of pp rank r holds block v * pp + r. With vpp = 1 rank r holds block r. Parameter names are the
full model's (GPTModel keys layers by global index), so a stage's state_dict is a subset of the full one.

Tied embeddings with pp > 1: the first stage owns embedding.word_embeddings.weight and the last stage a
separate output_layer.weight (V/tp, H), initialised equal to it by a broadcast over the embedding group
{first stage, last stage} of each pp group. Each copy gets a partial gradient (input side or output
side); `allreduce_tied_embedding_grads` sums them after backward and BEFORE the data-parallel reduction
(core.distributed.finalize_model_grads does both in that order), so both copies take the same optimizer
step and stay equal. The last stage's copy is tagged `pipeline_tied_copy = True`: a global gradient norm
must count it once (skip it there).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from core.parallel.dims import Groups, group_ranks
from core.transformer.config import TransformerConfig
from core.transformer.model import GPTModel


def stage_layer_ranges(num_layers: int, pp_size: int, vpp_size: int = 1) -> list[list[tuple[int, int]]]:
    """ranges[r][v] = global [start, end) of layers in model chunk v of pp rank r."""
    blocks = pp_size * vpp_size
    if pp_size < 1 or vpp_size < 1 or num_layers % blocks:
        raise ValueError(
            f"num_layers={num_layers} must split evenly into pp_size={pp_size} x vpp_size={vpp_size} chunks"
        )
    per_chunk = num_layers // blocks
    return [
        [((v * pp_size + r) * per_chunk, (v * pp_size + r + 1) * per_chunk) for v in range(vpp_size)]
        for r in range(pp_size)
    ]


def build_embedding_group(groups: Groups, timeout: timedelta | None = None) -> dist.ProcessGroup | None:
    """The {first stage, last stage} group of this rank's pp group, or None (middle stage, or pp = 1).

    Collective: every rank of the world calls it (after build_groups, same order everywhere).
    """
    if groups.pp_size == 1:
        return None
    mine = None
    for pp_members in group_ranks(groups.dims, "pp"):
        pair = [pp_members[0], pp_members[-1]]
        group = dist.new_group(pair, timeout=timeout)
        if groups.rank in pair:
            mine = group
    return mine


def build_stage_modules(
    config: TransformerConfig,
    groups: Groups,
    vpp_size: int,
    tp_group: dist.ProcessGroup | None,
    embedding_group: dist.ProcessGroup | None = None,
    *,
    cp_group: dist.ProcessGroup | None = None,
    ep_group: dist.ProcessGroup | None = None,
) -> list[GPTModel]:
    """This pp rank's model chunks, in virtual-stage order: chunk 0 of rank 0 embeds, the last chunk of
    the last rank owns the final norm and output head.

    Weights are drawn from the default generator in chunk order: seed pp ranks differently (or load
    weights) as for any per-rank layer. With tied embeddings and pp > 1 pass
    embedding_group=build_embedding_group(groups); the last stage's head is then broadcast from the first
    stage's embedding (collective over the embedding group). cp_group / ep_group (Groups.cp_group,
    Groups.ep_group) go to every chunk: context-parallel attention, expert-parallel MoE layers.
    """
    pp, rank = groups.pp_size, groups.pp_rank
    ranges = stage_layer_ranges(config.num_layers, pp, vpp_size)[rank]
    chunks = [
        GPTModel(
            config,
            tp_group=tp_group,
            layer_range=layer_range,
            pre_process=rank == 0 and v == 0,
            post_process=rank == pp - 1 and v == vpp_size - 1,
            cp_group=cp_group,
            ep_group=ep_group,
        )
        for v, layer_range in enumerate(ranges)
    ]
    if config.tie_embeddings and pp > 1 and (groups.is_first_stage or groups.is_last_stage):
        if embedding_group is None:
            raise ValueError("tied embeddings with pp > 1 need embedding_group=build_embedding_group(groups)")
        _sync_tied_weight(chunks, groups, embedding_group)
    return chunks


def tied_embedding_weight(model_chunks: Sequence[nn.Module]) -> nn.Parameter | None:
    """This rank's copy of the tied embedding when pp > 1: the embedding (first stage), the output head
    (last stage), else None. Chunks may be wrapped (e.g. DDP): `.module` is followed."""
    first, last = unwrap_model(model_chunks[0]), unwrap_model(model_chunks[-1])
    if not first.config.tie_embeddings or (first.pre_process and last.post_process):
        return None  # untied, or one stage holds both ends and they are the same Parameter
    if first.pre_process:
        return first.embedding.word_embeddings.weight
    if last.post_process:
        return last.output_layer.weight
    return None


@torch.no_grad()
def allreduce_tied_embedding_grads(
    model_chunks: Sequence[nn.Module], embedding_group: dist.ProcessGroup | None
) -> None:
    """Sum the tied embedding's gradient over the first and last stage (no-op elsewhere and at pp = 1).

    Reduces `param.main_grad` when present (DDP wrappers accumulate there), else `param.grad`. Call it
    after backward of the step's last micro-batch, before or after the data-parallel reduction (after it
    only when the weight has a gradient bucket of its own under a distributed optimizer: see
    core/distributed/finalize.py). Both ends must call it.
    """
    weight = tied_embedding_weight(model_chunks)
    if weight is None or embedding_group is None:
        return
    grad = weight.main_grad if hasattr(weight, "main_grad") else weight.grad
    if grad is None:  # no backward reached it: contribute zeros so the peer is not left waiting
        grad = weight.grad = torch.zeros_like(weight)
    dist.all_reduce(grad, group=embedding_group)


@torch.no_grad()
def _sync_tied_weight(chunks: list[GPTModel], groups: Groups, embedding_group: dist.ProcessGroup) -> None:
    """Copy the first stage's word embedding into the last stage's output head (broadcast)."""
    weight = tied_embedding_weight(chunks)
    assert weight is not None  # first or last stage of a tied model with pp > 1
    if groups.is_last_stage:
        weight.pipeline_tied_copy = True
    staged = weight.data
    if staged.device.type == "cpu" and dist.get_backend(embedding_group) == "nccl":
        staged = staged.cuda()  # a model built on the CPU of an NCCL job: broadcast via the current GPU
    dist.broadcast(staged, src=groups.ranks["pp"][0], group=embedding_group)
    if staged.device != weight.device:
        weight.copy_(staged)


def unwrap_model(chunk: nn.Module) -> GPTModel:
    """The GPTModel inside a wrapper that keeps it as `.module` (DDP)."""
    while not isinstance(chunk, GPTModel):
        chunk = chunk.module  # type: ignore[assignment]
    return chunk
