"""Expert parallelism against the single-process model: loss, every gradient, AdamW loss curves.

Worlds (gloo, CPU, fp32, Mixtral-tiny: 4 experts, top-2, 2 layers):
- 2 ranks, ep=2 = dp=2: each rank runs its own micro-batch and holds 2 of the 4 experts per layer. Once with
  the random init (tokens go everywhere) and once with routing forced uneven (a rank sends nothing to its
  peer in layer 0; in layer 1 every token goes to ep rank 0, so ep rank 1 receives zero rows).
- 4 ranks: tp=2 x ep=2 (dp=2; experts replicated over tp, each tp rank dispatches the same tokens) and
  ep=2 x edp=2 (dp=4: two ep groups, each expert held twice, its gradients summed over edp).
The same worlds run with NCCL on GPUs (gpu-marked; each world needs as many devices as ranks).

Reference: one process, one model holding every expert, on the concatenation of all data shards:
loss = sum of token cross-entropies / all tokens + mean over shards of the aux loss of each shard's own
forward (the aux loss is per micro-batch: each rank balances its local tokens). The parallel run: each rank
backpropagates its local CE sum / all tokens + its aux loss / #shards, then sums dense gradients over dp x cp
and expert gradients over edp only (an expert's gradient already holds every ep rank's tokens through the
all-to-all backward; summing it over ep as well would double count).

Tolerance: max |diff| <= 1e-5 * max |reference| per tensor (loss: relative 1e-5). EP changes only the
grouping and summation order (experts run on row subsets, gradients of two shards are added by all-reduce
or all-to-all); measured errors are <= 2e-6 of each tensor's scale (norm weights under the forced routing;
5e-7 elsewhere), while a missing or doubled reduction, a wrong expert slice or a mis-routed row is off by
O(tensor). Per-element rtol is meaningless for gradient entries that are sums with cancellation. NCCL runs
are compared with the CPU reference, so GPU kernels' own rounding adds to that: 5e-5 there (TF32 off). AdamW is elementwise, so 3 steps keep the loss curves as close.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from core.distributed.buffers import is_expert
from core.models import preset
from core.parallel.dims import Groups, ParallelDims, build_groups
from core.tensor_parallel import vocab_parallel_cross_entropy
from core.transformer import moe
from core.transformer.model import GPTModel
from core.transformer.token_dispatch import DispatchPlan

pytestmark = pytest.mark.slow  # every test runs on spawned ep worlds

CONFIG = replace(preset("mixtral_tiny"), moe_aux_loss_coeff=0.1)  # a weight the router gradients feel
B, T, LR = 2, 8, 1e-2  # per data shard: B sequences of T tokens
SKEW = 5.0  # uneven case: size of the two embedding features that steer the routers ...
ROUTER_SKEW = 0.1  # ... and router weight on them: logit gaps ~1.1 >> the rest (~0.01), softmax not saturated


@dataclass(frozen=True)
class Case:
    world_size: int
    tp: int = 1
    uneven: bool = False
    steps: int = 1


CASES = {
    "ep2": Case(world_size=2, steps=3),
    "ep2_uneven": Case(world_size=2, uneven=True, steps=3),
    "tp2_ep2": Case(world_size=4, tp=2),
    "ep2_edp2": Case(world_size=4),  # dp=4: ep groups {0,1}, {2,3}; edp groups {0,2}, {1,3}
}


def _dims(case: Case) -> ParallelDims:
    return ParallelDims(tp=case.tp, ep=2, world_size=case.world_size)


def _num_shards(case: Case) -> int:
    return _dims(case).dp_cp


def _shard(case: Case, shard: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Data shard `shard`: input_ids, labels (B, T). Uneven: shard 0 uses only ids < V/2 (see _force_routing_)."""
    g = torch.Generator().manual_seed(100 + shard)
    high = CONFIG.vocab_size // 2 if case.uneven and shard == 0 else CONFIG.vocab_size
    ids = torch.randint(0, high, (B, T), generator=g)
    return ids, torch.randint(0, CONFIG.vocab_size, (B, T), generator=g)


