"""Reward plugins (environment.name: plugin): loading and checks at start, what a plugin may return, and
failures during a run (one line, exit 2, the last checkpoint intact)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_grpo import pretrained  # noqa: F401 -- the module fixture: a tiny Llama taught arithmetic briefly

from algorithms.grpo_config import EnvironmentConfig
from algorithms.rollouts import rollout_metrics
from core.errors import InputError
from rollout.environments import Completion
from rollout.environments.plugin import PluginEnvironment, RewardPluginError

ROOT = Path(__file__).resolve().parents[1]

REWARDS = """
import asyncio

def exact(prompts, completions, rows, finish_reasons):
    return [float(c.strip() == r["answer"]) for c, r in zip(completions, rows)]

async def judged(prompts, completions, **kwargs):
    await asyncio.sleep(0)
    return [0.5 for _ in completions]

def parts(prompts, completions, rows, finish_reasons, bonus=0.0):
    right = [c.strip() == r["answer"] for c, r in zip(completions, rows)]
    return {
        "reward": [float(ok) + bonus for ok in right],
        "correct": right,
        "chars": [len(c) for c in completions],
        "batch": len(completions),
    }

class Judge:
    @staticmethod
    def score(prompts, completions, **kwargs):
        return [1.0] * len(completions)

NOT_CALLABLE = 3

def no_kwargs(prompts, completions):
    return [0.0] * len(completions)
