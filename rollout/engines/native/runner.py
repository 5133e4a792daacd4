"""Prefill and decode over a KV cache, on a GPTModel's own modules (its weights, no copy).

The runner walks the model as TransformerLayer.forward does (x + attn(norm(x)), then x + mlp(norm(x)))
but splits attention at `SelfAttention.project_qkv` so that K/V go into the cache. Any tensor-parallel
layout works unchanged: the model's linears and embedding communicate over its tp_group themselves;
the runner returns vocab-local logits and `full_vocab_logits` all-gathers them (S rows, not S * T).

The cache is paged (kv_cache.py): K/V are written to and read from blocks through the block table.
Decode attention is one query per row against that row's cached keys, masked by the row's own length
(b, 1, 1, L): on CUDA the split-K kernel reads the blocks in place, elsewhere the keys are gathered
through the table for SDPA (one index_select per layer and tensor, its index computed once per step).
A prefill chunk after the first (chunked prefill of a long prompt) attends to the row's cached prefix the
same way. GQA without repeating K/V: the group_size query heads that share a kv head are laid out as that
head's "query positions", q (b, n_kv, group_size, d), one SDPA call.

CPU (compile_cpu): the whole decode step, gather and attention included, runs as one Inductor-compiled
graph (`_CPU_DECODE`).

CUDA graphs (`CudaGraphDecoder`): the decode forward is captured per (batch rows, kv length) bucket
and replayed with static input buffers (tokens, positions, and the block table, updated in place between
steps); sampling stays outside the graph.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from core.parallel.collectives import all_gather_along_dim
from core.transformer.attention import RopeCache, build_attention_mask
from core.transformer.model import GPTModel, TransformerLayer
from core.transformer.rope import rope_cos_sin, rope_inv_freq
from rollout.engines.native import decode_attention as flash_decode
from rollout.engines.native.kv_cache import KVCache


def decode_mask(positions: torch.Tensor, kv_len: int, sliding_window: int | None) -> torch.Tensor:
    """positions (b,) of each slot's new token -> (b, 1, 1, kv_len) bool, True = may attend: keys
    [0, position], or the last sliding_window of them."""
    keys = torch.arange(kv_len, device=positions.device)[None, :]  # (1, L)
    mask = keys <= positions[:, None]  # (b, L)
    if sliding_window is not None:
        mask = mask & (positions[:, None] - keys < sliding_window)
    return mask[:, None, None, :]


def chunk_mask(start: int, length: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """Queries at positions [start, start + length) over keys [0, start + length) -> (1, 1, length,
    start + length) bool, True = may attend: causal, and within the sliding window if any."""
    queries = torch.arange(start, start + length, device=device)[:, None]  # (T, 1)
    keys = torch.arange(start + length, device=device)[None, :]  # (1, start + T)
    mask = keys <= queries
    if sliding_window is not None:
        mask = mask & (queries - keys < sliding_window)
    return mask[None, None]


def single_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, group_size: int
) -> torch.Tensor:
    """q (b, n_heads, 1, d), k/v (b, n_kv, L, d), mask (b, 1, 1, L) -> (b, n_heads, 1, d).

    Query head h reads kv head h // group_size (the fused QKV layout), so the heads of one kv group
    are contiguous and become that group's group_size queries."""
    b, n_heads, _, d = q.shape
    q = q.reshape(b, n_heads // group_size, group_size, d)  # (b, n_kv, group_size, d)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (b, n_kv, group_size, d)
    return out.reshape(b, n_heads, 1, d)


def math_single_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, group_size: int
) -> torch.Tensor:
    """single_query_attention written out (two batched GEMMs around a masked softmax that Inductor fuses),
    for the compiled CPU step: there SDPA stays one opaque flash kernel whose per-call cost exceeds the math
    at decode sizes (~10% of a qwen3_tiny step). The same fp32 result up to accumulation order."""
    b, n_heads, _, d = q.shape
    q = q.reshape(b, n_heads // group_size, group_size, d)  # (b, n_kv, group_size, d)
    scores = (q @ k.transpose(-1, -2)) * d**-0.5  # (b, n_kv, group_size, L)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).reshape(b, n_heads, 1, d)


def prompt_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """Causal attention over right-padded prompts, as SelfAttention.forward computes it.

    q (B, n_heads, T, d), k/v (B, n_kv, T, d). Right padding needs no mask: a real token's causal
    past holds only real tokens. mask: build_attention_mask's (sliding window) or None."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    k, v = k.repeat_interleave(group_size, dim=1), v.repeat_interleave(group_size, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, n_heads, T, d) -> (B, T, n_heads * d)."""
    B, n_heads, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, n_heads * d)


