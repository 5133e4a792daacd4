"""Data parallelism against the single-process model: DDP gradients, ZeRO-1 AdamW, resharded optimizer
state, global grad-norm clipping and fp16 loss scaling.

One 2-rank gloo world (dp=2, ep=1) runs every multi-process check on a tiny MoE GPTModel (dense params
reduced over dp, expert params over the expert-data-parallel group) and returns numbers; the tests
below assert on them. Each rank also computes the single-process reference itself (the model is tiny).

Reference: the same global batch of 4 micro-batches on one process, loss = sum of token losses / global
token count, gradients accumulated micro-batch by micro-batch (so every forward is bit-identical to the
dp rank that ran that micro-batch). The dp run differs only in summation order: rank sums of two
micro-batch gradients are added by the all-reduce instead of four in sequence. With O(1e-2..1) gradients
that is a few fp32 ulps (~1e-8), so atol = 1e-6 leaves a wide margin, while a missing or doubled
reduction, a wrong normalisation or a wrong shard is off by O(1e-2) or more. AdamW is elementwise, so
3 steps keep the parameters within 1e-6 too (lr = 1e-2: updates are O(lr), perturbed by relative 1e-6).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist import run_distributed
from torch import nn

from core.distributed import (
    DistributedDataParallel,
    DistributedOptimizer,
    DynamicGradScaler,
    MainGradAdamW,
    allreduce_sequence_parallel_main_grads,
    clip_grad_norm_,
    global_grad_norm,
    weight_decay_groups,
)

DP, MICRO, B, T, V = 2, 2, 2, 8, 64  # per rank: MICRO micro-batches of B sequences of T tokens
STEPS, LR, WD, BETAS, MAX_NORM = 3, 1e-2, 0.1, (0.9, 0.95), 0.05
BUCKET_MB = 0.01  # ~2.6k fp32 elements per bucket: the tiny model splits into several buckets
ATOL = 1e-6


def _tiny_gpt(device: torch.device) -> nn.Module:
    """Same weights on every call (seeded). Not copy.deepcopy: it drops the tp_dim/ep_dim attributes."""
    from core.transformer.config import TransformerConfig
    from core.transformer.model import GPTModel

    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=V, hidden_size=16, num_layers=2, num_attention_heads=2, ffn_hidden_size=32, num_experts=4
    )
    return GPTModel(cfg).to(device)


def _global_batch(step: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """DP * MICRO micro-batches, identical on every rank; rank r runs micro-batches r*MICRO ... ."""
    g = torch.Generator().manual_seed(100 + step)
    batches = []
    for _ in range(DP * MICRO):
        ids = torch.randint(0, V, (B, T + 1), generator=g)
        mask = (torch.rand(B, T, generator=g) > 0.3).float()  # uneven token counts across ranks
        mb = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mask}
        batches.append({k: v.to(device) for k, v in mb.items()})
    return batches


def _loss_sum(model: nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(mb["input_ids"])  # (B, T, V)
    per_token = F.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), reduction="none")
    return (per_token * mb["loss_mask"].flatten()).sum()


def _n_tokens(batches: list[dict[str, torch.Tensor]]) -> float:
    return float(sum(mb["loss_mask"].sum() for mb in batches))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float().cpu() - b[k].float().cpu()).abs().max().item() for k in a)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- single-process reference -----------------------------------------------------------------------


def _reference_backward(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    n = _n_tokens(batches)
    total = 0.0
    for mb in batches:
        loss = _loss_sum(model, mb) / n
        loss.backward()
        total += loss.item()
    return total


def _reference_adamw(model: nn.Module) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS)


# ---- the data-parallel side (runs in the workers) ----------------------------------------------------


def _rank_slice(rank: int) -> slice:
    return slice(rank * MICRO, (rank + 1) * MICRO)


def _dp_backward(
    ddp: DistributedDataParallel, batches: list[dict[str, torch.Tensor]], mine: slice
) -> torch.Tensor:
    """batches[mine] with no_sync on all but the last; returns their share of the global-batch loss."""
    n = _n_tokens(batches)
    local = batches[mine]
    total = torch.zeros((), device=local[0]["loss_mask"].device)
    for i, mb in enumerate(local):
        with ddp.no_sync() if i < len(local) - 1 else nullcontext():
            loss = _loss_sum(ddp, mb) / n
            loss.backward()
        total += loss.detach()
    return total


def _check_ddp_grads(rank: int, groups: Any, device: torch.device) -> dict[str, Any]:
    """(a) main_grads after no_sync + sync micro-batch = reference grads; buckets overlap backward;
    (d) the replicated-path global norm = the reference norm."""
    ref = _tiny_gpt(device)
    ddp = DistributedDataParallel(
        _tiny_gpt(device), groups.dp_group, expert_dp_group=groups.edp_group, bucket_size_mb=BUCKET_MB
    )
    launched_before_embedding_backward: list[int] = []

    def count_when_embedding_grad_starts(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        out.register_hook(lambda _: launched_before_embedding_backward.append(ddp.num_buckets_launched))

    ddp.module.embedding.register_forward_hook(count_when_embedding_grad_starts)
    batches = _global_batch(0, device)
    _reference_backward(ref, batches)
    ddp.zero_grad_buffer()
    _dp_backward(ddp, batches, _rank_slice(rank))
    launched_after_backward = ddp.num_buckets_launched
    ddp.finish_grad_sync()
    main_grads = {n: p.main_grad.clone() for n, p in ddp.module.named_parameters()}
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    norm = clip_grad_norm_(list(ddp.module.parameters()), 0.0, tp_group=groups.tp_group)
    return {
        "grad_diff": _max_diff(main_grads, ref_grads),
        "grads_left_in_p_grad": sum(p.grad is not None for p in ddp.module.parameters()),
        "num_buckets": ddp.num_buckets,
        "expert_buffers": sum(buf.group is groups.edp_group for buf in ddp.grad_buffers),
        # [no_sync micro-batch, synchronising micro-batch]: embedding grads are computed last
        "launched_before_embedding_backward": launched_before_embedding_backward,
        "launched_after_backward": launched_after_backward,
        "norm": norm.item(),
        "ref_norm": torch.nn.utils.get_total_norm(list(ref_grads.values())).item(),
    }


def _dist_opt_step(
    ddp: DistributedDataParallel, opt: DistributedOptimizer, step: int, rank: int, groups: Any
) -> tuple[float, float]:
    device = opt.shards[0].master.device
    opt.zero_grad()
    loss = _dp_backward(ddp, _global_batch(step, device), _rank_slice(rank))
    ddp.finish_grad_sync()
    norm = opt.clip_grad_norm_(MAX_NORM, tp_group=groups.tp_group)
    opt.step()
    dist.all_reduce(loss, group=groups.dp_group)
    return loss.item(), norm.item()


def _reference_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> tuple[float, float]:
    opt.zero_grad()
    loss = _reference_backward(model, _global_batch(step, next(model.parameters()).device))
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    opt.step()
    return loss, norm.item()


def _check_distributed_optimizer(rank: int, groups: Any, device: torch.device) -> dict[str, Any]:
    """(b) ZeRO-1 AdamW = torch AdamW for STEPS steps (with clipping: (d) sharded norm);
    (c) its full state dict loads into a single-process optimizer that continues identically."""
    ref = _tiny_gpt(device)
    ref_opt = _reference_adamw(ref)
    ddp = DistributedDataParallel(
        _tiny_gpt(device),
        groups.dp_group,
        expert_dp_group=groups.edp_group,
        bucket_size_mb=BUCKET_MB,
        use_distributed_optimizer=True,
    )
    opt = DistributedOptimizer(ddp, weight_decay_groups(ddp.module, WD), lr=LR, betas=BETAS)
    curve = [_dist_opt_step(ddp, opt, s, rank, groups) for s in range(STEPS)]
    ref_curve = [_reference_step(ref, ref_opt, s) for s in range(STEPS)]
    out: dict[str, Any] = {
        "curve": curve,
        "ref_curve": ref_curve,
        "param_diff": _max_diff(_params(ddp.module), _params(ref)),
        "owned_fraction": sum(s.master.numel() for s in opt.shards)
        / sum(p.numel() for p in ddp.module.parameters()),
    }
    full = opt.full_state_dict()
    ref_names = {p: n for n, p in ref.named_parameters()}
    ref_state = {ref_names[p]: s for p, s in ref_opt.state.items()}
    out["state_diff"] = max(
        _max_diff(
            {k: full["state"][n][k] for k in ("exp_avg", "exp_avg_sq")},
            {k: ref_state[n][k] for k in ("exp_avg", "exp_avg_sq")},
        )
        for n in ref_state
    )
    out["state_step"] = {float(e["step"]) for e in full["state"].values()}
    model_state = {k: v.clone() for k, v in ddp.module.state_dict().items()}
    _dist_opt_step(ddp, opt, STEPS, rank, groups)  # step 4 at dp2 (collective: both ranks)
    if rank == 0:
        out["resume_diff"] = _resume_at_dp1(model_state, full, _params(ddp.module), device)
    return out


def _resume_at_dp1(
    model_state: dict[str, torch.Tensor],
    full: dict[str, Any],
    dp2_params: dict[str, torch.Tensor],
    device: torch.device,
) -> float:
    """Load the dp2 checkpoint into a single process (no groups), take step 4, compare to dp2's."""
    model = _tiny_gpt(device)
    model.load_state_dict(model_state)
    ddp = DistributedDataParallel(model, None)
    opt = MainGradAdamW(ddp, weight_decay_groups(model, WD), lr=LR, betas=BETAS)
    opt.load_full_state_dict(full)
    opt.zero_grad()
    _dp_backward(ddp, _global_batch(STEPS, device), slice(None))  # dp1: every micro-batch here
    opt.clip_grad_norm_(MAX_NORM)
    opt.step()
    return _max_diff(_params(model), dp2_params)


