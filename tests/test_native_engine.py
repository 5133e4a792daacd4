"""NativeEngine (our GPTModel + KV cache) against HF transformers and our own full forward (fp32, CPU).

Tolerances: the engine's logits come from other kernel shapes than a teacher-forced forward (one-row
decode GEMVs and single-query SDPA vs a full causal pass), so they differ by fp32 accumulation order:
~1e-6 relative on logits of magnitude ~7 here. Logprobs are compared at atol = rtol = 1e-5, two orders
below any temperature or filter effect, and far below the models' greedy top-1/top-2 gaps (init std
0.2-0.3 makes logits peaked), so token-for-token greedy equality is a stable assertion.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from engine_helpers import one_thread, tokens_of  # noqa: F401 (one_thread: autouse)
from hf_tiny_gen import EOS_ID, build_tiny_llama

from core.bridge import export_hf_weights, load_hf
from core.errors import InputError
from core.models import preset
from core.transformer.model import GPTModel
from rollout.engines.base import WeightUpdateRejected
from rollout.engines.native import NativeEngine
from rollout.engines.native.sampler import SamplingRows, sample, split_key
from rollout.refit import refit_engine
from rollout.types import GenerationRequest, GenerationResult, SamplingParams

PROMPTS = [[1, 10, 11, 12], [1, 40, 41], [1, 5, 6, 7, 8, 9, 20, 33, 21, 22], [1, 7], [1, 30, 31, 32, 33]]
MAX_MODEL_LEN = 64
TOL = dict(atol=1e-5, rtol=1e-5)


# ---- fixtures and references -----------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny_llama")
    return build_tiny_llama(root / "a", seed=0), build_tiny_llama(root / "b", seed=1)


@pytest.fixture(scope="module")
def hf_models(checkpoints: tuple[Path, Path]) -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    return tuple(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in checkpoints)


@pytest.fixture(scope="module")
def engine(checkpoints: tuple[Path, Path]) -> Iterator[NativeEngine]:
    """max_num_seqs=2 < len(PROMPTS): every batch refills freed slots from the queue."""
    with NativeEngine(model_dir=checkpoints[0], max_model_len=MAX_MODEL_LEN, max_num_seqs=2, seed=0) as eng:
        yield eng


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF generate(do_sample=False) response ids; stops at EOS as the engine does."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt) :].tolist()


def hf_logprobs(model: torch.nn.Module, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Teacher-forced log_softmax of the HF logits (temperature 1) at the response tokens."""
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt + response])).logits[0, :-1].log_softmax(-1)  # (T-1, V)
    return logprobs[len(prompt) - 1 :].gather(-1, torch.tensor(response)[:, None])[:, 0]


def full_forward_greedy(
    model: GPTModel, prompt: list[int], max_tokens: int
) -> tuple[list[int], torch.Tensor]:
    """Greedy by re-running the whole sequence every token (no cache): tokens and their logprobs."""
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            last = model(torch.tensor([ids]))[0, -1].float().log_softmax(-1)  # (V,)
            ids.append(int(last.argmax()))
            logprobs.append(last[ids[-1]])
    return ids[len(prompt) :], torch.stack(logprobs)


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


# ---- generation against HF -------------------------------------------------------------------


def test_greedy_matches_hf_token_for_token_with_slot_reuse(engine, hf_models) -> None:
    requests = [GenerationRequest(p, greedy(8 + 3 * i), request_id=f"p{i}") for i, p in enumerate(PROMPTS)]
    results = engine.generate(requests)
    assert [r.request_id for r in results] == [f"p{i}" for i in range(len(PROMPTS))]
    for req, result in zip(requests, results):
        (sample_,) = result.samples
        expected = hf_greedy(hf_models[0], req.prompt_token_ids, req.params.max_tokens)
        assert sample_.token_ids == expected
        assert sample_.finish_reason == ("stop" if expected[-1] == EOS_ID else "length")
        ref = hf_logprobs(hf_models[0], req.prompt_token_ids, sample_.token_ids)
        torch.testing.assert_close(torch.tensor(sample_.logprobs), ref, **TOL)
        assert result.prompt_token_ids == req.prompt_token_ids and result.weight_version == 0
    assert any(r.samples[0].finish_reason == "stop" for r in results)  # EOS is exercised


