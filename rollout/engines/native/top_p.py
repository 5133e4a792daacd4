"""Top-p (nucleus) sampling without a vocabulary sort: one Triton program per row, Gumbel-max draws
rejected until the draw lies in the nucleus.

Why: `sampler.filter_threshold` sorts every row of the (S, V) logits to find the nucleus; at S = 256 and a
128k vocabulary that sort costs about as much as a decode step's attention. The nucleus never needs to be
listed, only recognised: with raw logits l, the nucleus is {i : l_i >= t*} where t* is the smallest logit
whose strictly-more-likely mass P(l > t*) is below top_p (the set `filter_threshold` keeps, ties
included). So token x is in it iff P(l > l_x) < top_p, one masked sum over the row.

The draw: x = argmax over the candidate set of (l / T + g), g the sampler's counter-based Gumbel noise
(the same hash of key, step and vocab id). If x is outside the nucleus, every token at or below l_x is
too, so the candidate set shrinks to {l > l_x} and the argmax is taken again with the same noise. The
candidate set always contains the nucleus, so the accepted x is argmax over the nucleus of (l / T + g):
exactly the token `sampler._draw` picks after masking below `filter_threshold` (an exact draw from the
renormalised tempered nucleus), up to float rounding at the boundary. A draw outside the nucleus has
probability at most 1 - top_p, and each retry removes the tail mass below it, so a row takes about two
passes over its logits plus two per (rare) retry, instead of a sort.

Rows with temperature 0 take the raw argmax (first index on ties); logprobs are raw (log_softmax of the
unscaled logits at the token), as everywhere in the engine.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; elsewhere the sampler sorts instead.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 2048  # vocab entries per inner iteration
NUM_WARPS = 8


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _fmix32(h):
        """MurmurHash3's 32-bit finalizer on uint32 (wrapping multiplies), as sampler._fmix32."""
        h = h ^ (h >> 16)
        h = h * 0x85EBCA6B
        h = h ^ (h >> 13)
        h = h * 0xC2B2AE35
        return h ^ (h >> 16)

    @triton.jit
    def _neg_log(u):
        """-log(u), accurate near 1 (sampler.neg_log: tl.log is lg2.approx on NVIDIA GPUs)."""
        w = 1.0 - u
        series = w * (1.0 + w * (0.5 + w * (1.0 / 3.0 + w * (0.25 + w * (0.2 + w * (1.0 / 6.0))))))
        return tl.where(w < 0.0625, series, -tl.log(u))

    @triton.jit
    def _gumbel(row_hash, offs):
        """Gumbel noise of vocab ids offs for a row whose (key, step) hash is row_hash (sampler.uniform_noise)."""
        h = _fmix32(row_hash ^ _fmix32(offs.to(tl.uint32) ^ 0x632BE5AB))
        m = tl.minimum(h >> 8, 16777214)  # as sampler.to_uniform: never 0 or 1
        u = (m.to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        return -tl.log(_neg_log(u))

    @triton.jit
    def _load_block(logits_row, start, V, BLOCK: tl.constexpr):
        """Vocab ids [start, start + BLOCK) of a row, their mask and their logits in fp32 (-inf past V)."""
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        return offs, mask, tl.load(logits_row + offs, mask=mask, other=-float("inf")).to(tl.float32)

    @triton.jit
    def _argmax_above(logits_row, row_hash, inv_scale, pivot, V, BLOCK: tl.constexpr):
        """argmax over {i : l_i > pivot} of l_i * inv_scale + gumbel_i (first index on ties)."""
        best = -float("inf")
        best_idx = 0
        for start in range(0, V, BLOCK):
            offs, mask, lg = _load_block(logits_row, start, V, BLOCK)
            s = tl.where(mask & (lg > pivot), lg * inv_scale + _gumbel(row_hash, offs), -float("inf"))
            blk = tl.max(s, axis=0)
            idx = tl.argmax(s, axis=0) + start
            better = blk > best
            best_idx = tl.where(better, idx, best_idx)
            best = tl.where(better, blk, best)
        return best_idx

    @triton.jit
    def _top_p_kernel(
        logits_ptr,
        stride_row,
        temperature_ptr,
        top_p_ptr,
        keys_ptr,
        steps_ptr,
        tokens_ptr,
        logprobs_ptr,
        retries_ptr,
        V,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        logits_row = logits_ptr + row.to(tl.int64) * stride_row
        temperature = tl.load(temperature_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        greedy = temperature == 0.0
        inv_scale = 1.0 / tl.where(greedy, 1.0, temperature)

        # Pass 1: raw and tempered log-sum-exp (online) and the raw argmax.
        raw_max = -float("inf")
        raw_sum = 0.0
        t_max = -float("inf")
        t_sum = 0.0
        arg_val = -float("inf")
        arg_idx = 0
        for start in range(0, V, BLOCK):
            offs, mask, lg = _load_block(logits_row, start, V, BLOCK)
            blk = tl.max(lg, axis=0)
            idx = tl.argmax(lg, axis=0) + start
            better = blk > arg_val
            arg_idx = tl.where(better, idx, arg_idx)
            arg_val = tl.where(better, blk, arg_val)
            new_max = tl.maximum(raw_max, blk)
            raw_sum = raw_sum * tl.exp(raw_max - new_max) + tl.sum(tl.exp(lg - new_max), axis=0)
            raw_max = new_max
            s = lg * inv_scale
            new_t = tl.maximum(t_max, blk * inv_scale)
            t_sum = t_sum * tl.exp(t_max - new_t) + tl.sum(tl.exp(s - new_t), axis=0)
            t_max = new_t
        raw_lse = raw_max + tl.log(raw_sum)

        token = arg_idx
        retries = 0
        if not greedy:
            k_lo = tl.load(keys_ptr + 2 * row).to(tl.uint32)
            k_hi = tl.load(keys_ptr + 2 * row + 1).to(tl.uint32)
            step = tl.load(steps_ptr + row).to(tl.uint32)
            row_hash = _fmix32(_fmix32(_fmix32(k_lo ^ 0x9E3779B9) ^ k_hi) ^ step)
            token = _argmax_above(logits_row, row_hash, inv_scale, -float("inf"), V, BLOCK)
            searching = top_p < 1.0
            while searching:
                l_x = tl.load(logits_row + token).to(tl.float32)
                above = 0.0  # tempered probability mass strictly more likely than the draw
                for start in range(0, V, BLOCK):
                    offs, mask, lg = _load_block(logits_row, start, V, BLOCK)
                    p = tl.exp(lg * inv_scale - t_max)
                    above += tl.sum(tl.where(mask & (lg > l_x), p, 0.0), axis=0)
                searching = above / t_sum >= top_p
                if searching:
                    retries += 1
                    token = _argmax_above(logits_row, row_hash, inv_scale, l_x, V, BLOCK)
        l_token = tl.load(logits_row + token).to(tl.float32)
        tl.store(tokens_ptr + row, token.to(tl.int64))
        tl.store(logprobs_ptr + row, l_token - raw_lse)
        tl.store(retries_ptr + row, retries)


def sample_top_p(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    keys: torch.Tensor,
    steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (S, V) any float dtype, temperature (S,) fp32 (0: greedy), top_p (S,) fp32 (>= 1: off), keys
    (S, 2) int64, steps (S,) int64 -> tokens (S,) int64, raw logprobs (S,) fp32, retries (S,) int32
    (draws rejected for lying outside the nucleus). No host sync; one program per row."""
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    retries = torch.empty(rows, dtype=torch.int32, device=logits.device)
    if rows:
        _top_p_kernel[(rows,)](
            logits,
            logits.stride(0),
            temperature.float().contiguous(),
            top_p.float().contiguous(),
            keys.contiguous(),
            steps.contiguous(),
            tokens,
            logprobs,
            retries,
            vocab,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    return tokens, logprobs, retries
