"""PPO with a critic: the math against its formulas and verl's reference behaviour, each phase on a tiny
model, `rl ppo` end to end (run, resume exactly, bad input), and the tiny recipe raising held-out accuracy.

The math (no model): GAE, the clipped value loss and the adaptive KL coefficient against the papers'
formulas and transcriptions of verl's compute_gae_advantage_return / compute_value_loss /
AdaptiveKLController (verl/trainer/ppo/core_algos.py); the KL in the reward per token.
With the tiny random Llama of tests/test_grpo.py (a few seconds): several epochs make clipping active,
critic warm-up leaves the policy as it was, a resumed run equals an uninterrupted one (policy, critic,
beta, data and sampling seeds). The slow end-to-end test pretrains the tiny model for 400 steps and trains
a reward model, as a user does before configs/ppo_tiny.yaml.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_grpo import pretrained  # noqa: F401 -- the module fixture: a tiny Llama taught arithmetic briefly

from algorithms.advantages import compute_advantages, masked_whiten
from algorithms.losses import adaptive_kl_coef, explained_variance, value_loss
from algorithms.ppo import (
    KLController,
    KLInRewardConfig,
    PPOConfig,
    VerifierPlusRewardModel,
    token_rewards,
)
from rollout.environments import Completion, Score, build_environment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: threads only fight each other on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- the math ------------------------------------------------------------------------------------------


def rl_rows(seed: int = 0, B: int = 5, T: int = 10) -> dict[str, torch.Tensor]:
    """Right-padded rows (prompt 2-3 tokens, response 3-6) with one masked token inside row 0's response
    (a tool turn, skipped by GAE), token rewards and values ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T)
    for b in range(B):
        start, length = 2 + b % 2, 3 + b % 4
        mask[b, start : start + length] = 1
    mask[0, 3] = 0
    return {
        "response_mask": mask,
        "rewards": torch.randn(B, T, generator=g) * mask,
        "values": torch.randn(B, T, generator=g),
    }


def formula_gae(rewards, values, mask, gamma, lam):
    """GAE by its definition, per row over the row's response tokens only (Schulman et al. 2016):
    A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V after the last token 0."""
    adv = torch.zeros_like(rewards, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        steps = mask[b].nonzero().flatten().tolist()
        v = [float(values[b, t]) for t in steps] + [0.0]
        deltas = [float(rewards[b, t]) + gamma * v[i + 1] - v[i] for i, t in enumerate(steps)]
        for i, t in enumerate(steps):
            adv[b, t] = sum((gamma * lam) ** k * d for k, d in enumerate(deltas[i:]))
    return adv


def verl_gae(token_level_rewards, values, response_mask, gamma, lam):
    """verl's compute_gae_advantage_return, transcribed (its masked_whiten: unbiased variance, eps 1e-8)."""
    nextvalues, lastgaelam, reversed_ = 0, 0, []
    for t in reversed(range(token_level_rewards.shape[-1])):
        delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
        reversed_.append(lastgaelam)
    advantages = torch.stack(reversed_[::-1], dim=1)
    returns = advantages + values
    n = response_mask.sum()
    mean = (advantages * response_mask).sum() / n
    var = (((advantages - mean) ** 2) * response_mask).sum() / n * n / (n - 1)
    return (advantages - mean) * torch.rsqrt(var + 1e-8), returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_its_formula_and_verl(gamma, lam):
    rows = rl_rows()
    mask, rewards, values = rows["response_mask"], rows["rewards"], rows["values"]
    raw, returns = compute_advantages("gae", rewards, mask, values=values, gamma=gamma, lam=lam, whiten=False)
    want = formula_gae(rewards, values, mask, gamma, lam)
    on = mask.bool()
    torch.testing.assert_close(raw.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(returns[on], (want.float() + values)[on], rtol=0, atol=1e-5)
    assert torch.all(raw[~on] == 0) and torch.all(returns[~on] == 0)
    whitened, _ = compute_advantages("gae", rewards, mask, values=values, gamma=gamma, lam=lam)
    verl_adv, verl_returns = verl_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(whitened[on], verl_adv[on], rtol=0, atol=1e-5)
    torch.testing.assert_close(returns[on], verl_returns[on], rtol=0, atol=1e-5)
    torch.testing.assert_close(whitened, masked_whiten(raw, mask))
    # lam = 1, gamma = 1: the advantage is the Monte-Carlo return minus the value
    if gamma == lam == 1.0:
        mc = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1])
        torch.testing.assert_close(raw[on], (mc - values)[on], rtol=0, atol=1e-5)


