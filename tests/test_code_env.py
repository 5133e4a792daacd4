"""The `code` environment: code extraction, rewards as the fraction of a row's tests passed (assert and
stdin/stdout cases), early-exit cheats, row checks and options; and a short GRPO run of
configs/grpo_code_tiny.yaml (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import InputError
from rollout.environments import Completion, build_environment
from rollout.environments.code import extract_code
from rollout.sandbox import isolation_error

ROOT = Path(__file__).resolve().parents[1]
ADD_ROW = {
    "prompt": "Write add(a, b).",
    "tests": [
        "assert add(2, 3) == 5",
        "assert add(-1, 1) == 0",
        "assert add(2, 2) == 4",
        {"input": "2 3\n", "output": "5"},
    ],
}


@pytest.fixture(scope="module")
def env():
    if isolation_error() is not None:
        with pytest.raises(InputError, match="cannot sandbox untrusted code"):
            build_environment("code")
        pytest.skip(f"no sandbox on this machine: {isolation_error()}")
    return build_environment("code", format_reward=0.5, timeout_s=5, max_workers=2)


def fenced(code: str, lang: str = "python") -> str:
    return f"Here it is:\n```{lang}\n{code}\n```\n"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        (fenced("print(1)"), "print(1)\n"),
        (fenced("print(1)", "py"), "print(1)\n"),
        (fenced("print(1)", ""), "print(1)\n"),
        (fenced("x = 1") + fenced("print(2)"), "print(2)\n"),  # the last block
        ("  print(3)\n", "print(3)"),  # no fence: the whole text
        ("```python\nprint(4)\n", None),  # cut off inside the fence
        ("   \n", None),
        (fenced("  "), None),
    ],
)
def test_extract_code(text, code):
    assert extract_code(text) == code


def test_rewards_are_the_fraction_of_tests_passed(env):
    solution = (
        "def add(a, b):\n    return a + b\n"
        "if __name__ == '__main__':\n    print(sum(map(int, input().split())))"
    )
    texts = [
        fenced(solution),  # everything: the main guard runs only in the stdin/stdout case
        fenced("def add(a, b):\n    return a + b"),  # the asserts, not the stdin/stdout case
        fenced("def add(a, b):\n    return a * b"),  # add(2, 2) only
        fenced("import sys\nsys.exit(0)"),  # exits before the tests: none
        fenced("import os\nos._exit(0)"),  # the same, without cleanup
        fenced("import atexit, os\natexit.register(lambda: os._exit(0))\ndef add(a, b): return -7"),
        fenced("import builtins\nbuiltins.exec = lambda *args: None\ndef add(a, b): return -7"),
        fenced("def add(a, b) return a + b"),  # SyntaxError: not well formed
        "no code here ```",
    ]
    scores = env.score([Completion("p", t, "stop", ADD_ROW) for t in texts])
    fractions = [1.0, 0.75, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    well_formed = [True] * 7 + [False, False]
    assert [s.reward for s in scores] == pytest.approx([f + 0.5 * w for f, w in zip(fractions, well_formed)])
    assert [s.correct for s in scores] == [True] + [False] * 8
    assert [s.well_formed for s in scores] == well_formed


def test_stdout_cases_and_what_ends_a_response(env):
    row = {
        "prompt": "echo",
        "tests": [{"input": "a b\n", "output": "b a\n\n"}, {"input": "x\n", "output": "x"}],
    }
    reverse = fenced("print(' '.join(reversed(input().split())) + '   ')")  # trailing spaces are ignored
    scores = env.score([Completion("echo", reverse, "stop", row), Completion("echo", reverse, "length", row)])
    assert scores[0].correct and scores[0].reward == 1.5
    assert scores[1].correct and not scores[1].well_formed and scores[1].reward == 1.0  # no EOS: no bonus


def test_a_hanging_solution_fails_its_case_within_the_timeout():
    if isolation_error() is not None:
        pytest.skip(isolation_error())
    env = build_environment("code", timeout_s=1.5, cpu_time_s=60)
    row = {"prompt": "p", "tests": ["assert f() == 1", {"input": "", "output": "1"}]}
    code = fenced("import time\ndef f():\n    time.sleep(60)\nprint(1)")
    score = env.score_one(Completion("p", code, "stop", row))
    assert score.reward == 0.5 and not score.correct  # the stdin/stdout case passed, the assert timed out


def test_template_and_tests_from_the_answer():
    if isolation_error() is not None:
        pytest.skip(isolation_error())
    env = build_environment("code", template="print({completion})", tests_from_answer=True, answer_key="sum")
    row = {"prompt": "23+58=", "sum": "81"}
    scores = env.score([Completion("23+58=", t, "stop", row) for t in ["81", " 23+58", "80", "81+", "x"]])
    assert [s.correct for s in scores] == [True, True, False, False, False]
    assert [s.well_formed for s in scores] == [True, True, True, False, True]  # "x" compiles (NameError)
    env.check_row(row, "prompt 0")
    with pytest.raises(InputError, match="prompt 3: .*'sum'"):
        env.check_row({"prompt": "1+1="}, "prompt 3")


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"prompt": "p"}, "row 7: row has no 'tests' list"),
        ({"prompt": "p", "tests": []}, "row 7: row has no 'tests' list"),
        ({"prompt": "p", "tests": "assert True"}, "row 7: row has no 'tests' list"),
        ({"prompt": "p", "tests": ["assert True", "assert ("]}, "row 7: test 1 does not compile"),
        ({"prompt": "p", "tests": [{"input": "1"}]}, "row 7: test 0 is neither"),
        ({"prompt": "p", "tests": [{"input": 1, "output": "1"}]}, "row 7: test 0 is neither"),
        ({"prompt": "p", "tests": [3]}, "row 7: test 0 is neither"),
    ],
)
def test_malformed_rows_are_named(env, row, match):
    with pytest.raises(InputError, match=match):
        env.check_row(row, "row 7")


def test_options_from_the_grpo_config():
    from algorithms.grpo_config import EnvironmentConfig

    if isolation_error() is not None:
        pytest.skip(isolation_error())
    options = {"timeout_s": 2.5, "memory_mb": 128, "max_workers": 3, "template": "print({completion})"}
    env = EnvironmentConfig(name="code", answer_key="target", options=options).build()
    limits = env.sandbox.limits
    assert (limits.wall_time_s, limits.cpu_time_s, limits.memory_mb) == (2.5, 3, 128)
    assert env.max_workers == 3 and env.answer_key == "target"
    with pytest.raises(InputError, match="has no \\{completion\\}"):
        build_environment("code", template="print(x)")
    with pytest.raises(InputError, match="environment 'code'"):
        build_environment("code", bogus=1)


@pytest.mark.slow
def test_grpo_code_tiny_config_runs_and_logs_rewards(tiny_pretrain_400, tmp_path):
    from rl.cli import main

    if isolation_error() is not None:
        pytest.skip(isolation_error())
    run_dir = tmp_path / "grpo_code"
    overrides = [
        f"run.dir={run_dir}",
        f"model.init_from={tiny_pretrain_400}/checkpoints/step_400",
        "train.max_steps=2",
        "train.eval_every=0",
        "train.save_every=2",
        "train.global_batch_size=64",
        "rollout.prompts_per_step=8",
        "eval.num_prompts=8",
        "eval.samples=0",
    ]
    assert main(["grpo", str(ROOT / "configs/grpo_code_tiny.yaml"), *overrides]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["reward/well_formed"] > 0.5 for r in steps)  # bare numbers: print(81) compiles
    assert max(r["reward/mean"] for r in steps) > 0  # the step-400 model gets some sums right