def test_sampled_logprobs_are_raw_model_logprobs(engine, hf_models) -> None:
    """Drawn at temperature 1.7 with top-k 5 and top-p 0.9, the logprobs are still log_softmax of the
    raw logits (the trainer's quantity), and every token is inside the filter."""
    params = SamplingParams(temperature=1.7, top_k=5, top_p=0.9, max_tokens=20, seed=7, ignore_eos=True)
    (result,) = engine.generate([GenerationRequest(PROMPTS[0], params)])
    tokens = result.samples[0].token_ids
    ref = hf_logprobs(hf_models[0], PROMPTS[0], tokens)
    torch.testing.assert_close(torch.tensor(result.samples[0].logprobs), ref, **TOL)
    with torch.no_grad():
        logits = hf_models[0](torch.tensor([PROMPTS[0] + tokens])).logits[0, len(PROMPTS[0]) - 1 : -1]
    top5 = logits.topk(5, -1).indices
    assert all(tok in top5[i].tolist() for i, tok in enumerate(tokens))


def test_seeded_sampling_is_reproducible_in_any_batch(engine) -> None:
    def draw(seed: int | None, n: int = 1, others: int = 0) -> list[list[int]]:
        params = SamplingParams(n=n, temperature=1.5, max_tokens=12, seed=seed, ignore_eos=True)
        filler = [
            GenerationRequest(p, SamplingParams(temperature=1.0, max_tokens=5)) for p in PROMPTS[:others]
        ]
        results = engine.generate([*filler, GenerationRequest(PROMPTS[1], params)])
        return [s.token_ids for s in results[-1].samples]

    alone = draw(11)
    assert draw(11) == alone
    assert draw(11, others=3) == alone  # other requests (slots, batch sizes) change nothing
    assert draw(12) != alone
    many = draw(11, n=4)
    assert many[0] == alone[0] and len({tuple(t) for t in many}) == 4
    assert draw(None) != draw(None)


def test_n_samples_share_one_prefill(checkpoints) -> None:
    """The n samples of a prompt admitted together prefill once and copy its K/V into their slots (a
    fresh engine: a missing copy would read zeros). Sample i of seed s is sample 0 of seed s + i."""
    params = SamplingParams(n=3, temperature=1.5, max_tokens=10, seed=20, ignore_eos=True)
    with NativeEngine(model_dir=checkpoints[0], max_model_len=MAX_MODEL_LEN, max_num_seqs=3) as eng:
        (shared,) = eng.generate([GenerationRequest(PROMPTS[4], params)])
        single = [dataclasses.replace(params, n=1, seed=20 + i) for i in range(3)]
        separate = eng.generate([GenerationRequest(PROMPTS[4], p) for p in single])
    assert [s.token_ids for s in shared.samples] == [r.samples[0].token_ids for r in separate]
    torch.testing.assert_close(
        torch.tensor([s.logprobs for s in shared.samples]),
        torch.tensor([r.samples[0].logprobs for r in separate]),
        **TOL,
    )


def test_unseeded_sampling_replays_on_a_fresh_engine(checkpoints) -> None:
    def run() -> list[list[list[int]]]:
        with NativeEngine(model_dir=checkpoints[0], max_model_len=MAX_MODEL_LEN, seed=3) as eng:
            params = SamplingParams(n=2, temperature=1.0, max_tokens=6, ignore_eos=True)
            return tokens_of(eng.generate([GenerationRequest(p, params) for p in PROMPTS[:2]]))

    assert run() == run()


