"""The options of current GRPO / PPO recipes (issue 12): DAPO's dynamic sampling and soft overlong
punishment, truncated importance sampling (TIS), several optimizer steps per rollout, REINFORCE++-baseline
and Dr. GRPO's seq_mean_token_sum_norm.

The math against hand computations and transcriptions of verl's formulas (verl/trainer/ppo/core_algos.py:
agg_loss, compute_reinforce_plus_plus_baseline_outcome_advantage; recipe/dapo's DAPORewardManager), then
each option through the in-process GRPOTrainer on tests/test_grpo.py's tiny Llama (a few seconds each).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_grpo import pretrained, sampled_batch, tiny_cfg  # noqa: F401 -- the module fixture: a tiny Llama

from algorithms.advantages import compute_advantages, constant_groups, overlong_penalty
from algorithms.grpo import GRPOConfig, GRPOTrainer, build_components, check_for_run
from algorithms.losses import POLICY_LOSSES, aggregate, loss_count, truncated_is_weights
from core.errors import InputError
from rollout.environments import Score


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: threads only fight each other on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def close(got: torch.Tensor | float, want: torch.Tensor | float, tol: float = 1e-6) -> None:
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    assert torch.allclose(got, want, rtol=tol, atol=tol), (got, want)


# ---- the math ------------------------------------------------------------------------------------------


def test_overlong_penalty_is_dapo_eq13_and_verls():
    """L_max = 20, L_c = 8, factor 0.5: free up to 12 tokens, then linear down to -0.5 at 20, -0.5 beyond."""
    lengths = torch.tensor([0, 12, 13, 16, 19, 20, 25])
    got = overlong_penalty(lengths, max_len=20, buffer_len=8, penalty_factor=0.5)
    by_hand = [0.0, 0.0, -1 / 16, -0.25, -7 / 16, -0.5, -0.5]
    close(got, by_hand)
    # verl's DAPORewardManager: min(-(L - (L_max - L_c)) / L_c * factor, 0), for L <= L_max (its responses
    # never exceed max_response_length)
    verl = [min(-(n - 12) / 8 * 0.5, 0.0) for n in lengths.tolist() if n <= 20]
    close(got[:6], verl)
    with pytest.raises(ValueError, match="buffer_len < max_len"):
        overlong_penalty(lengths, max_len=8, buffer_len=8)


def test_constant_groups_compare_exactly_in_fp64():
    scores = torch.tensor([0.6, 0.6, 0.6, 0.1, 0.1, 0.1 + 1e-7, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    assert constant_groups(scores, groups).tolist() == [True, False, True]
    assert constant_groups(torch.tensor([0.3, 0.3]), torch.tensor([7, 7])).tolist() == [True]


def rf_baseline_rows() -> dict[str, torch.Tensor]:
    """Two groups of three, responses of 2-4 tokens after a prompt of 1-2 tokens."""
    mask = torch.zeros(6, 6)
    for b, (start, length) in enumerate([(1, 2), (2, 3), (1, 4), (2, 2), (1, 3), (1, 2)]):
        mask[b, start : start + length] = 1
    return {
        "mask": mask,
        "scores": torch.tensor([1.0, 0.0, 0.5, 0.6, 0.6, 0.6]),
        "groups": torch.tensor([0, 0, 0, 1, 1, 1]),
    }


def test_reinforce_plus_plus_baseline_by_hand_and_verl():
    """Group means subtracted (group 0: mean 0.5; group 1: all 0.6 -> exactly 0), broadcast over each
    response, then whitened over the batch's response tokens (unbiased variance, + 1e-8)."""
    rows = rf_baseline_rows()
    mask = rows["mask"]
    adv, returns = compute_advantages(
        "reinforce_plus_plus_baseline", rows["scores"], mask, group_index=rows["groups"]
    )
    baselined = [0.5, -0.5, 0.0, 0.0, 0.0, 0.0]
    tokens = [baselined[b] for b in range(6) for t in range(6) if mask[b, t]]
    mean = sum(tokens) / len(tokens)
    std = math.sqrt(sum((x - mean) ** 2 for x in tokens) / (len(tokens) - 1) + 1e-8)
    for b in range(6):
        for t in range(6):
            want = (baselined[b] - mean) / std if mask[b, t] else 0.0
            close(adv[b, t], want, 1e-5)
            close(returns[b, t], baselined[b] if mask[b, t] else 0.0)
    assert torch.equal(returns[3:], torch.zeros(3, 6))  # a constant group: exactly no signal before whitening

    # verl: scores minus the group mean, tiled over the response, masked_whiten(unbiased) * mask
    scores = rows["scores"].clone()
    for g in (0, 1):
        scores[rows["groups"] == g] -= scores[rows["groups"] == g].mean()
    tiled = scores.unsqueeze(-1).tile(1, 6) * mask
    m = (tiled * mask).sum() / mask.sum()
    var = ((tiled - m) ** 2 * mask).sum() / mask.sum() * mask.sum() / (mask.sum() - 1)
    close(adv, (tiled - m) * torch.rsqrt(var + 1e-8) * mask, 1e-5)


