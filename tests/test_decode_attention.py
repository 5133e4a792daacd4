"""The Triton split-K decode kernel over the paged KV cache against its plain-torch reference and the
engine's CPU path (keys gathered through the block table, masked SDPA).

The kernel runs on the GPU, and on the CPU under Triton's interpreter (TRITON_INTERPRET=1 must be set
before triton is first imported, so that case runs in a subprocess).
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import run_under_triton_interpreter

from rollout.engines.native import decode_attention as flash_decode
from rollout.engines.native.kv_cache import KVCache
from rollout.engines.native.runner import decode_mask, single_query_attention


def paged_case(
    n_heads: int,
    n_kv: int,
    d: int,
    page: int,
    dtype: torch.dtype,
    device: str,
    lengths: list[int],
    max_len: int | None = None,
) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
    """q (b, n_heads, d), a one-layer paged cache (random K/V) whose rows own shuffled, non-contiguous
    blocks for max_len positions (>= any kv_len used; 2 more rows hold none), and lengths (b,)."""
    torch.manual_seed(0)
    b = len(lengths)
    per_row = -(-(max_len or max(lengths)) // page)
    num_blocks = 1 + b * per_row + 3
    cache = KVCache(["0"], num_blocks, page, b + 2, per_row, n_kv, d, dtype, torch.device(device))
    cache.k["0"].normal_()
    cache.v["0"].normal_()
    blocks = (1 + torch.randperm(num_blocks - 1)[: b * per_row]).view(b, per_row)
    cache.sync_table([(row, blocks[row].tolist()) for row in range(b)])
    q = torch.randn(b, n_heads, d, device=device, dtype=dtype)
    return q, cache, torch.tensor(lengths, device=device)


def kernel(q: torch.Tensor, cache: KVCache, lengths: torch.Tensor, kv_len: int, window: int | None = None):
    return flash_decode.decode_attention(
        q, cache.k["0"], cache.v["0"], cache.block_table, lengths, kv_len, window
    )


def reference(q: torch.Tensor, cache: KVCache, lengths: torch.Tensor, window: int | None = None):
    return flash_decode.reference_decode_attention(
        q, cache.k["0"], cache.v["0"], cache.block_table, lengths, window
    )


def sdpa_path(q: torch.Tensor, cache: KVCache, lengths: torch.Tensor, kv_len: int, window: int | None):
    """What the engine computes without the kernel: KVCache.gather + masked single-query SDPA."""
    k, v = cache.gather("0", torch.arange(q.shape[0], device=q.device), kv_len)
    mask = decode_mask(lengths - 1, kv_len, window)
    return single_query_attention(q[:, :, None], k, v, mask, q.shape[1] // k.shape[1])[:, :, 0]


def test_reference_equals_the_gathered_sdpa_path() -> None:
    q, cache, lengths = paged_case(8, 2, 16, 4, torch.float32, "cpu", [1, 5, 16, 37])
    for window in (None, 6):
        want = reference(q, cache, lengths, window)
        torch.testing.assert_close(sdpa_path(q, cache, lengths, 40, window), want, atol=1e-5, rtol=1e-5)


INTERPRETED = """
import torch
from test_decode_attention import kernel, paged_case, reference
for n_heads, n_kv, page, window, lengths in [
    (4, 2, 16, None, [1, 15, 16, 17, 64, 65, 130]),  # pages of 16 inside tiles of 64 keys
    (4, 4, 128, None, [3, 128, 129, 200]),  # a page spanning several tiles
    (4, 2, 64, 50, [1, 64, 65, 130, 200]),  # page = tile, window starting mid-tile
    (8, 2, 16, 20, [1, 30, 99]),  # sliding window
]:
    q, cache, lens = paged_case(n_heads, n_kv, 32, page, torch.float32, "cpu", lengths)
    got = kernel(q, cache, lens, max(lengths), window)
    torch.testing.assert_close(got, reference(q, cache, lens, window), atol=2e-5, rtol=2e-5)
print("ok")
"""


@pytest.mark.slow
def test_kernel_under_the_triton_interpreter_matches_reference() -> None:
    stdout = run_under_triton_interpreter(INTERPRETED)
    assert stdout.strip() == "ok", stdout


@pytest.mark.parametrize(
    ("n_heads", "n_kv", "d", "page", "window", "dtype", "tol"),
    [
        (4, 4, 64, 16, None, torch.float32, 2e-5),  # MHA, fp32: exact up to summation order
        (8, 2, 128, 16, None, torch.float32, 2e-5),  # GQA group 4
        (8, 4, 32, 32, 40, torch.float32, 2e-5),  # sliding window
        (8, 4, 32, 64, 100, torch.float32, 2e-5),  # sliding window, one page per tile
        (8, 2, 64, 128, None, torch.float32, 2e-5),  # a page longer than BLOCK_N
        (16, 16, 128, 16, None, torch.bfloat16, 2e-2),  # the llama_1b shape in bf16
    ],
)
@pytest.mark.gpu
def test_kernel_matches_reference(n_heads, n_kv, d, page, window, dtype, tol) -> None:
    # Lengths across split boundaries (CHUNK 512) and tiles (BLOCK_N 64), a single key, the full bucket.
    lengths = [1, 2, 63, 64, 255, 511, 512, 513, 1000]
    q, cache, lens = paged_case(n_heads, n_kv, d, page, dtype, "cuda", lengths, max_len=1024)
    got = kernel(q, cache, lens, 1024, window)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), reference(q, cache, lens, window), atol=tol, rtol=tol)
    sdpa = sdpa_path(q, cache, lens, 1024, window).float()
    torch.testing.assert_close(got.float(), sdpa, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_kernel_is_capturable_in_a_cuda_graph() -> None:
    """Same lengths and table buffers, new values between replays: the graph reads them in place."""
    q, cache, lengths = paged_case(4, 2, 64, 16, torch.float32, "cuda", [5, 6, 7, 8], max_len=512)
    kernel(q, cache, lengths, 512)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernel(q, cache, lengths, 512)
    lengths.copy_(torch.tensor([300, 1, 511, 42], device="cuda"))
    cache.block_table.copy_(cache.block_table.roll(1, dims=0).roll(3, dims=1))  # row 0 now holds no block
    graph.replay()
    torch.testing.assert_close(out, reference(q, cache, lengths), atol=2e-5, rtol=2e-5)