def _check_bf16_distributed_optimizer(rank: int, groups: Any, device: torch.device) -> dict[str, Any]:
    """bf16 params, fp32 main_grads and masters: ZeRO-1's sharded masters equal the replicated
    optimizer's on one process, and the bf16 params it all-gathers are exactly the masters rounded."""
    ref = _tiny_gpt(device).bfloat16()
    ref_ddp = DistributedDataParallel(ref, None)
    ref_opt = MainGradAdamW(ref_ddp, weight_decay_groups(ref, WD), lr=LR, betas=BETAS)
    model = _tiny_gpt(device).bfloat16()
    ddp = DistributedDataParallel(
        model,
        groups.dp_group,
        expert_dp_group=groups.edp_group,
        bucket_size_mb=BUCKET_MB,
        use_distributed_optimizer=True,
    )
    opt = DistributedOptimizer(ddp, weight_decay_groups(model, WD), lr=LR, betas=BETAS)
    for step in range(2):
        batches = _global_batch(step, device)
        for d, o, mine in ((ddp, opt, _rank_slice(rank)), (ref_ddp, ref_opt, slice(None))):
            o.zero_grad()
            _dp_backward(d, batches, mine)
            d.finish_grad_sync()
            o.step()
    masters = {n: e["master_param"] for n, e in opt.full_state_dict()["state"].items()}
    ref_masters = {n: e["master_param"] for n, e in ref_opt.full_state_dict()["state"].items()}
    rounded = {n: m.to(device, torch.bfloat16) for n, m in masters.items()}
    return {
        "main_grad_dtype": model.output_layer.weight.main_grad.dtype,
        "master_diff": _max_diff(masters, ref_masters),
        "params_are_rounded_masters": _max_diff(_params(model), rounded) == 0.0,
    }


