"""The sort-free top-p kernel (rollout/engines/native/top_p.py) draws the same tokens, with the same raw
logprobs, as the sampler's sort path (filter_threshold + Gumbel argmax) that the frequency test checks
against softmax; under the Triton interpreter on CPU and on a GPU."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import run_under_triton_interpreter

from rollout.engines.native.sampler import (
    Filters,
    SamplingRows,
    SlotSamplingTable,
    neg_log,
    sample,
    split_key,
    to_uniform,
)
from rollout.types import SamplingParams


def case(rows: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Rows of every kind: greedy, tempered, top-p off, small and large top-p, peaked and flat logits,
    and rows whose logits tie at the nucleus boundary."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.linspace(0.3, 6.0, rows)[:, None]  # flat rows to peaked rows
    logits = torch.randn(rows, vocab, generator=g) * spread
    logits[::5, : vocab // 2] = 1.0  # ties everywhere, at any threshold
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3, 1.0])[torch.arange(rows) % 5]
    top_p = torch.tensor([0.95, 0.9, 0.5, 1.0, 0.99, 0.3, 0.95, 0.8])[torch.arange(rows) % 8]
    keys = torch.tensor([split_key(k * 7919 - 3) for k in range(rows)])
    steps = torch.arange(rows) * 3 + seed
    to = dict(device=device)
    return (
        logits.to(dtype).to(**to),
        temperature.to(**to),
        top_p.to(**to),
        keys.to(**to),
        steps.to(**to),
    )


def compare(rows: int, vocab: int, dtype: torch.dtype, device: str, exact: bool = True) -> int:
    """Kernel vs sort path on one case; returns the number of retried draws (the rejection path).

    exact=False (compiled on a GPU, whose exp/log/division round differently from the sort path's kernels):
    a row may differ only where the two paths' float rounding decides it -- one of the two tokens lies
    within 1e-4 of the nucleus boundary (its more-likely mass, in fp64) or their perturbed logits are
    within 1e-4 of each other -- and at most 2% of rows may."""
    from rollout.engines.native.sampler import uniform_noise
    from rollout.engines.native.top_p import sample_top_p

    logits, temperature, top_p, keys, steps = case(rows, vocab, dtype, device)
    sort_rows = SamplingRows(temperature, torch.full_like(steps, vocab), top_p, keys)
    want_tokens, want_logprobs = sample(logits, sort_rows, steps, apply_filters=Filters.TOP_K)
    tokens, logprobs, retries = sample_top_p(logits, temperature, top_p, keys, steps)
    differ = (tokens != want_tokens).nonzero().flatten().tolist()
    if exact:
        assert not differ, differ
    else:
        raw = logits.double()
        scaled = raw / torch.where(temperature == 0, 1.0, temperature).double()[:, None]
        probs = scaled.softmax(-1)
        perturbed = scaled + -torch.log(-torch.log(uniform_noise(keys, steps, vocab).double()))
        for r in differ:
            a, b = int(tokens[r]), int(want_tokens[r])
            above = [float(probs[r][raw[r] > raw[r, t]].sum()) for t in (a, b)]
            boundary = min(abs(m - float(top_p[r])) for m in above)
            tie = abs(float(perturbed[r, a] - perturbed[r, b]))
            assert boundary < 1e-4 or tie < 1e-4, (r, a, b, above, float(top_p[r]), tie, int(retries[r]))
        assert len(differ) <= 0.02 * rows, differ
    same = tokens == want_tokens
    torch.testing.assert_close(logprobs[same], want_logprobs[same], atol=2e-5, rtol=2e-5)
    return int(retries.sum())


INTERPRETED = """
import torch
from test_top_p import compare
retried = compare(40, 1500, torch.bfloat16, "cpu") + compare(16, 1025, torch.float32, "cpu")
assert retried > 0, "no draw was rejected: the retry path was not exercised"
print("ok", retried)
"""


@pytest.mark.slow
def test_kernel_under_the_triton_interpreter_draws_the_sort_paths_tokens() -> None:
    stdout = run_under_triton_interpreter(INTERPRETED)
    assert stdout.startswith("ok"), stdout


def test_gumbel_noise_is_finite_and_accurate_at_both_ends_of_the_hash() -> None:
    """The smallest and largest hashes: u stays inside (0, 1) and -log(-log(u)) is finite and within 1e-5 of
    the fp64 value (near u = 1, -log(u) ~ 1 - u comes from a series, not from a log that loses it)."""
    h = torch.cat([torch.arange(0, 4096), torch.arange(2**32 - 4096, 2**32)])
    u = to_uniform(h)
    assert bool((u > 0).all()) and bool((u < 1).all())
    gumbel = -torch.log(neg_log(u))
    assert bool(torch.isfinite(gumbel).all())
    exact = -torch.log(-torch.log(u.double()))
    assert float((gumbel.double() - exact).abs().max()) < 1e-5


def test_slot_table_names_the_filters_a_batch_needs() -> None:
    table = SlotSamplingTable(4, vocab_size=100, device=torch.device("cpu"))
    table.assign(
        [0, 1, 2, 3],
        [
            SamplingParams(temperature=1.0),
            SamplingParams(temperature=1.0, top_p=0.9),
            SamplingParams(temperature=1.0, top_k=5, top_p=0.9),
            SamplingParams(temperature=0.0, top_k=5),  # greedy: no filter applies
        ],
        [1, 2, 3, 4],
    )
    assert table.any_filtered([0, 3]) is Filters.NONE and not table.any_filtered([0, 3])
    assert table.any_filtered([0, 1]) is Filters.TOP_P
    assert table.any_filtered([1, 2]) is Filters.TOP_K


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("rows", "vocab", "dtype"), [(256, 128_256, torch.bfloat16), (33, 1000, torch.float32)]
)
def test_kernel_draws_the_sort_paths_tokens_on_the_gpu(rows, vocab, dtype) -> None:
    assert compare(rows, vocab, dtype, "cuda", exact=False) > 0
