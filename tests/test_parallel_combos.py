"""ModelEngine in combined layouts on one 4-rank gloo world against the single-process engine, gradient level.

Layouts (each ParallelDims over the same 4 ranks, groups built one after the other in the world):
    pp2-dp2-zero1-tied   qwen2 (tied embeddings): the tied sum follows ZeRO-1's reduce-scatter (own bucket)
    tp2-dp2              llama, replicated AdamW on all-reduced grads
    cp2-dp2-zero1        llama, the engine's load-balanced cp split of full micro-batches
    ep2-edp2-zero1       mixtral (4 experts, top-2, dp4): experts sharded over ep, reduced over edp

The engine overlaps the dp reduction with backward at every pp (each bucket launched by the hooks of its
chunk's last backward): tp2-dp2 runs with ~10 kB buckets, so several buckets must all have started before
forward_backward returns; at pp = 2 too, the tied embedding's own bucket included.

Before training, forward_collect's per-token losses (the way RL reads logprobs out of any layout; under cp
gathered back to global order) must equal the single process's on the rank's micro-batches.

Every layout runs STEPS optimizer steps on the same global batch sequence as the reference (each dp rank
its contiguous share of the micro-batches). Checked: the loss of every step, the gradient norm, every
element of every gradient after the first backward (each rank's optimizer-owned ranges: ZeRO-1 shards or
whole params, tp/ep shards), and every parameter after the last step.

Tolerance. fp32 on CPU; the layouts compute the same math in another order (tp: split matmuls summed by
all-reduce; cp: half-sequence weight-gradient matmuls and masked instead of causal attention; dp/ep: the
global batch's gradient summed over ranks instead of accumulated in one buffer), measured at <= ~5e-7 of
each tensor's scale. Gradients: max |diff| <= 1e-5 * max |reference| per tensor; losses and norms 1e-5
relative. Parameters after 3 AdamW steps (lr 1e-3): 2e-5 absolute, because Adam's g / sqrt(v) turns a
1e-7 relative difference of a near-zero gradient into a larger one of its update (bounded by the lr).
A missing or doubled reduction, a wrong cp chunk or a tied sum after the reduce-scatter moves them by
~the scale (checked by breaking each).

fp16 overflow: a tp2 x dp2 ZeRO-1 engine with fp16 params and a DynamicGradScaler; an inf put into one
owned gradient element on rank 3 only (tp rank 1, dp rank 1) must skip the step on every rank (the inf check
reduces over tp x pp, then dp x cp) with the fp32 masters untouched and the scale backed off everywhere;
the next clean step updates.

The MoE layouts: ep2-edp2-zero1 runs without the load-balancing loss (coefficient 0), since each rank balances
its own tokens (Megatron's default), which is not the single-process global-batch value (moe.py). Its
coefficient is checked by ep2-edp2-aux-same-data: every dp rank gets the SAME micro-batches (the global token
count is then dp times theirs), so the summed gradient must equal one process on one copy, aux loss
included; without the engine's 1 / (dp * cp) share the router gradient would get dp times the aux term.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from core.config import OptimConfig, ParallelConfig
from core.distributed import DynamicGradScaler
from core.engine import ModelEngine, shard_of
from core.models import preset
from core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from core.transformer.config import TransformerConfig
from core.transformer.model import GPTModel

pytestmark = pytest.mark.slow  # every test runs on the spawned 8-rank world

WORLD = 4
STEPS = 3
MICRO_BATCHES, B, T = 8, 2, 16  # global micro-batches per step; T divisible by 2 * cp
OPTIM = OptimConfig(lr=1e-3, min_lr=0.0, weight_decay=0.1, clip_grad=1.0)
GRAD_RTOL, LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-5, 2e-5
BUCKET_MB = {"tp2-dp2": 0.01, "pp2-dp2-zero1-tied": 0.01}  # several small buckets; 25 MB (one) elsewhere


def _config(name: str) -> TransformerConfig:
    """preset; "+aux" keeps a MoE's load-balancing loss, else its coefficient is 0 (see the docstring)."""
    config = preset(name.removesuffix("+aux"))
    if config.is_moe and not name.endswith("+aux"):
        return dataclasses.replace(config, moe_aux_loss_coeff=0.0)
    return config


LAYOUTS: dict[str, tuple[str, ParallelConfig]] = {
    "pp2-dp2-zero1-tied": ("qwen2_tiny", ParallelConfig(pp=2, dp=2, distributed_optimizer=True)),
    "tp2-dp2": ("llama_tiny", ParallelConfig(tp=2, dp=2)),
    "cp2-dp2-zero1": ("llama_tiny", ParallelConfig(cp=2, dp=2, distributed_optimizer=True)),
    "ep2-edp2-zero1": ("mixtral_tiny", ParallelConfig(ep=2, dp=4, distributed_optimizer=True)),
    "ep2-edp2-aux-same-data": ("mixtral_tiny+aux", ParallelConfig(ep=2, dp=4, distributed_optimizer=True)),
}
SAME_DATA = {"ep2-edp2-aux-same-data"}  # every dp rank trains on the first SAME_DATA_MB micro-batches
SAME_DATA_MB = 2


