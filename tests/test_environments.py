"""Environments: what counts as a correct / well-formed answer, rewards, registry and row checks."""

from __future__ import annotations

import pytest

from core.data.synthetic import generate_arithmetic
from core.errors import InputError
from rollout.environments import ENVIRONMENTS, Completion, Score, build_environment
from rollout.environments.math import equivalent, last_boxed


def judge(env, prompt: str, text: str, finish: str = "stop", **row) -> tuple[bool, bool]:
    score = env.score([Completion(prompt, text, finish, {"prompt": prompt, **row})])[0]
    return score.correct, score.well_formed


def test_registry_names_and_unknown():
    assert {"arithmetic", "exact_match", "math"} <= set(ENVIRONMENTS)
    with pytest.raises(InputError, match="unknown environment 'nope'"):
        build_environment("nope")
    with pytest.raises(InputError, match="arithmetic"):
        build_environment("arithmetic", bogus=1)


@pytest.mark.parametrize(
    ("prompt", "text", "finish", "expected"),
    [
        ("12+34=", "46", "stop", (True, True)),
        ("12+34=", " 46", "stop", (True, True)),
        ("12+34=", "46\n7+1=8", "length", (True, False)),  # right answer, but did not stop at EOS
        ("12+34=", "47", "stop", (False, True)),
        ("12+34=", "46+1", "stop", (False, False)),
        ("12+34=", "", "stop", (False, False)),
        ("3-15=", "-12", "stop", (True, True)),
        ("7*8=", "56", "stop", (True, True)),
        ("1+1=2\n12+34=", "46", "stop", (True, True)),  # few-shot prefix: the last problem counts
    ],
)
def test_arithmetic_judgement(prompt, text, finish, expected):
    assert judge(build_environment("arithmetic"), prompt, text, finish) == expected


def test_arithmetic_agrees_with_the_synthetic_generator():
    env = build_environment("arithmetic")
    train, _ = generate_arithmetic(50, 0, seed=3, digits=2, ops="+-*")
    for p in train:
        assert judge(env, p.prompt, p.answer) == (True, True)
        assert judge(env, p.prompt, str(int(p.answer) + 1)) == (False, True)


def test_rewards_with_format_bonus():
    env = build_environment("arithmetic", format_reward=0.25)
    scores = env.score(
        [
            Completion("2+2=", "4"),
            Completion("2+2=", "5"),
            Completion("2+2=", "x"),
            Completion("2+2=", "4", "length"),
        ]
    )
    assert scores == [
        Score(1.25, True, True),
        Score(0.25, False, True),
        Score(0.0, False, False),
        Score(1.0, True, False),
    ]


def test_row_checks_fail_fast():
    with pytest.raises(InputError, match="prompts.jsonl:3: arithmetic"):
        build_environment("arithmetic").check_row({"prompt": "hello"}, "prompts.jsonl:3")
    with pytest.raises(InputError, match="row 1.*'answer'"):
        build_environment("exact_match").check_row({"prompt": "q"}, "row 1")
    build_environment("math").check_row({"prompt": "q", "answer": 3}, "row 1")


def test_exact_match():
    env = build_environment("exact_match")
    assert judge(env, "Capital of France?", "  Paris ", answer="paris") == (True, True)
    assert judge(env, "q", "New  York\nmore", answer="new york") == (True, True)
    assert judge(env, "q", "Paris!", answer="Paris") == (False, True)
    strict = build_environment("exact_match", case_sensitive=True, answer_key="label")
    assert judge(strict, "q", "paris", label="Paris") == (False, True)


def test_math_extraction_and_normalisation():
    env = build_environment("math")
    assert judge(env, "q", "so the answer is \\boxed{\\frac{1}{2}}.", answer="0.5") == (True, True)
    assert judge(env, "q", "\\boxed{\\dfrac{3}{4}}", answer="3/4") == (True, True)
    assert judge(env, "q", "It costs $1,000 in total.", answer="1000") == (True, True)
    assert judge(env, "q", "first 3 then 7", answer="#### 7") == (True, True)  # GSM8K reference
    assert judge(env, "q", "\\boxed{x+1} and later 5", answer="x + 1") == (True, True)  # boxed wins
    assert judge(env, "q", "no number here", answer="4") == (False, False)
    assert judge(env, "q", "\\boxed{4", "length", answer="4") == (False, False)  # cut off inside the box
    boxed_only = build_environment("math", require_boxed=True)
    assert judge(boxed_only, "q", "the answer is 4", answer="4") == (False, False)


def test_math_helpers():
    assert last_boxed("\\boxed{a} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert equivalent("-\\frac{1}{2}", "-0.5")
    assert equivalent("\\text{(B)}", "(B)")
    assert equivalent("90^\\circ", "90")
    assert not equivalent("1/0", "0")
    assert not equivalent("2", "3")
