"""Preference-optimisation losses as pure tensor functions: DPO and its variants, the RPO NLL term, and the
Bradley-Terry reward-model loss.

Every input is per pair, shape (B,): `*_logps` are per-sequence SUMS of the response tokens' logprobs (fp32),
`*_lengths` the response token counts. The implicit reward of a response is beta * (logp - ref_logp), and
every loss is a function of the pair's log-ratio difference
    h = (logp_c - ref_logp_c) - (logp_r - ref_logp_r)
(length-averaged for IPO and SimPO). ref_*=None is reference-free: ref logps are taken as 0.

Preference losses (PREFERENCE_LOSSES) share one signature (`PreferenceLossFn`), so a config picks one by name:
    fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, label_smoothing, gamma,
       chosen_lengths, rejected_lengths) -> (losses (B,), chosen_rewards (B,), rejected_rewards (B,))
Losses are per pair (the caller reduces them: TRL takes the mean); rewards are detached and are what TRL
logs. A knob a loss does not use (label_smoothing, gamma) must be left at 0: it is refused, not ignored.
The losses named in REFERENCE_FREE ignore the ref logps, so a trainer can skip the reference forward.

Parity: the formulas are TRL's (huggingface/trl): DPOTrainer.dpo_loss of v0.28 (trl/trainer/dpo_trainer.py,
the last version with cDPO label smoothing and rpo_alpha; v0.29's refactor dropped both), IPO's length
normalisation as in TRL's current DPOTrainer, SimPO as CPOTrainer.cpo_loss (trl/experimental/cpo), the
reward-model loss as RewardTrainer.compute_loss (trl/trainer/reward_trainer.py).

Imports nothing from the project but the registry (pure torch).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from algorithms.registry import Registry

Metrics = dict[str, torch.Tensor]
Rewarded = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (losses, chosen_rewards, rejected_rewards)


class PreferenceLossFn(Protocol):
    def __call__(
        self,
        chosen_logps: torch.Tensor,
        rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor | None,
        ref_rejected_logps: torch.Tensor | None,
        *,
        beta: float,
        label_smoothing: float = 0.0,
        gamma: float = 0.0,
        chosen_lengths: torch.Tensor | None = None,
        rejected_lengths: torch.Tensor | None = None,
    ) -> Rewarded: ...


PREFERENCE_LOSSES: Registry[PreferenceLossFn] = Registry("preference loss")
REFERENCE_FREE = frozenset({"simpo"})


# ---- shared pieces --------------------------------------------------------------------------------------


def _check_pairs(**tensors: torch.Tensor | None) -> None:
    """Every given tensor is (B,) with one B: a (B, 1) among (B,) would broadcast to (B, B) silently."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1 or any(len(s) != 1 for s in shapes.values()):
        raise ValueError(f"expected tensors of one shape (B,), got {shapes}")


def _check_knobs(loss: str, beta: float, label_smoothing: float, gamma: float, uses: set[str]) -> None:
    if beta <= 0:
        raise ValueError(f"{loss}: beta must be > 0, got {beta}")
    if "label_smoothing" in uses and not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{loss}: label_smoothing must lie in [0, 1], got {label_smoothing}")
    for name, value in (("label_smoothing", label_smoothing), ("gamma", gamma)):
        if name not in uses and value != 0.0:
            raise ValueError(f"{loss} does not use {name} (got {value}); leave it at 0")


def _logratio(logps: torch.Tensor, ref_logps: torch.Tensor | None) -> torch.Tensor:
    return logps if ref_logps is None else logps - ref_logps


def _per_token(x: torch.Tensor, lengths: torch.Tensor | None, loss: str) -> torch.Tensor:
    """x / length; a length of 0 counts as 1 (TRL's clamp), so an empty response cannot give inf."""
    if lengths is None:
        raise ValueError(f"{loss} is length-normalised: pass chosen_lengths and rejected_lengths")
    return x / lengths.to(x.dtype).clamp(min=1)


