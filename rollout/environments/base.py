"""What an environment scores and returns, and the registry a config picks environments from.

An environment turns finished single-turn rollouts into rewards. It sees text, never tensors or token
ids: the driver decodes each response (special tokens removed) and hands over the prompt, the response
text, why generation stopped and the dataset row the prompt came from (reference answers live there).

Scores are pure functions of their input, so environments are tested without a model and can run
anywhere (in the driver, in a Ray worker, in a sandbox process).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.errors import InputError


@dataclass(frozen=True)
class Completion:
    """One sampled response to score.

    text: the decoded response, special tokens (EOS) removed. finish_reason: "stop" when the sampler ended
    it (EOS, stop token or stop string), "length" when it ran out of max_tokens. row: the dataset row of the
    prompt (e.g. {"prompt": ..., "answer": ...}).
    """

    prompt: str
    text: str
    finish_reason: str = "stop"
    row: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Score:
    """reward: what the policy maximises. correct: whether the answer is right (accuracy metrics; a shaped
    reward such as a format bonus never makes a wrong answer correct). well_formed: an answer could be
    extracted and the response ended properly. metrics: extra per-completion numbers (a reward plugin's
    parts), logged as reward/NAME, the mean over a step's completions."""

    reward: float
    correct: bool
    well_formed: bool
    metrics: Mapping[str, float] = field(default_factory=dict)


class Environment(ABC):
    """Scores completions. Subclasses implement `score_one`; `score` is the batched entry point.

    Reward: 1.0 for a correct answer, 0.0 otherwise, plus `format_reward` for a well-formed response
    (R1-style shaping: it teaches the output format before the answers are right). `correct_reward`
    scales the first term.
    """

    def __init__(self, correct_reward: float = 1.0, format_reward: float = 0.0) -> None:
        self.correct_reward, self.format_reward = correct_reward, format_reward

    def score(self, completions: Sequence[Completion]) -> list[Score]:
        return [self.score_one(c) for c in completions]

    def score_one(self, completion: Completion) -> Score:
        correct, well_formed = self.judge(completion)
        reward = self.correct_reward * correct + self.format_reward * well_formed
        return Score(float(reward), bool(correct), bool(well_formed))

    @abstractmethod
    def judge(self, completion: Completion) -> tuple[bool, bool]:
        """(correct, well_formed) of one completion."""

    def check_row(self, row: Mapping[str, Any], where: str) -> None:
        """InputError (one line, naming `where`) when a dataset row lacks what scoring needs. Called on
        every row before training starts, so a bad dataset fails fast instead of mid-run."""
        return None


EnvironmentFactory = Callable[..., Environment]
ENVIRONMENTS: dict[str, EnvironmentFactory] = {}


def register_environment(name: str) -> Callable[[type[Environment]], type[Environment]]:
    def wrap(cls: type[Environment]) -> type[Environment]:
        if name in ENVIRONMENTS:
            raise ValueError(f"environment {name!r} is registered twice")
        ENVIRONMENTS[name] = cls
        return cls

    return wrap


def build_environment(name: str, **kwargs: Any) -> Environment:
    if name not in ENVIRONMENTS:
        raise InputError(f"unknown environment {name!r}; known: {', '.join(sorted(ENVIRONMENTS))}")
    try:
        return ENVIRONMENTS[name](**kwargs)
    except TypeError as e:
        raise InputError(f"environment {name!r}: {e}") from None


def reference_answer(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InputError(f"dataset row has no {key!r} answer (string or number): {dict(row)!r}"[:200])
    return str(value)
