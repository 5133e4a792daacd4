"""Batched sampling on the device: temperature, top-k, top-p, greedy, seeded, with raw logprobs.

Randomness is counter-based: the Gumbel noise of row r over the vocabulary is a hash of
(the row's 64-bit key, the index of the token being sampled, vocab id), and a token is drawn as
argmax(filtered_logits / temperature + gumbel) -- the Gumbel-max trick, an exact draw from
softmax(filtered_logits / temperature). So a sample's randomness depends only on its key and
position: not on which slot it sits in, what else is in the batch, the batch size, the tensor-parallel
size or CUDA graphs. No per-row torch.Generator (one kernel per row per step) and no generator state to
capture in a CUDA graph; every TP rank draws the same token from the same gathered logits.

Logprobs are RAW: log_softmax of the unscaled, unfiltered logits at the chosen token (vLLM's
logprobs_mode="raw_logprobs"), the quantity the trainer recomputes, whatever temperature or filter
the token was drawn with.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rollout.engines.native import top_p as top_p_kernel
from rollout.types import SamplingParams

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), split in 16-bit halves so no int64 product overflows."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer (a bijection with full avalanche) on int64 holding uint32 values."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def uniform_noise(keys: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """keys (S, 2) int64 (low, high 32 bits), steps (S,) int64 -> uniforms (S, V) fp32 in (0, 1).

    Pure function of (key, step, vocab id): reproducible anywhere, in any batch."""
    row = _fmix32(_fmix32(keys[:, 0] ^ 0x9E3779B9) ^ keys[:, 1])  # (S,)
    row = _fmix32(row ^ (steps & _MASK32))  # (S,)
    vocab = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    h = _fmix32(row[:, None] ^ _fmix32(vocab ^ 0x632BE5AB)[None, :])  # (S, V)
    return to_uniform(h)


def to_uniform(h: torch.Tensor) -> torch.Tensor:
    """uint32 hashes (in int64) -> fp32 uniforms in (0, 1) from their top 24 bits m: (m + 0.5) * 2**-24.
    m = 2**24 - 1 is read as 2**24 - 2: its m + 0.5 would round to 2**24 in fp32, u = 1, an infinite Gumbel
    noise that wins the draw whatever the logits (one token in 2**24: ~0.8% of draws over a 128k vocabulary)."""
    return ((h >> 8).clamp(max=(1 << 24) - 2).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def split_key(key: int) -> tuple[int, int]:
    """A Python int key (any sign or size) -> its low and high 32 bits mod 2**64."""
    key &= _MASK64
    return key & _MASK32, key >> 32


def filter_threshold(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """logits (S, V) raw, temperature (S,) fp32 (0: greedy, read as 1), top_k (S,) int64 (V: off), top_p
    (S,) fp32 (1: off) -> (S, 1) fp32: the smallest raw logit a row keeps. Top-k first, then top-p over
    the top-k renormalised distribution at the row's temperature (vLLM's order); the most likely token is
    always kept. The kept tokens are those whose raw logit is >= the threshold, so tokens tied with the
    last kept one are kept too (the set does not depend on how a sort orders ties, on any device).
    Scaling by a positive temperature keeps the order, so the raw logits sort for every temperature."""
    logits = logits.float()
    sorted_logits = logits.sort(dim=-1, descending=True).values  # (S, V)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    in_top_k = rank[None, :] < top_k[:, None]  # (S, V)
    scale = torch.where(temperature == 0, 1.0, temperature)[:, None]
    probs = (sorted_logits / scale).masked_fill(~in_top_k, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (S, V) probability of the more likely tokens
    kept = (in_top_k & (mass_before < top_p[:, None])).sum(dim=-1).clamp(min=1)  # (S,) a prefix
    return sorted_logits.gather(-1, (kept - 1)[:, None])


class Filters(enum.IntEnum):
    """Which vocabulary filters a batch's sampled rows use (falsy when none)."""

    NONE = 0
    TOP_P = 1  # top-p only: the sort-free kernel on CUDA (top_p.py)
    TOP_K = 2  # top-k, maybe with top-p: one vocab sort per row


@dataclass
class SamplingRows:
    """Per-row sampling parameters as device tensors, all (S,) except keys (S, 2)."""

    temperature: torch.Tensor  # fp32; 0 = greedy
    top_k: torch.Tensor  # int64; vocab_size = no top-k
    top_p: torch.Tensor  # fp32; 1 = no top-p
    keys: torch.Tensor  # int64 (S, 2): low, high 32 bits of the noise key

    def index(self, rows: torch.Tensor) -> SamplingRows:
        return SamplingRows(*(t.index_select(0, rows) for t in self._fields()))

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return self.temperature, self.top_k, self.top_p, self.keys