"""


def completions(*texts: str) -> list[Completion]:
    return [
        Completion(f"{i}+1=", t, "stop", {"prompt": f"{i}+1=", "answer": str(i + 1)})
        for i, t in enumerate(texts)
    ]


def plugin(tmp_path: Path, body: str, name: str = "rewards.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def env_of(function: str, **section) -> PluginEnvironment:
    return EnvironmentConfig(name="plugin", function=function, **section).build()


# ---- loading -----------------------------------------------------------------------------------------


def test_loads_a_file_relative_to_the_current_directory_and_a_module(tmp_path, monkeypatch):
    plugin(tmp_path, REWARDS, "my_rewards.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the module form adds the current directory
    batch = completions("1", "3")
    for spec in (
        "my_rewards.py:exact",
        "./my_rewards.py:exact",
        f"{tmp_path}/my_rewards.py:exact",
        "my_rewards:exact",
    ):
        assert [s.reward for s in env_of(spec).score(batch)] == [1.0, 0.0], spec
    assert [s.reward for s in env_of("my_rewards.py:Judge.score").score(batch)] == [1.0, 1.0]
    judged = env_of("my_rewards:judged")  # async: run with asyncio, in a thread inside a running loop
    assert [s.reward for s in judged.score(batch)] == [0.5, 0.5]

    async def in_a_loop():
        return judged.score(batch)

    assert [s.reward for s in asyncio.run(in_a_loop())] == [0.5, 0.5]
    sys.modules.pop("my_rewards")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rewards.py", "expected module:function or path/to/file.py:function"),
        ("rewards.py:", "expected module:function"),
        (":exact", "expected module:function"),
        ("not a module:exact", "expected module:function"),
        ("rewards.py:two words", "expected module:function"),
    ],
)
def test_bad_specs_are_config_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        EnvironmentConfig(name="plugin", function=spec)


def test_plugin_section_checks():
    with pytest.raises(ValueError, match="environment.function is needed with name=plugin"):
        EnvironmentConfig(name="plugin")
    with pytest.raises(ValueError, match="only with it"):
        EnvironmentConfig(name="math", function="rewards.py:exact")
    with pytest.raises(ValueError, match="do not apply to name=plugin"):
        EnvironmentConfig(name="plugin", function="rewards.py:exact", format_reward=0.1)
    with pytest.raises(ValueError, match="unknown environment 'plugin'"):
        EnvironmentConfig(name="reward_model", path="rm", verifier="plugin")


LOAD_ERRORS = {
    "missing.py:exact": "no file missing.py",
    "rewards.py:absent": "rewards.py has no 'absent'",
    "rewards.py:NOT_CALLABLE": "NOT_CALLABLE is a int, not a function",
    "rewards.py:no_kwargs": r"no_kwargs\(prompts, completions\) cannot be called with the keyword arguments",
    "broken.py:exact": r"importing broken.py failed: SyntaxError: invalid syntax \(broken.py, line 1\)",
    "raising.py:exact": r"importing raising.py failed: RuntimeError: needs a GPU \(raising.py:2\)",
    "no_such_module_xyz:exact": "importing no_such_module_xyz failed: ModuleNotFoundError",
    "rewards_needs:exact": "importing rewards_needs failed: ModuleNotFoundError: No module named 'absent_dep'",
}


@pytest.mark.parametrize("spec", list(LOAD_ERRORS))
def test_load_errors_are_one_line_input_errors(tmp_path, monkeypatch, spec):
    message = LOAD_ERRORS[spec]
    plugin(tmp_path, REWARDS)
    plugin(tmp_path, "def exact(:\n", "broken.py")
    plugin(tmp_path, "import os\nraise RuntimeError('needs a GPU')\n", "raising.py")
    plugin(tmp_path, "import absent_dep\n", "rewards_needs.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(InputError, match=message) as e:
        env_of(spec)
    assert "\n" not in str(e.value) and spec in str(e.value)


def test_options_must_be_taken(tmp_path):
    path = plugin(tmp_path, REWARDS)
    assert [s.reward for s in env_of(f"{path}:parts", options={"bonus": 0.5}).score(completions("1"))] == [
        1.5
    ]
    with pytest.raises(
        InputError, match="keyword arguments prompts, completions, rows, finish_reasons, bonus"
    ):
        env_of(f"{path}:exact", options={"bonus": 0.5})


# ---- what a plugin returns ---------------------------------------------------------------------------


def test_dict_returns_give_correct_and_metrics_logged_as_reward_names(tmp_path):
    env = env_of(f"{plugin(tmp_path, REWARDS)}:parts")
    scores = env.score(completions("1", "5", "33"))
    assert [(s.reward, s.correct, s.well_formed) for s in scores] == [
        (1.0, True, True),
        (0.0, False, True),
        (0.0, False, True),
    ]
    assert [s.metrics for s in scores] == [{"chars": c, "batch": 3.0} for c in (1.0, 1.0, 2.0)]
    batch = {
        "rewards": torch.tensor([s.reward for s in scores]),
        "correct": torch.tensor([float(s.correct) for s in scores]),
        "response_mask": torch.ones(3, 4),
    }
    metrics = rollout_metrics(batch, scores, [])
    assert metrics["reward/chars"] == pytest.approx(4 / 3) and metrics["reward/batch"] == 3.0
    assert metrics["reward/accuracy"] == pytest.approx(1 / 3)


def test_defaults_numpy_tensors_and_a_verifier(tmp_path):
    path = plugin(
        tmp_path,
        """
        import numpy as np, torch
        def np_rewards(completions, **kw):
            return np.array([1.0, -1.0], dtype=np.float32)
        def torch_dict(completions, **kw):
            return {"reward": torch.tensor([0.0, 2.0]), "well_formed": np.array([False, True]), "t": torch.tensor(7)}
        """,
    )
    batch = [
        Completion("q", "\\boxed{\\frac12}", "stop", {"answer": "0.5"}),
        Completion("q", "0.3", "length", {"answer": "0.5"}),
    ]
    scores = env_of(f"{path}:np_rewards").score(batch)
    assert [(s.reward, s.correct, s.well_formed) for s in scores] == [(1.0, True, True), (-1.0, False, False)]
    scores = env_of(f"{path}:torch_dict").score(batch)
    assert [(s.reward, s.correct, s.well_formed, s.metrics) for s in scores] == [
        (0.0, False, False, {"t": 7.0}),
        (2.0, True, True, {"t": 7.0}),
    ]
    judged = env_of(f"{path}:np_rewards", verifier="math").score(batch)  # the verifier decides correct
    assert [(s.reward, s.correct, s.well_formed) for s in judged] == [(1.0, True, True), (-1.0, False, False)]
    judged = env_of(f"{path}:torch_dict", verifier="math").score(batch)
    assert [(s.reward, s.correct) for s in judged] == [(0.0, True), (2.0, False)]


FAULTY = """
import math

