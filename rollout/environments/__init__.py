"""Environments and verifiers: completions (text) in, rewards out. Pick one by name from a config:
`build_environment("arithmetic", format_reward=0.1)`.

arithmetic   the embedded synthetic task; the answer is computed from the prompt
code         Python run against the row's tests (asserts or stdin/stdout) in a sandbox
exact_match  the first line equals the row's reference answer
math         \\boxed{...} or the last number, normalised, against the row's reference answer
calculator   the arithmetic task over several turns, with a calculator tool (multi-turn)
"""

from rollout.environments import arithmetic, calculator, code, exact_match, math  # noqa: F401  (register)
from rollout.environments.base import (
    ENVIRONMENTS,
    Completion,
    Environment,
    Score,
    build_environment,
    register_environment,
)

__all__ = [
    "ENVIRONMENTS",
    "Completion",
    "Environment",
    "Score",
    "build_environment",
    "register_environment",
]
