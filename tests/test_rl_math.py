"""RL math (algorithms/losses.py, algorithms/advantages.py, algorithms/registry.py) against direct
reference computations: per-token / per-sequence Python loops and hand-worked numbers. fp32 inputs; the
references run in float64, so tolerances are fp32 rounding (1e-6 relative)."""

from __future__ import annotations

import math

import pytest
import torch
from numerics import close as check_close

from algorithms.advantages import (
    ADVANTAGES,
    compute_advantages,
    masked_whiten,
    scores_to_token_rewards,
)
from algorithms.losses import (
    KL_ESTIMATORS,
    POLICY_LOSSES,
    aggregate,
    loss_count,
    value_loss,
)
from algorithms.registry import Registry

NAN = float("nan")


def close(got: torch.Tensor | float, want: torch.Tensor | float, tol: float = 1e-6) -> None:
    check_close(got, want, tol)


def random_batch(seed: int = 0, B: int = 5, T: int = 9) -> dict[str, torch.Tensor]:
    """Random logprobs / advantages with a ragged mask (prompt 0s, response 1s, padding 0s, one gap)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T)
    for b in range(B):
        start, end = 1 + b % 3, T - b % 2
        mask[b, start:end] = 1
    mask[0, 4] = 0  # an observation token inside the response
    mask[B - 1] = 0  # a row without loss tokens
    logprobs = -torch.rand(B, T, generator=g) * 3
    old = logprobs + 0.6 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    # garbage at masked positions must never reach a result
    logprobs = torch.where(mask.bool(), logprobs, NAN)
    return {"logprobs": logprobs, "old": old, "adv": adv, "mask": mask}


def response_positions(mask: torch.Tensor, b: int) -> list[int]:
    return [t for t in range(mask.shape[1]) if mask[b, t] > 0]


# ---- registry -------------------------------------------------------------------------------------------


def test_registry_get_names_and_did_you_mean() -> None:
    reg: Registry = Registry("thing")

    @reg.register("alpha")
    def alpha() -> int:
        return 1

    assert reg.get("alpha") is alpha and reg.names() == ["alpha"] and "alpha" in reg
    with pytest.raises(KeyError, match=r"did you mean 'alpha'.*choices: \['alpha'\]"):
        reg.get("alpah")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha")(alpha)
    assert POLICY_LOSSES.names() == ["gspo", "ppo_clip", "reinforce"]
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]
    assert ADVANTAGES.names() == [
        "gae",
        "grpo",
        "reinforce_plus_plus",
        "reinforce_plus_plus_baseline",
        "rloo",
    ]


# ---- aggregation ----------------------------------------------------------------------------------------


def test_aggregate_modes_by_hand() -> None:
    loss = torch.tensor([[1.0, 2.0, 3.0, NAN], [4.0, NAN, NAN, NAN], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    close(aggregate(loss, mask, "token_mean"), 10 / 4)
    close(aggregate(loss, mask, "seq_mean_token_sum"), (6 + 4) / 2)
    close(aggregate(loss, mask, "seq_mean_token_mean"), (2 + 4) / 2)
    close(aggregate(loss, mask, "token_mean", global_count=8), 10 / 8)
    close(loss_count(mask, "token_mean"), 4)
    close(loss_count(mask, "seq_mean_token_sum"), 2)  # the empty row is no sequence
    with pytest.raises(ValueError, match="choices"):
        aggregate(loss, mask, "mean")


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
def test_micro_batch_shares_with_global_count_sum_to_the_batch_loss(mode: str) -> None:
    b = random_batch(1, B=6)
    loss_tok = torch.where(b["mask"].bool(), b["adv"], NAN)
    whole = aggregate(loss_tok, b["mask"], mode)
    parts = [(loss_tok[i : i + 2], b["mask"][i : i + 2]) for i in range(0, 6, 2)]
    total = sum(loss_count(m, mode) for _, m in parts)
    close(sum(aggregate(lt, m, mode, global_count=total) for lt, m in parts), whole)


# ---- policy losses --------------------------------------------------------------------------------------


def ppo_reference(b: dict[str, torch.Tensor], clip_low: float, clip_high: float, dual: float | None):
    """Token loop: (token-mean loss, clip_frac, dual-clip fraction, approx_kl)."""
    total = clipped = capped = kl = 0.0
    n = 0
    for i in range(b["mask"].shape[0]):
        for t in response_positions(b["mask"], i):
            lp, old, a = (float(b[k][i, t]) for k in ("logprobs", "old", "adv"))
            r = math.exp(lp - old)
            l1, l2 = -a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high)
            loss = max(l1, l2)
            clipped += l2 > l1
            if dual is not None and a < 0 and loss > -a * dual:
                loss, capped = -a * dual, capped + 1
            total, kl, n = total + loss, kl + old - lp, n + 1
    return total / n, clipped / n, capped / n, kl / n


@pytest.mark.parametrize("clip_low,clip_high,dual", [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.3, 2.0)])
def test_ppo_clip_matches_token_loop(clip_low: float, clip_high: float, dual: float | None) -> None:
    b = random_batch(2)
    loss, m = POLICY_LOSSES.get("ppo_clip")(
        b["logprobs"], b["old"], b["adv"], b["mask"], clip_low=clip_low, clip_high=clip_high, dual_clip=dual
    )
    ref_loss, ref_clip, ref_capped, ref_kl = ppo_reference(b, clip_low, clip_high, dual)
    close(loss, ref_loss)
    close(m["clip_frac"], ref_clip)
    close(m["clip_frac_lower"], ref_capped)
    close(m["approx_kl"], ref_kl)
    assert 0 < float(m["clip_frac"]) < 1 and (dual is None or float(m["clip_frac_lower"]) > 0)
    ratios = (b["logprobs"] - b["old"]).exp()[b["mask"].bool()]
    close(m["ratio_max"], ratios.max())
    close(m["ratio_min"], ratios.min())
    close(m["ratio_mean"], ratios.mean())


def test_ppo_clip_hand_numbers() -> None:
    lp = torch.log(torch.tensor([[1.5, 0.5, 5.0, 1.1]]))
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    mask = torch.ones(1, 4)
    loss_fn = POLICY_LOSSES.get("ppo_clip")
    _, m = loss_fn(lp, torch.zeros(1, 4), adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    # token losses: -1.28 (clip-higher), max(0.5, 0.8) = 0.8, max(5, 1.28) = 5 -> dual cap 3, -1.1
    close(
        loss_fn(lp, torch.zeros(1, 4), adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)[0],
        (-1.28 + 0.8 + 3 - 1.1) / 4,
    )
    close(m["clip_frac"], 2 / 4)
    close(m["clip_frac_lower"], 1 / 4)


def test_on_policy_ppo_gradient_equals_reinforce_gradient() -> None:
    b = random_batch(3)
    lp = torch.where(b["mask"].bool(), b["logprobs"], 0.0)
    grads = {}
    for name, old in (("ppo_clip", lp.detach()), ("reinforce", None), ("gspo", lp.detach())):
        x = lp.clone().requires_grad_(True)
        mode = "seq_mean_token_mean" if name == "gspo" else "token_mean"
        loss, m = POLICY_LOSSES.get(name)(x, old, b["adv"], b["mask"], agg_mode=mode)
        loss.backward()
        grads[name] = x.grad
        close(m["ratio_mean"], 1.0)
        close(m["clip_frac"], 0.0)
    mask = b["mask"]
    close(grads["ppo_clip"], -b["adv"] * mask / mask.sum())
    close(grads["reinforce"], grads["ppo_clip"])
    # GSPO on-policy: the sequence's mean advantage spread over its tokens
    seq_len = mask.sum(-1, keepdim=True).clamp(min=1)
    n_seqs = (mask.sum(-1) > 0).sum()
    close(grads["gspo"], -b["adv"] * mask / seq_len / n_seqs)


def test_gspo_matches_sequence_level_objective_value_and_gradient() -> None:
    b = random_batch(4)
    mask = b["mask"]
    lp = torch.where(mask.bool(), b["logprobs"], 0.0)
    adv_seq = torch.randn(mask.shape[0], generator=torch.Generator().manual_seed(9))
    adv = adv_seq.unsqueeze(-1).expand_as(mask)
    x = lp.clone().requires_grad_(True)
    loss, m = POLICY_LOSSES.get("gspo")(x, b["old"], adv, mask, clip_low=0.05, clip_high=0.1)
    loss.backward()
    # reference: per sequence s = exp(mean log ratio), loss = mean over sequences of the clipped surrogate
    y = lp.clone().requires_grad_(True)
    terms, clipped_tokens = [], 0
    for i in range(mask.shape[0]):
        pos = response_positions(mask, i)
        if not pos:
            continue
        s = (y[i, pos] - b["old"][i, pos]).mean().exp()
        l1, l2 = -adv_seq[i] * s, -adv_seq[i] * s.clamp(0.95, 1.1)
        terms.append(torch.maximum(l1, l2))
        clipped_tokens += len(pos) * bool(l2 > l1)
    ref = torch.stack(terms).mean()
    ref.backward()
    close(loss, ref)
    close(x.grad, y.grad)
    close(m["clip_frac"], clipped_tokens / mask.sum())
    assert 0 < float(m["clip_frac"]) < 1


def test_reinforce_truncated_importance_weight() -> None:
    b = random_batch(5)
    mask = b["mask"]
    lp = torch.where(mask.bool(), b["logprobs"], 0.0)
    x = lp.clone().requires_grad_(True)
    loss, m = POLICY_LOSSES.get("reinforce")(x, b["old"], b["adv"], mask, clip_low=0.2, clip_high=0.3)
    loss.backward()
    w = (lp - b["old"]).exp().clamp(0.8, 1.3)
    close(loss, (-b["adv"] * w * lp * mask).sum() / mask.sum())
    close(x.grad, -b["adv"] * w * mask / mask.sum())  # the weight is a constant
    close(m["clip_frac"], (((lp - b["old"]).exp() - w).abs() > 0)[mask.bool()].float().mean())


# ---- KL estimators --------------------------------------------------------------------------------------


def test_kl_estimators_expectations_under_the_policy_are_exact() -> None:
    """Over a categorical p (the policy) and q (the reference): E_p[k1] = E_p[k3] = KL(p || q) exactly;
    k3 >= 0 everywhere while k1 takes both signs; k2 = (log p - log q)^2 / 2."""
    g = torch.Generator().manual_seed(6)
    logp = torch.log_softmax(0.7 * torch.randn(50, generator=g, dtype=torch.float64), -1)
    logq = torch.log_softmax(0.7 * torch.randn(50, generator=g, dtype=torch.float64), -1)
    p = logp.exp()
    kl = (p * (logp - logq)).sum()
    k1 = KL_ESTIMATORS.get("k1")(logp, logq)
    k3 = KL_ESTIMATORS.get("k3")(logp, logq)
    close((p * k1).sum(), kl, 1e-12)
    close((p * k3).sum(), kl, 1e-12)
    assert (k3 >= 0).all() and k3.max() < 10 and (k1 < 0).any() and (k1 > 0).any()  # no clamp active
    close(KL_ESTIMATORS.get("k2")(logp, logq), 0.5 * (logp - logq) ** 2)
    close(k1, logp - logq)  # sign: positive where the policy puts more mass than the reference


def test_kl_estimators_are_clamped_and_zero_at_equality() -> None:
    lp = torch.tensor([-1.0, -50.0, -0.1])
    ref = torch.tensor([-1.0, -0.1, -50.0])
    for name in ("k1", "k2", "k3"):
        out = KL_ESTIMATORS.get(name)(lp, ref)
        assert torch.isfinite(out).all() and out[0] == 0
    assert KL_ESTIMATORS.get("k3")(lp, ref).max() <= 10.0
    close(KL_ESTIMATORS.get("k1")(lp, ref)[1:], torch.tensor([-20.0, 20.0]))


# ---- value loss -----------------------------------------------------------------------------------------


def test_value_loss_matches_token_loop() -> None:
    b = random_batch(7)
    mask = b["mask"]
    values, old, returns = b["adv"], b["adv"] + 0.3 * torch.randn_like(b["adv"]), b["old"]
    loss, m = value_loss(values, old, returns, mask, clip_range=0.2)
    total = n = clipped = 0.0
    for i in range(mask.shape[0]):
        for t in response_positions(mask, i):
            v, o, r = float(values[i, t]), float(old[i, t]), float(returns[i, t])
            vc = o + min(max(v - o, -0.2), 0.2)
            total += 0.5 * max((v - r) ** 2, (vc - r) ** 2)
            clipped += (vc - r) ** 2 > (v - r) ** 2
            n += 1
    close(loss, total / n)
    close(m["vf_clip_frac"], clipped / n)
    close(value_loss(values, old, returns, mask, clip_range=None)[0], m["value_error"] / 2)


# ---- advantages -----------------------------------------------------------------------------------------


def test_scores_go_on_the_last_response_token() -> None:
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    got = scores_to_token_rewards(torch.tensor([2.0, -1.0, 7.0]), mask)
    assert torch.equal(got, torch.tensor([[0, 0, 2.0, 0], [0, 0, 0, -1.0], [0, 0, 0, 0]]))


def test_grpo_hand_numbers_and_dr_grpo() -> None:
    mask = torch.tensor([[1, 1, 0]] * 6)
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 5.0])
    group = torch.tensor([0, 0, 0, 1, 1, 2])
    adv, ret = ADVANTAGES.get("grpo")(scores, mask, group_index=group)
    std0 = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0)
    want = torch.tensor(
        [2 / 3 / (std0 + 1e-6), -1 / 3 / (std0 + 1e-6), -1 / 3 / (std0 + 1e-6), 0, 0, 5 / (1 + 1e-6)]
    )
    close(adv, want.unsqueeze(-1) * mask)
    assert torch.equal(adv, ret)
    dr, _ = ADVANTAGES.get("grpo")(scores, mask, group_index=group, norm_by_std=False)
    close(dr[:, 0], torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 5]))
    # (B,) scores and the same scores placed on the last response token give the same advantages
    token_level = scores_to_token_rewards(scores, mask)
    close(ADVANTAGES.get("grpo")(token_level, mask, group_index=group)[0], adv)


def test_grpo_and_rloo_match_group_loops() -> None:
    g = torch.Generator().manual_seed(8)
    B = 12
    mask = (torch.rand(B, 6, generator=g) > 0.3).long()
    mask[:, 2] = 1
    scores = torch.randn(B, generator=g)
    group = torch.tensor([3, 3, 3, 3, 7, 7, 7, 7, 1, 1, 1, 1])[torch.randperm(B, generator=g)]
    rewards = scores_to_token_rewards(scores, mask)
    grpo_adv, _ = compute_advantages("grpo", rewards, mask, group_index=group, gamma=0.9)
    rloo_adv, _ = compute_advantages("rloo", rewards, mask, group_index=group, values=torch.zeros(B, 6))
    for i in range(B):
        same = [j for j in range(B) if group[j] == group[i]]
        mine = torch.tensor([float(scores[j]) for j in same], dtype=torch.float64)
        want_grpo = (float(scores[i]) - mine.mean()) / (mine.std() + 1e-6)
        others = [float(scores[j]) for j in same if j != i]
        want_rloo = float(scores[i]) - sum(others) / len(others)
        for t in range(6):
            close(grpo_adv[i, t], want_grpo * mask[i, t])
            close(rloo_adv[i, t], want_rloo * mask[i, t])


def whiten_reference(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    vals = torch.tensor([float(x[i, t]) for i in range(x.shape[0]) for t in response_positions(mask, i)])
    mean, var = vals.mean(), vals.var()  # unbiased
    return torch.where(mask.bool(), (x - mean) / torch.sqrt(var + 1e-8), 0.0)


def test_reinforce_plus_plus_matches_loop() -> None:
    b = random_batch(9)
    mask, gamma, kl_coef = b["mask"], 0.9, 0.1
    rewards = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))
    kl = b["old"] - b["adv"]
    adv, ret = ADVANTAGES.get("reinforce_plus_plus")(rewards, mask, gamma=gamma, kl=kl, kl_coef=kl_coef)
    want = torch.zeros_like(rewards)
    for i in range(mask.shape[0]):
        pos = response_positions(mask, i)
        for k, t in enumerate(pos):
            want[i, t] = sum(
                gamma**j * (float(rewards[i, u]) - kl_coef * float(kl[i, u])) for j, u in enumerate(pos[k:])
            )
    close(ret, want, 1e-5)
    close(adv, whiten_reference(want, mask), 1e-5)
    close(adv[mask.bool()].mean(), 0.0, 1e-5)


@pytest.mark.parametrize("whiten", [False, True])
def test_gae_matches_per_step_loop(whiten: bool) -> None:
    b = random_batch(10)
    mask, gamma, lam = b["mask"], 0.95, 0.8
    rewards = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2))
    values = torch.where(mask.bool(), b["adv"], NAN)  # values off the response never matter
    adv, ret = compute_advantages("gae", rewards, mask, values=values, gamma=gamma, lam=lam, whiten=whiten)
    want_adv, want_ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for i in range(mask.shape[0]):
        pos = response_positions(mask, i)
        v = [float(values[i, t]) for t in pos] + [0.0]  # V = 0 after the last response token
        deltas = [float(rewards[i, t]) + gamma * v[k + 1] - v[k] for k, t in enumerate(pos)]
        for k, t in enumerate(pos):
            a = sum((gamma * lam) ** j * d for j, d in enumerate(deltas[k:]))
            want_adv[i, t], want_ret[i, t] = a, a + v[k]
    close(ret, want_ret, 1e-5)
    close(adv, whiten_reference(want_adv, mask) if whiten else want_adv, 1e-5)


def test_gae_lambda_one_gamma_one_is_return_minus_value() -> None:
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    rewards = scores_to_token_rewards(torch.tensor([2.0]), mask)
    values = torch.tensor([[9.0, 0.5, 1.0, 1.5, 9.0]])
    adv, ret = ADVANTAGES.get("gae")(rewards, mask, values=values, whiten=False)
    close(adv, torch.tensor([[0, 1.5, 1.0, 0.5, 0]]))
    close(ret, torch.tensor([[0, 2.0, 2.0, 2.0, 0]]))


def test_masked_whiten_and_compute_advantages_errors() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    close(masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), 1e-5)
    with pytest.raises(TypeError, match="no estimator takes \\['lamda'\\]"):
        compute_advantages("gae", x, mask, values=x, lamda=0.9)
    with pytest.raises(KeyError, match="did you mean 'grpo'"):
        compute_advantages("gpro", x, mask)


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_group_of_equal_rewards_gets_zero_advantages(name):
    """Group statistics in fp64: eight rewards of 0.6 (not exact in binary) give advantages of exactly 0.
    In fp32 the mean is off by ~1e-8 and the std is ~1e-8, so GRPO's normalised advantages reached 0.056."""
    rewards = torch.tensor([0.6] * 8 + [0.1, 0.9, 0.5, 0.5, 0.3, 0.7, 0.2, 0.8])
    mask = torch.ones(16, 4)
    groups = torch.arange(16) // 8
    adv, _ = compute_advantages(name, rewards, mask, group_index=groups)
    assert adv.dtype == torch.float32
    assert torch.equal(adv[:8], torch.zeros(8, 4))
    assert adv[8:].abs().max() > 0.1  # the other group still learns