def test_seq_mean_token_sum_norm_is_verls_per_sequence():
    """verl's seq-mean-token-sum-norm on a micro-batch is sum(token sums) / norm_length; ours divides that
    by the sequences with a loss token, so micro-batch shares with the global count add up to the batch's."""
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(5, 7, generator=g)
    mask = (torch.rand(5, 7, generator=g) > 0.4).float()
    mask[4] = 0  # no loss tokens: no sequence
    verl = (loss * mask).sum(-1).sum() / 7
    ours = aggregate(loss, mask, "seq_mean_token_sum_norm", norm_length=7)
    close(ours, verl / 4)
    total = loss_count(mask[:2], "seq_mean_token_sum_norm") + loss_count(mask[2:], "seq_mean_token_sum_norm")
    shares = [
        aggregate(loss[s], mask[s], "seq_mean_token_sum_norm", total, 7) for s in (slice(0, 2), slice(2, 5))
    ]
    close(sum(shares), ours)
    with pytest.raises(ValueError, match="needs a norm_length"):
        aggregate(loss, mask, "seq_mean_token_sum_norm")


def test_truncated_is_weights_by_hand():
    """w = min(exp(old - sampler), cap) on the mask, 1 off it; metrics over the mask's tokens."""
    old = torch.log(torch.tensor([[0.5, 0.3, 0.9, 0.1, 0.7]]))
    sampler = torch.log(torch.tensor([[0.5, 0.2, 0.3, 0.2, 0.1]]))
    mask = torch.tensor([[1.0, 1, 1, 1, 0]])
    weights, metrics = truncated_is_weights(old, sampler, mask, cap=2.0)
    close(weights, [[1.0, 1.5, 2.0, 0.5, 1.0]])  # ratios 1, 1.5, 3 (capped), 0.5; the last is off the mask
    assert not weights.requires_grad
    close(metrics["tis/weight_mean"], (1 + 1.5 + 2 + 0.5) / 4)
    close(metrics["tis/weight_max"], 2.0)
    close(metrics["tis/clipped_frac"], 1 / 4)


def test_ppo_clip_with_is_weights_is_the_weighted_token_loss():
    """Token losses max(-A r, -A clip(r)) times w, token mean; by hand: ratios 1.5 (clipped at 1.28 for
    A > 0), 0.5 (A < 0: max(0.5, 0.8) = 0.8), 1.1; weights 2, 0.5, 1."""
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3)
    w = torch.tensor([[2.0, 0.5, 1.0]])
    loss, _ = POLICY_LOSSES.get("ppo_clip")(
        logprobs, torch.zeros(1, 3), adv, mask, clip_low=0.2, clip_high=0.28, is_weights=w
    )
    close(loss, (2 * -1.28 + 0.5 * 0.8 + 1 * -1.1) / 3)
    loss.backward()  # gradient only through the unclipped third token, weighted: d(-r)/d logprob = -r
    close(logprobs.grad, [[0.0, 0.0, -1.1 / 3]])


# ---- config ----------------------------------------------------------------------------------------------


def test_config_checks_and_defaults():
    base = {"model": {"init_from": "x"}, "rollout": {"n": 4, "prompts_per_step": 4, "max_tokens": 8}}
    base["train"] = {"global_batch_size": 8, "max_steps": 5}
    with pytest.raises(ValueError, match="tis_cap needs rollout.temperature=1"):
        GRPOConfig(
            **base | {"rollout": base["rollout"] | {"temperature": 0.7}}, algorithm={"loss": {"tis_cap": 2}}
        )
    with pytest.raises(ValueError, match="buffer_len=8 must be below rollout.max_tokens=8"):
        GRPOConfig(**base, algorithm={"overlong": {"buffer_len": 8}})
    with pytest.raises(ValueError, match="dynamic_sampling needs rollout.n >= 2"):
        GRPOConfig(
            model={"init_from": "x"},
            rollout={"n": 1, "prompts_per_step": 8, "dynamic_sampling": {"enabled": True}},
            train={"global_batch_size": 8},
            algorithm={"advantage": "reinforce_plus_plus"},
        )
    with pytest.raises(ValueError, match="reinforce_plus_plus_baseline needs rollout.n >= 2"):
        GRPOConfig(
            model={"init_from": "x"},
            rollout={"n": 1, "prompts_per_step": 8},
            train={"global_batch_size": 8},
            algorithm={"advantage": "reinforce_plus_plus_baseline"},
        )
    cfg = GRPOConfig(
        **base,
        algorithm={"ppo_epochs": 3, "loss": {"agg_mode": "seq_mean_token_sum_norm"}},
    )
    assert cfg.algorithm.loss.norm_length == 8  # none: rollout.max_tokens
    assert cfg.mini_batches == 2 and cfg.policy_optimizer_steps == 5 * 3 * 2
    from algorithms.critic import ValueLossConfig

    with pytest.raises(ValueError, match="policy-loss mode"):
        ValueLossConfig(agg_mode="seq_mean_token_sum_norm")


