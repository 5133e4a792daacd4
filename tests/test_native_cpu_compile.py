"""The native engine's compiled CPU decode step (NativeEngine(compile_cpu=True)) against its eager one and HF.

The compiled step fuses norms, RoPE, the K/V write and gather and a written-out softmax attention into
Inductor C++ loops: the same fp32 math in another accumulation order, ~1e-6 relative on the logits, far
below the tiny models' top-1/top-2 gaps (init std 0.3), so greedy tokens are asserted equal and logprobs
compared at 1e-5 (as tests/test_native_engine.py and test_paged_kv.py do for eager vs HF).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_helpers import one_thread, tokens_of  # noqa: F401 (one_thread: autouse)
from hf_tiny_gen import build_tiny_llama

from core.models import preset
from core.transformer.model import GPTModel
from rollout.engines.native import NativeEngine
from rollout.types import GenerationRequest, GenerationResult, SamplingParams

pytestmark = pytest.mark.slow  # compiles

TOL = dict(atol=1e-5, rtol=1e-5)
PROMPTS = [[1, 10, 11, 12], [1, 40, 41], list(range(3, 24)), [1, 7], list(range(50, 63))]


def logprobs_of(results: list[GenerationResult]) -> torch.Tensor:
    return torch.tensor([lp for r in results for s in r.samples for lp in s.logprobs])


def test_compiled_cpu_decode_matches_hf_greedy(tmp_path) -> None:
    """HF checkpoint, 2 rows for 5 prompts (slot reuse, batches of 2 and 1): HF's greedy tokens and
    teacher-forced logprobs, through the compiled step."""
    from transformers import AutoModelForCausalLM

    checkpoint = build_tiny_llama(tmp_path / "llama", seed=0)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    requests = [
        GenerationRequest(p, SamplingParams(temperature=0.0, max_tokens=8 + 3 * i))
        for i, p in enumerate(PROMPTS)
    ]
    with NativeEngine(model_dir=checkpoint, max_model_len=64, max_num_seqs=2, compile_cpu=True) as engine:
        assert engine._runner.compile_cpu
        results = engine.generate(requests)
    for req, result in zip(requests, results, strict=True):
        prompt, got = req.prompt_token_ids, result.samples[0]
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=req.params.max_tokens)
            assert got.token_ids == want[0, len(prompt) :].tolist()
            logits = hf(torch.tensor([prompt + got.token_ids])).logits[0, len(prompt) - 1 : -1]
        ref = logits.log_softmax(-1).gather(-1, torch.tensor(got.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(got.logprobs), ref, **TOL)


def test_compiled_cpu_decode_keeps_paged_kv_semantics() -> None:
    """qk-norm and a sliding window of 8 (qwen3_tiny with a window), on a pool that preempts (block 4),
    with the n = 3 seeded samples of one prompt sharing its blocks: the compiled engine gives the eager
    roomy engine's tokens (greedy and sampled) and logprobs."""
    torch.manual_seed(0)
    model = GPTModel(dataclasses.replace(preset("qwen3_tiny"), init_std=0.3, sliding_window=8)).eval()
    requests = [
        GenerationRequest(p, SamplingParams(temperature=0.0, max_tokens=20 + 2 * i, ignore_eos=True))
        for i, p in enumerate(PROMPTS)
    ]
    sampled = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_tokens=24, seed=4, ignore_eos=True)
    requests.append(GenerationRequest(PROMPTS[1], sampled))
    want = NativeEngine(model, max_model_len=64, max_num_seqs=4, block_size=4).generate(requests)
    tight = NativeEngine(
        model, max_model_len=64, max_num_seqs=4, block_size=4, kv_cache_tokens=64, compile_cpu=True
    )
    got = tight.generate(requests)
    assert tight.num_preemptions > 0
    assert tokens_of(got) == tokens_of(want)
    torch.testing.assert_close(logprobs_of(got), logprobs_of(want), **TOL)
