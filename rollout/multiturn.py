"""Multi-turn rollouts: many episodes in lockstep through the Generator interface.

The protocol is rollout/environments/multiturn.py's. Each round generates the next turn of every live episode
in one batched `generate` call (the n samples of a request are n episodes), asks the environment about each
new turn, and appends the observations; an episode leaves the batch when the environment ends it or a limit
does. One episode becomes one `Sample` of the whole response, turns and observations interleaved:

    prompt | turn 1 (policy) | observation 1 | turn 2 (policy) | ...   response: everything after the prompt
    loss_mask        1 ... 1 |       0 ... 0 |         1 ... 1 |       1 on the policy's tokens only
    logprobs       sampler's |    0.0 ... 0.0 |      sampler's |       observations have none

The conversation is kept as token ids and never re-tokenized: a turn's ids are the ones the engine sampled
(so the trainer scores exactly the sampled tokens, whatever a tokenizer would merge at a boundary) and an
observation's ids are its text encoded without special tokens.

Limits: environment.max_turns policy turns; the request's max_tokens is the budget of the whole response
(policy and observation tokens), so prompt + max_tokens bounds the context as in single-turn generation. A
turn may use all the budget left; an observation that leaves no room for a policy token ends the episode.
Episode.finish_reason: "stop" (the environment ended it), "length" (budget), "max_turns"; the Sample's is
"stop" or "length" (cut short by either limit).

Seeds: turn k of sample j of a request seeded s draws with seed s + j + k * 2**32. Turn 0 draws what
single-turn generation draws, and an episode's seeds depend only on (s, j, k), never on the other episodes or
which of them are still running (the engine's noise is a pure function of seed and token index), so an
episode draws the same tokens alone or in any batch, and a resumed run replays the same samples. Unseeded
requests stay unseeded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from rollout.environments.base import Completion
from rollout.environments.multiturn import MultiTurnEnvironment
from rollout.types import GenerationRequest, GenerationResult, Sample, SamplingParams

TURN_SEED_STRIDE = 2**32  # turn k of an episode seeded s draws with s + k * TURN_SEED_STRIDE


class Generator(Protocol):
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...


@dataclass(eq=False)
class Episode:
    """One conversation of the policy with the environment. `request` is its turn-0 request (prompt, and
    params with n=1, the episode's own seed and max_tokens = the response budget)."""

    request: GenerationRequest
    row: Mapping[str, Any]
    state: Any
    token_ids: list[int] = field(default_factory=list)  # the response so far (turns + observations)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    turns: list[str] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)
    finish_reason: str | None = None  # None while it runs

    @property
    def budget_left(self) -> int:
        return self.request.params.max_tokens - len(self.token_ids)

    def turn_request(self, turn: int, stop: tuple[str, ...]) -> GenerationRequest:
        params = self.request.params
        seed = None if params.seed is None else params.seed + turn * TURN_SEED_STRIDE
        params = replace(params, seed=seed, max_tokens=self.budget_left, stop=stop, logprobs=True)
        return GenerationRequest(
            self.request.prompt_token_ids + self.token_ids, params, self.request.request_id
        )

    def add(self, token_ids: list[int], logprobs: list[float] | None, policy: bool) -> None:
        self.token_ids += token_ids
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(token_ids)
        self.loss_mask += [int(policy)] * len(token_ids)

    @property
    def transcript(self) -> str:
        """The response as text: turns and observations interleaved."""
        parts = []
        for k, turn in enumerate(self.turns):
            parts += [turn, *self.observations[k : k + 1]]
        return "".join(parts)

    def sample(self) -> Sample:
        reason = "stop" if self.finish_reason == "stop" else "length"
        return Sample(
            list(self.token_ids), list(self.logprobs), reason, self.transcript, list(self.loss_mask)
        )

    def completion(self) -> Completion:
        """What the environment scores: the final turn, with the episode in the row."""
        row = {
            **self.row,
            "turns": list(self.turns),
            "observations": list(self.observations),
            "transcript": self.transcript,
        }
        return Completion(str(self.row["prompt"]), self.turns[-1], self.finish_reason or "length", row)


def run_episodes(
    generator: Generator,
    requests: Sequence[GenerationRequest],
    environment: MultiTurnEnvironment,
    rows: Sequence[Mapping[str, Any]],
    tokenizer: Any,
) -> tuple[list[GenerationResult], list[Episode]]:
    """Run params.n episodes per request (rows[i]: request i's dataset row) to the end; returns one result
    per request (its samples: the episodes' whole responses, with loss_mask) and the episodes, request-major.
    tokenizer: decodes turns (special tokens dropped) and encodes observations (no special tokens added)."""
    if len(requests) != len(rows):
        raise ValueError(f"run_episodes: {len(requests)} requests but {len(rows)} rows")
    episodes = [
        Episode(replace(req, params=_episode_params(req, j)), row, environment.reset(row))
        for req, row in zip(requests, rows, strict=True)
        for j in range(req.params.n)
    ]
    versions = set()
    for turn in range(environment.max_turns):
        live = [e for e in episodes if e.finish_reason is None]
        if not live:
            break
        turn_results = generator.generate(
            [e.turn_request(turn, _turn_stop(e.request, environment)) for e in live]
        )
        for episode, result in zip(live, turn_results, strict=True):
            versions.add(result.weight_version)
            last = turn + 1 == environment.max_turns
            _advance(episode, result.samples[0], environment, tokenizer, last)
    if len(versions) > 1:
        raise RuntimeError(f"run_episodes: the generator's weights changed mid-episode (versions {versions})")
    version = versions.pop() if versions else 0
    results, start = [], 0
    for i, req in enumerate(requests):
        samples = [e.sample() for e in episodes[start : start + req.params.n]]
        results.append(GenerationResult(req.request_id or str(i), req.prompt_token_ids, samples, version))
        start += req.params.n
    return results, episodes


def _episode_params(request: GenerationRequest, j: int) -> SamplingParams:
    params = request.params
    return replace(params, n=1, seed=None if params.seed is None else params.seed + j)


def _turn_stop(request: GenerationRequest, environment: MultiTurnEnvironment) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*request.params.stop, *environment.turn_stop)))


def _advance(
    episode: Episode, sample: Sample, environment: MultiTurnEnvironment, tokenizer: Any, last_turn: bool
) -> None:
    """Record a generated turn, then end the episode or append the environment's observation."""
    episode.add(sample.token_ids, sample.logprobs, policy=True)
    turn = tokenizer.decode(sample.token_ids, skip_special_tokens=True)
    episode.turns.append(turn)
    if sample.finish_reason == "length":  # the turn used up the response budget
        episode.finish_reason = "length"
        return
    observation = environment.step(episode.state, turn)
    if observation is None:
        episode.finish_reason = "stop"
        return
    if last_turn:
        episode.finish_reason = "max_turns"
        return
    ids = tokenizer(observation, add_special_tokens=False)["input_ids"]
    if len(ids) >= episode.budget_left:  # no room left for the policy to answer it
        episode.finish_reason = "length"
        return
    episode.add(ids, None, policy=False)
    episode.observations.append(observation)


def episode_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    """Per-step means over a multi-turn rollout's episodes (empty for single-turn rollouts)."""
    if not episodes:
        return {}
    n = len(episodes)
    return {
        "rollout/turns_mean": sum(len(e.turns) for e in episodes) / n,
        "rollout/observation_tokens_mean": sum(len(e.loss_mask) - sum(e.loss_mask) for e in episodes) / n,
        "rollout/max_turns_frac": sum(e.finish_reason == "max_turns" for e in episodes) / n,
    }