def _check_grad_scaler(rank: int, groups: Any, device: torch.device) -> dict[str, Any]:
    """(e) an inf on rank 1 only makes both ranks skip and back off; a clean step unscales."""
    scaler = DynamicGradScaler(2.0**10, growth_interval=2)
    grads = [torch.full((3,), 8.0, device=device), torch.full((2,), 4.0, device=device)]
    if rank == 1:
        grads[1][0] = float("inf")
    found_inf = scaler.unscale_(grads, [groups.tp_group, groups.dp_group])
    scaler.update(found_inf)
    scale_after_inf = scaler.scale
    clean = [torch.full((3,), 8.0, device=device)]
    clean_found = scaler.unscale_(clean, [groups.tp_group, groups.dp_group])
    scaler.update(clean_found)
    return {
        "found_inf": found_inf,
        "scale_after_inf": scale_after_inf,
        "clean_found": clean_found,
        "clean_value": clean[0][0].item(),
        "scale_after_clean": scaler.scale,
    }


def _param(numel: int, device: torch.device, **attrs: Any) -> nn.Parameter:
    p = nn.Parameter(torch.zeros(numel, device=device))
    for k, v in attrs.items():
        setattr(p, k, v)
    return p


def _check_group_roles(rank: int, groups: Any, device: torch.device) -> dict[str, Any]:
    """The 2 ranks standing in for a tp group, then an ep group: the norm sums sharded params over the
    group and counts replicated ones once; sequence-parallel main_grads are summed over tp."""
    pair = groups.dp_group
    sharded, replicated = _param(2, device, tp_dim=0), _param(3, device, tp_dim=None)
    expert = _param(2, device, tp_dim=None, ep_dim=0)
    sharded_grad = torch.full((2,), 1.0 + rank, device=device)  # full grad [1, 1, 2, 2]
    replicated_grad = torch.full((3,), 2.0, device=device)  # the same on both ranks
    expert_grad = torch.full((2,), 3.0 * (rank + 1), device=device)  # experts [3, 3] and [6, 6]
    tp_norm = global_grad_norm([sharded, replicated], [sharded_grad, replicated_grad], tp_group=pair)
    ep_norm = global_grad_norm([replicated, expert], [replicated_grad, expert_grad], ep_group=pair)

    module = nn.Module()
    module.norm_weight = _param(2, device, sequence_parallel=True)
    module.weight = _param(2, device)
    ddp = DistributedDataParallel(module, None)
    for p in module.parameters():
        p.main_grad.fill_(rank + 1.0)
    allreduce_sequence_parallel_main_grads(ddp, pair)
    return {
        "tp_norm": tp_norm.item(),
        "ep_norm": ep_norm.item(),
        "sp_grad": module.norm_weight.main_grad.tolist(),
        "non_sp_grad": module.weight.main_grad.tolist(),
    }


