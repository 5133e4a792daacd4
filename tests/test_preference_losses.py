"""Preference losses (algorithms/preference_losses.py) against the papers' formulas written out per pair in
plain Python float64 math (no torch in the references), for several betas / label smoothings, with and
without a reference model; gradients against central differences of those references; and the properties
a user relies on (robust DPO's unbiasedness, IPO's optimum, the hinge's margin, the sign of margins).
Inputs are fp32 as in training; fp32 rounding of logps ~1e2 bounds the error near 1e-5, so values are
compared at 1e-4 relative-plus-absolute. Gradients run on float64 inputs and compare at 1e-6."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from numerics import close

from algorithms.preference_losses import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE,
    bradley_terry_loss,
    nll_loss,
    preference_metrics,
)

B = 8
BETAS = (0.01, 0.1, 0.5)
SMOOTHED = ("sigmoid", "robust", "simpo")  # the losses that take label_smoothing


# ---- references: the papers' formulas, one pair at a time -----------------------------------------------


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def reference(
    name: str, pair: dict[str, float], beta: float, label_smoothing: float, gamma: float
) -> tuple[float, ...]:
    """(loss, chosen_reward, rejected_reward) of one pair."""
    ls = label_smoothing
    lr_c, lr_r = pair["c"] - pair["ref_c"], pair["r"] - pair["ref_r"]
    h = lr_c - lr_r
    if name == "sigmoid":  # DPO; cDPO: the label is flipped with probability ls
        loss = -(1 - ls) * logsigmoid(beta * h) - ls * logsigmoid(-beta * h)
    elif name == "robust":  # rDPO eq. (9)
        loss = ((1 - ls) * -logsigmoid(beta * h) - ls * -logsigmoid(-beta * h)) / (1 - 2 * ls)
    elif name == "ipo":  # IPO eq. (17) on token-averaged log-ratios
        h_avg = lr_c / max(pair["len_c"], 1) - lr_r / max(pair["len_r"], 1)
        loss = (h_avg - 1 / (2 * beta)) ** 2
    elif name == "hinge":
        loss = max(0.0, 1 - beta * h)
    elif name == "simpo":  # SimPO eq. (6), reference-free
        avg_c, avg_r = pair["c"] / max(pair["len_c"], 1), pair["r"] / max(pair["len_r"], 1)
        z = beta * (avg_c - avg_r) - gamma
        loss = -(1 - ls) * logsigmoid(z) - ls * logsigmoid(-z)
        return loss, beta * avg_c, beta * avg_r
    else:
        raise KeyError(name)
    return loss, beta * lr_c, beta * lr_r


def random_pairs(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Summed logps of realistic size; refs near the policy so beta * h spans both signs."""
    g = torch.Generator().manual_seed(seed)
    c = -10 - 110 * torch.rand(B, generator=g, dtype=torch.float64)
    r = -10 - 110 * torch.rand(B, generator=g, dtype=torch.float64)
    pairs = {
        "c": c,
        "r": r,
        "ref_c": c + 4 * torch.randn(B, generator=g, dtype=torch.float64),
        "ref_r": r + 4 * torch.randn(B, generator=g, dtype=torch.float64),
    }
    pairs = {k: v.to(dtype) for k, v in pairs.items()}
    pairs["len_c"] = torch.randint(1, 60, (B,), generator=g)
    pairs["len_r"] = torch.randint(1, 60, (B,), generator=g)
    return pairs


def call(name: str, p: dict[str, torch.Tensor], reference_free: bool = False, **knobs):
    return PREFERENCE_LOSSES.get(name)(
        p["c"],
        p["r"],
        None if reference_free else p["ref_c"],
        None if reference_free else p["ref_r"],
        chosen_lengths=p["len_c"],
        rejected_lengths=p["len_r"],
        **knobs,
    )


