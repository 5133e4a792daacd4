"""GRPO on a real local Ray cluster (CPU, gloo; one cluster for the module, 4 logical CPUs).

- parity: a tp2 policy worker group (2 gloo ranks) through RayPolicy gives the single process's
  logprobs, train metrics and updated weights on the same batch;
- colocated: run_grpo_cluster, dp2 policy hosting the native engines on its own parameters + a dp2
  reference, one full step (refit, generate, score, logprobs, train), eval, checkpoint, hf/ export;
- disaggregated: tp2 policy pool + one native engine replica in its own pool, refit over a gloo weight
  transport: after a training step the engine's greedy output and logprobs equal those of an engine
  built from the policy's weights;
- failures: a policy actor killed mid-run stops the run with one message naming the role, the rank and
  how to resume (max_restarts=0), and the same command then resumes; with max_restarts=1 the run
  restarts from the newest checkpoint by itself and completes.

The tiny model is a random Llama (hidden 64, 2 layers, 2 heads) saved as an HF directory with the char
tokenizer. Tolerances (fp32): see `test_tp2_policy_group_matches_single_process`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import ray
import torch
from numerics import close
from ray_local import local_ray
from tiny_llama import save_random_tiny_llama

from core.config import OptimConfig, ParallelConfig
from core.parallel.dims import ParallelDims
from rl.cluster import ResourcePool, WorkerGroup

pytestmark = pytest.mark.slow

CALL_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(object_store_mb=256):
        yield


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A random tiny Llama with the char tokenizer as an HF directory (2 kv heads: tp2 splits them)."""
    from core.data.synthetic import save_char_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    return save_random_tiny_llama(root / "hf", tokenizer_dir=save_char_tokenizer(root / "tokenizer"))


# ---- parity ----------------------------------------------------------------------------------------------


