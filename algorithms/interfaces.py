"""The small interfaces the RL loops are written against.

A loop (algorithms/grpo.py, ...) only calls these methods, so the same loop drives in-process objects
(a unit test, a single-process run) and Ray worker groups (rl/ wraps a group of policy workers in an
object with the same methods, and fans each call out to its ranks). Implementations decide where the work
runs; the loop decides what runs and in which order.

Batches are dicts of tensors, B sequences right-padded to T (see algorithms/grpo.py `build_batch`):
input_ids (B, T) long, response_mask (B, T) 1 on generated tokens, and token-aligned per-token tensors
(value[:, t] belongs to input_ids[:, t]; position 0 is always 0): old_logprobs, ref_logprobs, advantages.
A worker group splits a batch over its data-parallel ranks and gathers results back in order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from rollout.environments import Completion, Score
from rollout.types import GenerationRequest, GenerationResult

Batch = dict[str, torch.Tensor]


@runtime_checkable
class Policy(Protocol):
    """The model being trained, with its optimizer and LR schedule."""

    def logprobs(self, batch: Batch, with_entropy: bool = False) -> dict[str, torch.Tensor]:
        """{"logprobs": (B, T) token-aligned fp32 [, "entropy": (B, T)]} of batch["input_ids"], no grad."""
        ...

    def train(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on the batch (micro-batched inside); returns metrics such as loss,
        grad_norm, lr, clip_frac, kl, entropy (averaged over the batch's response tokens)."""
        ...

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The whole model as HF-named full tensors, one at a time (what a generator's refit consumes)."""
        ...

    def save(self, path: str | Path) -> None:
        """Model + optimizer + schedule state under `path` (a directory the caller makes atomic)."""
        ...

    def load(self, path: str | Path) -> None:
        """Restore what `save` wrote, at any parallel layout."""
        ...


@runtime_checkable
class Reference(Protocol):
    """A frozen model the KL penalty is measured against (usually the initial policy)."""

    def logprobs(self, batch: Batch, with_entropy: bool = False) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class Generator(Protocol):
    """Generation engines (rollout.engines.GenerationEngine satisfies it as is).

    Every result carries the weight version it was generated under; `update_weights` takes the whole model
    in one call (HF names) with a version that must increase. sleep/wake_up free and restore memory when
    the engines share devices with training (colocated); on CPU they may do nothing.
    """

    @property
    def weight_version(self) -> int: ...

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...

    def update_weights(self, named_tensors: Iterator[tuple[str, torch.Tensor]], version: int) -> None: ...

    def sleep(self, level: int = 1) -> None: ...

    def wake_up(self) -> None: ...


class WeightSync(Protocol):
    """Makes the generator sample from the policy's current weights, as `version` (refit, phase 2).

    In-process and colocated with our native engine it only rebinds the training model (no copy); otherwise
    it streams `policy.hf_weights()` into `generator.update_weights`; on a cluster, policy workers broadcast
    to engine workers. The loop never needs to know which.
    """

    def __call__(self, version: int) -> None: ...


@runtime_checkable
class Environment(Protocol):
    """Scores decoded completions (rollout.environments.Environment satisfies it)."""

    def score(self, completions: Sequence[Completion]) -> list[Score]: ...
