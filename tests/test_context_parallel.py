"""Context parallelism: a cp=2 gloo world against the single-process GPTModel.

One world runs every case. Each rank feeds the model its load-balanced split of the batch (global
position ids included), sums the per-token cross-entropy over its own tokens and backpropagates; the
test process then compares logits (gathered back to global order), the loss (all-reduced over cp) and
every parameter's gradient (all-reduced over cp, as DDP over dp x cp does) with the reference.

Tolerance: max |diff| <= 1e-5 * max |reference| per tensor. The CP run computes the same fp32 math in a
different order: the masked SDPA kernel instead of the causal one, parameter gradients as two half-sequence
matmuls summed by the all-reduce, K/V gradients summed by the reduce-scatter. Measured on CPU: logits and
loss bit-identical, gradients within 4e-7 of their scale; a wrong chunk order, mask or missing reduction
moves them by the order of the scale (checked by breaking each).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from core.models import preset
from core.parallel.collectives import all_reduce
from core.transformer.attention import position_ids_from_segments
from core.transformer.config import TransformerConfig
from core.transformer.context_parallel import cp_positions, gather_from_cp, split_for_cp
from core.transformer.model import GPTModel

pytestmark = pytest.mark.slow  # every test runs on the 2-rank cp world

B, T = 2, 16  # T divisible by 2 * cp = 4


def _batch(packed: bool) -> dict[str, torch.Tensor]:
    """Full rows (B, T): labels shifted before any split; packed rows hold 2 documents (+ padding)."""
    ids = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(ids, -1, dims=1)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    segment_ids = torch.zeros(B, T, dtype=torch.long)
    if packed:
        segment_ids = torch.tensor([[0] * 6 + [1] * 7 + [2] * 3, [0] * 9 + [1] * 7])
        attention_mask[0, 13:] = 0
    loss_mask = attention_mask.clone()
    loss_mask[:, -1] = 0  # no next token
    batch = {"input_ids": ids, "labels": labels, "loss_mask": loss_mask}
    if not packed:
        return batch | {"position_ids": torch.arange(T).expand(B, T)}
    positions = position_ids_from_segments(segment_ids)
    return batch | {"position_ids": positions, "attention_mask": attention_mask, "segment_ids": segment_ids}


CASES = {
    "causal": ("llama_tiny", False),  # GQA (4 heads, 2 kv heads), RoPE, the is_causal path at cp=1
    "packed": ("llama_tiny", True),  # 2 documents per row and padding
    "sliding_window": ("mistral_tiny", False),  # window 8 < T: the window uses global positions
}


def _forward_backward(
    config: TransformerConfig, batch: dict[str, torch.Tensor], cp_group: dist.ProcessGroup | None = None
) -> dict[str, torch.Tensor]:
    """Logits in global order, total loss and parameter gradients summed over cp (identity for cp=1)."""
    torch.manual_seed(0)
    model = GPTModel(config, cp_group=cp_group)
    local = {name: split_for_cp(x, 1, cp_group) for name, x in batch.items()}  # (B, T / cp)
    inputs = {name: x for name, x in local.items() if name not in ("labels", "loss_mask")}
    logits = model(**inputs)  # (B, T / cp, V)
    ce = F.cross_entropy(logits.flatten(0, 1), local["labels"].flatten(), reduction="none")
    loss = (ce * local["loss_mask"].flatten()).sum()  # this rank's tokens only
    loss.backward()
    return {
        "logits": gather_from_cp(logits.detach(), 1, cp_group),
        "loss": all_reduce(loss.detach(), cp_group),
    } | {name: all_reduce(p.grad, cp_group) for name, p in model.named_parameters()}


def _layout_checks(cp_group: dist.ProcessGroup) -> dict[str, object]:
    rows = torch.arange(2 * 8).view(2, 8)  # (B, T) with T = 8: chunks of 2 tokens
    local = split_for_cp(rows, 1, cp_group)
    model = GPTModel(preset("llama_tiny"), cp_group=cp_group)
    errors = {}
    for name, call in {
        "no_position_ids": lambda: model(local),
        "indivisible": lambda: split_for_cp(torch.zeros(1, 6), 1, cp_group),
    }.items():
        try:
            call()
        except ValueError as e:
            errors[name] = str(e)
    return {
        "positions": cp_positions(8, cp_group),
        "local": local,
        "round_trip": torch.equal(gather_from_cp(local, 1, cp_group), rows),
        "errors": errors,
    }


def _cp_world(rank: int, world_size: int) -> dict[str, object]:
    torch.set_num_threads(1)
    cp_group = dist.new_group(list(range(world_size)))
    results: dict[str, object] = {"layout": _layout_checks(cp_group)}
    for case, (name, packed) in CASES.items():
        results[case] = _forward_backward(preset(name), _batch(packed), cp_group)
    return results


@pytest.fixture(scope="module")
def cp_world() -> list[dict[str, object]]:
    from dist import run_distributed

    return run_distributed(_cp_world, 2, timeout=120)


def test_load_balanced_layout(cp_world):
    """Rank r holds chunks r and 2cp-1-r; gather_from_cp inverts split_for_cp."""
    r0, r1 = (r["layout"] for r in cp_world)
    assert r0["positions"].tolist() == [0, 1, 6, 7] and r1["positions"].tolist() == [2, 3, 4, 5]
    assert r0["local"][1].tolist() == [8, 9, 14, 15]
    assert r0["round_trip"] and r1["round_trip"]


def test_clear_errors(cp_world):
    errors = cp_world[0]["layout"]["errors"]
    assert "needs position_ids" in errors.get("no_position_ids", "")
    assert "divisible by 2 * cp = 4" in errors.get("indivisible", "")


def _assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert got.shape == want.shape and err <= 1e-5 * scale, f"{what}: max |diff| {err:.2e}, scale {scale:.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_context_parallel_matches_single_process(case, cp_world):
    name, packed = CASES[case]
    want = _forward_backward(preset(name), _batch(packed))
    for rank, result in enumerate(cp_world):
        got = result[case]
        assert got.keys() == want.keys()
        for key in want:
            _assert_close_to_scale(got[key], want[key], f"rank {rank} {key}")
