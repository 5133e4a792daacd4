"""The data of one GRPO/PPO step between the phases: the prompts and what came back (`Rollouts`), the
sampling requests, the training batch (`build_batch`, layout in algorithms/grpo.py's docstring), its
advantages and the per-step rollout metrics. Pure functions of their inputs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import torch

from algorithms.grpo_config import AlgorithmConfig, GRPOConfig, RolloutConfig
from algorithms.interfaces import Batch
from algorithms.rl_inputs import Row
from rollout.environments import Completion, Score
from rollout.environments.multiturn import MultiTurnEnvironment
from rollout.multiturn import Episode, run_episodes
from rollout.types import GenerationRequest, GenerationResult, SamplingParams

if TYPE_CHECKING:
    from algorithms.grpo import Components


@dataclass
class Rollouts:
    """One step's prompts and what came back for them, in prompt order."""

    rows: list[Row]  # dataset rows, one per prompt
    prompt_ids: list[list[int]]
    results: list[GenerationResult] = field(default_factory=list)
    scores: list[Score] = field(default_factory=list)  # flat: prompt-major, n per prompt
    # multi-turn environments only: one per sample, flat like scores (the turns the samples are made of)
    episodes: list[Episode] = field(default_factory=list)


def sampling_requests(
    prompt_ids: Sequence[list[int]], cfg: RolloutConfig, seed: int, greedy: bool = False
) -> list[GenerationRequest]:
    """Prompt i's samples draw from seeds seed + i*n ... (engines seed sample j with seed + j), so a step's
    samples depend only on (seed, weights): a resumed run draws what the uninterrupted one drew."""
    n = 1 if greedy else cfg.n
    requests = []
    for i, ids in enumerate(prompt_ids):
        params = SamplingParams(
            n=n,
            temperature=0.0 if greedy else cfg.temperature,
            top_p=1.0 if greedy else cfg.top_p,
            top_k=None if greedy else cfg.top_k,
            max_tokens=cfg.max_tokens,
            seed=seed + i * n,
            logprobs=True,
        )
        requests.append(GenerationRequest(ids, params, request_id=str(i)))
    return requests


def sample_rollouts(
    parts: Components, rollouts: Rollouts, cfg: RolloutConfig, seed: int, greedy: bool
) -> None:
    """rollouts.results from the (awake) generator: one generate call, or with a multi-turn environment its
    episodes run to the end (rollout/multiturn.py, one batched call per turn; fills rollouts.episodes)."""
    requests = sampling_requests(rollouts.prompt_ids, cfg, seed, greedy)
    if isinstance(parts.environment, MultiTurnEnvironment):
        rollouts.results, rollouts.episodes = run_episodes(
            parts.generator, requests, parts.environment, rollouts.rows, parts.tokenizer
        )
    else:
        rollouts.results = parts.generator.generate(requests)


def completions_of(rollouts: Rollouts, decode: Callable[[list[int]], str]) -> list[Completion]:
    """Decoded responses (special tokens dropped), prompt-major, with each prompt's row attached. Multi-turn:
    each episode's final turn, its row extended with the episode (rollout/environments/multiturn.py)."""
    if rollouts.episodes:
        return [episode.completion() for episode in rollouts.episodes]
    return [
        Completion(row["prompt"], decode(sample.token_ids), sample.finish_reason, row)
        for row, result in zip(rollouts.rows, rollouts.results, strict=True)
        for sample in result.samples
    ]