def expected(name: str, p: dict[str, torch.Tensor], reference_free: bool, **knobs) -> list[torch.Tensor]:
    q = {k: v.tolist() for k, v in p.items()}
    if reference_free:
        q["ref_c"] = q["ref_r"] = [0.0] * B
    rows = [reference(name, {k: v[b] for k, v in q.items()}, **knobs) for b in range(B)]
    return [torch.tensor(col, dtype=torch.float64) for col in zip(*rows)]


def cases() -> list[tuple[str, float, float, float]]:
    """(loss, beta, label_smoothing, gamma) over every loss and the knobs it takes."""
    out = []
    for name in PREFERENCE_LOSSES.names():
        for beta in BETAS:
            for ls in (0.0, 0.1, 0.3) if name in SMOOTHED else (0.0,):
                for gamma in (0.0, 0.5, 1.6) if name == "simpo" else (0.0,):
                    out.append((name, beta, ls, gamma))
    return out


# ---- values ---------------------------------------------------------------------------------------------


def test_registry_holds_the_five_losses() -> None:
    assert PREFERENCE_LOSSES.names() == ["hinge", "ipo", "robust", "sigmoid", "simpo"]
    assert REFERENCE_FREE == {"simpo"}


@pytest.mark.parametrize("reference_free", [False, True])
@pytest.mark.parametrize("seed,name,beta,ls,gamma", [(i, *case) for i, case in enumerate(cases())])
def test_losses_and_rewards_match_the_papers(seed, name, beta, ls, gamma, reference_free) -> None:
    p = random_pairs(seed)
    knobs = dict(beta=beta, label_smoothing=ls, gamma=gamma)
    losses, chosen_rewards, rejected_rewards = call(name, p, reference_free, **knobs)
    want_losses, want_chosen, want_rejected = expected(name, p, reference_free or name == "simpo", **knobs)
    assert losses.shape == (B,) and losses.dtype == torch.float32
    close(losses, want_losses, 1e-4)
    close(chosen_rewards, want_chosen, 1e-4)
    close(rejected_rewards, want_rejected, 1e-4)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_cdpo_is_dpo_at_zero_smoothing_and_differs_otherwise() -> None:
    p = random_pairs(seed=3)
    dpo = call("sigmoid", p, beta=0.1)[0]
    close(call("robust", p, beta=0.1)[0], dpo, 1e-6)
    assert (call("sigmoid", p, beta=0.1, label_smoothing=0.2)[0] - dpo).abs().max() > 1e-3


def test_sigmoid_is_stable_far_from_the_margin() -> None:
    """beta h = -+300: exp would overflow a naive log(sigmoid); the loss must be ~300 and ~0, finite."""
    c, r = torch.tensor([-10.0, -3010.0]), torch.tensor([-3010.0, -10.0])
    losses, _, _ = PREFERENCE_LOSSES.get("sigmoid")(c, r, None, None, beta=0.1)
    close(losses, torch.tensor([0.0, 300.0], dtype=torch.float64), 1e-6)


def test_swapping_chosen_and_rejected_flips_the_margin_sign() -> None:
    p = random_pairs(seed=4)
    swapped = {**p, "c": p["r"], "r": p["c"], "ref_c": p["ref_r"], "ref_r": p["ref_c"]}
    _, c, r = call("sigmoid", p, beta=0.1)
    _, c_sw, r_sw = call("sigmoid", swapped, beta=0.1)
    m, m_sw = preference_metrics(c, r, p["c"], p["r"]), preference_metrics(c_sw, r_sw, p["r"], p["c"])
    close(m_sw["rewards/margins"], -m["rewards/margins"], 1e-6)
    assert float(m["rewards/margins"]) != 0.0
    close(m_sw["rewards/accuracies"], 1 - m["rewards/accuracies"], 1e-6)  # no ties in random data
    # DPO loss identity: -logsigmoid(-x) = -logsigmoid(x) + x
    h = (p["c"] - p["ref_c"]) - (p["r"] - p["ref_r"])
    close(call("sigmoid", swapped, beta=0.1)[0], call("sigmoid", p, beta=0.1)[0] + 0.1 * h, 1e-4)


