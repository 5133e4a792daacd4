"""Tensor-parallel parity: a tp=2 gloo world against single-process torch, forward and every gradient.

One 2-rank world runs every case (spawning is the expensive part) and returns its shards; the
references are computed here, in the parent, with plain torch on the full tensors.

Tolerance (fp32, atol = rtol = 1e-6): the sharded computation differs from the reference only in
summation order (a row-parallel output or a column-parallel input-gradient is two half-length dot
products summed by the all-reduce, instead of one full-length one). With O(1) values and <= 64 terms
that moves results by a few fp32 ulps (eps = 1.2e-7), far below 1e-6; a wrong shard, a missing or
doubled reduction, or a wrong sequence chunk gives errors of order 1e-1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dist import run_distributed
from torch import nn

from core.parallel import ParallelDims, build_groups, scatter_to_sequence
from core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    allreduce_sequence_parallel_grads,
    init_tp_param_,
    normal_init,
    seed_model_parallel,
    vocab_parallel_cross_entropy,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
)

TP = 2
B, T, H, FFN, V = 2, 4, 8, 16, 16
TOL = dict(atol=1e-6, rtol=1e-6)
# "+compile": the same module under torch.compile, so the collectives are traced (functional collectives,
# in the compiled backward too): a compiled tp2 model once trained with wrong gradients over NCCL.
MLP_MODES = ["tp", "sequence_parallel", "gathered", "tp+compile", "sequence_parallel+compile"]


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Not torch.testing.assert_close: its first call imports DTensor and sympy (>10 s on a busy box).
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, **TOL), f"max abs diff {diff:.2e} exceeds atol=rtol=1e-6"


def _data() -> dict[str, torch.Tensor]:
    """Full weights and inputs, identical in every process (seeded generator)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    target = torch.randint(0, V, (B, T), generator=g)
    target[0, 1] = -100  # an ignored position
    return {
        "x": randn(B, T, H),
        "dy": randn(B, T, H),
        "ln_w": 1 + 0.1 * randn(H),
        "ln_b": 0.1 * randn(H),
        "w1": randn(FFN, H) / H**0.5,
        "b1": 0.1 * randn(FFN),
        "w2": randn(H, FFN) / FFN**0.5,
        "b2": 0.1 * randn(H),
        "ids": torch.randint(0, V, (B, T), generator=g),
        "emb": randn(V, H),
        "logits": 2 * randn(B, T, V),
        "target": target,
        "loss_w": randn(3, B, T),
    }


