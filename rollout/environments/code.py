"""Code: the response is Python, run against the row's tests in a sandbox (rollout/sandbox.py).

Rows: row["tests"] (`tests_key`) is a list of test cases, each either
- a string of Python statements run after the solution, in the same program and namespace
  (e.g. "assert add(2, 3) == 5"): it passes when the program gets past them and exits 0. The solution
  runs with __name__ == "solution" here, so its `if __name__ == "__main__":` part does not;
- {"input": str, "output": str}: the solution alone, run with that stdin: it passes when it exits 0 and
  its stdout equals output (trailing whitespace of each line and trailing blank lines ignored).
With tests_from_answer the row needs no tests: its one case is {"input": "", "output": row[answer_key]},
e.g. the arithmetic rows ("23+58=", answer "81") with template "print({completion})".

The code is the last ```python (```py, or bare ```) fenced block of the response; a response without a
fence is code as a whole; an unclosed fence (cut off by max_tokens) yields none. "{completion}" in
`template` is replaced by it ("print({completion})" makes an expression a program).

Reward: correct_reward x (fraction of cases passed) + format_reward x well_formed. correct: every case
passed. well_formed: code was found, it compiles, and the response ended properly (EOS).

Each case is one sandbox run (limits from the options; max_workers at once) on this interpreter's Python,
standard library only (no site-packages, no network), in a small harness that compiles the solution
first (a SyntaxError exits with SYNTAX_ERROR). A statement case passes only when the harness prints, after
the tests, a random marker it read from stdin before the solution ran, so a solution that exits early
(sys.exit(0), os._exit(0), atexit) or replaces builtins.exec does not pass.
The tests trust the solution's objects, and the solution shares the harness's interpreter: one that
returns an object equal to everything, or edits the harness (sys.modules["__main__"], frames), can still
pass; stdin/stdout cases leave far less room.
"""

from __future__ import annotations

import math
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import InputError
from rollout.environments.base import (
    Completion,
    Environment,
    Score,
    reference_answer,
    register_environment,
)
from rollout.sandbox import Limits, Sandbox, SandboxResult

SYNTAX_ERROR = 97  # the harness's exit status when the solution does not compile
_FENCE = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL)

# The solution is compiled before anything runs, so a SyntaxError is told apart from a failing test.
_PREAMBLE = """\
import sys as _sys
_compile, _exec, _write = compile, exec, _sys.stdout.write  # bound before the solution can patch builtins
try:
    _solution = _compile({solution!r}, "solution.py", "exec")
except (SyntaxError, ValueError) as _e:
    _sys.stderr.write(f"{{type(_e).__name__}}: {{_e}}\\n")
    _sys.exit({syntax_error})
"""
_RUN_IO = "_exec(_solution, {'__name__': '__main__'})\n"
_RUN_STATEMENTS = """\
_marker = _sys.stdin.readline().strip()
_namespace = {{'__name__': 'solution'}}
_exec(_solution, _namespace)
_exec(_compile({tests!r}, "tests.py", "exec"), _namespace)
_write("\\n" + _marker + "\\n")
"""


@dataclass(frozen=True)
class Case:
    """One test case: statements run after the solution, or stdin in -> expected stdout out."""

    statements: str | None = None
    input: str = ""
    output: str = ""


@dataclass(frozen=True)
class Program:
    """What one sandbox run gets, and what its stdout must end with (the marker) or equal (the output)."""

    code: str
    stdin: str
    case: Case
    marker: str = ""


def extract_code(text: str) -> str | None:
    """The last fenced block, else the whole (stripped) text; None for an unclosed fence or nothing."""
    blocks = _FENCE.findall(text)
    if blocks:
        code = blocks[-1]
    elif "```" in text:
        return None
    else:
        code = text.strip()
    return code if code.strip() else None


def normalise_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def program_for(solution: str, case: Case) -> Program:
    preamble = _PREAMBLE.format(solution=solution, syntax_error=SYNTAX_ERROR)
    if case.statements is None:
        return Program(preamble + _RUN_IO, case.input, case)
    marker = secrets.token_hex(16)
    return Program(preamble + _RUN_STATEMENTS.format(tests=case.statements), marker + "\n", case, marker)


def passed(program: Program, result: SandboxResult) -> bool:
    if not result.ok:
        return False
    if program.case.statements is None:
        return normalise_output(result.stdout) == normalise_output(program.case.output)
    lines = result.stdout.rstrip("\n").rsplit("\n", 1)
    return lines[-1] == program.marker