def rl_batch(seed: int = 0, B: int = 8, T: int = 12) -> dict[str, torch.Tensor]:
    """Right-padded rows (prompts 2-5 tokens, responses 3-6) with advantages and off-policy old logprobs."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T)
    for b in range(B):
        prompt, response = 2 + b % 4, 3 + b % 4
        ids[b, : prompt + response] = torch.randint(4, 64, (prompt + response,), generator=g)
        mask[b, prompt : prompt + response] = 1
    advantages = torch.randn(B, 1, generator=g).expand(B, T) * mask
    old = -3.0 * mask + 0.3 * torch.randn(B, T, generator=g) * mask
    return {
        "input_ids": ids,
        "response_mask": mask,
        "advantages": advantages.contiguous(),
        "old_logprobs": old,
    }


def test_tp2_policy_group_matches_single_process(ray_cluster, hf_dir: Path) -> None:
    """fp32: tp splits the matmuls and the vocabulary sums (~1e-7 relative): 1e-5 on logprobs and metrics.
    AdamW with eps=1 makes the first update lr * g / (|g| + 1), smooth in g, so weights agree to 1e-6
    while lr=1 moves them by ~1e-3 and more (as in tests/test_policy_model.py)."""
    from algorithms.policy import PolicyLossConfig
    from rl.workers import PolicySpec, PolicyWorker, RayPolicy

    optim = OptimConfig(lr=1.0, min_lr=0.0, weight_decay=0.0, eps=1.0, clip_grad=0.0, decay="constant")
    spec = PolicySpec(
        init_from=str(hf_dir),
        parallel=ParallelConfig(tp=2),
        loss=PolicyLossConfig(clip_high=0.28, entropy_coef=0.01),
        optim=optim,
        micro_batch_size=3,
        total_optimizer_steps=4,
    )
    single = PolicyWorker(dataclasses.replace(spec, parallel=ParallelConfig()))
    single.rank = 0
    single.setup()  # in-process, no groups: the single-process reference
    pool = ResourcePool(1, {"CPU": 1}, name="parity")
    group = WorkerGroup(
        PolicyWorker,
        pool,
        2,
        ParallelDims(tp=2, world_size=2),
        (spec,),
        name="policy",
        timeout_s=CALL_TIMEOUT_S,
    )
    try:
        policy = RayPolicy(group)
        batch = rl_batch()
        got, want = policy.logprobs(batch, with_entropy=True), single.logprobs(batch, with_entropy=True)
        for key in ("logprobs", "entropy"):
            close(got[key], want[key], 1e-5)
        before = dict(policy.hf_weights())
        got_metrics, want_metrics = policy.train(batch), single.train(batch)
        assert got_metrics.keys() == want_metrics.keys()
        for key, value in want_metrics.items():
            close(got_metrics[key], value, 1e-5)
        after, want_after = dict(policy.hf_weights()), single.hf_state()
        assert after.keys() == want_after.keys()
        for name, tensor in want_after.items():
            close(after[name], tensor, 1e-6)
        assert max((after[n] - before[n]).abs().max() for n in after) > 1e-3  # the step moved them
    finally:
        group.shutdown()
        pool.remove()


def test_dp2_critic_group_matches_single_process_and_feeds_a_reward_model(
    ray_cluster, hf_dir: Path, tmp_path: Path
) -> None:
    """A dp2 CriticWorker group (value head on the tiny LM) through RayCritic: the single process's values
    and train metrics (1e-5, fp32: dp changes only the order of the gradient sum); its checkpoint loaded
    into a RewardModelWorker scores each row with the stepped critic's value after its last token."""
    from algorithms.critic import value_model_from_lm
    from core.bridge import load_hf, save_native
    from core.transformer.model import GPTModel
    from rl.workers import CriticSpec, CriticWorker, RayCritic, RewardModelSpec, RewardModelWorker

    optim = OptimConfig(lr=0.1, min_lr=0.1, weight_decay=0.0, eps=1.0, clip_grad=0.0, decay="constant")
    spec = CriticSpec(init_from=str(hf_dir), parallel=ParallelConfig(dp=2), optim=optim, micro_batch_size=3)
    single = CriticWorker(dataclasses.replace(spec, parallel=ParallelConfig()))
    single.rank = 0
    single.setup()
    pool = ResourcePool(1, {"CPU": 1}, name="critic")
    group = WorkerGroup(
        CriticWorker,
        pool,
        2,
        ParallelDims(dp=2, world_size=2),
        (spec,),
        name="critic",
        timeout_s=CALL_TIMEOUT_S,
    )
    try:
        critic, batch = RayCritic(group), rl_batch()
        values = critic.values(batch)["values"]
        mask = batch["response_mask"]  # past a micro-batch's last response token values are 0: rows differ
        close(values * mask, single.values(batch)["values"] * mask, 1e-5)
        batch |= {"returns": batch["advantages"] + 1.0, "old_values": values}
        got, want = critic.train(batch), single.train(batch)
        assert got.keys() == want.keys()
        for key, value in want.items():
            close(got[key], value, 1e-5)
        critic.save(tmp_path / "critic")
    finally:
        group.shutdown()
        pool.remove()
    config, state = value_model_from_lm(load_hf(hf_dir).config, load_hf(hf_dir).state_dict())
    model = GPTModel(config)
    model.load_state_dict(state)
    save_native(model, tmp_path / "value_model")
    reward = RewardModelWorker(
        RewardModelSpec(init_from=str(tmp_path / "value_model"), parallel=ParallelConfig())
    )
    reward.rank = 0
    reward.setup()
    reward.load(str(tmp_path / "critic"))
    scores = reward.scores({"input_ids": batch["input_ids"]})["scores"]
    lengths = (batch["input_ids"] != 0).sum(dim=1)
    after = single.values(batch | {"response_mask": torch.ones_like(batch["response_mask"])})["values"]
    rows = torch.arange(len(lengths))
    close(scores, after[rows, lengths], 1e-5)  # every row is padded: value after the last token


# ---- GRPO runs -------------------------------------------------------------------------------------------