def _micro_batches(step: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    """The step's global batch: packed rows of 2 documents, a few unscored tokens."""
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for _ in range(MICRO_BATCHES):
        ids = torch.randint(0, vocab, (B, T + 1), generator=g)
        segment_ids = (torch.arange(T) >= torch.randint(4, T - 4, (B, 1), generator=g)).long()  # (B, T)
        starts = torch.where(segment_ids.bool(), segment_ids.argmax(1, keepdim=True), 0)
        loss_mask = (torch.rand(B, T, generator=g) > 0.1).float()
        out.append(
            {
                "input_ids": ids[:, :-1],
                "labels": ids[:, 1:],
                "loss_mask": loss_mask,
                "segment_ids": segment_ids,
                "position_ids": torch.arange(T) - starts,
            }
        )
    return out


def _loss_fn(tp_group, n_tokens: torch.Tensor):
    def loss_fn(logits: torch.Tensor, mb: dict[str, torch.Tensor]):
        loss_sum = (vocab_parallel_cross_entropy(logits, mb["labels"], tp_group) * mb["loss_mask"]).sum()
        return loss_sum / n_tokens, {"loss_sum": loss_sum.detach()}

    return loss_fn


def _token_losses(tp_group):
    """forward_collect fn: per-token cross-entropy (B, T) of the (vocab-parallel) logits."""

    def fn(logits: torch.Tensor, mb: dict[str, torch.Tensor]):
        per_token = vocab_parallel_cross_entropy(logits, mb["labels"], tp_group)
        return per_token.sum(), {"token_loss": per_token}

    return fn


def _full_state(config: TransformerConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return GPTModel(config).state_dict()


def _share(global_batch: list, dp_rank: int, dp_size: int, same_data: bool) -> list:
    if same_data:
        return global_batch[:SAME_DATA_MB]
    per_rank = len(global_batch) // dp_size
    return global_batch[dp_rank * per_rank : (dp_rank + 1) * per_rank]


def _train(engine: ModelEngine, dp_rank: int, dp_size: int, same_data: bool = False) -> dict[str, Any]:
    """STEPS steps on this dp rank's share; gradients of the first step, losses, norms, final params."""
    out: dict[str, Any] = {"losses": [], "norms": []}
    mine = _share(_micro_batches(0, engine.config.vocab_size), dp_rank, dp_size, same_data)
    out["collected"] = [o["token_loss"] for o in engine.forward_collect(mine, _token_losses(engine.tp_group))]
    for step in range(STEPS):
        global_batch = _micro_batches(step, engine.config.vocab_size)
        mine = _share(global_batch, dp_rank, dp_size, same_data)
        scored = mine * dp_size if same_data else global_batch
        n_tokens = torch.stack([mb["loss_mask"].sum() for mb in scored]).sum()
        per_mb = engine.forward_backward(mine, _loss_fn(engine.tp_group, n_tokens))
        if step == 0:
            out["buckets"] = (engine.ddp.num_buckets, engine.ddp.num_buckets_launched)
        engine.finalize_grads()
        if step == 0:
            out["grads"] = [(n, lo, hi, g.clone()) for n, lo, hi, g in engine.owned_main_grads()]
        norm, _ = engine.optimizer_step(OPTIM.clip_grad)
        out["losses"].append(engine.reduce_metric(per_mb, "loss_sum") / float(n_tokens))
        out["norms"].append(norm)
    names = engine._ckpt_names
    params = [p for c in engine.chunks for p in c.parameters()]
    out["params"] = {names[p]: p.detach().clone() for p in params}
    out["dims"] = {
        names[p]: SimpleNamespace(tp_dim=getattr(p, "tp_dim", None), ep_dim=getattr(p, "ep_dim", None))
        for p in params
    }
    return out


def _layouts_world(rank: int, world_size: int) -> dict[str, Any]:
    from core.parallel.dims import ParallelDims, build_groups

    results = {}
    for name, (model, par) in LAYOUTS.items():
        dims = ParallelDims(tp=par.tp, cp=par.cp, ep=par.ep, dp=par.dp, pp=par.pp, world_size=world_size)
        groups = build_groups(dims, rank)
        config = _config(model)
        engine = ModelEngine(
            config,
            par,
            OPTIM,
            groups,
            torch.device("cpu"),
            _full_state(config),
            bucket_size_mb=BUCKET_MB.get(name, 25.0),
        )
        results[name] = _train(engine, groups.dp_rank, groups.dp_size, name in SAME_DATA) | {
            "shard": SimpleNamespace(
                tp_rank=groups.tp_rank,
                tp_size=groups.tp_size,
                ep_rank=groups.ep_rank,
                ep_size=groups.ep_size,
                dp_rank=groups.dp_rank,
            )
        }
        if name == "tp2-dp2":
            results["fp16"] = _fp16_overflow(rank, groups, config)
    return results


def _fp16_overflow(rank: int, groups, config: TransformerConfig) -> list[dict[str, float]]:
    par = ParallelConfig(tp=2, dp=2, distributed_optimizer=True)
    scaler = DynamicGradScaler(2.0**10)
    engine = ModelEngine(
        config, par, OPTIM, groups, torch.device("cpu"), _full_state(config), torch.float16, scaler
    )
    steps = []
    for poison in (rank == 3, False):
        global_batch = _micro_batches(0, config.vocab_size)
        n_tokens = torch.stack([mb["loss_mask"].sum() for mb in global_batch]).sum()
        mine = global_batch[groups.dp_rank * 4 : (groups.dp_rank + 1) * 4]
        masters = [s.master.clone() for s in engine.optimizer.shards]
        engine.forward_backward(mine, _loss_fn(engine.tp_group, n_tokens))
        engine.finalize_grads()
        if poison:
            engine.owned_main_grads()[0][3][0] = float("inf")
        _, metrics = engine.optimizer_step(OPTIM.clip_grad)
        unchanged = all(
            torch.equal(m, s.master) for m, s in zip(masters, engine.optimizer.shards, strict=True)
        )
        steps.append(metrics | {"unchanged": float(unchanged), "scale_after": scaler.scale})
    return steps


@pytest.fixture(scope="module")
def world() -> list[dict[str, Any]]:
    from dist import run_distributed

    return run_distributed(_layouts_world, WORLD, timeout=300)


@pytest.fixture(scope="module")
def references() -> dict[str, dict[str, Any]]:
    """The single-process engine per (model, same data), shared by the layouts of one model."""
    out = {}
    for key in {(m, name in SAME_DATA) for name, (m, _) in LAYOUTS.items()}:
        config = _config(key[0])
        engine = ModelEngine(config, ParallelConfig(), OPTIM, None, torch.device("cpu"), _full_state(config))
        ref = _train(engine, 0, 1, key[1])
        ref["full_grads"] = {n: g for n, _, _, g in ref["grads"]}  # whole params: lo = 0, hi = numel
        out[key] = ref
    return out


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> bool:
    return (got - want).abs().max().item() <= rtol * want.abs().max().clamp(min=1e-12).item()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, world, references):
    same_data = layout in SAME_DATA
    ref = references[LAYOUTS[layout][0], same_data]
    params_ref, dims = ref["params"], ref["dims"]
    covered: dict[str, int] = {}
    for rank, result in enumerate(world):
        got = result[layout]
        if got["collected"]:  # last pipeline stage
            want = _share(ref["collected"], got["shard"].dp_rank, LAYOUTS[layout][1].dp, same_data)
            assert len(got["collected"]) == len(want)
            for a, b in zip(got["collected"], want, strict=True):
                assert a.shape == (B, T) and _close(a, b, GRAD_RTOL), f"rank {rank} forward_collect"
        assert got["losses"] == pytest.approx(ref["losses"], rel=LOSS_RTOL), f"rank {rank}"
        assert got["norms"] == pytest.approx(ref["norms"], rel=LOSS_RTOL), f"rank {rank}"
        shard = got["shard"]
        for name, lo, hi, grad in got["grads"]:
            full = ref["full_grads"][name].view(params_ref[name].shape)
            local = shard_of(full, dims[name], shard).reshape(-1)  # type: ignore[arg-type]
            assert _close(grad, local[lo:hi], GRAD_RTOL), f"rank {rank} {name}[{lo}:{hi}]"
            covered[name] = covered.get(name, 0) + hi - lo
        for name, value in got["params"].items():
            want = shard_of(params_ref[name], dims[name], shard)  # type: ignore[arg-type]
            assert (value - want).abs().max().item() <= PARAM_ATOL, f"rank {rank} {name} after {STEPS} steps"
        buckets, launched_in_backward = got["buckets"]
        assert launched_in_backward == buckets, f"rank {rank}: every bucket launched during backward"
        assert buckets > 1 or layout != "tp2-dp2"
    assert sum(bool(r[layout]["collected"]) for r in world) == WORLD // LAYOUTS[layout][1].pp
    # Every element of every gradient was compared somewhere (replicas over dp count each time they own it).
    assert set(covered) == set(params_ref)


def test_fp16_overflow_on_one_rank_skips_the_step_everywhere(world):
    for rank, result in enumerate(world):
        poisoned, clean = result["fp16"]
        assert poisoned == {"loss_scale": 1024.0, "skipped": 1.0, "unchanged": 1.0, "scale_after": 512.0}, (
            rank
        )
        assert clean == {"loss_scale": 512.0, "skipped": 0.0, "unchanged": 0.0, "scale_after": 512.0}, rank