def _dp_world(rank: int, world_size: int, backend: str = "gloo") -> dict[str, Any]:
    from core.parallel import ParallelDims, build_groups

    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity, as on the CPU
    groups = build_groups(ParallelDims(dp=world_size, world_size=world_size), rank)
    return {
        "ddp": _check_ddp_grads(rank, groups, device),
        "dist_opt": _check_distributed_optimizer(rank, groups, device),
        "scaler": _check_grad_scaler(rank, groups, device),
        "roles": _check_group_roles(rank, groups, device),
        "bf16": _check_bf16_distributed_optimizer(rank, groups, device),
    }


@pytest.fixture(scope="module", params=["gloo", pytest.param("nccl", marks=pytest.mark.gpu)])
def world(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """The 2-rank world: gloo on the CPU; the same checks with NCCL on 2 GPUs where there are two."""
    backend = request.param
    if backend == "nccl" and torch.cuda.device_count() < DP:
        pytest.skip(f"needs {DP} CUDA devices")
    return run_distributed(_dp_world, DP, backend, timeout=300, backend=backend)


# ---- multi-process tests ----------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_main_grads_match_single_process(world: list[dict[str, Any]]) -> None:
    for r in world:
        d = r["ddp"]
        assert d["grad_diff"] < ATOL, f"max |main_grad - reference grad| = {d['grad_diff']:.2e}"
        assert d["grads_left_in_p_grad"] == 0  # moved into main_grad by the hook
        assert d["expert_buffers"] == 1  # expert params live in their own buffer, reduced over edp


@pytest.mark.slow
def test_ddp_buckets_overlap_backward(world: list[dict[str, Any]]) -> None:
    for r in world:
        d = r["ddp"]
        assert d["num_buckets"] >= 3
        no_sync_launches, sync_launches = d["launched_before_embedding_backward"]
        assert no_sync_launches == 0  # no_sync micro-batch: accumulate only
        # While backward had yet to reach the first layer, >= 2 buckets were already in flight.
        assert sync_launches >= 2
        assert d["launched_after_backward"] == d["num_buckets"]


@pytest.mark.slow
def test_distributed_optimizer_matches_torch_adamw(world: list[dict[str, Any]]) -> None:
    for r in world:
        d = r["dist_opt"]
        for (loss, norm), (ref_loss, ref_norm) in zip(d["curve"], d["ref_curve"], strict=True):
            assert abs(loss - ref_loss) < ATOL
            assert abs(norm - ref_norm) < ATOL * ref_norm
        assert d["param_diff"] < ATOL, f"max |param - reference| = {d['param_diff']:.2e}"
        assert d["state_diff"] < ATOL
        assert d["state_step"] == {float(STEPS)}
        assert 0.4 < d["owned_fraction"] < 0.6  # ZeRO-1: each rank keeps ~half the master weights


@pytest.mark.slow
def test_distributed_optimizer_bf16_params_fp32_masters(world: list[dict[str, Any]]) -> None:
    for r in world:
        d = r["bf16"]
        assert d["main_grad_dtype"] == torch.float32
        assert d["master_diff"] < ATOL, f"max |master - replicated master| = {d['master_diff']:.2e}"
        assert d["params_are_rounded_masters"]


@pytest.mark.slow
def test_clip_grad_norm_is_global(world: list[dict[str, Any]]) -> None:
    for r in world:
        d = r["ddp"]
        assert abs(d["norm"] - d["ref_norm"]) < ATOL * d["ref_norm"]  # replicated grads: no dp sum
        ref_norms = [norm for _, norm in r["dist_opt"]["ref_curve"]]
        assert min(ref_norms) > MAX_NORM  # so the parity above ran with clipping active


@pytest.mark.slow
def test_grad_norm_counts_replicated_params_once(world: list[dict[str, Any]]) -> None:
    for r in world:
        assert r["roles"]["tp_norm"] == pytest.approx((1 + 1 + 4 + 4 + 3 * 4) ** 0.5, rel=1e-6)
        assert r["roles"]["ep_norm"] == pytest.approx((3 * 4 + 9 + 9 + 36 + 36) ** 0.5, rel=1e-6)


@pytest.mark.slow
def test_sequence_parallel_main_grads_summed_over_tp(world: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(world):
        assert r["roles"]["sp_grad"] == [3.0, 3.0]
        assert r["roles"]["non_sp_grad"] == [rank + 1.0] * 2


@pytest.mark.slow
def test_full_state_dict_saved_at_dp2_resumes_at_dp1(world: list[dict[str, Any]]) -> None:
    diff = world[0]["dist_opt"]["resume_diff"]
    assert diff < ATOL, f"dp1 step after loading the dp2 state differs from dp2 by {diff:.2e}"


@pytest.mark.slow
def test_grad_scaler_skips_on_inf_anywhere(world: list[dict[str, Any]]) -> None:
    for r in world:
        s = r["scaler"]
        assert s["found_inf"] is True  # rank 0's grads were finite: the decision is all-reduced
        assert s["scale_after_inf"] == 2.0**9
        assert s["clean_found"] is False and s["clean_value"] == 8.0 / 2.0**9
        assert s["scale_after_clean"] == 2.0**9  # growth only after growth_interval clean steps


# ---- single-process tests (no world) ----------------------------------------------------------------


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)).to(dtype)