# ---- the policy: TIS weights and the norm mode reach the loss -------------------------------------------


def test_policy_loss_with_tis_weights_and_token_sum_norm_equals_the_hand_formula(pretrained):  # noqa: F811
    """On-policy (ratio 1, nothing clipped) the token loss is -A: with weights w and token_mean the step's
    pg_loss is -sum(A w) / tokens; with seq_mean_token_sum_norm (norm_length = max_tokens = 4) it is
    -sum over sequences of (sum of A / 4) / sequences."""
    from algorithms.grpo import build_policy
    from algorithms.rl_inputs import load_init_model, resolve_init

    hf = pretrained / "hf"
    init = load_init_model(resolve_init(hf))
    for agg_mode in ("token_mean", "seq_mean_token_sum_norm"):
        cfg = GRPOConfig(**tiny_cfg(hf).model_dump() | {"algorithm": {"loss": {"agg_mode": agg_mode}}})
        policy = build_policy(cfg, init, torch.device("cpu"))
        batch = sampled_batch(hf, cfg, policy)
        batch["old_logprobs"] = policy.logprobs(batch)["logprobs"]
        mask, adv = batch["response_mask"], batch["advantages"]
        weights = 0.5 + torch.rand(mask.shape, generator=torch.Generator().manual_seed(1)) * 1.5
        keys = ("input_ids", "response_mask", "advantages", "old_logprobs")
        metrics = policy.train({k: batch[k] for k in keys} | {"is_weights": weights})
        if agg_mode == "token_mean":
            want = -(adv * weights * mask).sum() / mask.sum()
        else:
            want = -((adv * weights * mask).sum(-1) / 4).sum() / (mask.sum(-1) > 0).sum()
        assert metrics["clip_frac"] == 0
        close(metrics["pg_loss"], want, 1e-5)


# ---- through the trainer ---------------------------------------------------------------------------------


