"""The math verifier's equivalence: the forms a correct answer takes, and near misses it must refuse."""

from __future__ import annotations

import pytest

from rollout.environments import Completion, build_environment
from rollout.environments.math import as_number, equivalent, parse

EQUAL = [
    # fractions and decimals
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\frac12", "1/2"),
    ("\\dfrac12", "0.50"),
    ("\\tfrac{1}{2}", ".5"),
    ("-\\frac{3}{4}", "-0.75"),
    ("\\frac{-3}{4}", "-3/4"),
    ("0.3333333", "1/3"),  # within 1e-6 (relative)
    ("1,000", "1000"),
    ("\\$1{,}000", "1000"),
    # arithmetic
    ("2^{10}", "1024"),
    ("2^10", "1024"),  # plain text, not TeX's 2^1 0
    ("2**3", "8"),
    ("2+3", "5"),
    ("2\\cdot 3", "6"),
    ("2\\times3", "6"),
    ("6\\div 4", "\\frac{3}{2}"),
    ("2^{-1}", "0.5"),
    ("-2^2", "-4"),
    ("\\sqrt{4}", "2"),
    ("sqrt(4)", "2"),
    ("\\sqrt[3]{27}", "3"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt2}{2}"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("\\pi", "3.14159265"),
    ("\\frac{\\pi}{2}", "\\pi/2"),
    ("2\\pi", "\\pi\\cdot2"),
    ("e^{2}", "7.3890561"),  # e is Euler's number
    ("\\sqrt[3]{-8}", "-2"),
    ("\\sin(\\pi/6)", "\\frac{1}{2}"),
    ("\\left(\\frac{1}{2}\\right)^2", "0.25"),
    # symbols
    ("x+1", "1+x"),
    ("2(x+1)", "2x+2"),
    ("(x+1)^2", "x^2+2x+1"),
    ("\\frac{x}{2}", "0.5x"),
    ("x=5", "5"),
    ("y=2x+1", "y=1+2x"),
    # percent: the number as written and its value
    ("10\\%", "10"),
    ("10\\%", "0.1"),
    ("50%", "\\frac{1}{2}"),
    # units, degrees, text
    ("5\\text{ cm}", "5"),
    ("90^\\circ", "90"),
    ("\\text{(B)}", "(B)"),
    ("(B)", "B"),
    # lists: points and intervals in order, unbracketed solutions in any order
    ("(1,2)", "(1, 2)"),
    ("(\\frac12, 3)", "(0.5,3)"),
    ("[0, \\infty)", "[0,\\infty)"),
    ("(-\\infty, 2]", "(-\\infty,2]"),
    ("2, -3", "-3, 2"),
]

NOT_EQUAL = [
    ("1/3", "0.33"),
    ("2", "3"),
    ("1/0", "0"),
    ("1000000", "1000001"),  # integers compare exactly
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("2^{10}", "1000"),
    ("\\sqrt{2}", "1.41"),
    ("\\pi", "3.14"),
    ("x+1", "x-1"),
    ("x+1", "y+1"),
    ("x^2", "2x"),
    ("yes", "sey"),  # words, not products of letters
    ("(1,2)", "(2,1)"),  # a point: in order
    ("[0,1)", "[0,1]"),  # an interval: its brackets
    ("(1,2)", "1,2"),
    ("1,2", "1,2,3"),
    ("10\\%", "0.01"),
    ("(A)", "(B)"),
    ("x=5", "y=5"),
]


@pytest.mark.parametrize(("answer", "reference"), EQUAL)
def test_equivalent_forms(answer, reference):
    assert equivalent(answer, reference)
    assert equivalent(reference, answer)


@pytest.mark.parametrize(("answer", "reference"), NOT_EQUAL)
def test_near_misses(answer, reference):
    assert not equivalent(answer, reference)
    assert not equivalent(reference, answer)


def test_exact_values():
    from fractions import Fraction

    assert as_number("\\frac{3}{4}") == Fraction(3, 4)
    assert as_number("2^{10}") == 1024
    assert as_number("\\sqrt{\\frac{9}{4}}") == Fraction(3, 2)
    assert as_number("\\sqrt{2}") is None  # irrational: compared in floating point instead
    assert as_number("x") is None


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('true')",  # never evaluated as code
        "1+",
        "\\frac{1}",
        "(1+2",
        "\\unknown{3}",
        "\\le 3",
        "",
    ],
)
def test_what_does_not_parse(text):
    assert parse(text) is None


def test_hostile_answers_stay_cheap():
    """Huge powers, deep nesting and long answers are refused or computed within bounds (no unbounded
    work on a policy's output; the per-test timeout catches a hang)."""
    assert not equivalent("9^{9^{9^{9}}}", "1")
    assert not equivalent("2^{100000}", "3")
    assert not equivalent("(" * 300 + "1" + ")" * 300, "2")
    assert not equivalent("1+" * 1000 + "1", "5")
    assert equivalent("2^{100}", str(2**100))


def test_math_environment_uses_the_equivalence():
    env = build_environment("math")
    rows = [
        ("The answer is \\boxed{\\dfrac12}.", "0.5", True),
        ("so \\boxed{2^{10}}", "1024", True),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt{2}/2", True),
        ("\\boxed{0.33}", "\\frac{1}{3}", False),
        ("about 42.", "#### 42", True),
    ]
    scores = env.score([Completion("q", text, "stop", {"answer": ref}) for text, ref, _ in rows])
    assert [s.correct for s in scores] == [ok for _, _, ok in rows]