def test_buffer_layout_reverse_order_aligned_views() -> None:
    from core.distributed.buffers import ALIGN

    model = _mlp()
    ddp = DistributedDataParallel(model, None, bucket_size_mb=40 * 4 / 2**20)  # ~40 elements a bucket
    (buf,) = ddp.grad_buffers
    params = list(model.parameters())
    assert buf.params == params[::-1]  # the last layer's grads arrive first in backward
    # (bias 2, weight 2) then (bias 1, weight 1): a bucket closes once it spans >= 40 elements
    assert [b.params for b in buf.buckets] == [params[:1:-1], params[1::-1]]
    for p in params:
        start, end = buf.param_range[p]
        assert start % ALIGN == 0 and end - start == p.numel()
        assert p.main_grad.data_ptr() == buf.data[start:].data_ptr() and p.main_grad.shape == p.shape
    assert all(b.numel % ALIGN == 0 for b in buf.buckets)


def test_accumulation_needs_no_sync_and_zeroing() -> None:
    ddp = DistributedDataParallel(_mlp(), None)
    x = torch.randn(3, 4)
    ddp(x).sum().backward()
    with pytest.raises(RuntimeError, match="already reduced"):
        ddp(x).sum().backward()  # a second synchronising backward without no_sync
    ddp.zero_grad_buffer()
    ddp(x).sum().backward()
    ddp.finish_grad_sync()
    with pytest.raises(RuntimeError, match="zero_grad_buffer"):
        ddp(x).sum().backward()  # would reduce the reduced gradients again


