"""Pipeline parallelism against the single-process model: 1F1B and interleaved (vpp=2) on a pp=2 gloo world,
tied and untied embeddings, a MoE model (aux loss on both stages), ragged micro-batches, AdamW steps.

Tolerance atol = rtol = 1e-5 (fp32). A pipeline stage runs the reference's ops on the same shapes, so the
only differences are the order in which partial gradients are summed: the tied embedding's input-side and
output-side gradients meet in one all-reduce after all micro-batches instead of in each backward, and the
MoE aux loss is a second backward root. That moves results by ~1e-7 relative (AdamW turns it into ~1e-6
of the loss after three steps); pairing a gradient with the wrong micro-batch, dropping the aux loss or
the tied reduction moves them by >= 1e-3.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import torch
from dist import run_distributed

from core.distributed.ddp import DistributedDataParallel
from core.parallel.collectives import all_gather_along_dim
from core.parallel.dims import Groups, ParallelDims, build_groups
from core.pipeline import (
    allreduce_tied_embedding_grads,
    build_embedding_group,
    build_stage_modules,
    forward_backward_1f1b,
    forward_backward_interleaved,
    forward_backward_no_pipelining,
    get_schedule,
    stage_layer_ranges,
)
from core.tensor_parallel import vocab_parallel_cross_entropy
from core.transformer.attention import position_ids_from_segments
from core.transformer.config import TransformerConfig
from core.transformer.model import GPTModel

TOL = dict(atol=1e-5, rtol=1e-5)
SEED = 1234
VOCAB = 64
SHAPES = [(2, 5), (2, 8), (1, 3), (2, 6)]  # (B, T) per micro-batch: ragged, as RL batches are
ADAM_STEPS = 3

# case -> (tie_embeddings, vpp, moe)
CASES: dict[str, tuple[bool, int, bool]] = {
    "1f1b_untied": (False, 1, False),
    "1f1b_tied": (True, 1, False),
    "interleaved_untied": (False, 2, False),
    "interleaved_tied": (True, 2, False),
    "1f1b_moe": (False, 1, True),
}
TP_CASES = ("1f1b_untied", "interleaved_tied")


def _config(tied: bool, moe: bool = False) -> TransformerConfig:
    """Llama-like (RMSNorm, SwiGLU, RoPE, GQA), 4 layers; MoE: 4 experts, top-2, aux loss on."""
    moe_fields: dict[str, Any] = dict(num_experts=4, moe_top_k=2, moe_aux_loss_coeff=0.1) if moe else {}
    return TransformerConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=4,
        num_attention_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=48,
        tie_embeddings=tied,
        **moe_fields,
    )


def _micro_batches() -> list[dict[str, torch.Tensor]]:
    """Micro-batch 1 packs two documents per row; micro-batch 3 has a padded row."""
    g = torch.Generator().manual_seed(0)
    micro_batches = []
    for i, (B, T) in enumerate(SHAPES):
        ids = torch.randint(0, VOCAB, (B, T + 1), generator=g)
        segment_ids = torch.zeros(B, T, dtype=torch.long)
        if i == 1:
            segment_ids[:, 5:] = 1
        attention_mask = torch.ones(B, T, dtype=torch.long)
        if i == 3:
            attention_mask[0, -2:] = 0
        mb = dict(input_ids=ids[:, :-1], labels=ids[:, 1:], loss_mask=attention_mask.float())
        mb.update(segment_ids=segment_ids, attention_mask=attention_mask)
        mb["position_ids"] = position_ids_from_segments(segment_ids)
        micro_batches.append(mb)
    return micro_batches


def _loss_fn(
    logits: torch.Tensor, mb: dict[str, torch.Tensor], num_tokens: float, tp_group: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token cross entropy summed over the micro-batch / the global token count: (B, T, V/tp) -> ()."""
    token_loss = vocab_parallel_cross_entropy(logits, mb["labels"], tp_group)  # (B, T)
    loss = (token_loss * mb["loss_mask"]).sum() / num_tokens
    return loss, {"loss": loss.detach()}


