"""Advantage estimators as pure tensor functions over (B, T) token-aligned rewards and masks.

Reward convention: `rewards` (B, T) are token-level, rewards[:, t] earned by emitting token t; only
tokens with response_mask 1 count. A verifier's sequence score (B,) goes on each row's LAST response
token (`scores_to_token_rewards`); every estimator also accepts the (B,) scores directly and places them
so. Sequence-level estimators (grpo, rloo) use the sequence score = sum of the row's token rewards and
broadcast the advantage over its response tokens; token-level ones (reinforce_plus_plus, gae) discount
over response tokens only (tokens with mask 0 in between, e.g. tool or user turns, are skipped, as in
verl's GAE), so the prompt and padding never matter.

Every estimator returns (advantages, returns), both (B, T) fp32 and 0 where response_mask is 0. Groups:
`group_index` (B,) long says which prompt a sample answers; samples of one prompt share an index.
`compute_advantages(name, rewards, response_mask, **inputs)` calls the registered estimator with the
inputs it takes, so a loop can pass everything it has (group_index, values, kl, gamma, ...).

Reward shaping and filtering before the estimator: `overlong_penalty` (DAPO's soft overlong punishment)
and `constant_groups` (DAPO's dynamic sampling drops the groups it marks).

Imports nothing from the project but the registry (pure torch).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from algorithms.registry import Registry

Estimator = Callable[..., tuple[torch.Tensor, torch.Tensor]]
ADVANTAGES: Registry[Estimator] = Registry("advantage estimator")


def scores_to_token_rewards(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) sequence scores -> (B, T) rewards with each score on its row's last response token (rows
    without a response token get none)."""
    mask = response_mask.bool()
    T = mask.shape[-1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).max(dim=-1).values  # (B,)
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    has = last >= 0
    rewards[has.nonzero().squeeze(-1), last[has]] = scores[has].float()
    return rewards


def _token_rewards(rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    if rewards.dim() == 1:
        return scores_to_token_rewards(rewards, response_mask)
    if rewards.shape != response_mask.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} vs response_mask {tuple(response_mask.shape)}")
    return torch.where(response_mask.bool(), rewards.float(), 0.0)