def _smoothed_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - ls) log sigmoid(z) - ls log sigmoid(-z): the logistic loss when the label is flipped with
    probability ls (cDPO)."""
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _rewarded(
    losses: torch.Tensor, beta: float, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor
) -> Rewarded:
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# ---- preference losses ----------------------------------------------------------------------------------


@PREFERENCE_LOSSES.register("sigmoid")
def dpo_sigmoid(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> Rewarded:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta h) per pair (B,).

    label_smoothing ls > 0 is conservative DPO (cDPO, Mitchell 2023), the expected loss when each label is
    flipped with probability ls: -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h). Biased towards a
    finite margin: the loss is minimal at beta h = log((1 - ls) / ls). Lengths and gamma are not used.
    """
    _check_pairs(c=chosen_logps, r=rejected_logps, ref_c=ref_chosen_logps, ref_r=ref_rejected_logps)
    _check_knobs("sigmoid", beta, label_smoothing, gamma, {"label_smoothing"})
    chosen_lr, rejected_lr = (
        _logratio(chosen_logps, ref_chosen_logps),
        _logratio(rejected_logps, ref_rejected_logps),
    )
    losses = _smoothed_logistic(beta * (chosen_lr - rejected_lr), label_smoothing)
    return _rewarded(losses, beta, chosen_lr, rejected_lr)


