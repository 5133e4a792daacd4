"""Paged KV cache of the native engine (fp32, CPU): block bookkeeping, preemption, prefix sharing, sampling,
chunked prefill and memory that follows the tokens held.

Engine-against-engine comparisons (preempted vs not, shared vs unshared, chunked vs one-shot) assert equal
greedy tokens: the runs differ only in which kernel shapes compute the same logits (a recomputed prefix is
prefilled instead of decoded one token at a time), ~1e-6 relative in fp32, far below the tiny model's
top-1/top-2 gaps at init std 0.3 (see test_native_engine.py). Logprobs are compared at 1e-5.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_helpers import one_thread, tokens_of  # noqa: F401 (one_thread: autouse)

from core.models import preset
from core.transformer.model import GPTModel
from rollout.engines.native import NativeEngine
from rollout.engines.native.blocks import NULL_BLOCK, BlockAllocator, BlockTable, OutOfBlocks
from rollout.engines.native.kv_cache import KVCache
from rollout.engines.native.runner import ModelRunner
from rollout.types import GenerationRequest, GenerationResult, SamplingParams

TOL = dict(atol=1e-5, rtol=1e-5)
PROMPTS = [[1, 10, 11, 12], [1, 40, 41], list(range(3, 24)), [1, 7], list(range(50, 63))]


def tiny_model(name: str = "llama_tiny") -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(dataclasses.replace(preset(name), init_std=0.3)).eval()


@pytest.fixture(scope="module")
def model() -> GPTModel:
    return tiny_model()


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def logprobs_of(results: list[GenerationResult]) -> list[float]:
    return [lp for r in results for s in r.samples for lp in s.logprobs]


# ---- block allocator and table ---------------------------------------------------------------


def test_allocator_hands_out_refcounted_blocks_never_the_null_block() -> None:
    alloc = BlockAllocator(4)  # blocks 1, 2, 3
    assert [alloc.allocate() for _ in range(3)] == [1, 2, 3] and alloc.num_free == 0
    with pytest.raises(OutOfBlocks):
        alloc.allocate()
    alloc.share(2)
    alloc.free(2)
    assert alloc.num_free == 0 and alloc.refcount[2] == 1  # still held once
    alloc.free(2)
    assert alloc.num_free == 1 and alloc.allocate() == 2
    assert alloc.peak_used == 3
    with pytest.raises(RuntimeError, match="not allocated"):
        alloc.free(NULL_BLOCK)
    alloc.free(1)
    with pytest.raises(RuntimeError, match="not allocated"):
        alloc.free(1)


def test_block_table_shares_appends_and_copies_on_write() -> None:
    table = BlockTable(num_blocks=10, block_size=4, num_rows=3, max_blocks_per_row=4)
    table.allocate(0, 6)  # positions 0..5: one full block, one holding 2 of 4
    assert table.rows[0] == [1, 2] and table.take_dirty() == [(0, [1, 2])]
    table.share(0, 1)
    table.share(0, 2)
    assert table.rows[1] == table.rows[2] == [1, 2]
    assert table.allocator.refcount[1] == table.allocator.refcount[2] == 3
    # Each sample writes position 6 (in the shared, partly filled block 2): the first two get copies,
    # the last holder writes in place.
    assert table.prepare_write(1, 6) == (2, 3)
    assert table.prepare_write(2, 6) == (2, 4)
    assert table.prepare_write(0, 6) is None
    assert [r[1] for r in table.rows] == [2, 3, 4] and table.allocator.refcount[2] == 1
    assert table.allocator.refcount[1] == 3  # the full block stays shared
    assert table.prepare_write(0, 7) is None and table.rows[0] == [1, 2]  # own block, in place
    assert table.prepare_write(0, 8) is None and table.rows[0] == [1, 2, 5]  # a new block at the boundary
    table.free(0)
    assert table.allocator.refcount[1] == 2 and table.allocator.num_free == 9 - 3  # 1, 3 and 4 still held
    table.free(1)
    table.free(2)
    assert table.allocator.num_free == 9 and table.allocator.peak_used == 5


def test_block_table_out_of_blocks_changes_nothing() -> None:
    table = BlockTable(num_blocks=4, block_size=4, num_rows=2, max_blocks_per_row=3)
    table.allocate(0, 8)
    with pytest.raises(OutOfBlocks):
        table.allocate(1, 8)
    assert table.rows[1] == [] and table.allocator.num_free == 1
    table.share(0, 1)
    assert table.prepare_write(1, 7) == (2, 3)  # the last free block
    with pytest.raises(OutOfBlocks):
        table.prepare_write(0, 8)
    assert table.rows[0] == [1, 2] and table.allocator.refcount == [0, 2, 1, 1]


def test_kv_cache_reads_back_what_it_wrote_through_the_table() -> None:
    """Tokens written by position (decode index) and by chunk (prefill index) into scattered blocks read
    back, gathered through the table, as a dense (rows, n_kv, L, d) tensor; block copies copy; a row at
    position -1 writes only the null block."""
    torch.manual_seed(0)
    cache = KVCache(["0"], 12, 4, 2, 4, 2, 3, torch.float32, torch.device("cpu"))
    table = BlockTable(12, 4, 2, 4)
    table.allocate(1, 3)  # row 1 takes block 1 first, so row 0's blocks are not 1, 2, ...
    table.allocate(0, 11)
    cache.sync_table(table.take_dirty())
    assert cache.block_table[0, :3].tolist() == table.rows[0] and cache.block_table[0, 3] == NULL_BLOCK
    dense = torch.randn(2, 2, 11, 3)  # (rows, n_kv, L, d)
    rows = torch.tensor([0, 1])
    cache.write("0", cache.chunk_index(rows, 0, 7), dense[:, :, :7], dense[:, :, :7])
    for position in range(7, 11):  # row 1 sits these steps out (position -1): nothing of it changes
        index = cache.token_index(torch.tensor([position, -1]))
        cache.write("0", index, dense[:, :, position : position + 1], dense[:, :, position : position + 1])
    k, v = cache.gather("0", rows, 11)
    torch.testing.assert_close(k[0], dense[0], rtol=0, atol=0)
    torch.testing.assert_close(v[1, :, :3], dense[1, :, :3], rtol=0, atol=0)
    copies = [(table.rows[0][0], table.rows[1][0])]
    cache.copy_blocks(copies)
    torch.testing.assert_close(cache.gather("0", rows, 4)[0][1], dense[0, :, :4], rtol=0, atol=0)


# ---- the engine under a small block budget ---------------------------------------------------


def test_preemption_under_a_small_block_budget_gives_the_same_tokens(model) -> None:
    """A pool of one sequence's worth of blocks for 4 running rows: growing samples preempt the newest,
    which is prefilled again (prompt + its tokens) later. Greedy tokens and seeded samples are those of an
    engine that never preempts; logprobs agree to fp32 rounding."""
    requests = [GenerationRequest(p, greedy(24 + 2 * i)) for i, p in enumerate(PROMPTS)]
    requests.append(
        GenerationRequest(
            PROMPTS[1], SamplingParams(n=3, temperature=1.0, max_tokens=30, seed=4, ignore_eos=True)
        )
    )
    roomy = NativeEngine(model, max_model_len=64, max_num_seqs=4, block_size=4)
    want = roomy.generate(requests)
    assert roomy.num_preemptions == 0
    tight = NativeEngine(model, max_model_len=64, max_num_seqs=4, block_size=4, kv_cache_tokens=64)
    got = tight.generate(requests)
    assert tight.num_preemptions > 0
    assert tokens_of(got) == tokens_of(want)
    torch.testing.assert_close(torch.tensor(logprobs_of(got)), torch.tensor(logprobs_of(want)), **TOL)
    assert tight.kv_cache_peak_bytes <= tight.kv_cache_bytes < roomy.kv_cache_bytes


# ---- prefix sharing --------------------------------------------------------------------------


@pytest.mark.parametrize(("max_prefill_tokens", "chunks"), [(8192, [21]), (8, [8, 8, 5])])
def test_samples_of_a_prompt_share_its_full_blocks(model, monkeypatch, max_prefill_tokens, chunks) -> None:
    """n = 4 samples of a 21-token prompt (block 8: two full blocks and one holding 5 tokens): one prefill
    (in chunks when longer than max_prefill_tokens), all four rows list the same three blocks (refcount
    4); at the first decode each sample but the last copies the partly filled block, the full blocks stay
    shared. Tokens equal the unshared run's."""
    prompt, n = PROMPTS[2], 4
    engine = NativeEngine(
        model, max_model_len=64, max_num_seqs=n, block_size=8, max_prefill_tokens=max_prefill_tokens
    )
    snapshots = []
    reserve = engine._reserve_blocks

    def spy(*args):
        rows = [list(r) for r in engine._blocks.rows[:n]]
        snapshots.append((rows, list(engine._blocks.allocator.refcount)))
        reserve(*args)
        rows_after = [list(r) for r in engine._blocks.rows[:n]]
        device = [engine._cache.block_table[i, : len(r)].tolist() for i, r in enumerate(rows_after)]
        snapshots.append((rows_after, list(engine._blocks.allocator.refcount), device))

    prefills = []
    prefill = engine._runner.prefill
    monkeypatch.setattr(engine, "_reserve_blocks", spy)
    monkeypatch.setattr(
        engine._runner, "prefill", lambda ids, *a: prefills.append(ids.shape) or prefill(ids, *a)
    )
    (shared,) = engine.generate([GenerationRequest(prompt, greedy(6, n=n))])
    assert prefills == [(1, c) for c in chunks]  # one prefill for the group
    (before, refcount), (after, refcount_after, device) = snapshots[0], snapshots[1][:3]
    full_1, full_2, partial = before[0]
    assert all(r == [full_1, full_2, partial] for r in before)
    assert refcount[full_1] == refcount[full_2] == refcount[partial] == n
    assert all(r[:2] == [full_1, full_2] for r in after) and refcount_after[full_1] == n
    lasts = [r[2] for r in after]
    assert len(set(lasts)) == n and lasts.count(partial) == 1 and refcount_after[partial] == 1
    assert device == after  # the device table mirrors the host rows
    single = NativeEngine(model, max_model_len=64, max_num_seqs=1, block_size=8)
    (alone,) = single.generate([GenerationRequest(prompt, greedy(6))])
    assert [s.token_ids for s in shared.samples] == [alone.samples[0].token_ids] * n
    torch.testing.assert_close(
        torch.tensor([s.logprobs for s in shared.samples]),
        torch.tensor([alone.samples[0].logprobs] * n),
        **TOL,
    )