def run(prompts, completions, rows, finish_reasons, kind):
    rewards = [1.0 for _ in completions]
    if kind == "raise" and any("7" in p for p in prompts):
        raise KeyError("score")
    if kind == "raise_batch" and len(prompts) > 1:
        raise RuntimeError("batch too large")
    if kind == "length":
        return rewards[:-1]
    if kind == "nan":
        rewards[-1] = math.nan
    if kind == "inf":
        rewards[0] = -math.inf
    if kind == "string":
        rewards[1] = "1.0"
    if kind == "none":
        return None
    if kind == "no_reward":
        return {"score": rewards}
    if kind == "taken":
        return {"reward": rewards, "mean": 1.0}
    if kind == "metric_nan":
        return {"reward": rewards, "loss": math.nan}
    if kind == "short_metric":
        return {"reward": rewards, "loss": [1.0]}
    return rewards
"""


FIRST = r"\(the batch's first prompt: '0\+1='\)"
FAILURES = {
    "raise": r"raised KeyError: 'score' \(rewards.py:7\) on completion 7 of 9 \(prompt '7\+1='\)",
    "raise_batch": r"raised RuntimeError: batch too large \(rewards.py:9\) on the batch of 9, though none "
    rf"fails alone {FIRST}",
    "length": rf"returned 8 values of reward for 9 completions {FIRST}",
    "nan": r"returned reward=nan on completion 8 of 9 \(prompt '8\+1='\)",
    "inf": r"returned reward=-inf on completion 0 of 9 \(prompt '0\+1='\)",
    "string": r"returned reward='1.0' \(str\), not a number on completion 1 of 9",
    "none": rf"returned NoneType as reward, not a list of one value per completion {FIRST}",
    "no_reward": rf"returned a dict without 'reward' \(keys: 'score'\) {FIRST}",
    "taken": r"returned a metric named 'mean'",
    "metric_nan": rf"returned loss=nan for the batch {FIRST}",
    "short_metric": rf"returned 1 values of loss for 9 completions {FIRST}",
}


@pytest.mark.parametrize("kind", list(FAILURES))
def test_failures_name_the_plugin_and_the_completion(tmp_path, kind):
    path = plugin(tmp_path, FAULTY)
    env = env_of(f"{path}:run", options={"kind": kind})
    with pytest.raises(RewardPluginError, match=f"^reward plugin {path}:run {FAILURES[kind]}") as e:
        env.score(completions(*"123456789"))
    assert "\n" not in str(e.value)


def test_long_prompts_are_cut(tmp_path):
    path = plugin(tmp_path, FAULTY)
    env = env_of(f"{path}:run", options={"kind": "nan"})
    with pytest.raises(RewardPluginError, match=r"\(prompt 'a\\nb{58}'\.\.\.\)$"):
        env.score([Completion("a\n" + "b" * 500, "x")])


# ---- PPO: a plugin plus a reward model -------------------------------------------------------------


def test_ppo_plugin_plus_reward_model(tmp_path, pretrained):  # noqa: F811
    """environment.name=plugin with environment.reward_model: plugin reward + weight x the model's score;
    correct and the plugin's metrics are the plugin's."""
    from test_ppo import fake_reward_model

    from algorithms.ppo import PPOEnvironmentConfig
    from core.data.tokenizer import load_tokenizer

    path = plugin(tmp_path, REWARDS)
    reward_model = fake_reward_model(pretrained / "hf", tmp_path / "rm")
    tokenizer = load_tokenizer(pretrained / "hf")
    batch = completions("1", "3")
    alone = EnvironmentConfig(name="plugin", function=f"{path}:parts").build().score(batch)
    section = {
        "name": "plugin",
        "function": f"{path}:parts",
        "reward_model": {"path": str(reward_model), "weight": 0.5},
    }
    both = PPOEnvironmentConfig(**section).build(tokenizer).score(batch)
    model = EnvironmentConfig(name="reward_model", path=str(reward_model)).build(tokenizer).score(batch)
    assert [b.reward for b in both] == pytest.approx(
        [a.reward + 0.5 * m.reward for a, m in zip(alone, model)]
    )
    assert [b.correct for b in both] == [True, False] and [b.metrics for b in both] == [
        a.metrics for a in alone
    ]


# ---- failures during a run: one line, exit 2, the last checkpoint intact ------------------------------

STEP_PLUGIN = """
import hashlib, json, math
from pathlib import Path

calls = 0

