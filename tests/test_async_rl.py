"""Asynchronous rollouts (rollout.asynchronous, algorithms/async_rollout.py).

- the launch queue: results in launch order, a failed generation re-raised in the trainer, the loader
  position of the oldest pending launch;
- the config refuses what it cannot run (in this process, dynamic sampling, tis without a cap, T != 1);
- on a real local Ray cluster (disaggregated: a policy pool and an engine pool, refit over a gloo
  transport): max_staleness=0 logs exactly what the synchronous loop logs, step for step; max_staleness=1
  trains each step on the samples of the previous step's weights (staleness 1 after the first step), and
  its checkpoint records the loader before the launched prompts.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from algorithms.async_rollout import RolloutQueue


def test_queue_returns_launches_in_order_and_reraises_failures() -> None:
    queue = RolloutQueue()
    order: list[int] = []

    def work(i: int, delay: float):
        def run() -> int:
            time.sleep(delay)
            order.append(i)
            return i * 10

        return run

    queue.launch(1, 0, work(1, 0.05), {"pos": 1})
    queue.launch(2, 0, work(2, 0.0), {"pos": 2})
    assert queue.loader_state == {"pos": 1}  # the oldest pending launch
    launched, result = queue.pop()
    assert (launched.step, result) == (1, 10) and queue.loader_state == {"pos": 2}
    queue.drain()
    assert order == [1, 2]  # one worker, in launch order
    assert queue.pop()[1] == 20 and queue.loader_state is None

    def fail() -> None:
        raise RuntimeError("engine died")

    queue.launch(3, 1, fail, {})
    with pytest.raises(RuntimeError, match="engine died"):
        queue.pop()
    queue.close()


def base_config(run_dir: Path, hf_dir: Path, **sections):
    from rl.grpo_cluster import ClusterGRPOConfig

    base = {
        "run": {"dir": str(run_dir)},
        "model": {"init_from": str(hf_dir)},
        "train": {
            "max_steps": 3,
            "global_batch_size": 8,
            "micro_batch_size": 8,
            "log_every": 1,
            "eval_every": 0,
            "save_every": 2,
            "progress_bar": False,
            "device": "cpu",
        },
        "optim": {"lr": 1e-2, "min_lr": 1e-2},
        "data": {"synthetic": {"n_train": 32, "n_eval": 4}},
        "rollout": {"prompts_per_step": 2, "n": 4, "max_tokens": 4},
        "environment": {"format_reward": 0.5},
        "algorithm": {"loss": {"tis_cap": 2.0, "entropy_coef": 0.01}},
        "placement": {"mode": "disaggregated", "pools": {"policy": 1, "generation": 1}},
        "failure": {"call_timeout_s": 120.0, "restart_timeout_s": 120.0},
    }
    for section, values in sections.items():
        if values is None:
            base.pop(section)
        else:
            base[section] = {**base.get(section, {}), **values}
    return ClusterGRPOConfig(**base)


ASYNC = {"asynchronous": {"enabled": True}}


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"placement": None, "rollout": ASYNC}, "mode=disaggregated"),
        ({"algorithm": {"loss": {"tis_cap": None}}, "rollout": ASYNC}, "tis_cap"),
        ({"rollout": {**ASYNC, "dynamic_sampling": {"enabled": True}}}, "dynamic_sampling"),
        ({"rollout": {**ASYNC, "temperature": 0.7}}, "temperature=1"),
    ],
)
def test_config_refuses_what_async_cannot_run(tmp_path: Path, sections: dict, message: str) -> None:
    from pydantic import ValidationError

    base_config(tmp_path, tmp_path, rollout=ASYNC)  # the base layout is fine
    with pytest.raises(ValidationError, match=message):
        base_config(tmp_path, tmp_path, **sections)


# ---- on Ray ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    from ray_local import local_ray

    with local_ray(object_store_mb=256):
        yield


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from tiny_llama import save_random_tiny_llama

    from core.data.synthetic import save_char_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    return save_random_tiny_llama(root / "hf", tokenizer_dir=save_char_tokenizer(root / "tokenizer"))


def _rows(run_dir: Path) -> list[dict]:
    from core.utils.metrics import read_metrics

    return [
        {k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in read_metrics(run_dir)
    ]


@pytest.mark.slow
def test_staleness_0_is_the_synchronous_loop_and_1_trains_on_the_previous_weights(
    ray_cluster, hf_dir: Path, tmp_path: Path
) -> None:
    from rl.grpo_cluster import run_grpo_cluster

    run_grpo_cluster(base_config(tmp_path / "sync", hf_dir))
    run_grpo_cluster(
        base_config(tmp_path / "s0", hf_dir, rollout={"asynchronous": {"enabled": True, "max_staleness": 0}})
    )
    sync, s0 = _rows(tmp_path / "sync"), _rows(tmp_path / "s0")
    assert len(sync) == 3
    for a, b in zip(sync, s0, strict=True):
        staleness = {k: b.pop(k) for k in ("rollout/staleness_mean", "rollout/staleness_max")}
        assert staleness == {"rollout/staleness_mean": 0.0, "rollout/staleness_max": 0.0}
        assert a == b  # same prompts, seeds, weights: the same numbers

    run_grpo_cluster(
        base_config(tmp_path / "s1", hf_dir, rollout={"asynchronous": {"enabled": True, "max_staleness": 1}})
    )
    s1 = _rows(tmp_path / "s1")
    assert [r["rollout/staleness_max"] for r in s1] == [0.0, 1.0, 1.0]
    assert s1[0]["reward/mean"] == sync[0]["reward/mean"]  # step 1: nothing launched ahead yet
    # step 2 trains on samples of step 1's weights: the ones the sync run drew at step 1 came from the
    # same weights with other seeds, so only the step-1 gap to the trainer is a refit check
    assert s1[0]["rollout/logprob_gap_max"] < 1e-4
    assert "rollout/stale_logprob_gap_max" in s1[1] and s1[1]["rollout/stale_logprob_gap_max"] > 1e-4
    assert all(r["tis/weight_mean"] > 0 for r in s1)
    # the step-2 checkpoint was written while step 3's prompts were launched: it records the loader
    # before them, so a resumed run draws them again
    from core.checkpoint.checkpointer import CheckpointManager

    state = CheckpointManager.load_state(tmp_path / "s1/checkpoints/step_2")
    assert state["data"] == CheckpointManager.load_state(tmp_path / "sync/checkpoints/step_2")["data"]