@PREFERENCE_LOSSES.register("robust")
def dpo_robust(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> Rewarded:
    """Robust DPO (Chowdhury et al. 2024), ls = the probability that a label is flipped, in [0, 0.5):

        (-(1 - ls) log sigmoid(beta h) + ls log sigmoid(-beta h)) / (1 - 2 ls)    per pair (B,)

    An unbiased estimate of the clean DPO loss under label noise: its expectation over the flip,
    (1 - ls) L(h) + ls L(-h), is exactly -log sigmoid(beta h). ls = 0 is DPO. Lengths and gamma are not used.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust: label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    _check_pairs(c=chosen_logps, r=rejected_logps, ref_c=ref_chosen_logps, ref_r=ref_rejected_logps)
    _check_knobs("robust", beta, label_smoothing, gamma, {"label_smoothing"})
    chosen_lr, rejected_lr = (
        _logratio(chosen_logps, ref_chosen_logps),
        _logratio(rejected_logps, ref_rejected_logps),
    )
    z = beta * (chosen_lr - rejected_lr)
    losses = (-(1.0 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (
        1.0 - 2.0 * label_smoothing
    )
    return _rewarded(losses, beta, chosen_lr, rejected_lr)


@PREFERENCE_LOSSES.register("ipo")
def ipo(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> Rewarded:
    """IPO (Azar et al. 2023, eq. 17, beta = the paper's tau): (h_avg - 1 / (2 beta))^2 per pair (B,), with

        h_avg = (logp_c - ref_logp_c) / |c| - (logp_r - ref_logp_r) / |r|

    the log-ratios averaged over each response's tokens, as TRL does (its comment: confirmed with the IPO
    authors; the summed form makes the squared loss and beta scale with length). Lengths are required.
    Rewards stay beta * the summed log-ratios, as TRL logs them. label_smoothing and gamma are not used.
    """
    _check_pairs(
        c=chosen_logps,
        r=rejected_logps,
        ref_c=ref_chosen_logps,
        ref_r=ref_rejected_logps,
        len_c=chosen_lengths,
        len_r=rejected_lengths,
    )
    _check_knobs("ipo", beta, label_smoothing, gamma, set())
    chosen_lr, rejected_lr = (
        _logratio(chosen_logps, ref_chosen_logps),
        _logratio(rejected_logps, ref_rejected_logps),
    )
    h_avg = _per_token(chosen_lr, chosen_lengths, "ipo") - _per_token(rejected_lr, rejected_lengths, "ipo")
    losses = (h_avg - 1.0 / (2.0 * beta)).square()
    return _rewarded(losses, beta, chosen_lr, rejected_lr)


@PREFERENCE_LOSSES.register("simpo")
def simpo(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> Rewarded:
    """SimPO (Meng et al. 2024): reference-free and length-normalised, with a target reward margin gamma:

        z = beta (logp_c / |c| - logp_r / |r|) - gamma
        loss = -(1 - ls) log sigmoid(z) - ls log sigmoid(-z)    per pair (B,)

    label smoothing as TRL's CPOTrainer (loss_type="simpo", simpo_gamma = gamma; the paper uses ls = 0).
    ref_* are ignored (REFERENCE_FREE). Rewards: beta * the length-averaged logps. Lengths are required.
    """
    _check_pairs(c=chosen_logps, r=rejected_logps, len_c=chosen_lengths, len_r=rejected_lengths)
    _check_knobs("simpo", beta, label_smoothing, gamma, {"label_smoothing", "gamma"})
    chosen_avg = _per_token(chosen_logps, chosen_lengths, "simpo")
    rejected_avg = _per_token(rejected_logps, rejected_lengths, "simpo")
    losses = _smoothed_logistic(beta * (chosen_avg - rejected_avg) - gamma, label_smoothing)
    return _rewarded(losses, beta, chosen_avg, rejected_avg)


@PREFERENCE_LOSSES.register("hinge")
def slic_hinge(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> Rewarded:
    """SLiC's calibration hinge (Zhao et al. 2023) on the reference-normalised likelihood, as TRL:
    relu(1 - beta h) per pair (B,); 1 / beta is the margin, beyond which a pair has no loss and no gradient.
    label_smoothing, gamma and lengths are not used.
    """
    _check_pairs(c=chosen_logps, r=rejected_logps, ref_c=ref_chosen_logps, ref_r=ref_rejected_logps)
    _check_knobs("hinge", beta, label_smoothing, gamma, set())
    chosen_lr, rejected_lr = (
        _logratio(chosen_logps, ref_chosen_logps),
        _logratio(rejected_logps, ref_rejected_logps),
    )
    losses = torch.relu(1.0 - beta * (chosen_lr - rejected_lr))
    return _rewarded(losses, beta, chosen_lr, rejected_lr)


# ---- metrics and auxiliary losses -----------------------------------------------------------------------


def preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> Metrics:
    """TRL's DPO metrics as detached scalar means over the batch: rewards/chosen, rewards/rejected,
    rewards/accuracies (fraction of pairs with chosen reward > rejected, ties count as wrong),
    rewards/margins (mean of chosen - rejected reward), logps/chosen, logps/rejected. Every key is a mean
    over pairs, so a caller combines micro-batches by weighting with their pair counts."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def nll_loss(
    chosen_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    *,
    global_count: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """RPO's NLL term on the chosen responses (Pang et al. 2024; TRL's rpo_alpha, added as
    loss + rpo_alpha * nll): a scalar, the token mean over the batch

        -sum_b chosen_logps[b] / sum_b chosen_lengths[b]

    Token mean, not the mean of per-sequence means: TRL computes it as F.cross_entropy over the flattened
    chosen tokens (one mean over every token of the batch), so a long response weighs in per token.
    global_count: the step's total chosen tokens over micro-batches and dp ranks (None: this batch's), so
    gradients summed over micro-batches are those of the step's token mean (core/engine.py's contract).
    """
    _check_pairs(c=chosen_logps, len_c=chosen_lengths)
    count = chosen_lengths.sum() if global_count is None else torch.as_tensor(global_count)
    total = -chosen_logps.sum()
    return total / count.to(device=total.device, dtype=total.dtype).clamp(min=1)


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | None = None,
    *,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Reward-model loss of TRL's RewardTrainer, per pair (B,):

        -log sigmoid(s_c - s_r - margin) + center_coef * (s_c + s_r)^2

    margin (B,): Llama-2's preference-strength margin (None: 0). center_coef: TRL's
    center_rewards_coefficient (Eisenstein et al. 2023), pulling rewards towards zero mean. Metrics,
    detached scalars: rm/accuracy (fraction with s_c > s_r), rm/margin_mean (mean of s_c - s_r),
    rm/reward_mean, rm/reward_min, rm/reward_max (over chosen and rejected scores together).
    """
    _check_pairs(c=chosen_scores, r=rejected_scores, margin=margin)
    diff = chosen_scores - rejected_scores
    losses = -F.logsigmoid(diff if margin is None else diff - margin)
    if center_coef != 0.0:
        losses = losses + center_coef * (chosen_scores + rejected_scores).square()
    scores = torch.cat([chosen_scores, rejected_scores]).detach()
    metrics = {
        "rm/accuracy": (chosen_scores.detach() > rejected_scores.detach()).float().mean(),
        "rm/margin_mean": diff.detach().mean(),
        "rm/reward_mean": scores.mean(),
        "rm/reward_min": scores.min(),
        "rm/reward_max": scores.max(),
    }
    return losses, metrics
