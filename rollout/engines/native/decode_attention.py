"""Split-K decode attention (flash-decoding) in Triton over a paged KV cache: one query token per row,
exact-length key reads through the block table.

Why: at decode the step is bound by reading the KV cache. SDPA with a (b, 1, 1, L) mask reads every row's
keys up to the batch's (bucketed) kv length; this kernel reads each row's own length only, so a batch whose
sequences average half the bucket reads half the bytes. The cache layout is the engine's paged one
(kv_cache.py): k/v (num_blocks, n_kv, block_size, d) and a block table (rows, max_blocks) int32; key
position p of row r is at (table[r, p // block_size], head, p % block_size). Nothing is copied or repacked.
Tiles of BLOCK_N keys start BLOCK_N-aligned: with block_size >= BLOCK_N a tile lies in one block (one
table entry, one contiguous tile load, as an unpaged cache reads); with smaller blocks each key's table
entry is loaded (from cache) and its K/V row, a contiguous d-vector, gathered.

Work split: program (row, kv head, split) takes the group_size query heads that share the kv head (GQA
without repeating K/V) and keys [split * chunk, (split + 1) * chunk) of that row, clipped to the row's length
(and sliding window). It writes an unnormalised-free partial output and its log-sum-exp; `combine_splits`
merges the splits in fp32. The grid depends only on (rows, kv bucket), so a CUDA graph can capture it; rows
whose length ends before a split just write an empty partial (lse = -inf).
"""

from __future__ import annotations