def verl_value_loss(vpreds, returns, values, response_mask, cliprange_value):
    """verl's compute_value_loss (token-mean), transcribed."""
    vpredclipped = torch.clamp(vpreds, values - cliprange_value, values + cliprange_value)
    vf_losses1, vf_losses2 = (vpreds - returns) ** 2, (vpredclipped - returns) ** 2
    mean = lambda x: (x * response_mask).sum() / response_mask.sum()  # noqa: E731
    return 0.5 * mean(torch.max(vf_losses1, vf_losses2)), mean(torch.gt(vf_losses2, vf_losses1).float())


def test_clipped_value_loss_matches_its_formula_and_verl():
    rows = rl_rows(seed=1)
    mask, returns, old = rows["response_mask"], rows["rewards"], rows["values"]
    values = (old + 0.5 * torch.randn(old.shape, generator=torch.Generator().manual_seed(2))).requires_grad_()
    loss, metrics = value_loss(values, old, returns, mask, clip_range=0.2)
    want_loss, want_clip = verl_value_loss(values, returns, old, mask, 0.2)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(metrics["vf_clip_frac"], want_clip)
    assert 0 < float(want_clip) < 1  # both branches occur
    (grad,) = torch.autograd.grad(loss, values)
    (want_grad,) = torch.autograd.grad(want_loss, values)
    torch.testing.assert_close(grad, want_grad)
    # A clipped token (the clipped branch larger) gets no gradient: its value moved past old +- 0.2.
    clipped = (old + (values - old).clamp(-0.2, 0.2) - returns) ** 2 > (values - returns) ** 2
    assert torch.all(grad[clipped & mask.bool()] == 0)
    # Unclipped: 0.5 (V - R)^2 averaged over the response tokens.
    plain, _ = value_loss(values, old, returns, mask, clip_range=None)
    torch.testing.assert_close(plain, 0.5 * ((values - returns) ** 2)[mask.bool()].mean())