def test_peak_kv_bytes_follow_the_tokens_held(model) -> None:
    """8 rows of max_model_len 512 reserve 8 * 512 positions by default; 8 prompts of 5 tokens + 6 new
    tokens hold one 16-token block each. 8 samples of one 40-token prompt hold its 2 full blocks once and
    the partly filled third block 8 times (copy-on-write): 10 blocks, not 24."""
    engine = NativeEngine(model, max_model_len=512, max_num_seqs=8, block_size=16)
    block = engine.kv_cache_bytes // (8 * 512 // 16 + 1)
    engine.generate([GenerationRequest([1, 2, 3, 4, i], greedy(6)) for i in range(8)])
    assert engine.kv_cache_peak_bytes == 8 * block
    assert engine.kv_cache_peak_bytes * 32 < engine.kv_cache_bytes  # 8 of 8 * 32 blocks
    engine.generate([GenerationRequest(list(range(1, 41)), greedy(6, n=8))])
    assert engine.kv_cache_peak_bytes == 10 * block


# ---- sampling --------------------------------------------------------------------------------


def test_sampled_generation_is_seeded_and_top_p_restricts_the_support(model) -> None:
    """Seeded samples replay across engines of other block sizes and budgets and differ across seeds.
    First tokens of 256 samples of one prompt at temperature 1 follow softmax of the prompt's last logits
    (each frequency within 5 standard errors); with top-p 0.5 every drawn token lies in the nucleus of
    its own position's logits (recomputed by a full forward)."""
    prompt = PROMPTS[0]
    params = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_tokens=12, seed=9, ignore_eos=True)
    a = NativeEngine(model, max_model_len=64, max_num_seqs=4).generate([GenerationRequest(prompt, params)])
    b = NativeEngine(model, max_model_len=64, max_num_seqs=4, block_size=4, kv_cache_tokens=64).generate(
        [GenerationRequest(prompt, params)]
    )
    assert tokens_of(a) == tokens_of(b) and len({tuple(t) for t in tokens_of(a)[0]}) == 4
    other = NativeEngine(model, max_model_len=64, max_num_seqs=4).generate(
        [GenerationRequest(prompt, dataclasses.replace(params, seed=10))]
    )
    assert tokens_of(other) != tokens_of(a)

    engine = NativeEngine(model, max_model_len=64, max_num_seqs=64)
    n = 256
    (wide,) = engine.generate(
        [GenerationRequest(prompt, SamplingParams(n=n, temperature=1.0, max_tokens=1, seed=0))]
    )
    with torch.no_grad():
        probs = model(torch.tensor([prompt]))[0, -1].softmax(-1)  # (V,)
    freq = torch.bincount(torch.tensor([s.token_ids[0] for s in wide.samples]), minlength=probs.numel()) / n
    stderr = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * stderr + 1e-3).all()

    (nucleus,) = engine.generate(
        [GenerationRequest(prompt, SamplingParams(n=16, temperature=1.0, top_p=0.5, max_tokens=10, seed=1))]
    )
    for s in nucleus.samples:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + s.token_ids]))[0, len(prompt) - 1 : -1]  # (T, V)
        sorted_probs, order = logits.softmax(-1).sort(-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        for t, token in enumerate(s.token_ids):
            allowed = order[t][mass_before[t] < 0.5].tolist()
            assert token in allowed


# ---- chunked prefill -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama_tiny", "mistral_tiny"])
def test_chunked_prefill_equals_one_shot(name: str) -> None:
    """A 45-token prompt prefilled in chunks of 16 (each chunk reading the cached ones through the block
    table; mistral: sliding window 8 across chunk boundaries) gives the one-shot prefill's last logits
    and K/V (fp32, summation order: 1e-5)."""
    model = tiny_model(name)
    attention = next(iter(model.layers.values())).self_attention
    cache = KVCache(
        model.layers.keys(),
        16,
        8,
        2,
        8,
        attention.n_kv_local,
        attention.head_dim,
        torch.float32,
        torch.device("cpu"),
    )
    table = BlockTable(16, 8, 2, 8)
    table.allocate(0, 45)
    table.allocate(1, 45)
    cache.sync_table(table.take_dirty())
    runner = ModelRunner(model, cache)
    prompt = torch.randint(0, 128, (1, 45), generator=torch.Generator().manual_seed(1))
    one_shot = runner.prefill(prompt, torch.tensor([44]), torch.tensor([0]))
    for start in range(0, 45, 16):
        piece = prompt[:, start : start + 16]
        chunked = runner.prefill(piece, torch.tensor([piece.shape[1] - 1]), torch.tensor([1]), start)
    torch.testing.assert_close(chunked, one_shot, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(one_shot[0], model(prompt)[0, -1], **TOL)
    for key in model.layers:
        k, v = cache.gather(key, torch.tensor([0, 1]), 45)
        torch.testing.assert_close(k[1], k[0], **TOL)
        torch.testing.assert_close(v[1], v[0], **TOL)


def test_engine_prefills_a_long_prompt_in_chunks(model) -> None:
    """max_prefill_tokens 8: the 21-token prompt (and a preempted sample's prompt + tokens) is prefilled in
    chunks; greedy tokens equal the one-shot engine's."""
    requests = [GenerationRequest(p, greedy(16)) for p in PROMPTS]
    want = NativeEngine(model, max_model_len=64, max_num_seqs=3).generate(requests)
    chunked = NativeEngine(model, max_model_len=64, max_num_seqs=3, max_prefill_tokens=8, block_size=4)
    assert tokens_of(chunked.generate(requests)) == tokens_of(want)
    tight = NativeEngine(
        model, max_model_len=64, max_num_seqs=3, max_prefill_tokens=8, block_size=4, kv_cache_tokens=64
    )
    assert tokens_of(tight.generate(requests)) == tokens_of(want) and tight.num_preemptions > 0


def test_bad_pool_sizes_raise_input_error(model) -> None:
    from core.errors import InputError

    with pytest.raises(InputError, match="power of two"):
        NativeEngine(model, max_model_len=32, block_size=12)
    with pytest.raises(InputError, match="at least one whole sequence"):
        NativeEngine(model, max_model_len=32, kv_cache_tokens=31)