def grpo_config(hf_dir: Path, run_dir: Path, **sections):
    from rl.grpo_cluster import ClusterGRPOConfig

    base = {
        "run": {"dir": str(run_dir)},
        "model": {"init_from": str(hf_dir)},
        "train": {
            "max_steps": 1,
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "log_every": 1,
            "progress_bar": False,
            "device": "cpu",
        },
        "optim": {"lr": 1e-2, "min_lr": 1e-2},
        "data": {"synthetic": {"n_train": 32, "n_eval": 4}},
        "rollout": {"prompts_per_step": 2, "n": 4, "max_tokens": 4},
        "environment": {"format_reward": 0.5},
        "eval": {"num_prompts": 4},
        "failure": {"call_timeout_s": CALL_TIMEOUT_S, "restart_timeout_s": CALL_TIMEOUT_S},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return ClusterGRPOConfig(**base)


def test_colocated_grpo_with_lora_on_ray(ray_cluster, hf_dir: Path, tmp_path: Path) -> None:
    """LoRA on Ray: the policy workers train adapters only, their base (adapters disabled) is the
    reference (no reference group), generation samples from the adapted model (logprob gap ~0), and the
    run exports merged hf/ plus adapter/ in PEFT's format; its checkpoint starts another stage merged."""
    from algorithms.rl_inputs import load_init_model, resolve_init
    from core.bridge import load_hf
    from core.utils.metrics import read_metrics
    from rl.grpo_cluster import run_grpo_cluster

    cfg = grpo_config(
        hf_dir,
        tmp_path / "run",
        parallel={"dp": 2},
        placement={"mode": "colocated", "num_bundles": 2},
        algorithm={"loss": {"kl_coef": 0.01, "entropy_coef": 0.01}},
        train={"max_steps": 2},
        lora={"rank": 4, "alpha": 8},
    )
    metrics = run_grpo_cluster(cfg)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["train/kl"] == 0.0 and rows[1]["train/kl"] > 0.0  # the adapters moved away from the base
    assert metrics["rollout/logprob_gap_max"] < 1e-4
    assert (tmp_path / "run/adapter/adapter_config.json").is_file()
    merged = load_hf(tmp_path / "run" / "hf").state_dict()
    from_checkpoint = load_init_model(resolve_init(tmp_path / "run/checkpoints/step_2")).state_dict()
    assert all((merged[k] - from_checkpoint[k]).abs().max() < 1e-6 for k in merged)
    base = load_hf(hf_dir).state_dict()
    assert any((merged[k] - base[k]).abs().max() > 1e-6 for k in merged)


def test_colocated_qat_grpo_step_end_to_end(ray_cluster, hf_dir: Path, tmp_path: Path) -> None:
    """A GRPO step on a dp2 group with colocated engines and a reference group, with quantize: on Ray: every policy rank calibrates the same fp8 scales on the first prompts, its
    colocated engine samples through the quantized modules (trainer == sampler), the reference group
    stays full precision, the checkpoint holds the scales and the run exports quantized/ beside hf/."""
    from torch.distributed.checkpoint import FileSystemReader

    from core.bridge import load_hf
    from core.utils.metrics import read_metrics
    from rl.grpo_cluster import run_grpo_cluster

    cfg = grpo_config(
        hf_dir,
        tmp_path / "run",
        parallel={"dp": 2},
        placement={"mode": "colocated", "num_bundles": 2},
        algorithm={"loss": {"kl_coef": 0.01}},
        quantize={"format": "fp8", "calibration_samples": 4},
    )
    metrics = run_grpo_cluster(cfg)
    for key in ("reward/mean", "train/loss", "train/kl", "train/grad_norm", "eval/accuracy", "time/refit"):
        assert key in metrics, key
    # generation split over the dp shards used the policy's own (quantized) modules: trainer == sampler
    assert metrics["rollout/logprob_gap_max"] < 1e-4
    assert metrics["train/kl"] > 0  # the quantized policy against the full-precision reference
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1]
    load_hf(tmp_path / "run" / "hf")
    saved = FileSystemReader(str(tmp_path / "run/checkpoints/step_1/model")).read_metadata()
    assert any(
        k.startswith("quantizers.") and k.endswith("input_quantizer._amax") for k in saved.state_dict_metadata
    )
    quantized = json.loads((tmp_path / "run/quantized/hf/config.json").read_text())["quantization_config"]
    assert quantized["quant_algo"] == "FP8"


