"""Host-side state of one sample being generated, its stop conditions, and per-request result assembly."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rollout.engines.base import EmitSamples
from rollout.types import FinishReason, GenerationRequest, Sample, SamplingParams


@dataclass(eq=False)
class SampleState:
    """Sample `sample` of request `request` (its index in the batch). key seeds its sampling noise."""

    request: int
    sample: int
    prompt: list[int]
    params: SamplingParams
    key: int
    slot: int = -1  # its row in the batch and block table while running
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str | None = None  # set when a stop string ended it: the text before the stop string
    text_searched: int = 0  # length of the decoded text already searched for stop strings

    @property
    def prefill_ids(self) -> list[int]:
        """What admitting it prefills: the prompt, and the tokens it had when preempted."""
        return self.prompt + self.tokens

    @property
    def group(self) -> object:
        """Samples admitted together with the same group share one prefill and its blocks: the samples
        of a request, unless resumed after preemption (their own tokens follow the prompt)."""
        return self if self.tokens else self.request

    @property
    def next_position(self) -> int:
        """Position of the last sampled token: the next decode step feeds it there."""
        return len(self.prompt) + len(self.tokens) - 1


class StopChecker:
    """Decides after each token whether a sample is finished, as vLLM does: EOS (unless ignore_eos) or
    a stop token id -> "stop"; a stop string in the decoded text (skip_special_tokens) -> "stop";
    max_tokens reached -> "length". A stop wins over length on the same token."""

    def __init__(self, eos_token_ids: frozenset[int], tokenizer: Any | None):
        self.eos_token_ids, self.tokenizer = eos_token_ids, tokenizer

    def __call__(self, state: SampleState) -> FinishReason | None:
        token, params = state.tokens[-1], state.params
        if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            return "stop"
        if params.stop and self._stop_string(state):
            return "stop"
        return "length" if len(state.tokens) >= params.max_tokens else None

    def _stop_string(self, state: SampleState) -> bool:
        """Search only text that could hold a new match; cut the text before the earliest one."""
        text = self.decode(state.tokens)
        found = []
        for stop in state.params.stop:
            at = text.find(stop, max(0, state.text_searched - len(stop) + 1))
            if at >= 0:
                found.append(at)
        state.text_searched = len(text)
        if found:
            state.text = text[: min(found)]
        return bool(found)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def to_sample(self, state: SampleState, reason: FinishReason) -> Sample:
        text = None
        if self.tokenizer is not None:
            text = state.text if state.text is not None else self.decode(state.tokens)
        logprobs = list(state.logprobs) if state.params.logprobs else None
        return Sample(list(state.tokens), logprobs, reason, text)


class RequestResults:
    """Collects the samples of each request and emits a request as soon as all of its samples are done."""

    def __init__(self, requests: Sequence[GenerationRequest], emit: EmitSamples):
        self._emit = emit
        self._samples: list[list[Sample | None]] = [[None] * r.params.n for r in requests]
        self._left = [r.params.n for r in requests]

    def add(self, state: SampleState, sample: Sample) -> None:
        self._samples[state.request][state.sample] = sample
        self._left[state.request] -= 1
        if self._left[state.request] == 0:
            self._emit(state.request, [s for s in self._samples[state.request] if s is not None])
