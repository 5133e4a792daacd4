"""GRPO: each phase alone on tiny objects, then `rl grpo` end to end (run, resume, bad input).

The tiny model is random (hidden 64, 2 layers) and saved as an HF directory with the char tokenizer, so
nothing here depends on a pretraining run; reward going up is checked by hand with configs/grpo_tiny.yaml.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from algorithms.grpo import (
    GRPOConfig,
    advantages_of,
    build_batch,
    logprob_gap,
    sampling_requests,
    split_batch,
)
from algorithms.rl_inputs import PromptLoader, resolve_init
from core.errors import InputError
from rollout.environments import Score
from rollout.types import GenerationResult, Sample

ROOT = Path(__file__).resolve().parents[1]


def result(prompt: list[int], responses: list[list[int]]) -> GenerationResult:
    samples = [Sample(r, [-0.5 - i for i in range(len(r))], "stop") for r in responses]
    return GenerationResult("0", prompt, samples, weight_version=1)


def test_build_batch_pads_right_and_masks_the_responses():
    results = [result([1, 5, 6], [[7, 2], [8]]), result([1, 9], [[10, 11, 2]])]
    scores = [Score(1.0, True, True), Score(0.0, False, True), Score(0.5, False, False)]
    batch = build_batch(results, scores, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 5, 6, 8, 0], [1, 9, 10, 11, 2]]
    assert batch["response_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0], [0, 0, 1, 1, 1]]
    # token-aligned: the sampler's logprob of token t sits at column t
    assert batch["sampler_logprobs"][0].tolist() == [0, 0, 0, -0.5, -1.5]
    assert batch["sampler_logprobs"][2].tolist() == [0, 0, -0.5, -1.5, -2.5]
    assert batch["group_index"].tolist() == [0, 0, 1]
    assert batch["rewards"].tolist() == [1.0, 0.0, 0.5]
    assert batch["correct"].tolist() == [1.0, 0.0, 0.0]


def test_grpo_advantages_are_group_relative_and_on_the_response_only():
    cfg = GRPOConfig(
        model={"init_from": "x"}, rollout={"n": 2, "prompts_per_step": 2}, train={"global_batch_size": 4}
    )
    results = [result([1, 5], [[7, 2], [8, 2]]), result([1, 9], [[10, 2], [11, 2]])]
    scores = [Score(r, r > 0, True) for r in (1.0, 0.0, 1.0, 1.0)]
    batch = build_batch(results, scores)
    adv = advantages_of(batch, cfg.algorithm)
    assert adv.shape == batch["input_ids"].shape
    assert torch.all(adv[batch["response_mask"] == 0] == 0)
    first, second = adv[0, 2].item(), adv[1, 2].item()
    assert first > 0 > second and first == pytest.approx(-second, rel=1e-5)
    assert torch.all(adv[2:] == 0)  # same reward in a group: no signal
    dr_grpo = advantages_of(batch, cfg.algorithm.model_copy(update={"norm_by_std": False}))
    assert dr_grpo[0, 2].item() == pytest.approx(0.5)


def test_logprob_gap_on_response_tokens_only():
    mask = torch.tensor([[0.0, 1, 1], [0, 0, 1]])
    trainer = torch.tensor([[5.0, -1.0, -2.0], [9.0, 9.0, -3.5]])
    sampler = torch.tensor([[0.0, -1.0, -2.5], [0.0, 0.0, -3.0]])
    gap = logprob_gap(trainer, sampler, mask)
    assert gap["rollout/logprob_gap_max"] == pytest.approx(0.5)
    assert gap["rollout/logprob_gap_mean"] == pytest.approx(1 / 3)


def test_sampling_requests_seed_every_sample_distinctly():
    cfg = GRPOConfig(model={"init_from": "x"}).rollout.model_copy(update={"n": 4, "temperature": 0.7})
    reqs = sampling_requests([[1, 2], [1, 3]], cfg, seed=100)
    assert [r.params.seed for r in reqs] == [100, 104] and all(r.params.n == 4 for r in reqs)
    greedy = sampling_requests([[1, 2]], cfg, seed=0, greedy=True)[0].params
    assert greedy.n == 1 and greedy.temperature == 0


def test_split_batch_in_order():
    batch = {"input_ids": torch.arange(8).view(4, 2), "group_index": torch.arange(4)}
    parts = split_batch(batch, 2)
    assert [p["group_index"].tolist() for p in parts] == [[0, 1], [2, 3]]


def test_prompt_loader_resumes_exactly_and_reshuffles_per_epoch():
    rows = [{"prompt": str(i)} for i in range(5)]
    loader = PromptLoader(rows, 3, seed=1)
    first = [loader.next_batch() for _ in range(2)]
    epoch0 = [i for i, _ in first[0]] + [i for i, _ in first[1]][:2]
    assert sorted(epoch0) == list(range(5))
    state = loader.state_dict()
    ahead = [loader.next_batch() for _ in range(3)]
    again = PromptLoader(rows, 3, seed=1)
    again.load_state_dict(state)
    assert [again.next_batch() for _ in range(3)] == ahead


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of train.global_batch_size"):
        GRPOConfig(
            model={"init_from": "x"}, rollout={"n": 3, "prompts_per_step": 3}, train={"global_batch_size": 4}
        )
    with pytest.raises(ValueError, match="rollout.n >= 2"):
        GRPOConfig(
            model={"init_from": "x"}, rollout={"n": 1, "prompts_per_step": 4}, train={"global_batch_size": 4}
        )
    with pytest.raises(InputError, match="not found.*rl pretrain"):
        resolve_init("/nonexistent/run")