def test_stop_token_ids_and_stop_strings_end_with_stop(engine) -> None:
    (ref,) = engine.generate([GenerationRequest(PROMPTS[2], greedy(24, ignore_eos=True))])
    ref_tokens, ref_text = ref.samples[0].token_ids, ref.samples[0].text
    assert ref.samples[0].finish_reason == "length" and len(ref_tokens) == 24
    k = next(k for k in range(1, len(ref_tokens)) if ref_tokens[k] not in ref_tokens[:k])
    stop_word = ref_text.split()[k]
    by_id, by_string = engine.generate(
        [
            GenerationRequest(PROMPTS[2], greedy(24, ignore_eos=True, stop_token_ids=[ref_tokens[k]])),
            GenerationRequest(PROMPTS[2], greedy(24, ignore_eos=True, stop=["zz", stop_word])),
        ]
    )
    for result in (by_id, by_string):
        assert result.samples[0].finish_reason == "stop"
        assert result.samples[0].token_ids == ref_tokens[: k + 1]
        assert len(result.samples[0].logprobs) == k + 1
    assert by_string.samples[0].text.split() == ref_text.split()[:k]  # the stop string is cut from text
    (no_logprobs,) = engine.generate([GenerationRequest(PROMPTS[0], greedy(3, logprobs=False))])
    assert no_logprobs.samples[0].logprobs is None


def test_stream_yields_results_as_they_finish(engine) -> None:
    requests = [
        GenerationRequest(PROMPTS[0], greedy(30, ignore_eos=True), request_id="long"),
        GenerationRequest(PROMPTS[1], greedy(2, ignore_eos=True), request_id="short"),
    ]

    async def collect() -> list[GenerationResult]:
        return [result async for result in engine.generate_stream(requests)]

    streamed = asyncio.run(collect())
    assert [r.request_id for r in streamed] == ["short", "long"]
    assert [r.samples for r in streamed[::-1]] == [r.samples for r in engine.generate(requests)]


# ---- every architecture, against our own full forward ----------------------------------------


@pytest.mark.parametrize("name", ["qwen2_tiny", "qwen3_tiny", "mistral_tiny", "mixtral_tiny", "gpt2_tiny"])
def test_presets_match_full_forward_greedy(name: str) -> None:
    """Biases + tied head (qwen2), qk-norm (qwen3), sliding window 8 (mistral: the long prompt needs
    the window in prefill too), MoE (mixtral), learned positions + LayerNorm + GELU (gpt2)."""
    torch.manual_seed(0)
    model = GPTModel(dataclasses.replace(preset(name), init_std=0.3)).eval()
    engine = NativeEngine(model, max_model_len=32, max_num_seqs=2)
    requests = [GenerationRequest(p, greedy(12)) for p in PROMPTS[1:4]]
    for req, result in zip(requests, engine.generate(requests)):
        tokens, logprobs = full_forward_greedy(model, req.prompt_token_ids, 12)
        assert result.samples[0].token_ids == tokens
        torch.testing.assert_close(torch.tensor(result.samples[0].logprobs), logprobs, **TOL)


# ---- weights: refit and colocated ------------------------------------------------------------


def greedy_tokens(engine: NativeEngine, max_tokens: int = 10) -> list[list[int]]:
    results = engine.generate([GenerationRequest(p, greedy(max_tokens)) for p in PROMPTS[:3]])
    return [r.samples[0].token_ids for r in results]