@register_environment("code")
class CodeEnvironment(Environment):
    def __init__(
        self,
        correct_reward: float = 1.0,
        format_reward: float = 0.0,
        answer_key: str = "answer",
        tests_key: str = "tests",
        tests_from_answer: bool = False,
        template: str = "{completion}",
        timeout_s: float = 10.0,
        cpu_time_s: int | None = None,
        memory_mb: int = 512,
        max_workers: int | None = None,
    ) -> None:
        """timeout_s: wall time of one case; cpu_time_s: its CPU seconds (None: timeout_s, rounded up);
        memory_mb: its address space; max_workers: cases run at once (None: the CPU count, at most 8).
        Refuses (InputError) where this machine cannot sandbox (see rollout/sandbox.py)."""
        super().__init__(correct_reward, format_reward)
        if "{completion}" not in template:
            raise InputError(f"environment 'code': template {template!r} has no {{completion}}")
        self.answer_key, self.tests_key, self.tests_from_answer = answer_key, tests_key, tests_from_answer
        self.template = template
        self.max_workers = max_workers or min(8, os.cpu_count() or 1)
        cpu = cpu_time_s if cpu_time_s is not None else math.ceil(timeout_s)
        limits = Limits(wall_time_s=timeout_s, cpu_time_s=cpu, memory_mb=memory_mb)
        try:
            self.sandbox = Sandbox(limits)
        except InputError as e:
            raise InputError(f"environment 'code': {e}") from None

    def cases(self, row: Mapping[str, Any]) -> list[Case]:
        """The row's test cases; InputError (one line) when they are missing or malformed."""
        if self.tests_from_answer:
            return [Case(output=reference_answer(row, self.answer_key))]
        tests = row.get(self.tests_key)
        if not isinstance(tests, list) or not tests:
            raise InputError(f"row has no {self.tests_key!r} list of test cases: {dict(row)!r}"[:200])
        return [_case(test, i) for i, test in enumerate(tests)]

    def solution(self, completion: Completion) -> str | None:
        code = extract_code(completion.text)
        return None if code is None else self.template.replace("{completion}", code)

    def score(self, completions: Sequence[Completion]) -> list[Score]:
        programs: list[tuple[int, Program]] = []
        for i, completion in enumerate(completions):
            solution = self.solution(completion)
            if solution is not None:
                programs += [(i, program_for(solution, case)) for case in self.cases(completion.row)]
        results = self.sandbox.run_many(
            [p.code for _, p in programs], [p.stdin for _, p in programs], self.max_workers
        )
        passes, counts = [0] * len(completions), [0] * len(completions)
        compiles = [True] * len(completions)
        for (i, program), result in zip(programs, results):
            counts[i] += 1
            passes[i] += passed(program, result)
            compiles[i] &= result.exit_code != SYNTAX_ERROR
        scores = []
        for i, completion in enumerate(completions):
            fraction = passes[i] / counts[i] if counts[i] else 0.0
            well_formed = counts[i] > 0 and compiles[i] and completion.finish_reason == "stop"
            reward = self.correct_reward * fraction + self.format_reward * well_formed
            scores.append(Score(float(reward), counts[i] > 0 and passes[i] == counts[i], well_formed))
        return scores

    def score_one(self, completion: Completion) -> Score:
        return self.score([completion])[0]

    def judge(self, completion: Completion) -> tuple[bool, bool]:
        score = self.score_one(completion)
        return score.correct, score.well_formed

    def check_row(self, row: Mapping[str, Any], where: str) -> None:
        try:
            self.cases(row)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None


def _case(test: Any, index: int) -> Case:
    if isinstance(test, str):
        try:
            compile(test, "tests.py", "exec")  # dataset text, not model output: safe to compile here
        except (SyntaxError, ValueError) as e:
            raise InputError(f"test {index} does not compile: {e}") from None
        return Case(statements=test)
    if isinstance(test, Mapping) and isinstance(test.get("input"), str):
        output = test.get("output")
        if isinstance(output, str | int | float) and not isinstance(output, bool):
            return Case(input=test["input"], output=str(output))
    raise InputError(
        f'test {index} is neither Python statements nor {{"input": str, "output": str}}: {test!r}'[:200]
    )
