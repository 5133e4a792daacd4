"""Exact match against the reference answer in the dataset row (`answer` by default).

The response's answer is its first line (EOS ends sampling and is not part of the text). Both sides are
compared after stripping and collapsing whitespace, and case-folded unless case_sensitive.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.errors import InputError
from rollout.environments.base import Completion, Environment, reference_answer, register_environment


def normalise(text: str, case_sensitive: bool) -> str:
    text = " ".join(text.split())
    return text if case_sensitive else text.casefold()


@register_environment("exact_match")
class ExactMatchEnvironment(Environment):
    def __init__(
        self,
        correct_reward: float = 1.0,
        format_reward: float = 0.0,
        answer_key: str = "answer",
        case_sensitive: bool = False,
    ) -> None:
        super().__init__(correct_reward, format_reward)
        self.answer_key, self.case_sensitive = answer_key, case_sensitive

    def judge(self, completion: Completion) -> tuple[bool, bool]:
        answer = normalise(completion.text.split("\n", 1)[0], self.case_sensitive)
        reference = normalise(reference_answer(completion.row, self.answer_key), self.case_sensitive)
        return answer == reference, bool(answer) and completion.finish_reason == "stop"

    def check_row(self, row: Mapping[str, Any], where: str) -> None:
        try:
            reference_answer(row, self.answer_key)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
