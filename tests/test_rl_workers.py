"""rl.workers without Ray: a worker object is a plain class, so its methods run in-process (no groups).

- a colocated PolicyWorker samples from its own parameters: after a train step and use_current_weights
  its engine's sampler logprobs equal the trainer's (fp32, 1e-5);
- save / load restores weights, optimizer and LR schedule: the next step after a load equals the next
  step without one;
- disaggregated refit glue: PolicyWorker.send_weights -> GenerationWorker.receive_weights over the gloo
  weight transport (two threads) makes the engine's greedy output equal the colocated engine's;
- ClusterGRPOConfig rejects layouts the cluster run cannot place.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch
from tiny_llama import save_random_tiny_llama

from algorithms.rollouts import build_batch, sampling_requests
from core.config import OptimConfig, ParallelConfig
from rollout.environments import Score

PROMPTS = [[1, 20, 21, 13], [1, 22, 12, 23, 13]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and immune to other processes competing for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save_random_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf")


def specs(hf_dir: Path):
    from rl.workers import EngineSpec, PolicySpec

    engine = EngineSpec(kind="native", init_from=str(hf_dir), max_model_len=16, eos_token_ids=(2,))
    optim = OptimConfig(lr=1e-2, min_lr=1e-3, weight_decay=0.0)
    policy = PolicySpec(
        init_from=str(hf_dir),
        parallel=ParallelConfig(),
        optim=optim,
        micro_batch_size=4,
        total_optimizer_steps=4,
        engine=engine,
    )
    return policy, engine


def policy_worker(spec):
    from rl.workers import PolicyWorker

    worker = PolicyWorker(spec)
    worker.rank = 0
    worker.setup()
    return worker


def sampled_batch(worker, greedy: bool = False) -> dict[str, torch.Tensor]:
    from algorithms.grpo_config import RolloutConfig

    cfg = RolloutConfig(n=4, max_tokens=6, temperature=1.0)
    results = worker.generate(sampling_requests(PROMPTS, cfg, seed=3, greedy=greedy))
    rewards = [float(i % 2) for i in range(sum(len(r.samples) for r in results))]
    batch = build_batch(results, [Score(r, r > 0, True) for r in rewards])
    batch["advantages"] = (batch["rewards"] - 0.5)[:, None] * batch["response_mask"]
    return batch


def train_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        k: v for k, v in batch.items() if k in ("input_ids", "response_mask", "advantages", "old_logprobs")
    }


def test_colocated_policy_worker_samples_from_its_trained_weights(hf_dir: Path) -> None:
    worker = policy_worker(specs(hf_dir)[0])
    batch = sampled_batch(worker)
    metrics = worker.train(train_batch(batch))
    assert metrics["grad_norm"] > 0 and metrics["lr"] == pytest.approx(
        1e-2
    )  # cosine from 1e-2: step 0 at the top
    worker.use_current_weights(version=2)
    assert worker.weight_version() == 2
    batch = sampled_batch(worker)
    gap = (worker.logprobs(batch)["logprobs"] - batch["sampler_logprobs"])[batch["response_mask"].bool()]
    assert gap.abs().max() < 1e-5


def test_save_load_resumes_weights_optimizer_and_schedule(hf_dir: Path, tmp_path: Path) -> None:
    spec = dataclasses.replace(specs(hf_dir)[0], engine=None)
    first = policy_worker(spec)
    batch = train_batch(sampled_batch(policy_worker(specs(hf_dir)[0])))
    first_lr = first.train(batch)["lr"]
    first.save(str(tmp_path / "ckpt"))
    straight = first.train(batch)
    resumed = policy_worker(spec)
    resumed.load(str(tmp_path / "ckpt"))
    again = resumed.train(batch)
    assert again["lr"] < first_lr and again == pytest.approx(straight, rel=1e-6, abs=1e-9)


def test_weight_transport_refit_between_workers(hf_dir: Path) -> None:
    from rl.workers import GenerationWorker

    policy_spec, engine_spec = specs(hf_dir)
    policy = policy_worker(policy_spec)
    policy.train(train_batch(sampled_batch(policy)))
    policy.use_current_weights(version=2)
    engine = GenerationWorker(engine_spec)
    engine.rank = 0
    engine.setup()
    stale = sampled_batch(engine, greedy=True)["input_ids"]
    address = policy.open_weight_sender(1, "process_group", timeout_s=60)
    engine.connect_weight_receiver(address, timeout_s=60)
    receiver = threading.Thread(target=engine.receive_weights)
    receiver.start()
    policy.send_weights(version=2)
    receiver.join(timeout=60)
    assert engine.weight_version() == 2
    want = sampled_batch(policy, greedy=True)["input_ids"]
    assert torch.equal(sampled_batch(engine, greedy=True)["input_ids"], want)
    assert not torch.equal(stale, want)  # the refit changed what the engine generates
    policy.close_weight_sender()
    engine.close()


def test_cluster_config_rejects_unplaceable_layouts() -> None:
    from rl.grpo_cluster import ClusterGRPOConfig

    model = {"init_from": "x"}
    with pytest.raises(ValueError, match="needs parallel.pp=1"):
        ClusterGRPOConfig(model=model, parallel={"pp": 2})
    with pytest.raises(ValueError, match=r"needs a size for \['generation'\]"):
        ClusterGRPOConfig(model=model, placement={"mode": "disaggregated", "pools": {"policy": 1}})
    with pytest.raises(ValueError, match="context parallelism"):
        ClusterGRPOConfig(model=model, parallel={"cp": 2})
    cfg = ClusterGRPOConfig(
        model=model,
        parallel={"pp": 2},
        placement={"mode": "disaggregated", "pools": {"policy": 2, "generation": 1}},
    )
    assert not cfg.colocated_engines and cfg.failure.max_restarts == 0