class VerlAdaptiveKL:
    """verl's AdaptiveKLController, transcribed."""

    def __init__(self, init_kl_coef, target_kl, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target_kl, horizon

    def update(self, current_kl, n_steps):
        proportional_error = np.clip(current_kl / self.target - 1, -0.2, 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


def test_adaptive_kl_coefficient_follows_ziegler_and_verl():
    # the formula: coef * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon)
    assert adaptive_kl_coef(0.1, 0.06, 0.05, 1000, 100) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adaptive_kl_coef(0.1, 1.0, 0.05, 1000, 100) == pytest.approx(0.1 * 1.02)  # error clipped at +0.2
    assert adaptive_kl_coef(0.1, 0.045, 0.05, 1000, 100) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    assert adaptive_kl_coef(0.1, 0.05, 0.05, 1000, 100) == pytest.approx(0.1)
    ours = KLController(KLInRewardConfig(coef=0.2, target=0.05, horizon=500))
    verl = VerlAdaptiveKL(0.2, 0.05, 500)
    for kl in (0.0, 0.01, 0.2, 0.06, 0.049, 0.5, 0.02):
        ours.update(kl, n_steps=64)
        verl.update(kl, n_steps=64)
        assert ours.value == pytest.approx(verl.value, rel=1e-12)
    again = KLController(KLInRewardConfig(coef=0.2, target=0.05, horizon=500))
    again.load_state_dict(ours.state_dict())
    assert again.value == ours.value
    fixed = KLController(KLInRewardConfig(coef=0.2))
    fixed.update(1.0, n_steps=64)
    assert fixed.value == 0.2


def test_kl_in_the_reward_is_per_token():
    """r_t = -beta * kl_t on every response token, plus the score on the last one; nothing elsewhere.
    reward/kl: the mean over rows of each row's mean KL per token (what the adaptive beta steers)."""
    mask = torch.tensor([[0.0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    old = torch.tensor([[0.0, 0, -1.0, -0.5, -2.0], [0, -1.0, -0.2, 0, 0]])
    ref = torch.tensor([[0.0, 0, -1.5, -0.5, -1.0], [0, -2.0, -0.4, 0, 0]])
    batch = {
        "response_mask": mask,
        "rewards": torch.tensor([1.0, 0.0]),
        "old_logprobs": old,
        "ref_logprobs": ref,
    }
    rewards, metrics = token_rewards(batch, KLInRewardConfig(coef=0.1, estimator="k1"), coef=0.1)
    k1 = old - ref  # log pi - log pi_ref
    want = -0.1 * k1 * mask
    want[0, 4] += 1.0
    want[1, 2] += 0.0
    torch.testing.assert_close(rewards, want)
    row_means = [(0.5 + 0.0 - 1.0) / 3, (1.0 + 0.2) / 2]
    assert metrics["reward/kl"] == pytest.approx(sum(row_means) / 2)
    assert metrics["reward/kl_coef"] == 0.1
    plain, none = token_rewards(batch, KLInRewardConfig(), coef=0.0)  # off: the score on the last token
    assert none == {} and plain[0].tolist() == [0, 0, 0, 0, 1.0] and plain[1].abs().sum() == 0


def test_explained_variance():
    mask = torch.tensor([[1.0, 1, 1, 0]])
    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    assert float(explained_variance(returns, returns, mask)) == pytest.approx(1.0)
    assert float(explained_variance(torch.full_like(returns, 7.0), returns, mask)) == pytest.approx(0.0)


def test_verifier_plus_weighted_reward_model():
    class FakeRewardModel:
        def score(self, completions):
            return [Score(float(len(c.text)), False, False) for c in completions]

    env = VerifierPlusRewardModel(build_environment("arithmetic"), FakeRewardModel(), weight=0.5)
    scores = env.score([Completion("2+3=", "5", "stop"), Completion("2+3=", "61", "stop")])
    assert [s.reward for s in scores] == [1.0 + 0.5 * 1, 0.0 + 0.5 * 2]
    assert [s.correct for s in scores] == [True, False]  # the verifier's, never the reward model's


def test_config_checks():
    base = {"model": {"init_from": "x"}, "rollout": {"n": 1, "prompts_per_step": 8}}
    cfg = PPOConfig(
        **base,
        train={"global_batch_size": 4, "max_steps": 10},
        algorithm={"ppo_epochs": 3, "kl_in_reward": {"coef": 0.1}},
        critic={"warmup": 2},
    )
    assert cfg.mini_batches == 2 and cfg.uses_reference
    assert cfg.policy_optimizer_steps == 8 * 3 * 2 and cfg.critic_optimizer_steps == 10 * 3 * 2
    assert not PPOConfig(**base, train={"global_batch_size": 8}).uses_reference
    with pytest.raises(ValueError, match="multiple of train.global_batch_size"):
        PPOConfig(**base, train={"global_batch_size": 3})
    with pytest.raises(ValueError, match="leave none of train.max_steps"):
        PPOConfig(**base, train={"global_batch_size": 8, "max_steps": 2}, critic={"warmup": 2})
    with pytest.raises(ValueError, match="target needs coef > 0"):
        PPOConfig(**base, train={"global_batch_size": 8}, algorithm={"kl_in_reward": {"target": 0.1}})
    with pytest.raises(ValueError, match="unknown KL estimator"):
        PPOConfig(**base, train={"global_batch_size": 8}, algorithm={"kl_in_reward": {"estimator": "k9"}})
    with pytest.raises(ValueError, match="adds a reward model to a verifier"):
        PPOConfig(
            **base,
            train={"global_batch_size": 8},
            environment={"name": "reward_model", "path": "rm", "reward_model": {"path": "rm"}},
        )


# ---- with a model: tests/test_grpo.py's tiny Llama ------------------------------------------------------


def ppo_cfg(init_from: Path, run_dir: Path, **sections) -> PPOConfig:
    base = {
        "run": {"dir": str(run_dir)},
        "model": {"init_from": str(init_from)},
        "train": {
            "max_steps": 3,
            "global_batch_size": 8,
            "micro_batch_size": 8,
            "log_every": 1,
            "progress_bar": False,
            "device": "cpu",
        },
        "optim": {"lr": 1e-2, "min_lr": 1e-2, "decay": "constant"},
        "data": {"synthetic": {"n_train": 32, "n_eval": 4}},
        "rollout": {"prompts_per_step": 4, "n": 4, "max_tokens": 4},
        "environment": {"format_reward": 0.5},
        "eval": {"num_prompts": 4},
        "algorithm": {"ppo_epochs": 2},
        "critic": {"optim": {"lr": 1e-2, "min_lr": 1e-2, "decay": "constant"}},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return PPOConfig(**base)


def ppo_trainer(cfg: PPOConfig):
    from algorithms.ppo import PPOTrainer, build_components, check_for_run

    inputs = check_for_run(cfg)
    parts = build_components(cfg, inputs, torch.device("cpu"))
    return PPOTrainer(cfg, parts, inputs.train_rows, inputs.eval_rows)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    return any(not torch.equal(before[name], p) for name, p in model.named_parameters())


def test_several_epochs_make_clipping_active_one_pass_does_not(pretrained, tmp_path):  # noqa: F811
    """One pass with one mini-batch is on-policy: ratio 1 and the values at their old values, nothing
    clipped. Two passes of two mini-batches: from the second update on the ratio and the values have moved,
    and the policy's and the value's clip fractions are non-zero."""
    hf = pretrained / "hf"
    one = ppo_trainer(
        ppo_cfg(hf, tmp_path / "one", algorithm={"ppo_epochs": 1}, train={"global_batch_size": 16})
    )
    metrics = one.step()
    assert metrics["train/clip_frac"] == 0 and metrics["critic/vf_clip_frac"] == 0
    assert metrics["train/ratio_max"] == pytest.approx(1.0, abs=1e-4)
    many = ppo_trainer(ppo_cfg(hf, tmp_path / "many"))
    metrics = many.step()
    assert metrics["train/clip_frac"] > 0 and metrics["critic/vf_clip_frac"] > 0
    for key in (
        "critic/vf_loss",
        "critic/value_mean",
        "critic/explained_variance",
        "critic/grad_norm",
        "time/values",
    ):
        assert key in metrics, key


def test_critic_warmup_trains_only_the_critic(pretrained, tmp_path):  # noqa: F811
    trainer = ppo_trainer(ppo_cfg(pretrained / "hf", tmp_path / "run", critic={"warmup": 2}))
    policy, critic = trainer.parts.policy.generation_model(), trainer.parts.critic.model.engine.chunks[0]
    policy_start = weights(policy)
    for _ in range(2):
        critic_before = weights(critic)
        metrics = trainer.advance()
        assert not changed(policy_start, policy)  # the policy is as it was
        assert changed(critic_before, critic)
        assert "critic/vf_loss" in metrics and not any(k.startswith("train/clip") for k in metrics)
    metrics = trainer.advance()  # step 3: both train
    assert changed(policy_start, policy) and "train/clip_frac" in metrics


def fake_reward_model(hf: Path, path: Path) -> Path:
    """The tiny LM with a value head drawn at random, saved as a native value model (a stand-in for an
    `rl rm` export: it gives every response a real-valued score)."""
    from algorithms.critic import value_model_from_lm
    from core.bridge import load_hf, save_native
    from core.transformer.model import GPTModel

    lm = load_hf(hf)
    config, state = value_model_from_lm(lm.config, lm.state_dict(), seed=3)
    state["value_head.weight"] *= 30  # scores of order 1
    model = GPTModel(config)
    model.load_state_dict(state)
    save_native(model, path)
    return path


PPO_FAST = [
    "train.max_steps=4",
    "train.global_batch_size=8",
    "train.micro_batch_size=8",
    "train.log_every=1",
    "train.eval_every=2",
    "train.save_every=2",
    "train.keep_last=3",
    "train.progress_bar=false",
    "optim.lr=1e-3",
    "optim.min_lr=1e-4",
    "optim.decay=cosine",
    "data.synthetic.n_train=64",
    "data.synthetic.n_eval=8",
    "rollout.prompts_per_step=4",
    "rollout.n=4",
    "rollout.max_tokens=4",
    "environment.format_reward=0.5",
    "environment.reward_model.weight=0.5",
    "algorithm.kl_in_reward.horizon=20",  # beta moves visibly every step: its state must survive a resume
    "algorithm.loss.kl_coef=0.01",  # the KL in the loss too
    "critic.init_from=null",  # the policy's start with a fresh value head
    "critic.warmup=1",
    "eval.samples=2",
]


def rl_ppo(run_dir: Path, init_from: Path, reward_model: Path, *overrides: str) -> int:
    from rl.cli import main

    return main(
        [
            "ppo",
            str(ROOT / "configs/ppo_tiny.yaml"),
            *PPO_FAST,
            f"run.dir={run_dir}",
            f"model.init_from={init_from}",
            f"environment.reward_model.path={reward_model}",
            *overrides,
        ]
    )


def test_rl_ppo_end_to_end_then_resume_gives_the_same_continuation(pretrained, tmp_path, capsys):  # noqa: F811
    from core.bridge import load_hf
    from core.utils.metrics import read_metrics
    from rl.cli import main

    reward_model = fake_reward_model(pretrained / "hf", tmp_path / "rm")
    run_dir = tmp_path / "ppo"
    assert rl_ppo(run_dir, pretrained, reward_model) == 0
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for key in ("reward/mean", "reward/kl", "reward/kl_coef", "critic/vf_loss", "critic/vf_clip_frac"):
        assert all(key in r for r in rows[1:]), key
    assert "train/clip_frac" not in rows[1] and all("train/clip_frac" in r for r in rows[2:])  # warm-up
    assert all(r["reward/mean"] not in (0.0, 0.5, 1.0, 1.5) for r in rows[1:])  # + a real-valued score
    coefs = [r["reward/kl_coef"] for r in rows[1:]]
    assert len(set(coefs)) > 1, coefs  # the adaptive beta moved
    checkpoint = run_dir / "checkpoints" / "step_4"
    assert (checkpoint / "critic" / "model").is_dir() and (checkpoint / "critic" / "schedule.pt").is_file()
    assert json.loads((checkpoint / "meta.json").read_text())["stage"] == "ppo"
    assert (run_dir / "metrics.png").is_file()
    load_hf(run_dir / "hf")

    # Interrupted after step 3: the same command resumes from step_2 and replays steps 3-4 exactly (policy,
    # critic, both optimizers and LR schedules, beta, prompt order, sampling seeds, mini-batch shuffles).
    shutil.rmtree(checkpoint)
    shutil.rmtree(run_dir / "hf")
    assert rl_ppo(run_dir, pretrained, reward_model) == 0
    resumed = read_metrics(run_dir)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
    for before, after in zip(rows[3:], resumed[3:]):
        assert drop(after) == drop(before)

    # Bad input stops before anything is written (exit 2, one line naming the key); `rl grpo` does not
    # resume a PPO run.
    assert rl_ppo(tmp_path / "bad", pretrained, reward_model, "critic.init_from=/nonexistent") == 2
    assert "critic.init_from: /nonexistent not found" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    grpo = [
        "grpo",
        str(ROOT / "configs/grpo_tiny.yaml"),
        f"run.dir={run_dir}",
        f"model.init_from={pretrained}",
    ]
    assert main(grpo) == 2
    assert "of an `rl ppo` run" in capsys.readouterr().err


@pytest.fixture(scope="module")
def base_and_reward_model(tmp_path_factory, tiny_pretrain_400) -> tuple[Path, Path]:
    """The tiny pretrain stopped at step 400 (~70% held-out greedy accuracy, as configs/ppo_tiny.yaml
    starts from) and configs/rm_tiny.yaml's reward model on it, as a user runs them first."""
    from rl.cli import main

    root = tmp_path_factory.mktemp("ppo_e2e")
    quiet = ["train.progress_bar=false", "train.eval_every=0"]
    base = tiny_pretrain_400 / "checkpoints" / "step_400"
    rm = [
        "rm",
        str(ROOT / "configs/rm_tiny.yaml"),
        f"run.dir={root / 'rm'}",
        f"model.init_from={base}",
        *quiet,
    ]
    assert main(rm) == 0
    return base, root / "rm"


@pytest.mark.slow
def test_ppo_tiny_raises_held_out_accuracy(base_and_reward_model, tmp_path):
    from core.utils.metrics import read_metrics
    from rl.cli import main

    base, reward_model = base_and_reward_model
    run_dir = tmp_path / "ppo"
    code = main(
        [
            "ppo",
            str(ROOT / "configs/ppo_tiny.yaml"),
            f"run.dir={run_dir}",
            f"model.init_from={base}",
            f"environment.reward_model.path={reward_model}",
            f"critic.init_from={reward_model}",
            "train.progress_bar=false",
        ]
    )
    assert code == 0
    rows = read_metrics(run_dir)
    greedy = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    sampled = [r["eval/sampled_accuracy"] for r in rows if "eval/sampled_accuracy" in r]
    assert greedy[-1] >= greedy[0] + 0.03, greedy  # 200 held-out problems: 0.03 is 6 more solved
    assert sampled[-1] >= sampled[0] + 0.05, sampled
    losses = [r["critic/vf_loss"] for r in rows if "critic/vf_loss" in r]
    assert np.mean(losses[-5:]) < np.mean(losses[:3]), losses  # the critic learns the returns
    assert any(r["train/clip_frac"] > 0 for r in rows if "train/clip_frac" in r)
    assert (run_dir / "metrics.png").is_file()


# ---- on Ray: the same run as in this process, colocated and disaggregated ----------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    from ray_local import local_ray

    with local_ray(object_store_mb=256):
        yield


@pytest.mark.slow
def test_ppo_on_ray_colocated_and_disaggregated_match_the_in_process_run(
    ray_cluster,
    pretrained,  # noqa: F811
    tmp_path,
):
    """Policy, reference, critic and reward-model worker groups (colocated on one bundle; disaggregated: the
    engine and the critic in pools of their own, the reference and reward model on the policy's) run the
    in-process run's steps: the same samples (same seeds, same weights), rewards, KL, values, losses and
    clip fractions (fp32, one rank per role: the same arithmetic up to ~1e-6)."""
    from algorithms.ppo import run_ppo
    from core.utils.metrics import read_metrics
    from rl.ppo_cluster import run_ppo_cluster

    reward_model = fake_reward_model(pretrained / "hf", tmp_path / "rm")
    sections = {
        "train": {"max_steps": 2, "eval_every": 2, "save_every": 2},
        "critic": {"warmup": 1},
        "algorithm": {"kl_in_reward": {"coef": 0.05, "target": 0.01, "horizon": 20}},
        "environment": {"format_reward": 0.5, "reward_model": {"path": str(reward_model), "weight": 0.5}},
        "failure": {"call_timeout_s": 120.0, "restart_timeout_s": 120.0},
    }
    run_ppo(ppo_cfg(pretrained / "hf", tmp_path / "local", **sections))
    want = read_metrics(tmp_path / "local")
    placements = {
        "colocated": {"mode": "colocated", "num_bundles": 1},
        "disaggregated": {"mode": "disaggregated", "pools": {"policy": 1, "generation": 1, "critic": 1}},
    }
    for name, placement in placements.items():
        run_dir = tmp_path / name
        run_ppo_cluster(ppo_cfg(pretrained / "hf", run_dir, placement=placement, **sections))
        got = read_metrics(run_dir)
        assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2]
        for before, after in zip(want, got):
            keys = [k for k in before if not k.startswith(("time/", "perf/"))]
            assert set(keys) <= set(after), (name, set(keys) - set(after))
            for key in keys:
                assert after[key] == pytest.approx(before[key], rel=1e-4, abs=1e-5), (name, key)
        assert got[-1]["rollout/logprob_gap_max"] < 1e-4  # the engine samples from the policy's weights
        assert (run_dir / "checkpoints/step_2/critic/schedule.pt").is_file()
        assert (run_dir / "hf/model.safetensors").is_file()