def test_update_weights_switches_to_the_new_model_exactly(checkpoints, hf_models) -> None:
    hf_a = [hf_greedy(hf_models[0], p, 10) for p in PROMPTS[:3]]
    hf_b = [hf_greedy(hf_models[1], p, 10) for p in PROMPTS[:3]]
    assert hf_a != hf_b
    with NativeEngine(model_dir=checkpoints[0], max_model_len=MAX_MODEL_LEN, max_num_seqs=2) as eng:
        assert greedy_tokens(eng) == hf_a
        refit_engine(eng, hf_models[1].state_dict().items(), 1, bucket_bytes=64 << 10)
        assert eng.weight_version == 1 and greedy_tokens(eng) == hf_b
        (result,) = eng.generate([GenerationRequest(PROMPTS[0], greedy(2))])
        assert result.weight_version == 1
        # back to model a, exported by the bridge from a GPTModel (what a trainer sends)
        trainer_model = load_hf(checkpoints[0])
        eng.update_weights(export_hf_weights(trainer_model, trainer_model.config), 2)
        assert eng.weight_version == 2 and greedy_tokens(eng) == hf_a
        with pytest.raises(InputError, match="must increase"):
            eng.update_weights(hf_models[1].state_dict().items(), 2)


def test_bad_updates_are_rejected_or_block_generation(checkpoints, hf_models) -> None:
    good = list(hf_models[1].state_dict().items())
    with NativeEngine(model_dir=checkpoints[0], max_model_len=MAX_MODEL_LEN) as eng:
        before = greedy_tokens(eng)
        with pytest.raises(WeightUpdateRejected, match="unknown tensor 'model.bogus.weight'"):
            eng.update_weights([("model.bogus.weight", torch.zeros(3)), *good], 1)
        assert eng.weight_version == 0 and greedy_tokens(eng) == before  # untouched, still serving
        with pytest.raises(InputError, match="got no .*weights"):
            eng.update_weights([(n, t) for n, t in good if "layers.1.mlp" not in n], 1)
        with pytest.raises(RuntimeError, match="failed midway"):
            eng.generate([GenerationRequest(PROMPTS[0], greedy(2))])
        eng.update_weights(good, 2)
        assert eng.weight_version == 2 and len(greedy_tokens(eng)) == 3


def test_colocated_engine_generates_from_the_training_model_in_place(checkpoints, hf_models) -> None:
    policy = load_hf(checkpoints[0])
    qkv = policy.layers["0"].self_attention.linear_qkv.weight
    eng = NativeEngine(policy, max_model_len=MAX_MODEL_LEN, max_num_seqs=2, eos_token_ids=[EOS_ID])
    assert eng.model is policy
    assert greedy_tokens(eng) == [hf_greedy(hf_models[0], p, 10) for p in PROMPTS[:3]]
    with torch.no_grad():  # a "training step" that changes every weight in place
        for p, new in zip(policy.parameters(), load_hf(checkpoints[1]).parameters(), strict=True):
            p.copy_(new)
    eng.use_model(policy, version=5)
    assert eng.weight_version == 5 and policy.layers["0"].self_attention.linear_qkv.weight is qkv
    assert greedy_tokens(eng) == [hf_greedy(hf_models[1], p, 10) for p in PROMPTS[:3]]
    with pytest.raises(InputError, match="must increase"):
        eng.use_model(policy, version=5)
    eng.use_model(load_hf(checkpoints[0]), version=6)  # another model object: a new KV cache
    assert greedy_tokens(eng) == [hf_greedy(hf_models[0], p, 10) for p in PROMPTS[:3]]


def test_sleep_drops_the_kv_cache_and_blocks_generation_until_wake_up(engine) -> None:
    before = greedy_tokens(engine)
    engine.sleep()
    try:
        assert engine.kv_cache_bytes == 0
        with pytest.raises(RuntimeError, match="wake_up"):
            engine.generate([GenerationRequest(PROMPTS[0], greedy(2))])
    finally:
        engine.wake_up()
    assert engine.kv_cache_bytes > 0 and greedy_tokens(engine) == before
    assert engine.num_cuda_graphs == 0  # CPU


# ---- sampler on its own ----------------------------------------------------------------------