def test_robust_dpo_is_unbiased_under_label_flips() -> None:
    """Chowdhury et al.'s Lemma: (1 - ls) L(h) + ls L(-h) = -log sigmoid(beta h), the clean DPO loss."""
    p = random_pairs(seed=5)
    swapped = {**p, "c": p["r"], "r": p["c"], "ref_c": p["ref_r"], "ref_r": p["ref_c"]}
    for ls in (0.1, 0.25, 0.4):
        expected_loss = (1 - ls) * call("robust", p, beta=0.2, label_smoothing=ls)[0] + ls * call(
            "robust", swapped, beta=0.2, label_smoothing=ls
        )[0]
        close(expected_loss, call("sigmoid", p, beta=0.2)[0], 1e-5)


def test_ipo_is_zero_at_its_target_margin_and_uses_token_averages() -> None:
    beta = 0.25
    lengths = torch.tensor([4, 10])
    # chosen log-ratio per token 2 + 1/(2 beta) over rejected's 2: h_avg = 1 / (2 beta), the optimum
    c, r = torch.tensor([-8.0, -20.0]), torch.tensor([-30.0, -50.0])
    ref_c = c - lengths * (2 + 1 / (2 * beta))
    ref_r = r - lengths * 2.0
    losses, _, _ = PREFERENCE_LOSSES.get("ipo")(
        c, r, ref_c, ref_r, beta=beta, chosen_lengths=lengths, rejected_lengths=lengths
    )
    close(losses, torch.zeros(2, dtype=torch.float64), 1e-6)
    # the same summed log-ratios over twice the tokens: h_avg halves, the loss is (1 / (4 beta))^2
    losses, _, _ = PREFERENCE_LOSSES.get("ipo")(
        c, r, ref_c, ref_r, beta=beta, chosen_lengths=2 * lengths, rejected_lengths=2 * lengths
    )
    close(losses, torch.full((2,), (1 / (4 * beta)) ** 2, dtype=torch.float64), 1e-6)


def test_hinge_has_no_loss_nor_gradient_beyond_the_margin() -> None:
    c = torch.tensor([0.0, 0.0], requires_grad=True)
    r = torch.tensor([-20.0, -5.0])  # beta h = 2 (beyond 1) and 0.5
    losses, _, _ = PREFERENCE_LOSSES.get("hinge")(c, r, None, None, beta=0.1)
    close(losses, torch.tensor([0.0, 0.5], dtype=torch.float64), 1e-6)
    losses.sum().backward()
    close(c.grad, torch.tensor([0.0, -0.1], dtype=torch.float64), 1e-6)


def test_simpo_ignores_the_reference_and_zero_lengths_count_as_one() -> None:
    p = random_pairs(seed=6)
    with_ref = call("simpo", p, beta=2.0, gamma=0.5)
    without = call("simpo", p, reference_free=True, beta=2.0, gamma=0.5)
    for got, want in zip(with_ref, without):
        close(got, want, 0.0)
    p["len_c"][0] = 0
    losses, chosen_rewards, _ = call("simpo", p, beta=2.0)
    assert torch.isfinite(losses).all()
    close(chosen_rewards[0], 2.0 * p["c"][0], 1e-6)


# ---- refusals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ls", [0.5, 0.7, -0.1])
def test_robust_refuses_smoothing_of_half_or_more(ls) -> None:
    with pytest.raises(ValueError, match="0.5"):
        call("robust", random_pairs(seed=0), beta=0.1, label_smoothing=ls)


@pytest.mark.parametrize("name", ["ipo", "simpo"])
def test_length_normalised_losses_require_lengths(name) -> None:
    p = random_pairs(seed=0)
    with pytest.raises(ValueError, match="lengths"):
        PREFERENCE_LOSSES.get(name)(p["c"], p["r"], p["ref_c"], p["ref_r"], beta=0.1)


@pytest.mark.parametrize(
    "name,knob",
    [("hinge", "label_smoothing"), ("ipo", "label_smoothing"), ("sigmoid", "gamma"), ("ipo", "gamma")],
)
def test_a_knob_the_loss_does_not_use_is_refused(name, knob) -> None:
    with pytest.raises(ValueError, match=knob):
        call(name, random_pairs(seed=0), beta=0.1, **{knob: 0.1})


