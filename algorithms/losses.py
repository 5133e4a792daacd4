"""RL losses as pure tensor functions: policy-gradient surrogates, KL estimators, value loss, aggregation.

Tensors follow the batch convention of every RL piece here: (B, T) token-aligned, value[:, t] belongs to
token t (its logprob given the prefix), and `response_mask` (B, T) is 1 on the tokens that count. Values
at masked positions never reach a result (they are selected away, so a NaN or inf there is harmless).

Normalisation (`aggregate`, verl's loss_agg_mode):
    token_mean            sum of token losses / number of loss tokens
    seq_mean_token_sum    sum over sequences of (sum of the sequence's token losses) / number of sequences
    seq_mean_token_mean   sum over sequences of (mean of the sequence's token losses) / number of sequences
    seq_mean_token_sum_norm
                          sum over sequences of (sum of the sequence's token losses / norm_length) / number
                          of sequences, norm_length a constant (Dr. GRPO, Liu et al. 2025: the maximum
                          response length): a token weighs the same in a short sequence as in a long one
Sequences without a loss token count in neither numerator nor denominator. `global_count` replaces the
local denominator with the step's total (tokens or sequences over every micro-batch and data-parallel
rank; `loss_count` gives one micro-batch's share): each micro-batch's loss is then its share of the step
loss, so gradients SUM over micro-batches and dp ranks to the gradient of the whole step's loss, which is
the engine's contract (core/engine.py). verl's seq-mean-token-sum-norm divides a micro-batch's summed
token losses by the constant only (and averages micro-batches): ours is that / the sequences per
micro-batch, the Dr. GRPO objective whatever the micro-batch size.

Policy losses (POLICY_LOSSES) share one signature (`PolicyLossFn`), so a config picks one by name:
    fn(logprobs, old_logprobs, advantages, response_mask, *, clip_low, clip_high, dual_clip, agg_mode,
       global_count, norm_length, is_weights) -> (loss: scalar tensor, metrics: dict[str, scalar tensor])
old_logprobs=None means on-policy (old = logprobs.detach(): ratio 1, value and gradient of the surrogate
at the sampling policy). is_weights (B, T): constant per-token weights multiplying the token losses
before aggregation (truncated importance sampling against the sampler: `truncated_is_weights`). Metrics are detached; keys ending in _max / _min are extremes over the local
mask (-inf / +inf without tokens), every other key is a mean over the local mask's tokens (0 without
tokens), so a caller combines micro-batches by weighting means with their token counts.

Imports nothing from the project but the registry (pure torch).
"""

from __future__ import annotations

from typing import Protocol

import torch

from algorithms.registry import Registry

AGG_MODES = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm")
LOG_RATIO_LIMIT = 20.0  # |log ratio| is clamped here before exp: exp(20) ~ 5e8 stays finite in fp32
K3_MAX = 10.0  # k3 is clamped from above (verl's low_var_kl): one bad token cannot dominate the penalty

Metrics = dict[str, torch.Tensor]


class PolicyLossFn(Protocol):
    def __call__(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor | None,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        *,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        dual_clip: float | None = None,
        agg_mode: str = "token_mean",
        global_count: float | torch.Tensor | None = None,
        norm_length: float | None = None,
        is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Metrics]: ...