def reward(prompts, completions, rows, finish_reasons, kind="", fail_at=0, run_dir=""):
    global calls
    calls += 1
    rewards = [float(c.strip() == r["answer"]) for c, r in zip(completions, rows)]
    if not kind or calls < fail_at:
        return {"reward": rewards, "chars": [len(c) for c in completions]}
    if calls == fail_at:  # what the failure must leave as it is, and the prompts of the failing step
        root = Path(run_dir) / "checkpoints"
        files = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in sorted(root.rglob("*")) if p.is_file()}
        (Path(run_dir).parent / "before.json").write_text(json.dumps({"files": files, "prompts": prompts}))
    if kind == "raise":
        raise ValueError("the judge is down")
    if kind == "length":
        return rewards[:-1]
    rewards[1] = math.nan
    return rewards
"""

FAST = [
    "train.max_steps=3",
    "train.save_every=2",
    "train.eval_every=0",
    "train.log_every=1",
    "train.progress_bar=false",
    "train.global_batch_size=4",
    "train.micro_batch_size=4",
    "rollout.prompts_per_step=2",
    "rollout.n=2",
    "rollout.max_tokens=4",
    "data.synthetic.n_train=16",
    "data.synthetic.n_eval=2",
    "eval.num_prompts=2",
    "eval.samples=0",
    "environment.name=plugin",
]


def rl_grpo(tiny: Path, run_dir: Path, function: str, *overrides: str) -> int:
    from rl.cli import main

    init = f"model.init_from={tiny}/checkpoints/step_400"
    argv = [str(ROOT / "configs/grpo_tiny.yaml"), init, f"run.dir={run_dir}", *FAST]
    return main(["grpo", *argv, f"environment.function={function}", *overrides])


def hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# What the error names at step 3, {p0} the step's first prompt (prompt-major, n=2: completion 1's too).
NAMED = {
    "raise": r"raised ValueError: the judge is down \(plugin.py:\d+\) on completion 0 of 4 \(prompt {p0}\)",
    "length": r"returned 3 values of reward for 4 completions \(the batch's first prompt: {p0}\)",
    "nan": r"returned reward=nan on completion 1 of 4 \(prompt {p0}\)",
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(NAMED))
def test_a_failing_plugin_stops_the_run_in_one_line_with_the_checkpoint_intact(
    tiny_pretrain_400, tmp_path, monkeypatch, capsys, kind
):
    import re

    from algorithms.rl_inputs import load_init_model, resolve_init
    from core.checkpoint.checkpointer import CheckpointManager
    from core.checkpoint.safe_load import verify_checkpoint

    plugin(tmp_path, STEP_PLUGIN, "plugin.py")
    monkeypatch.chdir(tmp_path)  # the plugin's path is relative to the current directory
    run_dir = tmp_path / "run"
    options = [
        f"environment.options.kind={kind}",
        "environment.options.fail_at=3",
        f"environment.options.run_dir={run_dir}",
    ]
    assert rl_grpo(tiny_pretrain_400, run_dir, "plugin.py:reward", *options) == 2

    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    before = json.loads((tmp_path / "before.json").read_text())
    assert len(errors) == 1, errors
    first_prompt = re.escape(repr(before["prompts"][0]))
    assert re.fullmatch(
        rf"error: reward plugin plugin.py:reward {NAMED[kind].format(p0=first_prompt)}; the run stopped after step 2: "
        r"fix the plugin and rerun the same command to resume from the newest checkpoint",
        errors[0],
    ), errors[0]

    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2"]  # no step_3, no temporary directory
    assert hashes(checkpoints) == before["files"]
    assert not (run_dir / "hf").exists() and not list(run_dir.glob(".tmp-*"))
    verify_checkpoint(checkpoints / "step_2")
    assert CheckpointManager.load_state(checkpoints / "step_2")["step"] == 2
    load_init_model(resolve_init(str(checkpoints / "step_2")))
    if kind != "nan":
        return
    # The user's way out: fix the plugin, rerun the same command; it resumes from step 2.
    plugin(tmp_path, STEP_PLUGIN.replace("if not kind", "if True"), "plugin.py")
    assert rl_grpo(tiny_pretrain_400, run_dir, "plugin.py:reward", *options) == 0
    from core.utils.metrics import read_metrics

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2, 3]
    assert all("reward/chars" in r for r in rows if "reward/mean" in r)