def test_disaggregated_refit_moves_the_weights(ray_cluster, hf_dir: Path, tmp_path: Path) -> None:
    from algorithms.grpo import GRPOTrainer, write_hf
    from algorithms.rollouts import sampling_requests
    from rl.grpo_cluster import ClusterRun
    from rollout.engines.native import NativeEngine

    cfg = grpo_config(
        hf_dir,
        tmp_path / "run",
        parallel={"tp": 2},
        placement={"mode": "disaggregated", "pools": {"policy": 1, "generation": 1}},
        train={"max_steps": 2},
        algorithm={"loss": {"entropy_coef": 0.01}},  # a gradient even if every reward is the same
    )
    run = ClusterRun(cfg)
    run.start()
    try:
        trainer = GRPOTrainer(cfg, run.parts, run.inputs.train_rows, run.inputs.eval_rows)
        first, second = trainer.advance(), trainer.advance()
        assert first["train/grad_norm"] > 0 and first["rollout/logprob_gap_max"] < 1e-4
        # step 2 sampled after a refit of step 1's update: the engine held the trained weights
        assert second["rollout/logprob_gap_max"] < 1e-4
        trainer.refit()
        assert run.parts.generator.weight_version == 3
        requests = sampling_requests(trainer.encode(run.inputs.eval_rows), cfg.rollout, 0, greedy=True)
        remote = run.parts.generator.generate(requests)
        write_hf(run.parts.policy.hf_weights(), run.parts.policy.model_config(), tmp_path / "hf", None)
        local = NativeEngine(
            model_dir=tmp_path / "hf", max_model_len=32, eos_token_ids=[run.inputs.tokenizer.eos_token_id]
        ).generate(requests)
        for r, ref in zip(remote, local, strict=True):
            assert r.samples[0].token_ids == ref.samples[0].token_ids
            close(r.samples[0].logprobs, ref.samples[0].logprobs, 1e-5)
        initial = NativeEngine(model_dir=hf_dir, max_model_len=32).generate(requests)
        assert any(  # ... and those differ from the initial weights' (the refit was not a no-op)
            abs(a - b) > 1e-3
            for r, i in zip(remote, initial)
            for a, b in zip(r.samples[0].logprobs, i.samples[0].logprobs)
        )
    finally:
        run.shutdown()


class KillOnScore:
    """Wraps the environment: at the `at`-th score call, kills policy rank `rank` (as an OOM kill or a
    lost node would), then scores as usual; the next call to the policy finds the rank dead."""

    def __init__(self, run, at: int, rank: int = 1) -> None:
        self.run, self.at, self.rank, self.calls = run, at, rank, 0
        self.inner = run.parts.environment

    def score(self, completions):
        self.calls += 1
        if self.calls == self.at:
            ray.kill(self.run.groups["policy"].actors[self.rank], no_restart=True)
        return self.inner.score(completions)


def run_with_kill(cfg, at: int):
    import dataclasses as dc

    from rl.grpo_cluster import ClusterRun

    run = ClusterRun(cfg, resume_command="rl grpo cfg.yaml run.dir=RUN")
    run.start()
    run.parts = dc.replace(run.parts, environment=KillOnScore(run, at))
    return run, run.run


def test_killed_policy_rank_stops_cleanly_then_resumes_and_restarts(
    ray_cluster, hf_dir: Path, tmp_path: Path
) -> None:
    from core.utils.metrics import read_metrics
    from rl.grpo_cluster import ClusterRunError

    run_dir = tmp_path / "run"
    sections = dict(
        parallel={"dp": 2},
        placement={"mode": "colocated", "num_bundles": 2},
        train={"max_steps": 2, "save_every": 1, "keep_last": 5},
    )
    cfg = grpo_config(hf_dir, run_dir, **sections)
    run, fit = run_with_kill(cfg, at=2)  # during step 2, after step_1 was saved
    with pytest.raises(ClusterRunError) as failure:
        fit()
    message = str(failure.value)
    assert "'policy' rank 1" in message and "To resume: rl grpo cfg.yaml run.dir=RUN" in message
    assert "\n" not in message and not run.groups  # one line; every actor released
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_1"]  # nothing half written

    # the same run directory again, with a restart allowed, killed again in (its first) step 2
    cfg = grpo_config(hf_dir, run_dir, **sections, failure={"max_restarts": 1})
    run, fit = run_with_kill(cfg, at=1)
    metrics = fit()
    assert run.restarts == 1 and metrics["rollout/logprob_gap_max"] < 1e-4
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_1", "step_2"]
    assert (run_dir / "hf" / "model.safetensors").is_file()