def test_sampler_draws_from_the_tempered_filtered_distribution() -> None:
    """20k rows with distinct keys: empirical frequencies match softmax(logits / T) restricted to the
    filter, within 4 standard errors (max 0.0035 * 4 at p = 0.5)."""
    n, logits = 20_000, torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0])
    keys = torch.tensor([split_key(k) for k in range(n)])

    def frequencies(temperature: float, top_k: int, top_p: float) -> torch.Tensor:
        rows = SamplingRows(
            torch.full((n,), temperature), torch.full((n,), top_k), torch.full((n,), top_p), keys
        )
        tokens, logprobs = sample(logits.expand(n, -1), rows, torch.zeros(n, dtype=torch.int64), True)
        torch.testing.assert_close(logprobs, logits.log_softmax(-1)[tokens])  # raw, whatever was sampled
        return torch.bincount(tokens, minlength=5) / n

    def expected(temperature: float, keep: int) -> torch.Tensor:
        p = (logits[:keep] / temperature).softmax(-1)
        return torch.cat([p, torch.zeros(5 - keep)])

    torch.testing.assert_close(frequencies(0.7, 5, 1.0), expected(0.7, 5), atol=0.014, rtol=0)
    torch.testing.assert_close(frequencies(1.3, 2, 1.0), expected(1.3, 2), atol=0.014, rtol=0)
    # top-p 0.75 at T=1: top-2 mass is 0.62 < 0.75, top-3 mass 0.85 -> keep 3
    torch.testing.assert_close(frequencies(1.0, 5, 0.75), expected(1.0, 3), atol=0.014, rtol=0)
    greedy_rows = frequencies(0.0, 5, 1.0)
    assert greedy_rows[0] == 1.0


# ---- bad input -------------------------------------------------------------------------------


def test_bad_requests_and_construction_raise_input_error(engine, checkpoints) -> None:
    with pytest.raises(InputError, match=r"prompt of 60 tokens \+ max_tokens 10 = 70 exceeds .* 64"):
        engine.generate([GenerationRequest([1] * 60, greedy(10))])
    with pytest.raises(InputError, match="token id 64 is outside the vocabulary of 64"):
        engine.generate([GenerationRequest([1, 64])])
    with pytest.raises(InputError, match="list of GenerationRequest"):
        engine.generate(GenerationRequest([1, 2]))
    model = load_hf(checkpoints[0])
    with pytest.raises(InputError, match="exactly one of model"):
        NativeEngine(model, model_dir=checkpoints[0], max_model_len=16)
    with pytest.raises(InputError, match="exactly one of model"):
        NativeEngine(max_model_len=16)
    with pytest.raises(InputError, match="does not cast"):
        NativeEngine(model, max_model_len=16, dtype=torch.bfloat16)
    with pytest.raises(InputError, match="max_num_seqs"):
        NativeEngine(model, max_model_len=16, max_num_seqs=0)
    with pytest.raises(InputError, match="max_model_len=512 exceeds the model's max_position_embeddings=256"):
        NativeEngine(model, max_model_len=512)
    no_tokenizer = NativeEngine(model, max_model_len=16)
    with pytest.raises(InputError, match="stop strings need a tokenizer"):
        no_tokenizer.generate([GenerationRequest([1, 2], greedy(2, stop=["aa"]))])


# ---- tensor parallelism ----------------------------------------------------------------------


def _tp_generate(rank: int, world_size: int, model_dir: str, cuda: bool) -> list[list[list[int]]]:
    device = None
    if cuda:
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    tp_group = torch.distributed.new_group(list(range(world_size)))
    with NativeEngine(
        model_dir=model_dir, max_model_len=MAX_MODEL_LEN, max_num_seqs=2, tp_group=tp_group, device=device
    ) as eng:
        return tokens_of(eng.generate(tp_requests()))


def tp_requests() -> list[GenerationRequest]:
    sampled = SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=5, ignore_eos=True)
    return [GenerationRequest(p, greedy(10)) for p in PROMPTS[:3]] + [GenerationRequest(PROMPTS[3], sampled)]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.gpu)])