def _full_model(config: TransformerConfig) -> GPTModel:
    torch.manual_seed(SEED)
    return GPTModel(config)


# ---- the worlds: pp=2 (every check), pp=2 x tp=2 (parity), pp=2 on NCCL (every check, 2 GPUs) ----------


@dataclass
class _Ctx:
    """What every check in a world shares."""

    groups: Groups
    emb_group: Any
    mbs: list[dict[str, torch.Tensor]]
    device: torch.device


def _load_full_weights(chunks: list[GPTModel], config: TransformerConfig, groups: Groups) -> None:
    """Give each stage the full model's weights by name (strict), sharded over tp by `tp_dim`."""
    full = _full_model(config).state_dict()  # a tied head is listed under both names
    size, rank = groups.tp_size, groups.tp_rank
    for chunk in chunks:
        tp_dims = {name: getattr(p, "tp_dim", None) for name, p in chunk.named_parameters()}
        state = {}
        for name in chunk.state_dict():
            dim = tp_dims.get(name)
            state[name] = full[name] if dim is None else full[name].chunk(size, dim)[rank]
        chunk.load_state_dict(state, strict=True)


def _stage(ctx: _Ctx, config: TransformerConfig, vpp: int) -> list[GPTModel]:
    chunks = build_stage_modules(config, ctx.groups, vpp, ctx.groups.tp_group, ctx.emb_group)
    chunks = [chunk.to(ctx.device) for chunk in chunks]
    _load_full_weights(chunks, config, ctx.groups)
    return chunks


def _grads(chunks: list[GPTModel], groups: Groups) -> dict[str, torch.Tensor]:
    """Every parameter's full (tp-gathered) gradient by global name."""
    out = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            dim = getattr(p, "tp_dim", None)
            out[name] = p.grad if dim is None else all_gather_along_dim(p.grad, dim, groups.tp_group)
    return out


def _run(ctx: _Ctx, chunks, vpp: int, mbs=None, forward_only=False, **hooks) -> list[torch.Tensor]:
    """One step's schedule (+ the tied-embedding reduction); per-micro-batch losses on the last stage."""
    mbs = ctx.mbs if mbs is None else mbs
    loss_fn = partial(_loss_fn, num_tokens=_num_tokens(mbs), tp_group=ctx.groups.tp_group)
    schedule = forward_backward_interleaved if vpp > 1 else forward_backward_1f1b
    metrics = schedule(chunks, mbs, loss_fn, ctx.groups, forward_only, **hooks)
    if not forward_only:
        allreduce_tied_embedding_grads(chunks, ctx.emb_group)
    return [m["loss"] for m in metrics]


def _num_tokens(mbs: list[dict[str, torch.Tensor]]) -> float:
    return float(sum(mb["loss_mask"].sum() for mb in mbs))


def _parity_case(ctx: _Ctx, tied: bool, vpp: int, moe: bool) -> dict[str, Any]:
    chunks = _stage(ctx, _config(tied, moe), vpp)
    calls: list[tuple[str, int]] = []

    @contextmanager
    def no_sync(c: int):
        calls.append(("no_sync", c))
        yield

    def on_last_backward(c: int) -> None:
        calls.append(("last", c))

    losses = _run(ctx, chunks, vpp, no_sync_func=no_sync, on_last_backward=on_last_backward)
    return {"losses": losses, "grads": _grads(chunks, ctx.groups), "hook_calls": calls}


def _ddp_case(ctx: _Ctx) -> dict[str, Any]:
    """Interleaved, tied, each chunk in the project's DDP: no_sync on all but the last backward of each
    chunk, dp sync, then the tied reduction on main_grad."""
    chunks = _stage(ctx, _config(True), 2)
    ddps = [DistributedDataParallel(chunk, ctx.groups.dp_group) for chunk in chunks]
    losses = _run(ctx, ddps, 2, no_sync_func=lambda c: ddps[c].no_sync(), on_last_backward=lambda c: None)
    for ddp in ddps:  # _run reduced the tied grads before this sync: fine at dp = 1 (sums commute)
        ddp.finish_grad_sync()
    grads = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            assert p.grad is None  # DDP moved it into main_grad
            grads[name] = p.main_grad.clone()
    return {"losses": losses, "grads": grads}


