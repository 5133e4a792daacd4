"""Math answers: the last \\boxed{...} of the response (else, unless require_boxed, its last number),
compared with the row's reference answer after normalisation.

Normalisation (the usual MATH/GSM8K verifier rules, kept small): drop $, spaces, \\left/\\right, \\!,
\\text{...} wrappers, trailing periods, degree signs and thousands separators; \\dfrac/\\tfrac -> \\frac.
Two answers that both parse as numbers (integers, decimals, a/b, \\frac{a}{b}, -\\frac{a}{b}) are equal when
their values agree to 1e-6 (relative); otherwise the normalised strings must be identical. A reference
like GSM8K's "... #### 72" is reduced to what follows the last ####.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from core.errors import InputError
from rollout.environments.base import Completion, Environment, reference_answer, register_environment

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_FRAC = re.compile(r"^(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}$")
_SLASH = re.compile(r"^(-?[\d.]+)/(-?[\d.]+)$")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None when there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: cut off by max_tokens


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def normalise(answer: str) -> str:
    s = _TEXT.sub(r"\1", answer)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("$", ""), ("\\dfrac", "\\frac")):
        s = s.replace(old, new)
    s = s.replace("\\tfrac", "\\frac").replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    s = "".join(s.split()).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def as_number(s: str) -> Fraction | None:
    try:
        if m := _FRAC.match(s) or _SLASH.match(s):
            groups = m.groups()
            sign = -1 if len(groups) == 3 and groups[0] == "-" else 1
            num, den = Fraction(groups[-2]), Fraction(groups[-1])
            return None if den == 0 else sign * num / den
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def equivalent(answer: str, reference: str) -> bool:
    a, r = normalise(answer), normalise(reference)
    if a == r:
        return True
    x, y = as_number(a), as_number(r)
    if x is None or y is None:
        return False
    return abs(x - y) <= 1e-6 * max(1, abs(y))


def reference_of(row: Mapping[str, Any], key: str) -> str:
    ref = reference_answer(row, key)
    return ref.rsplit("####", 1)[-1].strip() if "####" in ref else ref


@register_environment("math")
class MathEnvironment(Environment):
    def __init__(
        self,
        correct_reward: float = 1.0,
        format_reward: float = 0.0,
        answer_key: str = "answer",
        require_boxed: bool = False,
    ) -> None:
        super().__init__(correct_reward, format_reward)
        self.answer_key, self.require_boxed = answer_key, require_boxed

    def extract(self, text: str) -> str | None:
        # A response that opened a box answers there; one cut off inside it has no answer.
        if self.require_boxed or "\\boxed{" in text or "\\fbox{" in text:
            return last_boxed(text)
        return last_number(text)

    def judge(self, completion: Completion) -> tuple[bool, bool]:
        answer = self.extract(completion.text)
        if answer is None:
            return False, False
        correct = equivalent(answer, reference_of(completion.row, self.answer_key))
        return correct, completion.finish_reason == "stop"

    def check_row(self, row: Mapping[str, Any], where: str) -> None:
        try:
            reference_answer(row, self.answer_key)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
