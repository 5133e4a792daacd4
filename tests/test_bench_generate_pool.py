"""`rl bench generate`'s default native KV pool: every sample's full length in whole blocks, so the bench
shape never preempts (a pool of batch * max_model_len tokens is short when max_model_len is not a
multiple of the block size, and preemption would recompute prefixes inside the timed run)."""

from __future__ import annotations

import dataclasses

import torch

from core.models import preset
from core.transformer.model import GPTModel
from rl.bench.generate import GenShape, native_kv_cache_tokens, random_prompts
from rollout.engines.native import NativeEngine
from rollout.types import GenerationRequest, SamplingParams


def test_default_native_pool_holds_every_sample_at_full_length() -> None:
    config = dataclasses.replace(preset("llama_tiny"), init_std=0.3)
    shape = GenShape(6, 8, 12, torch.device("cpu"), torch.float32, n=2)  # max_model_len 20: 2 blocks of 16
    tokens = native_kv_cache_tokens(config, shape, None, block_size=16)
    assert tokens == shape.num_samples * 32
    torch.manual_seed(0)
    engine = NativeEngine(
        GPTModel(config).eval(),
        max_model_len=shape.max_model_len,
        max_num_seqs=shape.num_samples,
        kv_cache_tokens=tokens,
        block_size=16,
    )
    params = SamplingParams(n=shape.n, temperature=1.0, max_tokens=shape.new_tokens, ignore_eos=True, seed=0)
    prompts = random_prompts(shape.batch, shape.prompt_len, config.vocab_size)
    results = engine.generate([GenerationRequest(p, params) for p in prompts])
    assert sum(len(s.token_ids) for r in results for s in r.samples) == shape.num_samples * shape.new_tokens
    assert engine.num_preemptions == 0