def _forward_only_case(ctx: _Ctx, vpp: int) -> dict[str, Any]:
    chunks = _stage(ctx, _config(True), vpp)
    losses = _run(ctx, chunks, vpp, forward_only=True)
    return {"losses": losses, "any_grad": any(p.grad is not None for c in chunks for p in c.parameters())}


def _adamw_case(ctx: _Ctx) -> dict[str, Any]:
    """Interleaved, tied: AdamW on each rank's parameters after the tied-embedding reduction."""
    chunks = _stage(ctx, _config(True), 2)
    opt = torch.optim.AdamW([p for c in chunks for p in c.parameters()], lr=1e-2, weight_decay=0.1)
    curve = []
    for _ in range(ADAM_STEPS):
        opt.zero_grad(set_to_none=True)
        losses = _run(ctx, chunks, 2)
        curve.extend([torch.stack(losses).sum()] if losses else [])
        opt.step()
    first, last = chunks[0], chunks[-1]
    tied = first.embedding.word_embeddings.weight if first.pre_process else last.output_layer.weight
    return {"curve": curve, "tied_weight": tied.detach().clone()}


def _init_broadcast_case(ctx: _Ctx) -> torch.Tensor:
    """The tied copy right after build_stage_modules (ranks seeded differently: only the broadcast can
    make the last stage's head equal the first stage's embedding)."""
    torch.manual_seed(SEED + ctx.groups.pp_rank)
    chunks = build_stage_modules(_config(True), ctx.groups, 1, ctx.groups.tp_group, ctx.emb_group)
    first, last = chunks[0], chunks[-1]
    weight = first.embedding.word_embeddings.weight if first.pre_process else last.output_layer.weight
    # The last stage's copy is tagged so that a global grad norm counts the tied weight once.
    assert getattr(weight, "pipeline_tied_copy", False) == ctx.groups.is_last_stage
    return weight.detach().clone()


def _error_cases(ctx: _Ctx) -> dict[str, str]:
    """Errors every rank raises together (before any p2p), so nothing hangs."""
    out = {}
    chunks = _stage(ctx, _config(False), 2)
    try:
        _run(ctx, chunks, 2, mbs=ctx.mbs[:3])
    except ValueError as e:
        out["indivisible"] = str(e)
    chunks = _stage(ctx, _config(False), 1)
    try:  # rank-dependent count: a data bug that would otherwise deadlock the pipeline
        _run(ctx, chunks, 1, mbs=ctx.mbs[: 2 + 2 * ctx.groups.pp_rank])
    except ValueError as e:
        out["mismatch"] = str(e)
    return out


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_to_cpu(v) for v in x)
    return x