def test_bf16_params_keep_fp32_master_weights() -> None:
    """Updates smaller than bf16's resolution accumulate in the fp32 master instead of rounding away."""
    model = _mlp(torch.bfloat16)
    with torch.no_grad():
        model[0].weight.fill_(1.0)  # bf16 spacing just below 1.0 is 2**-8
    ddp = DistributedDataParallel(model, None)
    opt = MainGradAdamW(ddp, [{"params": [model[0].weight]}], lr=1e-3, weight_decay=0.0)
    master = opt.shards[0].master
    x = torch.randn(16, 4, dtype=torch.bfloat16)
    for step in range(10):
        opt.zero_grad()
        ddp(x).float().pow(2).sum().backward()
        assert model[0].weight.main_grad.dtype == torch.float32
        opt.step()
        if step == 0:
            assert master.dtype == torch.float32 and (master != 1.0).any()
            assert (model[0].weight == 1.0).all()  # each update is below bf16 resolution
    assert (model[0].weight != 1.0).any()
    assert torch.equal(model[0].weight.view(-1), master.to(torch.bfloat16))


def test_per_rank_state_dict_round_trip() -> None:
    """state_dict()/load_state_dict() restore masters and Adam state (same layout), bf16 included."""

    def setup() -> tuple[nn.Module, DistributedDataParallel, MainGradAdamW]:
        model = _mlp(torch.bfloat16)
        ddp = DistributedDataParallel(model, None)
        return model, ddp, MainGradAdamW(ddp, weight_decay_groups(model, WD), lr=LR, betas=BETAS)

    def step(ddp: DistributedDataParallel, opt: MainGradAdamW, seed: int) -> None:
        opt.zero_grad()
        ddp(torch.randn(5, 4, generator=torch.Generator().manual_seed(seed)).bfloat16()).sum().backward()
        opt.step()

    model, ddp, opt = setup()
    step(ddp, opt, 0)
    step(ddp, opt, 1)
    saved_model, saved_opt = copy_state(model.state_dict()), copy_state(opt.state_dict())
    step(ddp, opt, 2)
    model2, ddp2, opt2 = setup()
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    step(ddp2, opt2, 2)
    assert _max_diff(_params(model2), _params(model)) == 0.0
    assert all(torch.equal(a.master, b.master) for a, b in zip(opt.shards, opt2.shards, strict=True))


def copy_state(state: Any) -> Any:
    """Deep copy of a (nested) state dict's tensors: the optimizer's masters alias live memory."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: copy_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [copy_state(v) for v in state]
    return state


def test_grad_scaler_grows_after_interval_and_floors() -> None:
    scaler = DynamicGradScaler(4.0, min_scale=2.0, growth_interval=3)
    for _ in range(3):
        scaler.update(False)
    assert scaler.scale == 8.0
    for _ in range(3):
        scaler.update(True)
    assert scaler.scale == 2.0  # never below min_scale
    grads = [torch.tensor([float("nan"), 1.0])]
    assert scaler.unscale_(grads) is True  # single process: no groups


def test_lr_scheduler_and_plain_param_list() -> None:
    model = _mlp()
    ddp = DistributedDataParallel(model, None)
    opt = MainGradAdamW(ddp, list(model.parameters()), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** (step + 1))
    assert opt.param_groups[0]["lr"] == 0.05
    ddp(torch.randn(2, 4)).sum().backward()
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.025
    assert opt.full_state_dict()["param_groups"][0]["params"] == [n for n, _ in model.named_parameters()]