class SlotSamplingTable:
    """The sampling parameters of every KV-cache slot, on the device, written when a slot is filled."""

    def __init__(self, num_slots: int, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.rows = SamplingRows(
            temperature=torch.ones(num_slots, device=device),
            top_k=torch.full((num_slots,), vocab_size, dtype=torch.int64, device=device),
            top_p=torch.ones(num_slots, device=device),
            keys=torch.zeros(num_slots, 2, dtype=torch.int64, device=device),
        )
        self._filtered: set[int] = set()  # slots whose params use top-k or top-p
        self._top_k: set[int] = set()  # slots whose params use top-k
        self._random: set[int] = set()  # slots that sample (temperature > 0)

    def assign(self, slots: Sequence[int], params: Sequence[SamplingParams], keys: Sequence[int]) -> None:
        """Write the params and noise keys of newly filled slots (one small host->device copy each)."""
        device = self.rows.temperature.device
        index = torch.tensor(list(slots), dtype=torch.int64, device=device)
        values = SamplingRows(
            temperature=torch.tensor([float(p.temperature) for p in params]),
            top_k=torch.tensor([min(p.top_k or self.vocab_size, self.vocab_size) for p in params]),
            top_p=torch.tensor([float(p.top_p) for p in params]),
            keys=torch.tensor([split_key(k) for k in keys], dtype=torch.int64).view(-1, 2),
        )
        for table, new in zip(self.rows._fields(), values._fields(), strict=True):
            table.index_copy_(0, index, new.to(device=device, dtype=table.dtype))
        for slot, p in zip(slots, params, strict=True):
            _set_membership(self._filtered, slot, needs_filter(p, self.vocab_size))
            _set_membership(
                self._top_k, slot, needs_filter(p, self.vocab_size) and uses_top_k(p, self.vocab_size)
            )
            _set_membership(self._random, slot, not p.greedy)

    def any_filtered(self, slots: Sequence[int]) -> Filters:
        if self._filtered.isdisjoint(slots):
            return Filters.NONE
        return Filters.TOP_P if self._top_k.isdisjoint(slots) else Filters.TOP_K

    def any_random(self, slots: Sequence[int]) -> bool:
        return not self._random.isdisjoint(slots)


def _set_membership(members: set[int], slot: int, member: bool) -> None:
    if member:
        members.add(slot)
    else:
        members.discard(slot)


def uses_top_k(params: SamplingParams, vocab_size: int) -> bool:
    return 0 < (params.top_k or vocab_size) < vocab_size


def needs_filter(params: SamplingParams, vocab_size: int) -> bool:
    return not params.greedy and (uses_top_k(params, vocab_size) or params.top_p < 1.0)


def sample(
    logits: torch.Tensor,
    rows: SamplingRows,
    steps: torch.Tensor,
    apply_filters: bool | Filters = True,
    any_random: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (S, V) full-vocab, steps (S,) index of the token being drawn in its sample ->
    token ids (S,) int64 and their raw logprobs (S,) fp32.

    Greedy rows (temperature 0) take the argmax of the raw logits (first index on ties, as torch and
    HF do). The caller may skip work it knows is not needed: apply_filters=False when no row uses
    top-k/top-p (no vocab sort), any_random=False when every row is greedy (no noise). Filters.TOP_P
    (no row uses top-k) takes the sort-free rejection kernel on CUDA (top_p.py: the same tokens).

    On CUDA the draw is one Inductor-compiled function: the fp32 upcast, filter mask, noise hash, Gumbel
    argmax and log-sum-exp read the (S, V) logits a few times instead of writing a dozen (S, V)
    temporaries (each a full pass over memory in eager mode). Filters add one eager vocab sort per row
    before it (`filter_threshold`: sort, softmax, cumsum; Inductor's split cumsum did not compile, torch
    2.11), reduced to one threshold per row. No host sync either way."""
    threshold = None
    if apply_filters is Filters.TOP_P and any_random and top_p_kernel.available(logits.device):
        tokens, logprobs, _ = top_p_kernel.sample_top_p(
            logits, rows.temperature, rows.top_p, rows.keys, steps
        )
        return tokens, logprobs
    if apply_filters and any_random:
        threshold = filter_threshold(logits, rows.temperature, rows.top_k, rows.top_p)  # (S, 1)
    draw = _compiled(_draw) if logits.is_cuda else _draw
    return draw(logits, rows.temperature, rows.keys, steps, any_random, threshold)


def neg_log(u: torch.Tensor) -> torch.Tensor:
    """-log(u) for u in (0, 1), accurate near 1 too: there -log(u) ~ 1 - u, which a fast log (CUDA's
    lg2.approx, as compiled kernels use) loses entirely -- it can even return 0, making that token's Gumbel
    noise infinite. Below 1/16 of 1 - u, the series w + w^2/2 + ... + w^6/6 (relative error < 1e-8)."""
    w = 1.0 - u  # exact for u >= 1/2
    series = w * (1.0 + w * (0.5 + w * (1.0 / 3.0 + w * (0.25 + w * (0.2 + w * (1.0 / 6.0))))))
    return torch.where(w < 0.0625, series, -torch.log(u))


def _gumbel_argmax(scaled: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """scaled (S, V) fp32 temperature-scaled (filtered) logits -> Gumbel-max draws (S,) int64."""
    gumbel = -torch.log(neg_log(uniform_noise(keys, steps, scaled.shape[-1])))
    return (scaled + gumbel).argmax(dim=-1)


def _raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax of fp32 logits (S, V) at tokens (S,), without writing the (S, V) log-probabilities."""
    return logits.gather(-1, tokens[:, None]).squeeze(-1) - logits.logsumexp(dim=-1)


def _draw(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    keys: torch.Tensor,
    steps: torch.Tensor,
    any_random: bool,
    threshold: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (S, V) any float dtype, threshold (S, 1) raw logits below which a token is filtered out (or
    None) -> tokens (S,) int64, raw logprobs (S,) fp32."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)  # (S,)
    if any_random:
        greedy = temperature == 0
        scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
        if threshold is not None:  # compared on raw logits: exact, whatever the division's rounding
            scaled = scaled.masked_fill(logits < threshold, float("-inf"))
        tokens = torch.where(greedy, tokens, _gumbel_argmax(scaled, keys, steps))
    return tokens, _raw_logprobs(logits, tokens)


_COMPILED: dict[Callable, Callable] = {}


def _compiled(draw: Callable) -> Callable:
    """The Inductor-compiled draw (dynamic over the number of rows), compiled once per process."""
    if draw not in _COMPILED:
        _COMPILED[draw] = torch.compile(draw, dynamic=True)
    return _COMPILED[draw]
