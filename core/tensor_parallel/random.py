"""RNG states for dropout under tensor parallelism (Megatron's RNG tracker, without globals).

Two streams:
- the default torch generators, seeded identically on all tp ranks: dropout on activations that are
  replicated across tp (e.g. the residual stream without sequence parallelism) must draw the same
  mask on every tp rank, or the replicas diverge;
- a tracked "tp" stream seeded with seed + 2718 + tp_rank: dropout on tp-sharded activations
  (attention probabilities of this rank's heads, or the residual stream's sequence shard under
  sequence parallelism) must draw *different* masks per shard, as the unsharded model would.

    tracker = seed_model_parallel(seed, groups.tp_rank)
    with tracker.fork():                  # tp-sharded region
        probs = F.dropout(probs, p)

States cover the CPU generator and, when CUDA is available, the current CUDA device's generator.
get_states/set_states let activation recomputation replay the same masks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

TP_RNG = "tp"
_TP_SEED_OFFSET = 2718  # Megatron's offset, so the tp stream never equals the default stream


@dataclass
class RNGState:
    cpu: torch.Tensor
    cuda: torch.Tensor | None


def _get_state() -> RNGState:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return RNGState(cpu=torch.get_rng_state(), cuda=cuda)


def _set_state(state: RNGState) -> None:
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state(state.cuda)


def _seeded_state(seed: int) -> RNGState:
    """The generator state after seeding with `seed`, leaving the current state untouched."""
    saved = _get_state()
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
    state = _get_state()
    _set_state(saved)
    return state


class RNGStatesTracker:
    """Named RNG streams that a `fork` swaps in and out of torch's default generators."""

    def __init__(self) -> None:
        self._states: dict[str, RNGState] = {}

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        self._states[name] = _seeded_state(seed)

    @contextmanager
    def fork(self, name: str = TP_RNG) -> Iterator[None]:
        """Draw from stream `name` inside the block; the default stream resumes where it was."""
        if name not in self._states:
            raise KeyError(f"unknown RNG stream {name!r}; known: {sorted(self._states)}")
        outside = _get_state()
        _set_state(self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_state()
            _set_state(outside)

    def get_states(self) -> dict[str, RNGState]:
        return dict(self._states)

    def set_states(self, states: dict[str, RNGState]) -> None:
        self._states = dict(states)


def seed_model_parallel(seed: int, tp_rank: int) -> RNGStatesTracker:
    """Seed torch's default generators with `seed` (same on all tp ranks: pass the same seed) and
    return a tracker whose "tp" stream is seeded per tp rank. Ranks that must differ in their default
    stream (e.g. pipeline stages or data-parallel replicas, if wanted) pass different seeds."""
    torch.manual_seed(seed)
    tracker = RNGStatesTracker()
    tracker.add(TP_RNG, seed + _TP_SEED_OFFSET + tp_rank)
    return tracker