@torch.no_grad()
def _force_routing_(model: GPTModel) -> None:
    """Hidden feature 0 is +SKEW for ids < V/2 and -SKEW above, feature 1 is +SKEW for every id (they dominate
    the residual stream). Layer 0's router reads feature 0 (ids < V/2 -> experts {0, 1} on ep rank 0, the rest
    -> {2, 3} on ep rank 1), layer 1's reads feature 1 (every token -> {0, 1})."""
    emb = model.embedding.word_embeddings.weight  # (V, H): tp=1 only
    emb[:, 0] = SKEW
    emb[CONFIG.vocab_size // 2 :, 0] = -SKEW
    emb[:, 1] = SKEW
    towards_rank0 = ROUTER_SKEW * torch.tensor([1.0, 1.0, -1.0, -1.0])
    for layer, feature in (("0", 0), ("1", 1)):
        router = model.layers[layer].mlp.router.weight  # (E, H)
        router[:, :2] = 0.0
        router[:, feature] = towards_rank0


def _build(case: Case, groups: Groups | None) -> GPTModel:
    torch.manual_seed(0)  # init draws full weights: same full model at any tp / ep
    if groups is None:
        model = GPTModel(CONFIG)
    else:
        model = GPTModel(CONFIG, groups.tp_group, ep_group=groups.ep_group)
    if case.uneven:
        _force_routing_(model)
    return model


class _AdamW:
    """torch.optim.AdamW's update with its defaults (betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2), written
    out: torch.optim imports torch._dynamo on first use, ~8 s in every fresh rank of a busy 2-core machine."""

    def __init__(
        self,
        params: list[nn.Parameter],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        self.params, self.betas, self.eps, self.weight_decay = params, betas, eps, weight_decay
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        (b1, b2), t = self.betas, self.steps
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            p.mul_(1 - LR * self.weight_decay)
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m, (v / (1 - b2**t)).sqrt_().add_(self.eps), value=-LR / (1 - b1**t))


def _ce_sum(
    model: GPTModel, ids: torch.Tensor, labels: torch.Tensor, tp_group: dist.ProcessGroup | None
) -> torch.Tensor:
    return vocab_parallel_cross_entropy(model(ids), labels, tp_group).sum()


def _reduce_grads(model: nn.Module, groups: Groups) -> None:
    """Dense grads summed over dp x cp, expert grads over edp (never over ep or tp: see the module doc)."""
    for p in model.parameters():
        group, size = (
            (groups.edp_group, groups.edp_size) if is_expert(p) else (groups.dp_cp_group, groups.dp_cp_size)
        )
        if size > 1:
            dist.all_reduce(p.grad, group=group)


@contextmanager
def _recorded_plans():
    """Record every DispatchPlan's splits built in this process (MoE.forward looks plan_dispatch up in moe)."""
    plans: list[tuple[list[int], list[int]]] = []
    original = moe.plan_dispatch

    def recording(*args: Any, **kwargs: Any) -> DispatchPlan:
        plan = original(*args, **kwargs)
        plans.append((plan.send_splits, plan.recv_splits))
        return plan

    moe.plan_dispatch = recording
    try:
        yield plans
    finally:
        moe.plan_dispatch = original


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy (never the tensor itself: the optimizer updates params in place)."""
    return t.detach().to("cpu", copy=True)


def _parallel_run(case: Case, groups: Groups, device: torch.device) -> dict[str, Any]:
    model = _build(case, groups).to(device)
    initial_experts = {n: _to_cpu(p) for n, p in model.named_parameters() if is_expert(p)}
    optimizer = _AdamW(list(model.parameters()))
    ids, labels = (t.to(device) for t in _shard(case, groups.dp_cp_rank))
    shards, total_tokens = _num_shards(case), _num_shards(case) * B * T
    losses, grads = [], {}
    with _recorded_plans() as plans:
        for step in range(case.steps):
            model.zero_grad()
            loss = _ce_sum(model, ids, labels, groups.tp_group) / total_tokens + model.aux_loss / shards
            loss.backward()
            _reduce_grads(model, groups)
            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss, group=groups.dp_cp_group)
            losses.append(global_loss.item())
            if step == 0:
                grads = {n: _to_cpu(p.grad) for n, p in model.named_parameters()}
            optimizer.step()
    return {
        "losses": losses,
        "grads": grads,
        "initial_experts": initial_experts,
        "plans": plans[: CONFIG.num_layers],  # step 0, one per layer
        "coords": {"tp": (groups.tp_rank, groups.tp_size), "ep": (groups.ep_rank, groups.ep_size)},
    }


def _world(rank: int, world_size: int, backend: str) -> dict[str, dict[str, Any]]:
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity, as on the CPU
    results = {}
    for name, case in CASES.items():
        if case.world_size == world_size:
            results[name] = _parallel_run(case, build_groups(_dims(case), rank), device)
    return results


def _reference_run(case: Case) -> dict[str, Any]:
    """Single process, every expert. Records the top-k experts each layer picks for each shard at step 0."""
    model = _build(case, None)
    optimizer = _AdamW(list(model.parameters()))
    shards = [_shard(case, s) for s in range(_num_shards(case))]
    ids, labels = torch.cat([s[0] for s in shards]), torch.cat([s[1] for s in shards])
    routed = _routing(model, ids)
    losses, grads = [], {}
    for step in range(case.steps):
        model.zero_grad()
        aux = 0.0
        for shard_ids, _ in shards:  # the aux loss of each shard's own forward, as its rank computes it
            model(shard_ids)
            aux = aux + model.aux_loss / len(shards)
        loss = _ce_sum(model, ids, labels, None) / labels.numel() + aux
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
    return {"losses": losses, "grads": grads, "initial_model": _build(case, None), "routed": routed}


@torch.no_grad()
def _routing(model: GPTModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """Top-k expert ids (B * T, k) that each layer's router picks for ids (B, T)."""
    routed: list[torch.Tensor] = []
    hooks = [
        layer.mlp.router.register_forward_hook(lambda _m, _i, out: routed.append(out[2]))
        for layer in model.layers.values()
    ]
    model(ids)
    for h in hooks:
        h.remove()
    return routed


def _local(full: torch.Tensor, param: nn.Parameter, coords: dict[str, tuple[int, int]]) -> torch.Tensor:
    """This rank's slice of a full tensor by the parameter's tp_dim / ep_dim contract."""
    for axis in ("tp", "ep"):
        dim = getattr(param, f"{axis}_dim", None)
        rank, size = coords[axis]
        if dim is not None:
            full = full.chunk(size, dim=dim)[rank]
    return full


def _assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert got.shape == want.shape and err <= rtol * scale, f"{what}: max |diff| {err:.2e}, scale {scale:.2e}"


@pytest.fixture(scope="module", params=["gloo", pytest.param("nccl", marks=pytest.mark.gpu)])
def worlds(request: pytest.FixtureRequest) -> dict[str, Any]:
    """{"rtol": ..., case name: per-rank results}: one 2-rank and one 4-rank world for all cases (NCCL: the
    worlds that fit the visible GPUs)."""
    from dist import run_distributed

    backend = request.param
    sizes = sorted({c.world_size for c in CASES.values()})
    if backend == "nccl":
        sizes = [n for n in sizes if n <= torch.cuda.device_count()]
        if not sizes:
            pytest.skip("needs 2 CUDA devices")
    results: dict[str, Any] = {"rtol": 1e-5 if backend == "gloo" else 5e-5}
    for world_size in sizes:
        ranks = run_distributed(_world, world_size, backend, timeout=180, backend=backend)
        results |= {name: [r[name] for r in ranks] for name in ranks[0]}
    return results


def _case_results(worlds: dict[str, Any], case: str) -> list[dict[str, Any]]:
    if case not in worlds:
        pytest.skip(f"{case} needs {CASES[case].world_size} CUDA devices")
    return worlds[case]


@pytest.fixture(scope="module")
def references() -> dict[str, dict[str, Any]]:
    return {name: _reference_run(case) for name, case in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_expert_parallel_matches_single_process(case, worlds, references):
    want = references[case]
    params = dict(want["initial_model"].named_parameters())
    for rank, got in enumerate(_case_results(worlds, case)):
        for step, (g, w) in enumerate(zip(got["losses"], want["losses"], strict=True)):
            assert abs(g - w) <= worlds["rtol"] * abs(w), f"rank {rank} step {step}: loss {g} != {w}"
        assert got["grads"].keys() == want["grads"].keys()
        for name, grad in got["grads"].items():
            want_grad = _local(want["grads"][name], params[name], got["coords"])
            _assert_close_to_scale(grad, want_grad, worlds["rtol"], name)


@pytest.mark.parametrize("case", ["ep2", "tp2_ep2"])
def test_experts_are_the_ep_slices_of_the_full_model(case, worlds, references):
    """Init draws full experts and keeps the ep slice: exactly the single-process weights."""
    full = dict(references[case]["initial_model"].named_parameters())
    for got in _case_results(worlds, case):
        assert got["initial_experts"], "no expert parameters"
        for name, local in got["initial_experts"].items():
            assert local.shape[0] == CONFIG.num_experts // 2
            assert torch.equal(local, _local(full[name].detach(), full[name], got["coords"])), name


def test_uneven_routing_sends_and_receives_nothing_where_forced(worlds, references):
    """The forced routing really happened: empty all-to-all splits and an ep rank without any rows."""
    routed = references["ep2_uneven"]["routed"]  # per layer, all shards' tokens: (2 * B * T, k)
    shard0 = routed[0][: B * T]
    assert (shard0 < 2).all() and (routed[1] < 2).all() and (routed[0][B * T :] >= 2).any()
    results = _case_results(worlds, "ep2_uneven")
    rank0, rank1 = (r["plans"] for r in results)
    rows = B * T * CONFIG.moe_top_k
    assert rank0[0][0] == [rows, 0]  # layer 0: rank 0 sends nothing to rank 1
    assert rank1[1][1] == [0, 0]  # layer 1: rank 1's experts receive no rows ...
    grads = results[1]["grads"]
    assert (grads["layers.1.mlp.experts.w_gate_up"] == 0).all()  # ... yet get (zero) gradients
