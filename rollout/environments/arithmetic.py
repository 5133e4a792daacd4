"""The embedded arithmetic task ("23+58=" -> "81"): the answer is computed from the prompt itself.

The prompt ends with the problem in core/data/synthetic.py's format (anything before it, e.g. few-shot
examples, is ignored). The response's answer is its text up to the end marker: EOS (which ends sampling
and is not part of the text) or a newline. Only a bare integer there counts: "81" and " 81" are right,
"81+1" and "eighty-one" are not.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from core.data.synthetic import OPERATORS
from core.errors import InputError
from rollout.environments.base import Completion, Environment, register_environment

_PROBLEM = re.compile(r"(\d+)\s*([+\-*])\s*(\d+)\s*=\s*$")
_INTEGER = re.compile(r"^-?\d+$")


def solve(prompt: str) -> int:
    """The result of the problem the prompt ends with; InputError when there is none."""
    m = _PROBLEM.search(prompt)
    if m is None:
        raise InputError(f"arithmetic: prompt does not end with a problem like '12+34=': {prompt[-40:]!r}")
    return OPERATORS[m.group(2)](int(m.group(1)), int(m.group(3)))


def answer_text(text: str) -> str:
    """The response up to its first newline, stripped."""
    return text.split("\n", 1)[0].strip()


@register_environment("arithmetic")
class ArithmeticEnvironment(Environment):
    def judge(self, completion: Completion) -> tuple[bool, bool]:
        answer = answer_text(completion.text)
        is_integer = _INTEGER.match(answer) is not None
        correct = is_integer and int(answer) == solve(completion.prompt)
        return correct, is_integer and completion.finish_reason == "stop"

    def check_row(self, row: Mapping[str, Any], where: str) -> None:
        try:
            solve(str(row.get("prompt", "")))
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