def build_batch(results: Sequence[GenerationResult], scores: Sequence[Score], pad_id: int = 0) -> Batch:
    """Training batch of prompt + response rows, right-padded (see the module docstring).

    input_ids (B, T) long; response_mask (B, T) float, 1 on generated tokens (EOS included: the policy
    learns to stop) and 0 on a multi-turn sample's observation tokens (Sample.loss_mask); sampler_logprobs
    (B, T) fp32 (0 on observations); group_index (B,) the prompt of each row; rewards,
    correct (B,) fp32. B = sum of samples over results, prompt-major.
    """
    rows = [(r.prompt_token_ids, s) for r in results for s in r.samples]
    if len(rows) != len(scores):
        raise ValueError(f"build_batch: {len(rows)} samples but {len(scores)} scores")
    T = max(len(p) + len(s.token_ids) for p, s in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    response_mask = torch.zeros(B, T)
    sampler_logprobs = torch.zeros(B, T)
    for b, (prompt, sample) in enumerate(rows):
        start, end = len(prompt), len(prompt) + len(sample.token_ids)
        input_ids[b, :end] = torch.tensor([*prompt, *sample.token_ids])
        response_mask[b, start:end] = 1.0 if sample.loss_mask is None else torch.tensor(sample.loss_mask)
        if sample.logprobs is not None:
            sampler_logprobs[b, start:end] = torch.tensor(sample.logprobs)
    group_index = torch.tensor([i for i, r in enumerate(results) for _ in r.samples], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "response_mask": response_mask,
        "sampler_logprobs": sampler_logprobs,
        "group_index": group_index,
        "rewards": torch.tensor([s.reward for s in scores], dtype=torch.float32),
        "correct": torch.tensor([float(s.correct) for s in scores]),
    }


def logprob_gap(
    trainer: torch.Tensor, sampler: torch.Tensor, response_mask: torch.Tensor
) -> dict[str, float]:
    """mean / max |trainer - sampler| logprob over response tokens (float64)."""
    mask = response_mask.bool()
    diff = (trainer.double() - sampler.double())[mask].abs()
    if diff.numel() == 0:
        return {"rollout/logprob_gap_mean": 0.0, "rollout/logprob_gap_max": 0.0}
    return {"rollout/logprob_gap_mean": float(diff.mean()), "rollout/logprob_gap_max": float(diff.max())}


def advantages_of(batch: Batch, cfg: AlgorithmConfig) -> torch.Tensor:
    """(B, T) advantages from the row rewards by the configured estimator (0 off the response)."""
    from algorithms.advantages import compute_advantages

    inputs: dict[str, Any] = {"group_index": batch["group_index"]}
    if cfg.advantage == "grpo":
        inputs["norm_by_std"] = cfg.norm_by_std
    if cfg.advantage in ("reinforce_plus_plus", "reinforce_plus_plus_baseline"):
        inputs["gamma"] = cfg.gamma
    advantages, _ = compute_advantages(cfg.advantage, batch["rewards"], batch["response_mask"], **inputs)
    return advantages


def rollout_metrics(
    batch: Batch, scores: Sequence[Score], results: Sequence[GenerationResult]
) -> dict[str, float]:
    rewards = batch["rewards"]
    lengths = batch["response_mask"].sum(-1)
    samples = [s for r in results for s in r.samples]
    metrics = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "reward/accuracy": float(batch["correct"].mean()),
        "reward/well_formed": sum(s.well_formed for s in scores) / max(1, len(scores)),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/truncated_frac": sum(s.finish_reason == "length" for s in samples) / max(1, len(samples)),
    }
    for name in sorted({name for s in scores for name in s.metrics}):  # a reward plugin's parts
        values = [s.metrics[name] for s in scores if name in s.metrics]
        metrics[f"reward/{name}"] = sum(values) / len(values)
    return metrics


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """Equal slices along dim 0 (each one optimizer step), in order."""
    B = batch["input_ids"].shape[0]
    size = B // parts
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(parts)]


def mean_metrics(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in sorted(keys)}


def shaped_rewards(batch: Batch, cfg: GRPOConfig) -> torch.Tensor:
    """(B,) the environment's rewards plus DAPO's overlong penalty (algorithm.overlong) of each response's
    length L = its loss tokens, L_max = rollout.max_tokens."""
    from algorithms.advantages import overlong_penalty

    overlong = cfg.algorithm.overlong
    if overlong.buffer_len == 0:
        return batch["rewards"]
    lengths = batch["response_mask"].sum(-1)
    penalty = overlong_penalty(lengths, cfg.rollout.max_tokens, overlong.buffer_len, overlong.penalty_factor)
    return batch["rewards"] + penalty


def take_prompts(rollouts: Rollouts, keep: Iterable[int]) -> Rollouts:
    """The prompts `keep` (indices, in that order) with their samples: rows, prompt_ids and results are per
    prompt; scores and episodes per sample, prompt-major."""
    keep = list(keep)
    starts = list(accumulate((len(r.samples) for r in rollouts.results), initial=0))

    def samples_of(flat: list[Any]) -> list[Any]:
        return [x for i in keep for x in flat[starts[i] : starts[i + 1]]] if flat else []

    return Rollouts(
        [rollouts.rows[i] for i in keep],
        [rollouts.prompt_ids[i] for i in keep],
        [rollouts.results[i] for i in keep],
        samples_of(rollouts.scores),
        samples_of(rollouts.episodes),
    )


def join_rollouts(parts: Sequence[Rollouts]) -> Rollouts:
    """One Rollouts of several, in order (each field concatenated)."""
    return Rollouts(**{f.name: [x for r in parts for x in getattr(r, f.name)] for f in fields(Rollouts)})