def test_tensor_parallel_engine_matches_single_process(checkpoints, engine, tmp_path, backend) -> None:
    """tp=2 shards heads, ffn and vocab (the logits are all-gathered before sampling): both ranks
    return the tp=1 tokens, greedy and seeded samples alike. nccl: 2 GPUs, CUDA-graph decode with
    captured all-reduces."""
    import shutil

    from dist import run_distributed

    if backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    # Weights and config only: without tokenizer files the ranks never import transformers (seconds each).
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoints[0] / name, bare / name)
    cuda = backend == "nccl"
    ranks = run_distributed(_tp_generate, 2, str(bare), cuda, timeout=300, backend=backend)
    want = tokens_of(engine.generate(tp_requests()))
    assert ranks[0] == ranks[1] == want


# ---- CUDA ------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager_and_hf(checkpoints, hf_models) -> None:
    """fp32 on the GPU: graphs captured per (batch, kv length) bucket give the eager tokens, which are
    HF's greedy tokens; seeded samples are the same with and without graphs; bf16 runs."""
    requests = [GenerationRequest(p, greedy(8 + 3 * i)) for i, p in enumerate(PROMPTS)]
    sampled = [
        GenerationRequest(p, SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=3)) for p in PROMPTS
    ]
    out = {}
    for graphs in (True, False):
        with NativeEngine(
            model_dir=checkpoints[0],
            max_model_len=MAX_MODEL_LEN,
            max_num_seqs=3,
            device="cuda",
            cuda_graphs=graphs,
        ) as eng:
            out[graphs] = tokens_of(eng.generate(requests)), tokens_of(eng.generate(sampled))
            assert (eng.num_cuda_graphs > 0) == graphs
    assert out[True] == out[False]
    assert [r[0] for r in out[True][0]] == [
        hf_greedy(hf_models[0], r.prompt_token_ids, r.params.max_tokens) for r in requests
    ]
    with NativeEngine(
        model_dir=checkpoints[0], max_model_len=MAX_MODEL_LEN, device="cuda", dtype=torch.bfloat16
    ) as eng:
        assert all(len(r.samples[0].token_ids) > 0 for r in eng.generate(requests))


@pytest.mark.gpu
def test_compiled_cuda_draw_equals_the_eager_cpu_draw() -> None:
    """The Inductor-compiled draw on CUDA (with and without top-k/top-p thresholds) is the eager CPU
    function: same tokens for greedy, tempered and mixed rows at several batch sizes (dynamic shapes),
    logprobs within fp32 rounding."""
    torch.manual_seed(0)
    for rows_n in (1, 7, 64):
        logits = (torch.randn(rows_n, 32000) * 3).to(torch.bfloat16)
        temperature = torch.tensor([0.0 if i % 3 == 0 else 0.7 + 0.1 * (i % 5) for i in range(rows_n)])
        rows = SamplingRows(
            temperature=temperature,
            top_k=torch.tensor([32000 if i % 2 else 50 for i in range(rows_n)]),
            top_p=torch.tensor([0.95 if i % 4 < 2 else 1.0 for i in range(rows_n)]),
            keys=torch.tensor([split_key(1000 + i) for i in range(rows_n)], dtype=torch.int64).view(-1, 2),
        )
        steps = torch.arange(rows_n, dtype=torch.int64) * 5
        for any_random, apply_filters in ((False, False), (True, False), (True, True)):
            want = sample(logits, rows, steps, apply_filters=apply_filters, any_random=any_random)
            cuda_rows = SamplingRows(*(t.cuda() for t in rows._fields()))
            got = sample(logits.cuda(), cuda_rows, steps.cuda(), apply_filters, any_random)
            assert torch.equal(got[0].cpu(), want[0])
            torch.testing.assert_close(got[1].cpu(), want[1], rtol=0, atol=1e-5)
