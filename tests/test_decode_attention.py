"""The Triton split-K decode kernel against masked SDPA (the CPU path), on the GPU."""

from __future__ import annotations

import pytest
import torch

from rollout.engines.native import decode_attention as flash_decode
from rollout.engines.native.runner import decode_mask, single_query_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def reference(q, k_cache, v_cache, lengths, kv_len, window):
    """Masked SDPA over keys [0, kv_len) as the engine's CPU path computes it."""
    b = q.shape[0]
    mask = decode_mask(lengths - 1, kv_len, window)
    k, v = k_cache[:b, :, :kv_len], v_cache[:b, :, :kv_len]
    group = q.shape[1] // k.shape[1]
    return single_query_attention(q[:, :, None], k, v, mask, group)[:, :, 0]


@pytest.mark.parametrize(
    ("n_heads", "n_kv", "d", "window", "dtype", "tol"),
    [
        (4, 4, 64, None, torch.float32, 2e-5),  # MHA, fp32: exact up to summation order
        (8, 2, 128, None, torch.float32, 2e-5),  # GQA group 4
        (8, 4, 32, 40, torch.float32, 2e-5),  # sliding window
        (16, 16, 128, None, torch.bfloat16, 2e-2),  # the llama_1b shape in bf16
    ],
)
def test_kernel_matches_masked_sdpa(n_heads, n_kv, d, window, dtype, tol) -> None:
    torch.manual_seed(0)
    slots, max_len, b, kv_len = 12, 1024, 9, 600
    k_cache = torch.randn(slots, n_kv, max_len, d, device="cuda", dtype=dtype)
    v_cache = torch.randn(slots, n_kv, max_len, d, device="cuda", dtype=dtype)
    q = torch.randn(b, n_heads, d, device="cuda", dtype=dtype)
    # Lengths across split boundaries (256), a single key, and the full bucket.
    lengths = torch.tensor([1, 2, 63, 64, 255, 256, 257, 511, 600], device="cuda")
    got = flash_decode.decode_attention(q, k_cache, v_cache, lengths, kv_len, window)
    want = reference(q, k_cache, v_cache, lengths, kv_len, window)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_kernel_is_capturable_in_a_cuda_graph() -> None:
    """Same lengths buffer, new values between replays: the graph reads them in place."""
    torch.manual_seed(1)
    k_cache = torch.randn(4, 2, 512, 64, device="cuda")
    v_cache = torch.randn(4, 2, 512, 64, device="cuda")
    q = torch.randn(4, 4, 64, device="cuda")
    lengths = torch.tensor([5, 6, 7, 8], device="cuda")
    flash_decode.decode_attention(q, k_cache, v_cache, lengths, 512)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flash_decode.decode_attention(q, k_cache, v_cache, lengths, 512)
    lengths.copy_(torch.tensor([300, 1, 511, 42], device="cuda"))
    graph.replay()
    want = reference(q, k_cache, v_cache, lengths, 512, None)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
