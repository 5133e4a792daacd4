"""What a generation engine takes and returns: token ids in, token ids + sampler logprobs out.

Engines work on token ids only; text is a convenience (`Sample.text`) for verifiers and logs.
Every check here raises `InputError` with a one-line message, before anything reaches an engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from core.errors import InputError

FinishReason = Literal["stop", "length"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _token_id_list(value: object, what: str) -> list[int]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise InputError(f"{what} must be a list of token ids (ints), got {type(value).__name__}")
    ids = list(value)
    bad = next((t for t in ids if not _is_int(t) or t < 0), None)
    if bad is not None:
        raise InputError(f"{what} must hold non-negative int token ids, got {bad!r}")
    return ids


def _stop_string_tuple(value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise InputError(f"stop must be a list of strings, got {type(value).__name__} {value!r}")
    bad = next((s for s in value if not isinstance(s, str) or not s), None)
    if bad is not None:
        raise InputError(f"stop must be a list of non-empty strings, got element {bad!r}")
    return tuple(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one prompt's responses.

    temperature 0 is greedy. top_k None and top_p 1.0 disable those filters. A seed makes the
    request's samples reproducible on the same engine and weights; sample i of n uses seed + i.
    stop_token_ids and stop (strings) end a sample with finish_reason "stop"; the EOS token does
    too unless ignore_eos. logprobs=True returns one logprob per generated token (see `Sample`).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    max_tokens: int = 16
    stop_token_ids: Sequence[int] = ()  # stored as a tuple
    stop: Sequence[str] = ()  # stored as a tuple
    seed: int | None = None
    logprobs: bool = True
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self._check_counts()
        self._check_filters()
        # Lists are accepted and stored as tuples so the params stay hashable and immutable.
        object.__setattr__(
            self, "stop_token_ids", tuple(_token_id_list(self.stop_token_ids, "stop_token_ids"))
        )
        object.__setattr__(self, "stop", _stop_string_tuple(self.stop))
        if self.seed is not None and not _is_int(self.seed):
            raise InputError(f"seed must be an int or None, got {self.seed!r}")
        if not isinstance(self.logprobs, bool) or not isinstance(self.ignore_eos, bool):
            raise InputError(
                f"logprobs and ignore_eos must be bools, got {self.logprobs!r}, {self.ignore_eos!r}"
            )

    def _check_counts(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise InputError(f"n (samples per prompt) must be an int >= 1, got {self.n!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InputError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")

    def _check_filters(self) -> None:
        if not _is_number(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise InputError(f"top_k must be an int >= 1 or None (no top-k), got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt (token ids) and how to sample it. request_id is echoed back in the result;
    the engine assigns one when it is None. Whether the prompt fits is checked by the engine,
    which knows its context length (`check_fits`)."""

    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None

    def __post_init__(self) -> None:
        ids = _token_id_list(self.prompt_token_ids, "prompt_token_ids")
        if not ids:
            raise InputError("prompt_token_ids is empty: a request needs at least one prompt token")
        object.__setattr__(self, "prompt_token_ids", ids)
        if not isinstance(self.params, SamplingParams):
            raise InputError(
                f"params must be a rollout.types.SamplingParams, got {type(self.params).__name__}"
            )
        if self.request_id is not None and not isinstance(self.request_id, str):
            raise InputError(f"request_id must be a str or None, got {self.request_id!r}")

    def check_fits(self, max_model_len: int, vocab_size: int) -> None:
        """Raise InputError unless prompt + max_tokens fits the context and every id is in the vocab."""
        prompt_len, max_tokens = len(self.prompt_token_ids), self.params.max_tokens
        if prompt_len + max_tokens > max_model_len:
            raise InputError(
                f"request {self.request_id or '(unnamed)'}: prompt of {prompt_len} tokens + max_tokens "
                f"{max_tokens} = {prompt_len + max_tokens} exceeds the engine context of {max_model_len} tokens"
            )
        too_big = [t for t in (*self.prompt_token_ids, *self.params.stop_token_ids) if t >= vocab_size]
        if too_big:
            raise InputError(
                f"request {self.request_id or '(unnamed)'}: token id {too_big[0]} is outside the "
                f"vocabulary of {vocab_size}"
            )


@dataclass(frozen=True)
class Sample:
    """One generated response.

    token_ids include the token that stopped it (EOS or a stop token id); for a stop string they
    run up to the token that completed the string. logprobs[i] is the engine's log-probability of
    token_ids[i] (which distribution is the engine's contract: vLLM returns raw model logprobs,
    pre-temperature and pre-filter); None when the request did not ask for them. text is the
    detokenized response (stop strings removed), None when the engine has no tokenizer.
    loss_mask[i] is 1 when the policy generated token_ids[i] and 0 when something else put it there (a
    multi-turn environment's observation, rollout/multiturn.py; its logprob is a 0.0 placeholder); None
    means every token is the policy's (what an engine returns).
    """

    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: FinishReason
    text: str | None = None
    loss_mask: list[int] | None = None


@dataclass(frozen=True)
class GenerationResult:
    """All samples of one request, produced under a single weight version."""

    request_id: str
    prompt_token_ids: list[int]
    samples: list[Sample]
    weight_version: int