def grpo_trainer(hf: Path, run_dir: Path, **sections) -> GRPOTrainer:
    base = {
        "run": {"dir": str(run_dir)},
        "model": {"init_from": str(hf)},
        "train": {
            "max_steps": 3,
            "global_batch_size": 16,
            "micro_batch_size": 8,
            "progress_bar": False,
            "device": "cpu",
        },
        "optim": {"lr": 1e-2, "min_lr": 1e-2, "decay": "constant"},
        "data": {"synthetic": {"n_train": 64, "n_eval": 4}},
        "rollout": {"prompts_per_step": 4, "n": 4, "max_tokens": 4},
        "environment": {"format_reward": 0.5},
        "eval": {"num_prompts": 4},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    cfg = GRPOConfig(**base)
    inputs = check_for_run(cfg)
    parts, _ = build_components(cfg, inputs, torch.device("cpu"))
    return GRPOTrainer(cfg, parts, inputs.train_rows, inputs.eval_rows)


def record_policy_steps(trainer: GRPOTrainer) -> list[tuple[dict, dict]]:
    """(mini-batch, metrics) of every policy.train call from now on."""
    calls: list[tuple[dict, dict]] = []
    train = trainer.parts.policy.train

    def recorded(mb):
        metrics = train(mb)
        calls.append((mb, metrics))
        return metrics

    trainer.parts.policy.train = recorded
    return calls


def record_batches(trainer: GRPOTrainer) -> list[dict]:
    """The step's batch as the advantages phase sees it (shaped rewards), every step from now on."""
    batches: list[dict] = []
    advantages = trainer.advantages

    def recorded(batch):
        batches.append(batch)
        return advantages(batch)

    trainer.advantages = recorded
    return batches


def even_first_digit(prompt: str) -> bool:
    return int(prompt[0]) % 2 == 0


class HalfConstant:
    """0.6 for every sample of a prompt starting with an even digit (a group of equal rewards); otherwise a
    reward that varies with the response text."""

    def check_row(self, row, where):
        pass

    def score(self, completions):
        return [
            Score(0.6 if even_first_digit(c.prompt) else sum(map(ord, c.text)) % 97 / 97, False, True)
            for c in completions
        ]


def test_dynamic_sampling_keeps_only_groups_whose_rewards_differ(pretrained, tmp_path):  # noqa: F811
    trainer = grpo_trainer(
        pretrained / "hf", tmp_path / "run", rollout={"dynamic_sampling": {"enabled": True, "max_rounds": 8}}
    )
    trainer.parts.environment = HalfConstant()
    batches = record_batches(trainer)
    sampled = 0
    for _ in range(2):
        metrics = trainer.advance()
        batch = batches[-1]
        assert batch["input_ids"].shape[0] == 16  # prompts_per_step groups of n
        assert not constant_groups(batch["rewards"], batch["group_index"]).any()
        assert not (batch["rewards"] == 0.6).any()  # no sample of an even prompt
        sampled += metrics["rollout/prompts_sampled"]
        assert metrics["rollout/prompts_sampled"] == 4 * metrics["rollout/dynamic_rounds"]
        assert metrics["rollout/groups_dropped"] >= 1
    # every round draws the loader's next prompts: its position (part of every checkpoint) counts them all
    assert trainer.loader.state_dict()["position"] == sampled

    trainer.parts.environment.score = lambda cs: [Score(0.0, False, True) for _ in cs]
    with pytest.raises(InputError, match="8 rounds of 4 prompts left 0 of the 4 groups"):
        trainer.step()


def test_several_minibatches_per_rollout_go_off_policy(pretrained, tmp_path):  # noqa: F811
    """ppo_epochs=2 with two mini-batches: four optimizer steps on one rollout; the first is on-policy
    (ratio 1, nothing clipped), the later ones see moved weights (ratio != 1) and clip."""
    trainer = grpo_trainer(
        pretrained / "hf",
        tmp_path / "run",
        train={"global_batch_size": 8},
        algorithm={"ppo_epochs": 2},
    )
    calls = record_policy_steps(trainer)
    metrics = trainer.step()
    assert len(calls) == 4 and trainer.cfg.policy_optimizer_steps == 3 * 4
    first, later = calls[0][1], [m for _, m in calls[1:]]
    assert first["clip_frac"] == 0 and first["ratio_max"] == pytest.approx(1.0, abs=1e-4)
    assert all(abs(m["ratio_max"] - 1) > 1e-3 or abs(m["ratio_min"] - 1) > 1e-3 for m in later)
    assert max(m["clip_frac"] for m in later) > 0
    assert metrics["train/clip_frac"] == pytest.approx(sum(m["clip_frac"] for _, m in calls) / 4)
    # each pass sees every sequence once
    for epoch in (calls[:2], calls[2:]):
        rows = torch.cat([mb["input_ids"] for mb, _ in epoch])
        assert rows.shape[0] == 16


def test_overlong_shaping_tis_and_filter_reach_the_training_batch(pretrained, tmp_path):  # noqa: F811
    """Rewards + the overlong penalty of each response's length before the advantages; truncated responses
    out of the policy's loss mask; TIS weights (~1: the colocated engine samples from the trainer's own
    weights) in every mini-batch and their metrics logged."""
    trainer = grpo_trainer(
        pretrained / "hf",
        tmp_path / "run",
        algorithm={
            "overlong": {"buffer_len": 2, "penalty_factor": 0.5, "filter": True},
            "loss": {"tis_cap": 2.0},
        },
    )
    batches, calls = record_batches(trainer), record_policy_steps(trainer)
    raw = []
    score = trainer.score

    def keep_raw(rollouts):
        score(rollouts)
        raw.extend(s.reward for s in rollouts.scores)

    trainer.score = keep_raw
    metrics = trainer.step()
    batch = batches[0]
    lengths = batch["response_mask"].sum(-1)
    penalty = overlong_penalty(lengths, 4, 2, 0.5)  # 0 up to 2 tokens, -0.25 at 3, -0.5 at 4
    close(batch["rewards"], torch.tensor(raw) + penalty)
    assert (lengths == 4).any(), "some responses should be cut at max_tokens"
    close(metrics["reward/overlong_penalty"], penalty.mean())
    (mb, _), *_ = calls  # one mini-batch: the batch's rows in the pass's order
    order = trainer._shuffled({"input_ids": batch["input_ids"], "row": torch.arange(16)}, epoch=0)["row"]
    truncated = batch["truncated"].bool()
    assert truncated.any() and (lengths[truncated] == 4).all()
    mb_mask, mb_truncated = mb["response_mask"], truncated[order]
    assert torch.equal(mb_mask[mb_truncated], torch.zeros_like(mb_mask[mb_truncated]))
    assert torch.equal(mb_mask[~mb_truncated], batch["response_mask"][order][~mb_truncated])
    assert "is_weights" in mb and torch.allclose(
        mb["is_weights"], torch.ones_like(mb["is_weights"]), atol=1e-4
    )
    assert metrics["tis/weight_max"] == pytest.approx(1.0, abs=1e-4) and metrics["tis/clipped_frac"] == 0