def kl_penalized_rewards(
    rewards: torch.Tensor, response_mask: torch.Tensor, kl: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """(B, T) token rewards r_t - kl_coef * kl_t on the response tokens (0 elsewhere): the KL to the
    reference as a per-token reward (Ziegler et al. 2019; verl's and OpenRLHF's use_kl_in_reward). rewards:
    (B,) scores (placed on each row's last response token) or (B, T) token rewards; kl: (B, T) a per-token
    KL estimate of the sampling policy to the reference (e.g. KL_ESTIMATORS "k1" of old vs ref logprobs)."""
    token_rewards = _token_rewards(rewards, response_mask)
    return token_rewards - kl_coef * torch.where(response_mask.bool(), kl.float(), 0.0)


def sequence_scores(rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) sum of each row's response-token rewards (the score, when it was placed on one token)."""
    return _token_rewards(rewards, response_mask).sum(dim=-1)


def masked_whiten(x: torch.Tensor, response_mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and unbiased var over the masked tokens of the whole batch;
    0 outside the mask."""
    mask = response_mask.bool()
    vals = x[mask]
    mean = vals.mean()
    var = vals.var() if vals.numel() > 1 else torch.zeros((), device=x.device)
    return torch.where(mask, (x - mean) * torch.rsqrt(var + eps), 0.0)


def _broadcast(per_seq: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    return torch.where(response_mask.bool(), per_seq.float().unsqueeze(-1), 0.0)


def _group_stats(scores: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-sample (group size, group mean, unbiased group std) of the sample's group, each (B,), in fp64:
    in fp32 a group whose rewards are all 0.6 gets a mean off by ~1e-8 and a std of ~1e-8, and dividing
    one by the other gives advantages of ~0.06 where they must be 0."""
    scores = scores.to(torch.float64)
    _, inverse = torch.unique(group_index, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    count = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(
        0, inverse, torch.ones_like(scores)
    )
    mean = torch.zeros_like(count).index_add_(0, inverse, scores) / count
    sq_dev = torch.zeros_like(count).index_add_(0, inverse, (scores - mean[inverse]).square())
    std = (sq_dev / (count - 1).clamp(min=1)).sqrt()
    return count[inverse], mean[inverse], std[inverse]


def constant_groups(scores: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """(G,) bool, one per distinct group_index in ascending order: True where every sample of the group has
    the same score (compared exactly, in fp64). Such a group gets advantage 0 from every group-relative
    estimator and so no gradient (DAPO's dynamic sampling drops it)."""
    scores = scores.to(torch.float64)
    _, inverse = torch.unique(group_index, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    top = torch.full((n_groups,), float("-inf"), dtype=scores.dtype, device=scores.device)
    bottom = torch.full_like(top, float("inf"))
    top = top.scatter_reduce(0, inverse, scores, "amax")
    bottom = bottom.scatter_reduce(0, inverse, scores, "amin")
    return top == bottom


def overlong_penalty(
    lengths: torch.Tensor, max_len: int, buffer_len: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), (B,) fp32 to add to the rewards. For a
    response of L tokens, L_max = max_len and L_c = buffer_len:

        0                                       L <= L_max - L_c
        (L_max - L_c - L) / L_c * factor        L_max - L_c < L <= L_max   (0 down to -factor)
        -factor                                 L > L_max
    """
    if not 0 < buffer_len < max_len:
        raise ValueError(f"overlong penalty: need 0 < buffer_len < max_len, got {buffer_len} and {max_len}")
    excess = lengths.to(torch.float64) - (max_len - buffer_len)
    penalty = (-excess / buffer_len * penalty_factor).clamp(min=-penalty_factor, max=0.0)
    return penalty.float()


@ADVANTAGES.register("grpo")
def grpo(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    group_index: torch.Tensor,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: A_i = (r_i - mean of its group) / (std of its group + eps), std unbiased (torch.std, as verl).

    norm_by_std=False is Dr. GRPO (Liu et al. 2025): r_i - mean only, no per-prompt scaling. A group of
    one sample has no baseline: mean 0 and std 1 (verl's convention), so A = r. Returns (A, A).
    """
    scores = sequence_scores(rewards, response_mask).to(torch.float64)
    count, mean, std = _group_stats(scores, group_index)
    single = count < 2
    mean = torch.where(single, 0.0, mean)
    adv = scores - mean
    if norm_by_std:
        adv = adv / (torch.where(single, 1.0, std) + eps)
    adv_tok = _broadcast(adv, response_mask)
    return adv_tok, adv_tok


@ADVANTAGES.register("rloo")
def rloo(
    rewards: torch.Tensor, response_mask: torch.Tensor, *, group_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO (Ahmadian et al. 2024): A_i = r_i - mean of the OTHER samples of its group
    = n / (n - 1) * (r_i - group mean). A group of one sample gets A = r. Returns (A, A)."""
    scores = sequence_scores(rewards, response_mask).to(torch.float64)
    count, mean, _ = _group_stats(scores, group_index)
    adv = torch.where(count < 2, scores, count / (count - 1).clamp(min=1) * (scores - mean))
    adv_tok = _broadcast(adv, response_mask)
    return adv_tok, adv_tok


def _discounted_returns(rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_next over the response tokens of each row (masked tokens skipped)."""
    mask = response_mask.bool()
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return torch.where(mask, returns, 0.0)


@ADVANTAGES.register("reinforce_plus_plus")
def reinforce_plus_plus(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): token rewards r_t - kl_coef * kl_t (kl: (B, T) per-token KL estimate of the
    sampling policy to the reference, e.g. KL_ESTIMATORS "k1" of old vs ref logprobs), discounted returns
    G_t over response tokens, advantages = G whitened over all masked tokens of the batch (global, no
    per-prompt baseline). Returns (whitened G, G)."""
    token_rewards = _token_rewards(rewards, response_mask)
    if kl is not None and kl_coef != 0.0:
        token_rewards = token_rewards - kl_coef * torch.where(response_mask.bool(), kl.float(), 0.0)
    returns = _discounted_returns(token_rewards, response_mask, gamma)
    return masked_whiten(returns, response_mask, eps), returns


@ADVANTAGES.register("reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    group_index: torch.Tensor,
    gamma: float = 1.0,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline (Hu 2025; OpenRLHF's reinforce_baseline, verl's reinforce_plus_plus_baseline):
    each sequence score minus the mean score of its group (fp64; a group of one keeps its score), then
    REINFORCE++: the baselined score on the last response token, minus kl_coef * kl_t per token, discounted
    returns G_t, advantages = G whitened over all masked tokens of the batch (the global std replaces
    GRPO's per-prompt one). Returns (whitened G, G)."""
    scores = sequence_scores(rewards, response_mask).to(torch.float64)
    count, mean, _ = _group_stats(scores, group_index)
    baselined = scores - torch.where(count < 2, 0.0, mean)
    return reinforce_plus_plus(baselined.float(), response_mask, gamma=gamma, kl=kl, kl_coef=kl_coef, eps=eps)


@ADVANTAGES.register("gae")
def gae(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    values: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = True,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016) over response tokens. values[:, t] = V(state before token t), token-
    aligned like everything else; after the last response token V = 0 (episode end).

        delta_t = r_t + gamma V_next - V_t,   A_t = delta_t + gamma lam A_next,   returns = A + V

    where "next" is the row's next response token (masked tokens in between are skipped). whiten:
    advantages whitened over all masked tokens of the batch (returns are not). Returns (A, returns).
    """
    mask = response_mask.bool()
    token_rewards = _token_rewards(rewards, response_mask)
    values = values.float()
    adv = torch.zeros_like(token_rewards)
    next_value = torch.zeros_like(token_rewards[:, 0])
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(token_rewards.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        step_adv = delta + gamma * lam * next_adv
        next_value = torch.where(mask[:, t], values[:, t], next_value)
        next_adv = torch.where(mask[:, t], step_adv, next_adv)
        adv[:, t] = step_adv
    adv = torch.where(mask, adv, 0.0)
    returns = torch.where(mask, adv + values, 0.0)
    if whiten:
        adv = masked_whiten(adv, mask, eps)
    return adv, returns


def compute_advantages(
    name: str, rewards: torch.Tensor, response_mask: torch.Tensor, **inputs: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """The estimator registered as `name`, given the `inputs` it declares (others are ignored, so a loop
    passes all it has). An input that NO registered estimator takes is an error (a misspelt option)."""
    fn = ADVANTAGES.get(name)
    known = {p for n in ADVANTAGES.names() for p in inspect.signature(ADVANTAGES.get(n)).parameters}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise TypeError(f"compute_advantages: no estimator takes {unknown}; known inputs: {sorted(known)}")
    accepted = inspect.signature(fn).parameters
    return fn(rewards, response_mask, **{k: v for k, v in inputs.items() if k in accepted})