def full_vocab_logits(logits_local: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """(S, V/tp) vocab shard of each rank -> (S, V) on every rank (one all-gather of S rows)."""
    return all_gather_along_dim(logits_local, -1, tp_group)


class ModelRunner:
    """Prefill and decode steps of a whole GPTModel (all layers, embedding and head) over a KVCache."""

    def __init__(self, model: GPTModel, cache: KVCache, compile_cpu: bool = False):
        """compile_cpu: on the CPU, run the whole decode step Inductor-compiled (see _CPU_DECODE)."""
        check_runnable(model)
        self.model, self.cache = model, cache
        config = model.config
        self.sliding_window = config.sliding_window
        self.inv_freq: torch.Tensor | None = None
        if config.position_embedding == "rope":
            inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
            self.inv_freq = inv_freq.to(cache.k[next(iter(cache.k))].device)  # on device: graph-safe
        device = cache.k[next(iter(cache.k))].device
        # Exact-length split-K kernel on CUDA (reads each row's own keys); masked SDPA elsewhere.
        self.use_flash_decode = flash_decode.available(device) and _is_power_of_two(config.head_dim)
        if self.use_flash_decode:
            # Small elementwise ops (norms, RoPE, SiLU, residuals, the split combine) dominate a decode step
            # once attention reads only what it needs; Inductor fuses them. Modules are graph inputs
            # (inlined nn modules), so one compiled graph serves every layer.
            self._pre = torch.compile(_before_attention_write)
            self._post = torch.compile(_after_split_attention)
        # MoE routing syncs with the host (graph breaks): MoE models decode eagerly.
        self.compile_cpu = compile_cpu and device.type == "cpu" and not config.is_moe
        # Prefill on CUDA: the same fusion over (B, T) of any prompt length (one dynamic-shape graph each);
        # eager RMSNorm/RoPE/SiLU over B * T tokens cost about as much as the prefill GEMMs.
        compile_prefill = flash_decode.available(device)
        self._prefill_pre = (
            torch.compile(_prefill_before, dynamic=True) if compile_prefill else _prefill_before
        )
        self._prefill_post = (
            torch.compile(_prefill_after, dynamic=True) if compile_prefill else _prefill_after
        )

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> RopeCache | None:
        if self.inv_freq is None:
            return None
        return rope_cos_sin(position_ids, self.inv_freq, dtype)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, H) -> vocab-local logits (N, V/tp)."""
        return self.model.output_layer(self.model.final_norm(x))

    @torch.no_grad()
    def prefill(
        self, input_ids: torch.Tensor, last_index: torch.Tensor, rows: torch.Tensor, start: int = 0
    ) -> torch.Tensor:
        """input_ids (B, T) right-padded tokens at positions [start, start + T) of the sequences in cache
        rows (B,) (their blocks allocated); last_index (B,) index in the chunk of each row's last token
        -> vocab-local logits there (B, V/tp). start > 0 (a later chunk of a long prompt) attends to the
        row's cached positions [0, start) too, read through the block table."""
        B, T = input_ids.shape
        positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x = self.model.embedding(input_ids, positions)  # (B, T, H)
        rope = self._rope(positions, x.dtype)
        if start == 0:
            mask = build_attention_mask(T, None, None, self.sliding_window, x.device)  # None unless a window
        else:
            mask = chunk_mask(start, T, self.sliding_window, x.device)
        index = self.cache.chunk_index(rows, start, T)  # (B * n_kv * T,) cache rows of the chunk's K/V
        for key, layer in self.model.layers.items():
            x = self._prefill_layer(key, layer, x, rope, mask, rows, index, start)
        x = x[torch.arange(B, device=x.device), last_index]  # (B, H)
        return self._head(x)

    def _prefill_layer(
        self,
        key: str,
        layer: TransformerLayer,
        x: torch.Tensor,
        rope: RopeCache | None,
        mask: torch.Tensor | None,
        rows: torch.Tensor,
        index: torch.Tensor,
        start: int,
    ) -> torch.Tensor:
        q, k, v = self._prefill_pre(layer, x, rope)  # (B, n_heads, T, d), (B, n_kv, T, d) x2
        self.cache.write(key, index, k, v)
        if start > 0:  # the cached prefix and this chunk, through the table
            k, v = self.cache.gather(key, rows, start + k.shape[2])  # (B, n_kv, start + T, d)
        out = prompt_attention(q, k, v, mask, layer.self_attention.group_size)  # (B, n_heads, T, d)
        return self._prefill_post(layer, x, out)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One token for each of the rows [0, b): tokens (b,) at positions (b,) -> vocab-local logits
        (b, V/tp). Keys [0, kv_len) are read through the block table; kv_len must exceed every position.
        Position -1: a row that sits the step out (its logits are junk, its K/V go to the null block, so
        a running sample's shared blocks are never touched). No host sync."""
        if self.compile_cpu:
            return _CPU_DECODE(self, tokens, positions, kv_len)
        return self._decode(tokens, positions, kv_len)

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        index = self.cache.token_index(positions)  # (b * n_kv,) the new token's cache rows
        positions = positions.clamp(min=0)
        pos = positions[:, None]  # (b, 1)
        x = self.model.embedding(tokens[:, None], pos)  # (b, 1, H)
        rope = self._rope(pos, x.dtype)
        if self.use_flash_decode:
            lengths = positions + 1  # (b,) keys of each row
            for key, layer in self.model.layers.items():
                x = self._decode_layer_fast(key, layer, x, rope, lengths, index, kv_len)
            return self._head(x[:, 0])
        mask = decode_mask(positions, kv_len, self.sliding_window)  # (b, 1, 1, L)
        rows = torch.arange(x.shape[0], device=x.device)
        keys = self.cache.chunk_index(rows, 0, kv_len)  # (b * n_kv * L,) every layer reads these rows
        for key, layer in self.model.layers.items():
            x = self._decode_layer(key, layer, x, rope, mask, index, keys)
        return self._head(x[:, 0])

    def _decode_layer(
        self,
        key: str,
        layer: TransformerLayer,
        x: torch.Tensor,
        rope: RopeCache | None,
        mask: torch.Tensor,
        index: torch.Tensor,
        keys: torch.Tensor,
    ) -> torch.Tensor:
        """index: KVCache.token_index of the step's positions (the writes); keys: chunk_index of the rows'
        positions [0, L) (the reads)."""
        attn = layer.self_attention
        q, k, v = attn.project_qkv(layer.input_norm(x), rope)  # (b, n_heads, 1, d), (b, n_kv, 1, d) x2
        self.cache.write(key, index, k, v)
        k_all, v_all = self.cache.read(key, keys, x.shape[0])  # (b, n_kv, L, d)
        attention = math_single_query_attention if self.compile_cpu else single_query_attention
        out = attention(q, k_all, v_all, mask, attn.group_size)  # (b, n_heads, 1, d)
        return _after_attention(layer, x, out)

    def _decode_layer_fast(
        self,
        key: str,
        layer: TransformerLayer,
        x: torch.Tensor,
        rope: RopeCache | None,
        lengths: torch.Tensor,
        index: torch.Tensor,
        kv_len: int,
    ) -> torch.Tensor:
        """CUDA: compiled norm/QKV/RoPE/K-V write, the split-K kernel on exact lengths, compiled
        combine/proj/MLP. index: KVCache.token_index of the step's positions."""
        k_flat, v_flat = self.cache.flat(key)
        q = self._pre(layer, x, rope, k_flat, v_flat, index)  # (b, n_heads, 1, d)
        part, lse = flash_decode.split_attention(
            q[:, :, 0],
            self.cache.k[key],
            self.cache.v[key],
            self.cache.block_table,
            lengths,
            kv_len,
            self.sliding_window,
        )
        return self._post(layer, x, part, lse)


# CPU decode, compiled (ModelRunner(compile_cpu=True)): for a small model a step is ~100 small ops
# (norms, RoPE, the K/V write and gather, masking, SiLU, residuals) that each pay eager dispatch; Inductor's
# C++ backend fuses them into a few loops around the GEMMs (~1.7x tokens/s on qwen3_tiny at batch 32).
# One compiled function for every runner (the runner is an argument; its model is inlined), dynamic over
# the rows and the kv length, so steps of any batch or length and new engines on models of the same config
# reuse the graph. The first call compiles (tens of seconds; Inductor caches on disk after); past dynamo's
# recompile limit (8 graphs, e.g. 8 model configs in one process) further configs decode eagerly.
_CPU_DECODE = torch.compile(ModelRunner._decode, dynamic=True)


def _before_attention(
    layer: TransformerLayer, x: torch.Tensor, rope: RopeCache | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer.self_attention.project_qkv(layer.input_norm(x), rope)


def _before_attention_write(
    layer: TransformerLayer,
    x: torch.Tensor,
    rope: RopeCache | None,
    k_flat: torch.Tensor,
    v_flat: torch.Tensor,
    index: torch.Tensor,
) -> torch.Tensor:
    """Decode: x (b, 1, H) -> q (b, n_heads, 1, d); the new K/V go straight into the cache rows `index`
    (b * n_kv,) of the flat views (KVCache.flat), inside the same compiled graph as the RoPE that makes them."""
    q, k, v = _before_attention(layer, x, rope)  # (b, n_heads, 1, d), (b, n_kv, 1, d) x2
    d = k.shape[-1]
    k_flat.index_copy_(0, index, k.reshape(-1, d))
    v_flat.index_copy_(0, index, v.reshape(-1, d))
    return q


def _after_attention(layer: TransformerLayer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """x (b, T, H), attention out (b, n_heads, T, d) -> the layer's output (b, T, H)."""
    x = x + layer.self_attention.linear_proj(_merge_heads(out))
    return x + layer.mlp(layer.pre_mlp_norm(x))


# Prefill's own code objects: Dynamo caches compiled graphs per code object, so these keep the
# dynamic-shape prefill graphs apart from the decode step's static ones.
def _prefill_before(
    layer: TransformerLayer, x: torch.Tensor, rope: RopeCache | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _before_attention(layer, x, rope)


def _prefill_after(layer: TransformerLayer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return _after_attention(layer, x, out)


def _after_split_attention(
    layer: TransformerLayer, x: torch.Tensor, part: torch.Tensor, lse: torch.Tensor
) -> torch.Tensor:
    out = flash_decode.combine_splits(part, lse).to(x.dtype)  # (b, n_heads, d)
    return _after_attention(layer, x, out[:, :, None])


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_runnable(model: GPTModel) -> None:
    """The runner needs the whole model in one process (pipeline stages are not supported)."""
    config = model.config
    if not (model.pre_process and model.post_process and len(model.layers) == config.num_layers):
        raise ValueError(
            "the native engine needs a whole GPTModel (every layer, embedding and output head); "
            "pipeline-parallel stages are not supported"
        )


def bucket_at_least(n: int, limit: int, smallest: int = 1) -> int:
    """The smallest power of two >= max(n, smallest), capped at `limit` (itself a bucket)."""
    size = smallest
    while size < n:
        size *= 2
    return min(size, limit)


class CudaGraphDecoder:
    """Decode steps captured as CUDA graphs, one per (batch rows, kv length) bucket, on first use.

    Static inputs: the engine's next-token buffer and a positions buffer (num_slots entries each); a
    graph reads a prefix of them and writes its own logits buffer; all graphs share one memory pool
    (replays are sequential and a graph's temporaries are dead after it). A graph holds the addresses
    of the weights and the KV cache: `valid_for` tells whether the model's parameters still live where
    they were captured (in-place updates keep them; `.to()`, offload or another model do not).
    """

    MIN_KV_BUCKET = 256

    def __init__(self, runner: ModelRunner, tokens: torch.Tensor):
        """tokens (num_slots,) int64: the engine's buffer of each slot's next input token, read in place."""
        self.runner, self.tokens = runner, tokens
        self.positions = torch.zeros_like(tokens)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: object | None = None
        self._param_ptrs = _param_pointers(runner.model)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def valid_for(self, model: GPTModel) -> bool:
        return model is self.runner.model and _param_pointers(model) == self._param_ptrs

    def buckets(self, num_rows: int, kv_len: int) -> tuple[int, int]:
        """(rows, kv length) of the graph that serves a decode of num_rows slots reading kv_len keys."""
        cache = self.runner.cache
        return (
            bucket_at_least(num_rows, cache.num_rows),
            bucket_at_least(kv_len, cache.max_len, self.MIN_KV_BUCKET),
        )

    def decode(self, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """ModelRunner.decode of tokens[:b] at positions (b,); b and kv_len must be bucket sizes. The
        returned logits are the graph's output buffer: read them before the next call."""
        b = positions.shape[0]
        self.positions[:b].copy_(positions, non_blocking=True)
        key = (b, kv_len)
        if key not in self._graphs:
            self._graphs[key] = self._capture(b, kv_len)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits

    def _capture(self, b: int, kv_len: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        tokens, positions = self.tokens[:b], self.positions[:b]
        # Warm up on a side stream (lazy inits, allocator) as torch.cuda.graphs requires. The warm-up
        # writes the same K/V the replay will write (same inputs), so it changes nothing.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.runner.decode(tokens, positions, kv_len)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.runner.decode(tokens, positions, kv_len)
        self._pool = graph.pool()
        return graph, logits


def _param_pointers(model: GPTModel) -> tuple[int, ...]:
    return tuple(p.data_ptr() for p in model.parameters())
