"""SFT, DPO and reward models from their tiny configs, as a user runs them after `rl pretrain`: each moves
its metric. Plus: any stage's checkpoint starts any other stage, a reward model trained here scores GRPO
rollouts, and bad input stops every loop with one line and exit code 2 before anything is written.

The starting model is a shortened `configs/pretrain_tiny.yaml` run (module fixture), so the tests do not
depend on runs/ and take what a fresh clone has.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.utils.metrics import read_metrics
from rl.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["train.progress_bar=false"]


def rl(*argv: str) -> int:
    return main([*argv])


def evals(run_dir: Path, key: str) -> list[float]:
    return [r[key] for r in read_metrics(run_dir) if key in r]


@pytest.fixture(scope="module")
def base(tiny_pretrain_400) -> Path:
    """The tiny pretrain, stopped early (~80% held-out greedy accuracy): room to improve, wrong samples."""
    return tiny_pretrain_400 / "checkpoints" / "step_400"


@pytest.mark.slow
def test_sft_tiny_raises_held_out_accuracy(base, tmp_path):
    run_dir = tmp_path / "sft"
    code = rl(
        "sft",
        str(ROOT / "configs/sft_tiny.yaml"),
        f"run.dir={run_dir}",
        f"model.init_from={base}",
        "train.max_steps=60",
        "train.eval_every=60",
        "train.save_every=60",
        *QUIET,
    )
    assert code == 0
    accuracy = evals(run_dir, "eval/accuracy")
    assert len(accuracy) == 2 and accuracy[-1] > accuracy[0], accuracy  # step 0, then step 60
    rows = read_metrics(run_dir)
    assert "train/token_accuracy" in rows[-1] and "eval/loss" in rows[-1]
    meta = json.loads((run_dir / "checkpoints/step_60/meta.json").read_text())
    assert meta["stage"] == "sft" and meta["step"] == 60 and meta["arch"] == "llama"
    assert (run_dir / "hf/model.safetensors").is_file()


@pytest.mark.slow
def test_dpo_tiny_separates_pairs_without_losing_accuracy(base, tmp_path):
    run_dir = tmp_path / "dpo"
    code = rl(
        "dpo",
        str(ROOT / "configs/dpo_tiny.yaml"),
        f"run.dir={run_dir}",
        f"model.init_from={base}",
        "train.eval_every=200",
        *QUIET,
    )
    assert code == 0
    accuracies = evals(run_dir, "eval/rewards/accuracies")
    margins = evals(run_dir, "eval/rewards/margins")
    greedy = evals(run_dir, "eval/accuracy")
    assert accuracies[-1] >= 0.9, accuracies
    assert margins[0] < margins[1] < margins[2], margins  # steps 0, 200, 400
    # Greedy task accuracy must not fall (200 held-out problems: one problem is 0.005).
    assert greedy[-1] >= greedy[0] - 0.01, greedy
    last = read_metrics(run_dir)[-1]
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ):
        assert f"train/{key}" in last and f"eval/{key}" in last, key


@pytest.mark.slow
def test_rm_tiny_ranks_held_out_pairs_and_scores_grpo_rollouts(base, tmp_path):
    run_dir = tmp_path / "rm"
    code = rl(
        "rm",
        str(ROOT / "configs/rm_tiny.yaml"),
        f"run.dir={run_dir}",
        f"model.init_from={base}",
        "train.eval_every=100",
        *QUIET,
    )
    assert code == 0
    assert evals(run_dir, "eval/accuracy")[-1] >= 0.9
    assert (run_dir / "reward_model/model_config.json").is_file()

    # GRPO rewarded by the reward model just trained (its score of prompt + response).
    grpo_dir = tmp_path / "grpo_rm"
    code = rl(
        "grpo",
        str(ROOT / "configs/grpo_tiny.yaml"),
        f"run.dir={grpo_dir}",
        f"model.init_from={base}",
        "environment.name=reward_model",
        f"environment.path={run_dir}",
        "environment.verifier=arithmetic",
        "train.max_steps=2",
        "train.eval_every=0",
        "rollout.prompts_per_step=8",
        "train.global_batch_size=64",
        "train.micro_batch_size=32",
        *QUIET,
    )
    assert code == 0
    rows = read_metrics(grpo_dir)
    rewards = [r["reward/mean"] for r in rows]
    # Scores, not 0/1 verifier rewards: a reward model's outputs are real numbers.
    assert all(r not in (0.0, 1.0) for r in rewards), rewards
    assert all(0.0 <= r["reward/accuracy"] <= 1.0 for r in rows)

    # On Ray the same run scores through a RewardModelWorker group: the first step's rollouts (same seeds,
    # same weights) get the same rewards as in this process.
    ray_dir = tmp_path / "grpo_rm_ray"
    code = rl(
        "grpo",
        str(ROOT / "configs/grpo_tiny.yaml"),
        f"run.dir={ray_dir}",
        f"model.init_from={base}",
        "environment.name=reward_model",
        f"environment.path={run_dir}",
        "environment.verifier=arithmetic",
        "train.max_steps=1",
        "train.eval_every=0",
        "rollout.prompts_per_step=8",
        "train.global_batch_size=64",
        "train.micro_batch_size=32",
        "placement.num_bundles=1",
        "ray.num_cpus=2",
        *QUIET,
    )
    assert code == 0
    first = read_metrics(ray_dir)[0]
    assert abs(first["reward/mean"] - rows[0]["reward/mean"]) < 1e-4, (first, rows[0])
    assert first["reward/accuracy"] == rows[0]["reward/accuracy"]


@pytest.mark.slow
def test_any_stage_checkpoint_starts_any_other_stage(base, tmp_path):
    """grpo step_N -> sft and dpo; sft step_N -> grpo."""
    grpo = tmp_path / "grpo"
    assert (
        rl(
            "grpo",
            str(ROOT / "configs/grpo_tiny.yaml"),
            f"run.dir={grpo}",
            f"model.init_from={base}",
            "train.max_steps=1",
            "train.eval_every=0",
            "rollout.prompts_per_step=8",
            "train.global_batch_size=64",
            "train.micro_batch_size=32",
            *QUIET,
        )
        == 0
    )
    step = grpo / "checkpoints/step_1"
    assert json.loads((step / "meta.json").read_text())["stage"] == "grpo"
    sft = tmp_path / "sft"
    assert (
        rl(
            "sft",
            str(ROOT / "configs/sft_tiny.yaml"),
            f"run.dir={sft}",
            f"model.init_from={step}",
            "train.max_steps=2",
            "train.eval_every=0",
            "data.synthetic.n_train=200",
            *QUIET,
        )
        == 0
    )
    dpo = tmp_path / "dpo"
    assert (
        rl(
            "dpo",
            str(ROOT / "configs/dpo_tiny.yaml"),
            f"run.dir={dpo}",
            f"model.init_from={step}",
            "train.max_steps=1",
            "train.eval_every=0",
            "data.synthetic.n_train=200",
            "data.synthetic.n_eval=20",
            *QUIET,
        )
        == 0
    )
    back = tmp_path / "grpo_from_sft"
    assert (
        rl(
            "grpo",
            str(ROOT / "configs/grpo_tiny.yaml"),
            f"run.dir={back}",
            f"model.init_from={sft / 'checkpoints/step_2'}",
            "train.max_steps=1",
            "train.eval_every=0",
            "rollout.prompts_per_step=8",
            "train.global_batch_size=64",
            "train.micro_batch_size=32",
            *QUIET,
        )
        == 0
    )
    # A checkpoint and the hf/ export of the same step load as the same weights.
    from algorithms.rl_inputs import load_init_model, resolve_init

    a = load_init_model(resolve_init(step)).state_dict()
    b = load_init_model(resolve_init(grpo / "hf")).state_dict()
    assert all((a[k] - b[k]).abs().max() == 0 for k in a)