def _chunk(x: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    return x.chunk(TP, dim=dim)[rank].contiguous()


# ---- the sharded side (runs in the workers) ---------------------------------------------------------------


class _TPMLP(nn.Module):
    """LayerNorm -> column-parallel -> gelu -> row-parallel, as in a transformer block."""

    def __init__(self, tp_group, mode: str) -> None:
        super().__init__()
        sp = mode == "sequence_parallel"
        gathered = mode == "gathered"
        self.norm = nn.LayerNorm(H)
        for p in self.norm.parameters():
            p.sequence_parallel = sp
        self.fc1 = ColumnParallelLinear(
            H, FFN, True, tp_group=tp_group, sequence_parallel=sp, gather_output=gathered
        )
        self.fc2 = RowParallelLinear(
            FFN, H, True, tp_group=tp_group, sequence_parallel=sp, input_is_parallel=not gathered
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


def _mlp_case(tp_group, rank: int, mode: str, d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from torch._dynamo.utils import counters

    mode, _, compiled = mode.partition("+")
    model = _TPMLP(tp_group, mode)
    with torch.no_grad():
        model.norm.weight.copy_(d["ln_w"])
        model.norm.bias.copy_(d["ln_b"])
        model.fc1.weight.copy_(_chunk(d["w1"], 0, rank))  # (FFN / tp, H)
        model.fc1.bias.copy_(_chunk(d["b1"], 0, rank))
        model.fc2.weight.copy_(_chunk(d["w2"], 1, rank))  # (H, FFN / tp)
        model.fc2.bias.copy_(d["b2"])
    sp = mode == "sequence_parallel"
    x = (_chunk(d["x"], 1, rank) if sp else d["x"].clone()).requires_grad_()
    dy = _chunk(d["dy"], 1, rank) if sp else d["dy"]
    counters.clear()
    forward = torch.compile(model) if compiled else model
    y = forward(x)  # (B, T / tp, H) under SP, else (B, T, H)
    (y * dy).sum().backward()
    allreduce_sequence_parallel_grads(model, tp_group)
    out = {"y": y.detach(), "dx": x.grad, "graphs": counters["stats"]["unique_graphs"]}
    out |= {name: p.grad for name, p in model.named_parameters()}
    return out


def _embedding_case(tp_group, rank: int, sp: bool, d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    emb = VocabParallelEmbedding(V, H, tp_group=tp_group, sequence_parallel=sp)
    with torch.no_grad():
        emb.weight.copy_(_chunk(d["emb"], 0, rank))
    y = emb(d["ids"])  # (B, T / tp, H) under SP, else (B, T, H)
    (y * (_chunk(d["dy"], 1, rank) if sp else d["dy"])).sum().backward()
    return {"y": y.detach(), "dw": emb.weight.grad}


def _losses_case(tp_group, logits_local: torch.Tensor, d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each function's value (B, T) and its gradient w.r.t. logits_local (B, T, V / tp)."""
    fns = {
        "ce": lambda z: vocab_parallel_cross_entropy(z, d["target"], tp_group),
        "logprobs": lambda z: vocab_parallel_logprobs(z, d["target"].clamp(min=0), tp_group),
        "entropy": lambda z: vocab_parallel_entropy(z, tp_group),
    }
    out = {}
    for i, (name, fn) in enumerate(fns.items()):
        leaf = logits_local.clone().requires_grad_()
        value = fn(leaf)  # (B, T)
        (value * d["loss_w"][i]).sum().backward()
        out[name], out[f"d_{name}"] = value.detach(), leaf.grad
    return out


def _init_case(tp_group) -> dict[str, torch.Tensor]:
    torch.manual_seed(1234)
    layers = _init_layers(tp_group)
    out = {f"{name}.seed": layer.weight.detach().clone() for name, layer in layers.items()}
    gen = torch.Generator().manual_seed(7)
    for name, layer in layers.items():
        layer.reset_parameters(gen)
        out[f"{name}.generator"] = layer.weight.detach().clone()
    for name, layer in layers.items():  # what a model's own reset_parameters loop calls
        init_tp_param_(layer.weight, normal_init(0.5), tp_group, gen)
        out[f"{name}.init_tp_param_"] = layer.weight.detach().clone()
    return out


def _init_layers(tp_group) -> dict[str, nn.Module]:
    return {
        "col": ColumnParallelLinear(H, FFN, tp_group=tp_group),
        "row": RowParallelLinear(FFN, H, tp_group=tp_group),
        "emb": VocabParallelEmbedding(V, H, tp_group=tp_group),
    }


def _rng_case(tp_rank: int) -> dict[str, torch.Tensor]:
    tracker = seed_model_parallel(42, tp_rank)
    before = torch.rand(4)
    with tracker.fork():
        forked = torch.rand(4)
    return {"default": torch.cat([before, torch.rand(4)]), "forked": forked}


def _scatter_to_sequence_case(tp_group, rank: int, d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    x = d["x"].clone().requires_grad_()  # (B, T, H) replicated
    y = scatter_to_sequence(x, tp_group)  # (B, T / tp, H)
    (y * _chunk(d["dy"], 1, rank)).sum().backward()
    return {"y": y.detach(), "dx": x.grad}


def _tp_world(rank: int, world_size: int) -> dict[str, object]:
    groups = build_groups(ParallelDims(tp=world_size, world_size=world_size), rank)
    tp = groups.tp_group
    d = _data()
    return {
        "mlp": {mode: _mlp_case(tp, rank, mode, d) for mode in MLP_MODES},
        "embedding": {sp: _embedding_case(tp, rank, sp, d) for sp in (False, True)},
        "losses": _losses_case(tp, _chunk(d["logits"], -1, rank), d),
        "init": _init_case(tp),
        "rng": _rng_case(groups.tp_rank),
        "scatter_to_sequence": _scatter_to_sequence_case(tp, rank, d),
    }


@pytest.fixture(scope="module")
def world() -> list[dict[str, object]]:
    return run_distributed(_tp_world, TP, timeout=120)


# ---- references and checks (parent process) ---------------------------------------------------------------


def _reference_mlp(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    leaves = {k: d[k].clone().requires_grad_() for k in ("x", "ln_w", "ln_b", "w1", "b1", "w2", "b2")}
    h = F.layer_norm(leaves["x"], (H,), leaves["ln_w"], leaves["ln_b"])
    y = F.linear(F.gelu(F.linear(h, leaves["w1"], leaves["b1"])), leaves["w2"], leaves["b2"])
    (y * d["dy"]).sum().backward()
    return {"y": y.detach()} | {k: v.grad for k, v in leaves.items()}


def _cat(shards: list[torch.Tensor], dim: int) -> torch.Tensor:
    return torch.cat(shards, dim=dim)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MLP_MODES)
def test_column_row_mlp_matches_single_process(world, mode: str) -> None:
    ref = _reference_mlp(_data())
    per_rank = [r["mlp"][mode] for r in world]
    assert all((r["graphs"] > 0) == mode.endswith("+compile") for r in per_rank)
    sp = mode.startswith("sequence_parallel")
    if sp:  # activations and input-gradients are sequence shards
        close(_cat([r["y"] for r in per_rank], 1), ref["y"])
        close(_cat([r["dx"] for r in per_rank], 1), ref["x"])
    for r in per_rank:
        if not sp:  # replicated activations: every rank holds the full result
            close(r["y"], ref["y"])
            close(r["dx"], ref["x"])
        close(r["norm.weight"], ref["ln_w"])  # after allreduce_sequence_parallel_grads under SP
        close(r["norm.bias"], ref["ln_b"])
        close(r["fc2.bias"], ref["b2"])
    close(_cat([r["fc1.weight"] for r in per_rank], 0), ref["w1"])
    close(_cat([r["fc1.bias"] for r in per_rank], 0), ref["b1"])
    close(_cat([r["fc2.weight"] for r in per_rank], 1), ref["w2"])


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True])
def test_vocab_parallel_embedding_matches_single_process(world, sp: bool) -> None:
    d = _data()
    weight = d["emb"].clone().requires_grad_()
    y = F.embedding(d["ids"], weight)
    (y * d["dy"]).sum().backward()
    per_rank = [r["embedding"][sp] for r in world]
    got_y = _cat([r["y"] for r in per_rank], 1) if sp else per_rank[0]["y"]
    close(got_y, y.detach())
    close(_cat([r["dw"] for r in per_rank], 0), weight.grad)


def _reference_losses(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    flat = lambda z: z.flatten(0, 1)  # noqa: E731
    fns = {
        "ce": lambda z: F.cross_entropy(flat(z), d["target"].flatten(), reduction="none").view(B, T),
        "logprobs": lambda z: (
            z.log_softmax(-1).gather(-1, d["target"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        ),
        "entropy": lambda z: -(z.softmax(-1) * z.log_softmax(-1)).sum(-1),
    }
    out = {}
    for i, (name, fn) in enumerate(fns.items()):
        logits = d["logits"].clone().requires_grad_()
        value = fn(logits)
        (value * d["loss_w"][i]).sum().backward()
        out[name], out[f"d_{name}"] = value.detach(), logits.grad
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ce", "logprobs", "entropy"])
def test_vocab_parallel_losses_match_full_logits(world, name: str) -> None:
    ref = _reference_losses(_data())
    per_rank = [r["losses"] for r in world]
    for r in per_rank:
        close(r[name], ref[name])
    close(_cat([r[f"d_{name}"] for r in per_rank], -1), ref[f"d_{name}"])


def test_losses_without_a_group_are_plain_torch() -> None:
    d = _data()
    ref = _reference_losses(d)
    got = _losses_case(None, d["logits"], d)
    for name in ("ce", "logprobs", "entropy"):
        close(got[name], ref[name])
        close(got[f"d_{name}"], ref[f"d_{name}"])


@pytest.mark.slow
def test_init_gives_the_same_full_weights_at_tp1_and_tp2(world) -> None:
    ref = _init_case(None)
    dims = {"col": 0, "row": 1, "emb": 0}
    for key, full in ref.items():
        close(_cat([r["init"][key] for r in world], dims[key.split(".")[0]]), full)
    assert not torch.equal(ref["col.seed"], ref["col.generator"])


@pytest.mark.slow
def test_rng_tracker_differs_over_tp_only_inside_fork(world) -> None:
    rank0, rank1 = (r["rng"] for r in world)
    assert torch.equal(rank0["default"], rank1["default"])
    assert not torch.equal(rank0["forked"], rank1["forked"])
    torch.manual_seed(42)  # the fork leaves the default stream where it was
    assert torch.equal(rank0["default"], torch.rand(8))


@pytest.mark.slow
def test_scatter_to_sequence_splits_forward_and_gathers_backward(world) -> None:
    d = _data()
    for rank, r in enumerate(world):
        close(r["scatter_to_sequence"]["y"], _chunk(d["x"], 1, rank))
        close(r["scatter_to_sequence"]["dx"], d["dy"])