def _pipeline_world(
    rank: int, world_size: int, tp: int, mbs: list[dict[str, torch.Tensor]], backend: str, full: bool
) -> dict[str, Any]:
    """Every check (full) or the parity of TP_CASES; tensors come back on the CPU."""
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity, as on the CPU
    groups = build_groups(ParallelDims(tp=tp, pp=world_size // tp, world_size=world_size), rank)
    mbs = [{k: v.to(device) for k, v in mb.items()} for mb in mbs]
    ctx = _Ctx(groups, build_embedding_group(groups), mbs, device)
    out: dict[str, Any] = {"pp_rank": groups.pp_rank, "tp_rank": groups.tp_rank}
    out["parity"] = {case: _parity_case(ctx, *CASES[case]) for case in (CASES if full else TP_CASES)}
    if full:
        out["ddp"] = _ddp_case(ctx)
        out["forward_only"] = {vpp: _forward_only_case(ctx, vpp) for vpp in (1, 2)}
        out["adamw"] = _adamw_case(ctx)
        out["init_broadcast"] = _init_broadcast_case(ctx)
        out["errors"] = _error_cases(ctx)
    return _to_cpu(out)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The references are tiny: extra intra-op threads only fight the gloo ranks for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["gloo", pytest.param("nccl", marks=pytest.mark.gpu)])
def pp2(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """pp=2, every check: gloo on the CPU; the same on NCCL where there are 2 GPUs."""
    backend = request.param
    if backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    return run_distributed(
        _pipeline_world, 2, 1, _micro_batches(), backend, True, timeout=300, backend=backend
    )


@pytest.fixture(scope="module")
def pp2_tp2() -> list[dict[str, Any]]:
    """pp=2 x tp=2 (4 gloo ranks): parity only, the model's TP layers sharded by tp_dim."""
    return run_distributed(_pipeline_world, 4, 2, _micro_batches(), "gloo", False, timeout=300)


# ---- single-process references (parent process) ----------------------------------------------------------


def _reference_step(model: GPTModel, mbs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """A plain loop (no schedule code): backward of loss + aux / n per micro-batch; returns the losses."""
    losses = []
    for mb in mbs:
        logits = model(mb["input_ids"], mb["position_ids"], mb["attention_mask"], mb["segment_ids"])
        loss, _ = _loss_fn(logits, mb, _num_tokens(mbs), None)
        (loss + model.aux_loss / len(mbs)).backward()
        losses.append(loss.detach())
    return losses


def _reference_grads(model: GPTModel) -> dict[str, torch.Tensor]:
    """Gradients by every name a parameter has (a tied weight under both)."""
    return {name: p.grad for name, p in model.named_parameters(remove_duplicate=False)}


def _reference(tied: bool, moe: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    model = _full_model(_config(tied, moe))
    losses = _reference_step(model, _micro_batches())
    return losses, _reference_grads(model)


def _by_stage(world: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The tp-rank-0 result of each pp stage."""
    return {r["pp_rank"]: r for r in world if r["tp_rank"] == 0}


def _check_parity(world: list[dict[str, Any]], case: str) -> None:
    """Every rank: gradients of its parameters (tp-gathered); every last-stage rank: the losses."""
    tied, _, moe = CASES[case]
    want_losses, want_grads = _reference(tied, moe)
    last_stage = max(r["pp_rank"] for r in world)
    seen: set[str] = set()
    for r in world:
        got = r["parity"][case]
        if r["pp_rank"] == last_stage:
            torch.testing.assert_close(torch.stack(got["losses"]), torch.stack(want_losses), **TOL)
        for name, grad in got["grads"].items():
            torch.testing.assert_close(grad, want_grads[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")
            seen.add(name)
    assert seen == set(want_grads)  # every parameter lives on some stage, under its global name


# ---- tests -------------------------------------------------------------------------------------------------


def test_stage_layer_ranges_follow_megatron_interleaving() -> None:
    assert stage_layer_ranges(4, 2, 1) == [[(0, 2)], [(2, 4)]]
    assert stage_layer_ranges(8, 2, 2) == [[(0, 2), (4, 6)], [(2, 4), (6, 8)]]
    with pytest.raises(ValueError, match="split evenly"):
        stage_layer_ranges(6, 2, 2)


def test_get_schedule_dispatches_on_layout() -> None:
    assert get_schedule(1) is forward_backward_no_pipelining
    assert get_schedule(2) is forward_backward_1f1b
    assert get_schedule(2, 2) is forward_backward_interleaved
    with pytest.raises(ValueError, match="needs pp_size > 1"):
        get_schedule(1, 2)


@pytest.mark.parametrize("moe", [False, True])
def test_no_pipelining_schedule_equals_a_plain_loop(moe: bool) -> None:
    want_losses, want_grads = _reference(tied=True, moe=moe)
    model, mbs = _full_model(_config(True, moe)), _micro_batches()
    loss_fn = partial(_loss_fn, num_tokens=_num_tokens(mbs), tp_group=None)
    got = get_schedule(1)([model], mbs, loss_fn, groups=None)
    torch.testing.assert_close(
        torch.stack([m["loss"] for m in got]), torch.stack(want_losses), atol=0, rtol=0
    )
    for name, grad in _reference_grads(model).items():
        torch.testing.assert_close(grad, want_grads[name], atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_pp2_loss_and_every_gradient_match_single_process(pp2, case: str) -> None:
    _check_parity(pp2, case)


@pytest.mark.slow
def test_ddp_wrapped_chunks_match_single_process_in_main_grad(pp2) -> None:
    """The schedule unwraps DDP chunks; the tied reduction works on main_grad."""
    world = [r | {"parity": {"interleaved_tied": r["ddp"]}} for r in pp2]
    _check_parity(world, "interleaved_tied")


@pytest.mark.slow
@pytest.mark.parametrize("case", TP_CASES)
def test_pp2_tp2_loss_and_every_gradient_match_single_process(pp2_tp2, case: str) -> None:
    _check_parity(pp2_tp2, case)


@pytest.mark.slow
def test_moe_aux_loss_reaches_routers_on_both_stages(pp2) -> None:
    """The aux loss alone changes the router gradients (so the parity above covers its backward)."""
    _, with_aux = _reference(tied=False, moe=True)
    stages = _by_stage(pp2)
    for stage in stages.values():
        routers = [n for n in stage["parity"]["1f1b_moe"]["grads"] if n.endswith("router.weight")]
        assert routers  # two MoE layers per stage
    config = _config(False, moe=True)
    config.moe_aux_loss_coeff = 0.0
    model = _full_model(config)
    _reference_step(model, _micro_batches())
    no_aux = _reference_grads(model)
    for name in ("layers.0.mlp.router.weight", "layers.3.mlp.router.weight"):
        assert (with_aux[name] - no_aux[name]).abs().max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("vpp", [1, 2])
def test_ddp_hooks_run_no_sync_for_all_but_the_last_backward_of_each_chunk(pp2, vpp: int) -> None:
    case = "interleaved_untied" if vpp > 1 else "1f1b_untied"
    n = len(SHAPES)
    for stage in _by_stage(pp2).values():
        calls = stage["parity"][case]["hook_calls"]
        for c in range(vpp):
            mine = [kind for kind, chunk in calls if chunk == c]
            assert mine == ["no_sync"] * (n - 1) + ["last"]


@pytest.mark.slow
@pytest.mark.parametrize("vpp", [1, 2])
def test_forward_only_returns_the_reference_losses_without_grads(pp2, vpp: int) -> None:
    want, _ = _reference(tied=True, moe=False)
    stages = _by_stage(pp2)
    got = stages[max(stages)]["forward_only"][vpp]["losses"]
    torch.testing.assert_close(torch.stack(got), torch.stack(want), **TOL)
    assert stages[0]["forward_only"][vpp]["losses"] == []  # metrics live on the last stage only
    assert not any(s["forward_only"][vpp]["any_grad"] for s in stages.values())


@pytest.mark.slow
def test_adamw_steps_keep_the_loss_curve_and_the_tied_copies_equal(pp2) -> None:
    model, mbs = _full_model(_config(True)), _micro_batches()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    want = []
    for _ in range(ADAM_STEPS):
        opt.zero_grad(set_to_none=True)
        want.append(sum(_reference_step(model, mbs), torch.zeros(())))
        opt.step()
    stages = _by_stage(pp2)
    got = stages[max(stages)]["adamw"]["curve"]
    torch.testing.assert_close(torch.stack(got), torch.stack(want), **TOL)
    assert want[-1] < want[0] - 1e-3  # the steps moved the model
    first, last = stages[0]["adamw"]["tied_weight"], stages[max(stages)]["adamw"]["tied_weight"]
    torch.testing.assert_close(first, last, atol=0, rtol=0)
    torch.testing.assert_close(last, model.output_layer.weight.detach(), **TOL)


@pytest.mark.slow
def test_tied_head_is_broadcast_from_the_first_stage_at_init(pp2) -> None:
    stages = _by_stage(pp2)
    first, last = stages[0]["init_broadcast"], stages[max(stages)]["init_broadcast"]
    torch.testing.assert_close(first, last, atol=0, rtol=0)


@pytest.mark.slow
def test_schedule_errors_are_raised_on_every_rank(pp2) -> None:
    for rank in pp2:
        assert "multiple of pp_size (2)" in rank["errors"]["indivisible"]
        assert "disagree on the number of micro-batches: 2 to 4" in rank["errors"]["mismatch"]
