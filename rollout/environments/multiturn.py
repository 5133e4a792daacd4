"""Multi-turn environments: the policy and the environment take turns until the environment ends the episode.

Protocol (rollout/multiturn.py drives it, many episodes in lockstep):
    state = env.reset(row)                       once per episode
    policy generates a turn                      ends at EOS, one of env.turn_stop, or the token budget
    observation = env.step(state, turn_text)     None: the episode is over, turn_text is the final answer;
                                                 else the observation's tokens are appended to the
                                                 conversation and the policy generates the next turn
    env.score([...])                             the final answer, as a single-turn Completion
Limits end an episode early: `max_turns` policy turns, and the response budget (rollout.max_tokens: every
policy and observation token of the episode); Completion.finish_reason says which ("stop" when the
environment ended it, "length", "max_turns").

`step` returns the observation or None rather than (observation, done): an observation nobody answers would
be trained on by no one, and a turn with no observation needs none of the environment's help.

Scoring is the single-turn `Environment` contract: Completion.text is the final turn's text and
Completion.row is the dataset row plus the episode ("turns", "observations": the decoded texts, in order;
"transcript": the whole response as the policy saw it), so an environment can also reward how it got there.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

from core.errors import InputError
from rollout.environments.base import Environment


class MultiTurnEnvironment(Environment):
    """An environment the policy talks to over several turns (tools, games, simulated users).

    turn_stop: stop strings that end a policy turn besides EOS (a tool-call marker). A turn's text keeps its
    stop string, so `step` sees the call as the policy wrote it. max_turns: policy turns per episode at most.
    """

    turn_stop: tuple[str, ...] = ()

    def __init__(self, correct_reward: float = 1.0, format_reward: float = 0.0, max_turns: int = 2) -> None:
        super().__init__(correct_reward, format_reward)
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
            raise InputError(f"max_turns must be an int >= 1, got {max_turns!r}")
        self.max_turns = max_turns

    def reset(self, row: Mapping[str, Any]) -> Any:
        """A new episode's state (a sandbox session, a board), handed to every `step` of the episode."""
        return row

    @abstractmethod
    def step(self, state: Any, turn: str) -> str | None:
        """The policy's latest turn (decoded, special tokens dropped) -> the observation to append before its
        next turn, or None when the episode is over (the turn is the final answer)."""