import math

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs run the SDPA path instead.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# On one H200 at the llama_1b decode shape (b 256, 16 heads x 128, 256 keys per row, 537 MB of K/V per
# layer) these run at ~3.2 TB/s (scripts/tune_decode_attention.py sweeps them).
CHUNK = 512  # keys per split
BLOCK_N = 64  # keys per inner iteration
NUM_WARPS = 4
NUM_STAGES = 3


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _split_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        table_ptr,
        lens_ptr,
        out_ptr,
        lse_ptr,
        stride_qb,
        stride_qh,
        stride_tb,
        stride_kb,
        stride_kh,
        stride_kl,
        stride_vb,
        stride_vh,
        stride_vl,
        stride_ob,
        stride_oh,
        stride_os,
        stride_lb,
        stride_lh,
        sm_scale,
        window,
        GROUP: tl.constexpr,
        G_PAD: tl.constexpr,
        D: tl.constexpr,
        CHUNK_: tl.constexpr,
        BLOCK: tl.constexpr,
        PAGE: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(lens_ptr + row)
        lo = split * CHUNK_
        hi = tl.minimum(lo + CHUNK_, length)
        if HAS_WINDOW:
            lo = tl.maximum(lo, length - window)
        first = (lo // BLOCK) * BLOCK  # tiles start BLOCK-aligned: with PAGE >= BLOCK a tile is in one page

        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D)
        heads = kv_head * GROUP + offs_g
        g_mask = offs_g < GROUP
        q = tl.load(
            q_ptr + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=g_mask[:, None],
            other=0.0,
        )  # (G_PAD, D)
        table_row = table_ptr + row * stride_tb
        k_base = k_ptr + kv_head * stride_kh
        v_base = v_ptr + kv_head * stride_vh

        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        for start in range(first, hi, BLOCK):
            offs_n = start + tl.arange(0, BLOCK)
            n_mask = (offs_n >= lo) & (offs_n < hi)
            # int64: a large pool's element offsets exceed 2**31.
            if PAGE >= BLOCK:  # one table entry, one contiguous (BLOCK, D) tile
                block = tl.load(table_row + start // PAGE).to(tl.int64)
                offset = start % PAGE + tl.arange(0, BLOCK)
            else:  # the entry of each key; each key's row is a contiguous D-vector
                block = tl.load(table_row + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
                offset = offs_n % PAGE
            k_rows = block * stride_kb + offset * stride_kl  # (BLOCK,)
            v_rows = block * stride_vb + offset * stride_vl
            k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
            v = tl.load(v_base + v_rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
            # The group's query heads share the K/V tiles on tensor cores (one head: padded to 16 rows, which
            # measured faster than a CUDA-core dot product per key).
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale  # (G_PAD, BLOCK) fp32
            scores = tl.where(n_mask[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        has_keys = l_i > 0
        out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        o_ptrs = out_ptr + row * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
        tl.store(o_ptrs, out, mask=g_mask[:, None])
        tl.store(lse_ptr + row * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


def combine_splits(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """out (b, n_heads, S, d) fp32 per-split attention, lse (b, n_heads, S) -> (b, n_heads, d) fp32."""
    m = lse.amax(dim=-1, keepdim=True)  # every row has >= 1 key, so m is finite
    w = torch.exp(lse - m)  # (b, n_heads, S), 0 for empty splits
    return (out * w[..., None]).sum(dim=2) / w.sum(dim=-1)[..., None]


def split_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    kv_len: int,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel alone: per-split outputs (b, n_heads, S, d) fp32 and log-sum-exps (b, n_heads, S), for a
    caller that fuses `combine_splits` into its own (compiled) epilogue. Arguments as decode_attention."""
    b, n_heads, d = q.shape
    n_kv, page = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    splits = max(1, math.ceil(kv_len / CHUNK))
    out = torch.empty(b, n_heads, splits, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(b, n_heads, splits, device=q.device, dtype=torch.float32)
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and q.stride(-1) == 1
    assert block_table.dtype == torch.int32 and block_table.stride(-1) == 1
    _split_kernel[(b, n_kv, splits)](
        q,
        k_cache,
        v_cache,
        block_table,
        lengths,
        out,
        lse,
        q.stride(0),
        q.stride(1),
        block_table.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        lse.stride(0),
        lse.stride(1),
        1.0 / math.sqrt(d),
        sliding_window or 0,
        GROUP=group,
        G_PAD=max(16, triton.next_power_of_2(group)),
        D=d,
        CHUNK_=CHUNK,
        BLOCK=BLOCK_N,
        PAGE=page,
        HAS_WINDOW=sliding_window is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays exact (no TF32)
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    return out, lse


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    kv_len: int,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q (b, n_heads, d) of one new token per row; k/v_cache (num_blocks, n_kv, block_size, d) paged;
    block_table (>= b, max_blocks) int32, rows [0, b) used; lengths (b,) int keys each row attends
    ([length - window, length) with a window), all <= kv_len <= max_blocks * block_size.
    -> (b, n_heads, d) in q's dtype. kv_len only sizes the grid (a CUDA-graph bucket)."""
    out, lse = split_attention(q, k_cache, v_cache, block_table, lengths, kv_len, sliding_window)
    return combine_splits(out, lse).to(q.dtype)


def reference_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """What decode_attention computes, in plain torch (fp32, one row at a time): each row's keys gathered
    through its table entries, softmax(q k^T / sqrt(d)) v over [length - window, length)."""
    b, n_heads, d = q.shape
    n_kv, page = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(b, n_heads, d, dtype=torch.float32, device=q.device)
    for row in range(b):
        length = int(lengths[row])
        lo = max(0, length - sliding_window) if sliding_window is not None else 0
        positions = torch.arange(lo, length, device=q.device)
        blocks = block_table[row, positions // page].long()
        k = k_cache[blocks, :, positions % page].float()  # (L, n_kv, d)
        v = v_cache[blocks, :, positions % page].float()
        k = k.repeat_interleave(n_heads // n_kv, dim=1).transpose(0, 1)  # (n_heads, L, d)
        v = v.repeat_interleave(n_heads // n_kv, dim=1).transpose(0, 1)
        scores = (q[row].float()[:, None, :] @ k.transpose(1, 2))[:, 0] / math.sqrt(d)  # (n_heads, L)
        out[row] = (scores.softmax(-1)[:, None, :] @ v)[:, 0]
    return out