def test_mismatched_shapes_are_refused() -> None:
    """(B, 1) against (B,) would broadcast to (B, B) and give a plausible-looking wrong loss."""
    p = random_pairs(seed=0)
    with pytest.raises(ValueError, match="shape"):
        PREFERENCE_LOSSES.get("sigmoid")(p["c"][:, None], p["r"], p["ref_c"], p["ref_r"], beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        call("sigmoid", p, beta=0.0)


# ---- gradients ------------------------------------------------------------------------------------------

GRAD_INPUTS = ("c", "r", "ref_c", "ref_r")


def numerical_grads(name: str, p: dict[str, torch.Tensor], knobs: dict) -> dict[str, torch.Tensor]:
    """d(sum of reference losses)/d input by central differences of the float64 Python reference."""
    eps, out = 1e-5, {}
    for key in GRAD_INPUTS:
        grad = torch.zeros(B, dtype=torch.float64)
        for b in range(B):
            pair = {k: float(v[b]) for k, v in p.items()}
            hi, lo = {**pair, key: pair[key] + eps}, {**pair, key: pair[key] - eps}
            grad[b] = (reference(name, hi, **knobs)[0] - reference(name, lo, **knobs)[0]) / (2 * eps)
        out[key] = grad
    return out


@pytest.mark.parametrize(
    "name,beta,ls,gamma",
    [
        ("sigmoid", 0.1, 0.0, 0.0),
        ("sigmoid", 0.5, 0.2, 0.0),
        ("robust", 0.1, 0.3, 0.0),
        ("ipo", 0.1, 0.0, 0.0),
    ]
    + [("hinge", 0.1, 0.0, 0.0), ("simpo", 2.0, 0.1, 1.0)],
)
def test_gradients_match_the_reference_formula(name, beta, ls, gamma) -> None:
    p = random_pairs(seed=7, dtype=torch.float64)
    leaves = {k: p[k].clone().requires_grad_(True) for k in GRAD_INPUTS}
    losses, _, _ = call(name, {**p, **leaves}, beta=beta, label_smoothing=ls, gamma=gamma)
    losses.sum().backward()
    want = numerical_grads(name, p, dict(beta=beta, label_smoothing=ls, gamma=gamma))
    for key in GRAD_INPUTS:
        got = leaves[key].grad if leaves[key].grad is not None else torch.zeros(B, dtype=torch.float64)
        close(got, want[key], 1e-6)
    assert leaves["c"].grad.abs().sum() > 0


def test_dpo_gradient_is_the_papers_closed_form() -> None:
    """Rafailov et al. eq. (7), with cDPO's smoothing: dL/dlogp_c = -beta (sigmoid(-beta h) - ls)."""
    p = random_pairs(seed=8, dtype=torch.float64)
    c = p["c"].clone().requires_grad_(True)
    beta, ls = 0.3, 0.15
    losses, _, _ = PREFERENCE_LOSSES.get("sigmoid")(
        c, p["r"], p["ref_c"], p["ref_r"], beta=beta, label_smoothing=ls
    )
    losses.sum().backward()
    h = (p["c"] - p["ref_c"]) - (p["r"] - p["ref_r"])
    close(c.grad, -beta * (torch.sigmoid(-beta * h) - ls), 1e-9)


# ---- metrics, NLL, reward model -------------------------------------------------------------------------


def test_preference_metrics_are_trls_names_and_means() -> None:
    chosen_rewards = torch.tensor([1.0, -0.5, 2.0, 0.0], requires_grad=True)
    rejected_rewards = torch.tensor([0.5, 0.5, -1.0, 0.0])
    chosen_logps, rejected_logps = (
        torch.tensor([-10.0, -20.0, -5.0, -7.0]),
        torch.tensor([-12.0, -9.0, -30.0, -7.0]),
    )
    m = preference_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
    want = {
        "rewards/chosen": 0.625,
        "rewards/rejected": 0.0,
        "rewards/accuracies": 0.5,  # the tie (0, 0) counts as wrong, as TRL's strict >
        "rewards/margins": 0.625,
        "logps/chosen": -10.5,
        "logps/rejected": -14.5,
    }
    assert set(m) == set(want)
    for key, value in want.items():
        assert m[key].shape == () and not m[key].requires_grad, key
        close(m[key], value, 1e-6)


def test_nll_is_trls_token_mean_cross_entropy() -> None:
    """TRL: F.cross_entropy over the flattened chosen tokens (prompt/padding ignored) = one token mean."""
    g = torch.Generator().manual_seed(9)
    T, V = 12, 7
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    lengths = torch.randint(1, T - 2, (B,), generator=g)
    for b in range(B):
        mask[b, 2 : 2 + lengths[b]] = True  # a 2-token prompt, then the response, then padding
    trl = F.cross_entropy(logits.flatten(0, 1), labels.masked_fill(~mask, -100).flatten(), ignore_index=-100)
    token_logps = logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    chosen_logps = (token_logps * mask).sum(-1)  # the (B,) sums every preference loss takes
    ours = nll_loss(chosen_logps, lengths)
    close(ours, trl, 1e-12)
    (g_trl,) = torch.autograd.grad(trl, logits)
    (g_ours,) = torch.autograd.grad(ours, logits)
    close(g_ours, g_trl, 1e-12)
    # not the mean of per-sequence means (lengths differ, so the two disagree)
    assert abs(float(ours.detach()) - float((-chosen_logps / lengths).mean().detach())) > 1e-3
    # global_count: micro-batch shares sum to the step's token mean
    halves = [
        nll_loss(chosen_logps[s], lengths[s], global_count=lengths.sum()) for s in (slice(0, 3), slice(3, B))
    ]
    close(halves[0] + halves[1], trl, 1e-12)


def test_bradley_terry_matches_trls_reward_trainer() -> None:
    g = torch.Generator().manual_seed(10)
    s_c = torch.randn(B, generator=g, dtype=torch.float64, requires_grad=True)
    s_r = torch.randn(B, generator=g, dtype=torch.float64)
    margin = torch.rand(B, generator=g, dtype=torch.float64)
    sc, sr = s_c.tolist(), s_r.tolist()
    for m, coef in ((None, 0.0), (margin, 0.0), (margin, 0.01)):
        losses, metrics = bradley_terry_loss(s_c, s_r, m, center_coef=coef)
        ms = [0.0] * B if m is None else m.tolist()
        want = [-logsigmoid(a - b - mb) + coef * (a + b) ** 2 for a, b, mb in zip(sc, sr, ms)]
        close(losses, torch.tensor(want, dtype=torch.float64), 1e-12)
    # gradient: d/ds_c of -logsigmoid(s_c - s_r - m) = -sigmoid(-(s_c - s_r - m))
    (grad,) = torch.autograd.grad(bradley_terry_loss(s_c, s_r, margin)[0].sum(), s_c)
    close(grad, -torch.sigmoid(-(s_c - s_r - margin)).detach(), 1e-12)
    both = sc + sr
    close(metrics["rm/accuracy"], sum(a > b for a, b in zip(sc, sr)) / B, 1e-12)
    close(metrics["rm/margin_mean"], sum(a - b for a, b in zip(sc, sr)) / B, 1e-12)
    close(metrics["rm/reward_mean"], sum(both) / (2 * B), 1e-12)
    close(metrics["rm/reward_min"], min(both), 0.0)
    close(metrics["rm/reward_max"], max(both), 0.0)
    assert not any(v.requires_grad for v in metrics.values())
    # swapping the pair flips the margin and the accuracy
    _, swapped = bradley_terry_loss(s_r, s_c)
    close(swapped["rm/margin_mean"], -metrics["rm/margin_mean"], 1e-12)
    close(swapped["rm/accuracy"], 1 - metrics["rm/accuracy"], 1e-12)