class KLEstimatorFn(Protocol):
    def __call__(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor: ...


POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")
KL_ESTIMATORS: Registry[KLEstimatorFn] = Registry("KL estimator")


# ---- masked reductions ----------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x where mask is nonzero (masked entries are selected away, not multiplied by 0)."""
    picked = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return picked.sum() if dim is None else picked.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the mask's tokens; 0 when the mask is empty."""
    return masked_sum(x, mask) / mask.bool().sum().clamp(min=1)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max of x over the mask (-inf when empty: the identity of a MAX reduction over ranks)."""
    return torch.where(mask.bool(), x, float("-inf")).max()


def masked_min(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Min of x over the mask (+inf when empty)."""
    return torch.where(mask.bool(), x, float("inf")).min()


# ---- aggregation ----------------------------------------------------------------------------------------


def _check_mode(mode: str) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown agg_mode {mode!r}; choices: {list(AGG_MODES)}")


def loss_count(response_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """This batch's share of the normaliser of `mode`: loss tokens (token_mean) or sequences with at least
    one loss token (seq_mean_*), as a float64 scalar. Sum it over micro-batches and dp ranks for the
    `global_count` of a step."""
    _check_mode(mode)
    mask = response_mask.bool()
    count = mask.sum() if mode == "token_mean" else mask.any(dim=-1).sum()
    return count.to(torch.float64)


def aggregate(
    loss_tok: torch.Tensor,
    response_mask: torch.Tensor,
    mode: str = "token_mean",
    global_count: float | torch.Tensor | None = None,
    norm_length: float | None = None,
) -> torch.Tensor:
    """Reduce per-token losses (B, T) to a scalar by `mode` (module docstring). global_count: the step's
    total number of tokens (token_mean) or sequences (seq_mean_*) over all micro-batches and dp ranks;
    None: this batch's own count (then the result is the batch's mean). norm_length: the constant of
    seq_mean_token_sum_norm (required there, unused by the other modes)."""
    _check_mode(mode)
    mask = response_mask.bool()
    per_seq = masked_sum(loss_tok, mask, dim=-1)  # (B,)
    if mode == "seq_mean_token_mean":
        per_seq = per_seq / mask.sum(dim=-1).clamp(min=1)
    elif mode == "seq_mean_token_sum_norm":
        if norm_length is None or norm_length <= 0:
            raise ValueError(f"agg_mode=seq_mean_token_sum_norm needs a norm_length > 0, got {norm_length}")
        per_seq = per_seq / norm_length
    total = per_seq.sum()
    count = loss_count(mask, mode) if global_count is None else torch.as_tensor(global_count)
    return total / count.to(device=total.device, dtype=total.dtype).clamp(min=1)


# ---- policy losses --------------------------------------------------------------------------------------


def _weighted(
    loss_tok: torch.Tensor,
    response_mask: torch.Tensor,
    agg_mode: str,
    global_count: float | torch.Tensor | None,
    norm_length: float | None,
    is_weights: torch.Tensor | None,
) -> torch.Tensor:
    """`aggregate` of the token losses times the constant importance weights (when given)."""
    if is_weights is not None:
        loss_tok = loss_tok * is_weights.detach()
    return aggregate(loss_tok, response_mask, agg_mode, global_count, norm_length)


def truncated_is_weights(
    old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, response_mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL framework secretly brings
    you off-policy RL training"; verl's tis_imp_ratio_cap): per-token w = min(exp(old - sampler), cap),
    the ratio of the trainer's policy at the step's start to the sampler that drew the tokens (an engine
    with other kernels or precision), truncated so that no token the sampler over-sampled dominates. Both
    logprobs must be of one distribution (the same temperature).

    Returns (weights (B, T) fp32 without gradient, 1 off the mask; metrics over the mask: tis/weight_mean,
    tis/weight_max (after truncation), tis/clipped_frac (tokens whose ratio exceeded cap))."""
    if cap <= 0:
        raise ValueError(f"the TIS cap must be > 0, got {cap}")
    mask = response_mask.bool()
    log_ratio = old_logprobs.detach().float() - sampler_logprobs.float()
    ratio = log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT).exp()
    weights = torch.where(mask, ratio.clamp(max=cap), 1.0)
    metrics = {
        "tis/weight_mean": float(masked_mean(weights, mask)),
        "tis/weight_max": float(masked_max(weights, mask)) if mask.any() else 0.0,
        "tis/clipped_frac": float(masked_mean((ratio > cap).float(), mask)),
    }
    return weights, metrics


def _log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None) -> torch.Tensor:
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    return (logprobs - old).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)


def _ratio_metrics(log_ratio: torch.Tensor, mask: torch.Tensor) -> Metrics:
    """approx_kl: mean of old - new logprob (k1 of KL(old || new) on old's samples, verl's ppo_kl)."""
    log_ratio = log_ratio.detach()
    ratio = log_ratio.exp()
    return {
        "approx_kl": masked_mean(-log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_max": masked_max(ratio, mask),
        "ratio_min": masked_min(ratio, mask),
    }


def _clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic surrogate max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) per token, and
    where the clipped branch is the active one (the token's gradient is then 0)."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg_mode: str = "token_mean",
    global_count: float | torch.Tensor | None = None,
    norm_length: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Token-level PPO clipped surrogate, ratio r = exp(logprobs - old_logprobs) per token.

    clip_low / clip_high: the trust region [1 - clip_low, 1 + clip_high]; clip_high > clip_low is DAPO's
    clip-higher. dual_clip c > 1 (Ye et al. 2020): for A < 0 the loss is also capped at -A c, so a huge
    ratio on a negative-advantage token cannot blow up the loss. Metrics: clip_frac (tokens whose clipped
    branch is active), clip_frac_lower (tokens capped by the dual clip), approx_kl, ratio_mean/max/min.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    log_ratio = _log_ratio(logprobs, old_logprobs)
    loss_tok, is_clipped = _clipped_surrogate(log_ratio.exp(), advantages, clip_low, clip_high)
    dual_capped = torch.zeros_like(is_clipped)
    if dual_clip is not None:
        cap = -advantages * dual_clip
        dual_capped = (advantages < 0) & (loss_tok > cap)
        loss_tok = torch.where(dual_capped, cap, loss_tok)
    metrics = {
        "clip_frac": masked_mean(is_clipped.float(), response_mask),
        "clip_frac_lower": masked_mean(dual_capped.float(), response_mask),
        **_ratio_metrics(log_ratio, response_mask),
    }
    return _weighted(loss_tok, response_mask, agg_mode, global_count, norm_length, is_weights), metrics


@POLICY_LOSSES.register("gspo")
def gspo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    dual_clip: float | None = None,
    agg_mode: str = "seq_mean_token_mean",
    global_count: float | torch.Tensor | None = None,
    norm_length: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GSPO (Zheng et al. 2025): the clipped surrogate on the sequence ratio s = exp(mean over the
    sequence's tokens of the log ratio).

    Token form (as verl): s_t = sg(s) * exp(logprobs_t - sg(logprobs_t)), equal to s in value, so that
    with seq_mean_token_mean (the paper's normalisation) the gradient is exactly that of s. The paper's
    clip range is ~(3e-4, 4e-4), orders of magnitude below PPO's. dual_clip is not used. clip_frac counts
    tokens of clipped sequences.
    """
    mask = response_mask.bool()
    log_ratio = _log_ratio(logprobs, old_logprobs)
    seq_log_ratio = masked_sum(log_ratio, mask, dim=-1) / mask.sum(dim=-1).clamp(min=1)  # (B,)
    log_seq_ratio = logprobs - logprobs.detach() + seq_log_ratio.detach().unsqueeze(-1)  # (B, T)
    log_seq_ratio = log_seq_ratio.clamp(max=LOG_RATIO_LIMIT)
    loss_tok, is_clipped = _clipped_surrogate(log_seq_ratio.exp(), advantages, clip_low, clip_high)
    metrics = {
        "clip_frac": masked_mean(is_clipped.float(), mask),
        **_ratio_metrics(log_seq_ratio, mask),
    }
    return _weighted(loss_tok, mask, agg_mode, global_count, norm_length, is_weights), metrics


@POLICY_LOSSES.register("reinforce")
def reinforce(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg_mode: str = "token_mean",
    global_count: float | torch.Tensor | None = None,
    norm_length: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """REINFORCE surrogate -A * w * logprobs per token, w a constant (no gradient) importance weight.

    old_logprobs=None: w = 1, plain on-policy REINFORCE. Otherwise w = clip(exp(logprobs - old_logprobs),
    1 - clip_low, 1 + clip_high), the truncated importance weight of CISPO (MiniMax-M1): unlike PPO's clip
    it never zeroes a token's gradient, it bounds its weight. dual_clip is not used. clip_frac counts
    tokens whose weight was truncated.
    """
    log_ratio = _log_ratio(logprobs, old_logprobs).detach()
    ratio = log_ratio.exp()
    weight = (
        ratio.clamp(1.0 - clip_low, 1.0 + clip_high) if old_logprobs is not None else torch.ones_like(ratio)
    )
    loss_tok = -advantages * weight * logprobs
    metrics = {
        "clip_frac": masked_mean((weight != ratio).float(), response_mask),
        **_ratio_metrics(log_ratio, response_mask),
    }
    return _weighted(loss_tok, response_mask, agg_mode, global_count, norm_length, is_weights), metrics


# ---- KL estimators --------------------------------------------------------------------------------------
# Per-token estimators of KL(policy || ref) from tokens sampled from the policy (Schulman, "Approximating
# KL divergence", 2020), with log r = ref_logprobs - logprobs:
#   k1 = -log r                  unbiased, high variance, can be negative
#   k2 = (log r)^2 / 2           biased (exact to second order), >= 0; its gradient is that of KL's
#   k3 = (r - 1) - log r         unbiased, >= 0, low variance (verl's low_var_kl, GRPO's KL term)
# |log r| is clamped to LOG_RATIO_LIMIT and k3 to at most K3_MAX.


def _ref_log_ratio(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return (ref_logprobs - logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)


@KL_ESTIMATORS.register("k1")
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """logprobs - ref_logprobs per token (B, T)."""
    return -_ref_log_ratio(logprobs, ref_logprobs)


@KL_ESTIMATORS.register("k2")
def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """(logprobs - ref_logprobs)^2 / 2 per token (B, T)."""
    return 0.5 * _ref_log_ratio(logprobs, ref_logprobs).square()


@KL_ESTIMATORS.register("k3")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """exp(ref - logprobs) - (ref - logprobs) - 1 per token (B, T), in [0, K3_MAX]."""
    log_r = _ref_log_ratio(logprobs, ref_logprobs)
    return (log_r.exp() - log_r - 1.0).clamp(max=K3_MAX)


def adaptive_kl_coef(coef: float, current_kl: float, target: float, horizon: float, n_steps: int) -> float:
    """The adaptive KL coefficient's next value (Ziegler et al. 2019, sec. 2.2; verl's AdaptiveKLController):
    coef * (1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon). current_kl: the KL the
    penalty measured this step; n_steps: the samples it was measured on (the batch size)."""
    error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)


# ---- value loss -----------------------------------------------------------------------------------------


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_range: float | None = 0.2,
    agg_mode: str = "token_mean",
    global_count: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO's clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2) per token, V_clip = old_values +
    clip(V - old_values, -clip_range, clip_range); clip_range=None: plain 0.5 (V - R)^2.

    Metrics: vf_clip_frac (tokens where the clipped branch is the larger), value_mean, value_error (mean
    squared error of V, unclipped).
    """
    err = (values - returns).square()
    loss_tok, is_clipped = err, torch.zeros_like(err, dtype=torch.bool)
    if clip_range is not None:
        clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
        err_clipped = (clipped - returns).square()
        loss_tok, is_clipped = torch.maximum(err, err_clipped), err_clipped > err
    metrics = {
        "vf_clip_frac": masked_mean(is_clipped.float(), response_mask),
        "value_mean": masked_mean(values.detach(), response_mask),
        "value_error": masked_mean(err.detach(), response_mask),
    }
    return aggregate(0.5 * loss_tok, response_mask, agg_mode, global_count), metrics


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over the masked tokens (float64 scalar): 1 when the values
    predict the returns, 0 for a constant prediction, negative when worse than one; 0 without variance."""
    mask = response_mask.bool()
    target, error = returns[mask].double(), (returns - values)[mask].double()
    if target.numel() < 2 or target.var() == 0:
        return torch.zeros((), dtype=torch.float64)
    return 1.0 - error.var() / target.var()
