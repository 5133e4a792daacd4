"""`GenerationEngine` on our own GPTModel: KV cache, continuous batching, on-device sampling.

Scheduling. Each request expands to n samples, queued in order. Every engine step first admits queued
samples into free rows (slots) of the batch while the paged KV cache has blocks for their prompts (one
batched prefill of right-padded prompts, capped at max_prefill_tokens padded tokens), then runs one decode
step for every running sample. A finished sample (EOS, stop token, stop string, max_tokens) frees its row
and blocks at once, the next step refills them from the queue, and its request is emitted as soon as all of
its samples are done.

KV memory (kv_cache.py, blocks.py): a pool of block_size-token blocks; a sample holds the blocks of the
tokens it has, so memory follows the tokens actually generated. The n samples of a prompt admitted
together prefill it once and share its blocks (refcounted; the partly filled last block is copied for
each sample as it first writes there). A prompt longer than max_prefill_tokens is prefilled in chunks, each
attending to the chunks before it through the block table. When a decode step needs a block and none is
free, the most recently admitted sample is preempted: its blocks are freed and it goes back to the front
of the queue with the tokens it has, to be prefilled again (prompt + those tokens) when blocks free up.
Recompute gives the same tokens (greedy, and seeded samples, whose noise depends on the token index
only), up to the last-bits difference of prefill vs decode logits noted below.

Host/device traffic per step: the sampled tokens stay on the device as the next step's inputs; the host
sends the step's positions (b int64) and reads the sampled tokens and their logprobs back with one small
`.cpu()` (2 x b float64), which is the step's only synchronisation: stop checks, stop strings and
scheduling need the tokens on the host.

Sampling and logprobs: see sampler.py. Logprobs are RAW (log_softmax of the unscaled logits, vLLM's
raw_logprobs). Reproducibility: sample i of a request with seed s draws its noise from key s + i (as vLLM
seeds sample i with s + i), as a pure function of (key, token index, vocab id), so a seeded sample is the
same in any batch, slot, batch size and TP size, given the same logits. Unseeded samples take keys from the
engine's own RNG (seeded with `seed`), so a fresh engine replays the same sequence of unseeded calls.
Greedy is the argmax of the logits. Logits of different batch compositions may differ in the last bits
(kernel choice), which can flip a sample where two tokens are nearly tied, as in any batched engine.

Colocated mode: `NativeEngine(model=policy_model)` (or `use_model`) runs on the training model's own
parameters, no copy and no refit: after an optimizer step (in-place updates) call
`use_model(model, version=step)` to record the new version. `update_weights` (HF names) copies into the
same parameters in place, for weights that come from elsewhere.

Tensor parallelism: the model's layers communicate over its tp_group; every TP rank must call generate
with the same requests (SPMD) and gets the same results (the logits are all-gathered before sampling and
sampling is deterministic, so the ranks never need to agree on tokens). `cancelled` must agree across ranks.

CUDA graphs (device.type == "cuda", cuda_graphs=True, dense models): the decode forward is captured per
(batch, kv length) bucket on first use; MoE layers route with host-synchronising ops and run eagerly.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from core.bridge.convert import resolve_architecture
from core.errors import InputError
from core.models import Architecture
from core.transformer.model import GPTModel
from rollout.engines.base import EmitSamples, GenerationEngine
from rollout.engines.native.blocks import BlockTable, OutOfBlocks
from rollout.engines.native.kv_cache import KVCache, SlotAllocator
from rollout.engines.native.loading import (
    PathLike,
    check_given_model,
    check_sizes,
    device_of,
    empty_device_cache,
    load_model_dir,
    resolve_eos,
    resolve_tokenizer,
)
from rollout.engines.native.runner import CudaGraphDecoder, ModelRunner, check_runnable, full_vocab_logits
from rollout.engines.native.sampler import SlotSamplingTable, sample
from rollout.engines.native.sequence import RequestResults, SampleState, StopChecker
from rollout.engines.native.weights import HFWeightLoader
from rollout.types import GenerationRequest

DEFAULT_BLOCK_SIZE = 64  # token positions per KV block (see NativeEngine's block_size)


class NativeEngine(GenerationEngine):
    """Generation on a GPTModel (given, or loaded from an HF checkpoint directory) with a KV cache.

    model: run on this model's parameters in place (colocated); its device, dtype and tp_group are used.
    model_dir: else load an HF checkpoint (in `dtype`, default fp32, on `device`, sharded over tp_group).
    tokenizer: a tokenizer object (`decode`) or a local path; default: model_dir's tokenizer if it has one.
        Needed for stop strings and Sample.text.
    eos_token_ids: default from model_dir's generation_config.json / config.json, else the tokenizer's,
        else none (then only stop_token_ids, stop strings and max_tokens end a sample).
    max_model_len: context per sequence (prompt + max_tokens).
    max_num_seqs: rows of the decode batch (samples running at once).
    kv_cache_tokens: token positions of the paged KV pool, allocated up front:
        2 * layers * kv_cache_tokens * kv_heads/tp * head_dim * dtype bytes; default max_num_seqs *
        max_model_len rounded up to whole blocks per row (never preempts). Smaller pools preempt
        (recompute) when they run out; at least max_model_len, so any one request fits.
    block_size: token positions per KV block (a power of two). 64, the decode kernel's key tile, makes a
        tile one block (one contiguous load): 7% more tokens/s than 16 at the llama_1b bench shape on an
        H200; a sequence wastes < one block.
    max_prefill_tokens: padded tokens per prefill batch; a longer prompt is prefilled in chunks of it.
    compile_cpu: on the CPU, run the decode step Inductor-compiled (C++ loops fusing a step's small ops:
        ~1.7x tokens/s on a tiny model; the first generate call compiles for tens of seconds). Off by
        default because of that cost; ignored on CUDA, whose decode is always compiled and graph-captured.
    """

    def __init__(
        self,
        model: GPTModel | None = None,
        *,
        model_dir: PathLike | None = None,
        tokenizer: Any | None = None,
        max_model_len: int,
        max_num_seqs: int = 64,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
        tp_group: dist.ProcessGroup | None = None,
        eos_token_ids: Sequence[int] | None = None,
        arch: Architecture | str | None = None,
        cuda_graphs: bool = True,
        max_prefill_tokens: int = 8192,
        kv_cache_tokens: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        compile_cpu: bool = False,
    ) -> None:
        super().__init__()
        if (model is None) == (model_dir is None):
            raise InputError("NativeEngine takes exactly one of model (a GPTModel) and model_dir")
        if kv_cache_tokens is None:  # every row's longest sequence, in whole blocks
            kv_cache_tokens = max_num_seqs * -(-max_model_len // block_size) * block_size
        check_sizes(max_model_len, max_num_seqs, max_prefill_tokens, kv_cache_tokens, block_size)
        if model_dir is not None:
            model, arch = load_model_dir(Path(model_dir), device, dtype or torch.float32, tp_group)
        else:
            check_given_model(model, device, dtype, tp_group)
        if max_model_len > model.config.max_position_embeddings:
            raise InputError(
                f"NativeEngine: max_model_len={max_model_len} exceeds the model's "
                f"max_position_embeddings={model.config.max_position_embeddings}"
            )
        self._max_model_len, self._max_num_seqs = max_model_len, max_num_seqs
        self._max_prefill_tokens = max_prefill_tokens
        self._block_size = block_size
        self._max_blocks_per_row = -(-max_model_len // block_size)
        self._num_blocks = 1 + -(-kv_cache_tokens // block_size)  # + the null block
        self._peak_blocks, self._num_preemptions = 0, 0
        self._cuda_graphs, self._compile_cpu = cuda_graphs, compile_cpu
        self._owns_weights = model_dir is not None
        self._offloaded_from: torch.device | None = None
        self._tokenizer = resolve_tokenizer(tokenizer, model_dir)
        self._eos_token_ids = resolve_eos(eos_token_ids, model_dir, self._tokenizer)
        self._rng = random.Random(seed)  # keys of unseeded samples
        self._closed = False
        self._bind(model, resolve_architecture(arch, model.config))

    # ---- GenerationEngine --------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return self._model.config.vocab_size

    @property
    def model(self) -> GPTModel:
        return self._model

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes the KV pool reserves (0 while asleep)."""
        return 0 if self._cache is None else self._cache.nbytes

    @property
    def kv_cache_peak_bytes(self) -> int:
        """Bytes of the KV blocks held at the peak of the last generate call (the memory its tokens needed)."""
        return 0 if self._cache is None else self._peak_blocks * self._cache.block_nbytes

    @property
    def num_preemptions(self) -> int:
        """Samples preempted (blocks freed, recomputed later) during the last generate call."""
        return self._num_preemptions

    @property
    def num_cuda_graphs(self) -> int:
        """Decode graphs captured so far (0 on CPU, with cuda_graphs=False, or for MoE models)."""
        return 0 if self._graphs is None else self._graphs.num_graphs

    def use_model(self, model: GPTModel, version: int | None = None) -> None:
        """Generate with `model`'s parameters from now on, in place (colocated mode: no copy, no refit).

        Call it again after the trainer changed the weights, with the new `version` (must increase);
        the same model object keeps the KV cache, and CUDA graphs while its parameters stay where they
        were. Waits for in-flight generation."""
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise InputError(f"weight version must be an int, got {version!r}")
        with self._lock:
            if version is not None and version <= self._weight_version:
                raise InputError(
                    f"weight version must increase: engine has {self._weight_version}, got {version}"
                )
            check_given_model(model, None, None, None)
            if model is not self._model:
                same_config = model.config == self._model.config
                self._bind(model, self._arch if same_config else resolve_architecture(None, model.config))
                self._owns_weights = False
            self._failed_update = None  # the whole model is consistent again
            if version is not None:
                self._weight_version = version

    def _load_weights_locked(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._loader.load(named_tensors)  # in place: the KV cache holds nothing to drop, graphs stay valid

    def _sleep_locked(self, level: int) -> None:
        """Drop the KV cache and CUDA graphs; an engine that owns its weights (model_dir) also moves them
        to the CPU (any level). A colocated model is never moved: the trainer owns it."""
        self._drop_state()
        device = device_of(self._model)
        if self._owns_weights and device.type != "cpu":
            self._model.to("cpu")
            self._offloaded_from = device
        empty_device_cache(device)

    def _wake_up_locked(self) -> None:
        if self._offloaded_from is not None:
            self._model.to(self._offloaded_from)
            self._offloaded_from = None
        self._ensure_state()

    def shutdown(self) -> None:
        with self._lock:
            self._drop_state()
            self._closed = True

    # ---- generation --------------------------------------------------------------------------

    def _generate_locked(
        self, requests: list[GenerationRequest], emit: EmitSamples, cancelled: Callable[[], bool]
    ) -> None:
        if self._closed:
            raise RuntimeError("generate on a shut-down NativeEngine")
        if self._tokenizer is None and any(r.params.stop for r in requests):
            raise InputError("stop strings need a tokenizer: build the NativeEngine with tokenizer=...")
        self._ensure_state()
        results = RequestResults(requests, emit)
        waiting = deque(self._samples_of(requests))
        running: dict[int, SampleState] = {}  # slot -> sample
        self._slots = SlotAllocator(self._max_num_seqs)
        self._blocks = BlockTable(
            self._num_blocks, self._block_size, self._max_num_seqs, self._max_blocks_per_row
        )
        self._cache.reset_table()
        self._num_preemptions = 0
        in_flight: _InFlight | None = None
        try:
            while (waiting or running) and not cancelled():
                if self._can_admit(waiting, running):
                    in_flight = self._finish(in_flight, running, results)
                    self._prefill(self._admit(waiting, running), running, results)
                # One step ahead: the next decode is queued on the device before the previous step's tokens
                # are read back, so the host's bookkeeping overlaps the GPU's work.
                launched = self._launch_decode(running, in_flight, waiting) if running else None
                self._finish(in_flight, running, results)
                in_flight = launched
            self._finish(in_flight, running, results)
        finally:
            self._peak_blocks = self._blocks.allocator.peak_used

    def _samples_of(self, requests: list[GenerationRequest]) -> list[SampleState]:
        out = []
        for index, req in enumerate(requests):
            seed = req.params.seed
            for i in range(req.params.n):
                key = seed + i if seed is not None else self._rng.getrandbits(64)
                out.append(SampleState(index, i, req.prompt_token_ids, req.params, key))
        return out

    def _can_admit(self, waiting: deque[SampleState], running: dict[int, SampleState]) -> bool:
        """A free row, and blocks for the next queued sample's prefill (plus headroom for the running
        ones to grow: admitting into the last free blocks would preempt at once)."""
        if not (waiting and self._slots.num_free):
            return False
        needed = self._blocks.blocks_for(len(waiting[0].prefill_ids))
        return needed + (self._headroom if running else 0) <= self._blocks.allocator.num_free

    @property
    def _headroom(self) -> int:
        """Free blocks kept back at admission when the pool can run out (1%): none when every row fits its
        longest sequence."""
        if self._num_blocks - 1 >= self._max_num_seqs * self._max_blocks_per_row:
            return 0
        return max(1, self._num_blocks // 100)

    def _admit(self, waiting: deque[SampleState], running: dict[int, SampleState]) -> list[SampleState]:
        """Move queued samples into free rows, in order, while the prefill stays within max_prefill_tokens
        (padded) and blocks last. The samples of a prompt admitted together share its blocks (one
        prefill); a preempted sample resumes alone. At least one when _can_admit."""
        admitted: list[SampleState] = []
        leaders: dict[object, SampleState] = {}
        longest = 0
        while waiting and self._slots.num_free:
            state = waiting[0]
            leader = leaders.get(state.group)
            new_longest = max(longest, len(state.prefill_ids))
            # A sample of an admitted prompt adds no prefill work, however long the prompt.
            if admitted and leader is None and (len(leaders) + 1) * new_longest > self._max_prefill_tokens:
                break
            needed = 0 if leader is not None else self._blocks.blocks_for(len(state.prefill_ids))
            headroom = self._headroom if running or admitted else 0
            if needed + headroom > self._blocks.allocator.num_free:
                break
            waiting.popleft()
            state.slot = self._slots.allocate()
            running[state.slot] = state
            admitted.append(state)
            if leader is None:
                leaders[state.group] = state
                self._blocks.allocate(state.slot, len(state.prefill_ids))
            else:
                self._blocks.share(leader.slot, state.slot)
            longest = new_longest
        self._sampling.assign(
            [s.slot for s in admitted], [s.params for s in admitted], [s.key for s in admitted]
        )
        return admitted

    def _prefill(
        self, admitted: list[SampleState], running: dict[int, SampleState], results: RequestResults
    ) -> None:
        """Prefill one row per admitted prompt (its samples' rows share the blocks), sample every admitted
        sample's next token."""
        if not admitted:
            return
        leaders: dict[object, SampleState] = {}
        for state in admitted:
            leaders.setdefault(state.group, state)
        self._cache.sync_table(self._blocks.take_dirty())
        sequences = [s.prefill_ids for s in leaders.values()]
        rows = self._device_tensor([s.slot for s in leaders.values()])  # (P,)
        logits_local = self._prefill_chunks(sequences, rows)  # (P, V/tp)
        row_of_group = {group: row for row, group in enumerate(leaders)}
        index = self._device_tensor([row_of_group[s.group] for s in admitted])  # (A,)
        logits = full_vocab_logits(logits_local, self._tp_group).index_select(0, index)  # (A, V)
        slots, steps = [s.slot for s in admitted], [len(s.tokens) for s in admitted]
        self._sample_and_record(logits, slots, steps, admitted, running, results)

    def _prefill_chunks(self, sequences: list[list[int]], rows: torch.Tensor) -> torch.Tensor:
        """Vocab-local logits at each sequence's last token (P, V/tp). Right-padded batch in one forward;
        a single sequence longer than max_prefill_tokens in chunks, each attending to those before it."""
        T = max(len(s) for s in sequences)
        chunk = self._max_prefill_tokens
        if T <= chunk:
            input_ids = self._device_tensor([s + [0] * (T - len(s)) for s in sequences])  # (P, T)
            return self._runner.prefill(input_ids, self._device_tensor([len(s) - 1 for s in sequences]), rows)
        (sequence,) = sequences  # _admit admits a longer prompt alone
        for start in range(0, T, chunk):
            piece = sequence[start : start + chunk]
            last = self._device_tensor([len(piece) - 1])
            logits = self._runner.prefill(self._device_tensor([piece]), last, rows, start)
        return logits

    def _launch_decode(
        self, running: dict[int, SampleState], in_flight: _InFlight | None, waiting: deque[SampleState]
    ) -> _InFlight | None:
        """Queue one decode step for every running sample, assuming the in-flight step's samples have one
        more token (theirs, not read yet). Samples that surely finish with that token are left out; a
        sample that stops on it decodes one wasted token, which _finish drops. Blocks for the step's
        writes come first (preempting when the pool runs dry). No host sync."""
        pending = in_flight.slots_set if in_flight is not None else frozenset()
        ahead = {state: int(slot in pending) for slot, state in running.items()}
        # `running` is in admission order (a sample is inserted when admitted, deleted when it leaves).
        decoding = [s for s in running.values() if len(s.tokens) + ahead[s] < s.params.max_tokens]
        self._reserve_blocks(decoding, ahead, running, waiting)
        slots, positions, steps = [], [], []
        for state in sorted((s for s in decoding if s.slot >= 0), key=attrgetter("slot")):
            slots.append(state.slot)
            positions.append(state.next_position + ahead[state])
            steps.append(len(state.tokens) + ahead[state])
        if not slots:
            return None
        num_rows = slots[-1] + 1
        row_positions = [-1] * num_rows  # rows in between decode a dummy token that writes no block
        for slot, position in zip(slots, positions, strict=True):
            row_positions[slot] = position
        logits_local = self._decode_logits(row_positions, max(row_positions) + 1)[:num_rows]  # (b, V/tp)
        logits = full_vocab_logits(logits_local, self._tp_group).index_select(0, self._device_tensor(slots))
        tokens, logprobs = self._sample(logits, slots, steps)
        samples = [running[slot] for slot in slots]
        return _InFlight(
            samples, frozenset(slots), _to_host_async(torch.stack([tokens.double(), logprobs.double()]))
        )

    def _finish(
        self, in_flight: _InFlight | None, running: dict[int, SampleState], results: RequestResults
    ) -> None:
        """Read an in-flight step's tokens back (the sync) and record them; always returns None."""
        if in_flight is None:
            return None
        host = in_flight.wait()  # samples preempted since have slot -1 (or another sample their slot)
        live = [(i, s) for i, s in enumerate(in_flight.samples) if running.get(s.slot) is s]
        self._record(host[:, [i for i, _ in live]], [s for _, s in live], running, results)
        return None

    def _decode_logits(self, positions: list[int], kv_len: int) -> torch.Tensor:
        """Vocab-local logits (>= len(positions) rows) of the decode step; graphs pad to their buckets."""
        if self._graphs is None:
            rows = len(positions)
            return self._runner.decode(self._next_tokens[:rows], self._device_tensor(positions), kv_len)
        rows, kv_len = self._graphs.buckets(len(positions), kv_len)
        padded = positions + [-1] * (rows - len(positions))
        return self._graphs.decode(self._device_tensor(padded), kv_len)

    def _sample(
        self, logits: torch.Tensor, slots: list[int], steps: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (S, V) of the samples in `slots` -> their next tokens (S,) and raw logprobs (S,), on the
        device; the tokens are also stored as the slots' next decode inputs."""
        slot_index = self._device_tensor(slots)
        tokens, logprobs = sample(
            logits,
            self._sampling.rows.index(slot_index),
            self._device_tensor(steps),
            apply_filters=self._sampling.any_filtered(slots),
            any_random=self._sampling.any_random(slots),
        )
        self._next_tokens.index_copy_(0, slot_index, tokens)
        return tokens, logprobs

    def _sample_and_record(
        self,
        logits: torch.Tensor,
        slots: list[int],
        steps: list[int],
        samples: list[SampleState],
        running: dict[int, SampleState],
        results: RequestResults,
    ) -> None:
        tokens, logprobs = self._sample(logits, slots, steps)
        self._record(torch.stack([tokens.double(), logprobs.double()]).cpu(), samples, running, results)

    def _record(
        self,
        host: torch.Tensor,
        samples: list[SampleState],
        running: dict[int, SampleState],
        results: RequestResults,
    ) -> None:
        """host (2, S) tokens and logprobs of `samples`: append them; finished samples leave their slots."""
        for state, token, logprob in zip(samples, host[0].long().tolist(), host[1].tolist(), strict=True):
            state.tokens.append(token)
            state.logprobs.append(logprob)
            reason = self._stops(state)
            if reason is not None:
                self._release(state, running)
                results.add(state, self._stops.to_sample(state, reason))

    def _reserve_blocks(
        self,
        decoding: list[SampleState],
        ahead: dict[SampleState, int],
        running: dict[int, SampleState],
        waiting: deque[SampleState],
    ) -> None:
        """Make the position each decoding sample writes next writable (a new block, or its own copy of a
        shared one), oldest sample first. When no block is free, preempt the newest decoding sample (the
        requester itself if it is the newest; never one that finishes with its in-flight token) until one
        is. Queues the block copies and the table update."""
        copies = []
        rows, refcount, block_size = self._blocks.rows, self._blocks.allocator.refcount, self._block_size
        for state in decoding:  # admission order
            if state.slot < 0:  # preempted for an older sample in this loop
                continue
            position = state.next_position + ahead[state]
            if position % block_size and refcount[rows[state.slot][-1]] == 1:
                continue  # inside its own last block (position - 1 is there): the common case, kept cheap
            while state.slot >= 0:
                try:
                    copy = self._blocks.prepare_write(state.slot, position)
                except OutOfBlocks:
                    victim = next(s for s in reversed(decoding) if s.slot >= 0)
                    self._preempt(victim, running, waiting)
                    continue
                if copy is not None:
                    copies.append(copy)
                break
        self._cache.copy_blocks(copies)  # gathers every source before writing any destination
        self._cache.sync_table(self._blocks.take_dirty())

    def _preempt(
        self, state: SampleState, running: dict[int, SampleState], waiting: deque[SampleState]
    ) -> None:
        """Recompute-style preemption: free the sample's row and blocks, queue it first; it keeps its tokens
        (an in-flight one is dropped) and is prefilled again, prompt + tokens, when readmitted."""
        self._release(state, running)
        waiting.appendleft(state)  # victims go newest first, so the oldest ends up in front
        self._num_preemptions += 1

    def _release(self, state: SampleState, running: dict[int, SampleState]) -> None:
        del running[state.slot]
        self._blocks.free(state.slot)
        self._slots.free(state.slot)
        state.slot = -1

    # ---- state -------------------------------------------------------------------------------

    def _bind(self, model: GPTModel, arch: Architecture) -> None:
        check_runnable(model)
        self._model, self._arch = model, arch
        self._tp_group = model.output_layer.tp_group
        self._loader = HFWeightLoader(model, arch, self._tp_group)
        self._stops = StopChecker(self._eos_token_ids, self._tokenizer)
        self._drop_state()
        if not self._sleeping:
            self._ensure_state()

    def _drop_state(self) -> None:
        self._cache: KVCache | None = None
        self._runner: ModelRunner | None = None
        self._graphs: CudaGraphDecoder | None = None

    def _ensure_state(self) -> None:
        """(Re)build the KV cache, runner and slot tables if dropped; recapture graphs if the model's
        parameters moved since they were captured."""
        model = self._model
        device, dtype = device_of(model), next(model.parameters()).dtype
        if self._cache is None:
            attention = next(iter(model.layers.values())).self_attention
            self._cache = KVCache(
                model.layers.keys(),
                self._num_blocks,
                self._block_size,
                self._max_num_seqs,
                self._max_blocks_per_row,
                attention.n_kv_local,
                attention.head_dim,
                dtype,
                device,
            )
            self._runner = ModelRunner(model, self._cache, self._compile_cpu)
            self._sampling = SlotSamplingTable(self._max_num_seqs, model.config.vocab_size, device)
            self._next_tokens = torch.zeros(self._max_num_seqs, dtype=torch.int64, device=device)
            self._graphs = None
        use_graphs = self._cuda_graphs and device.type == "cuda" and not model.config.is_moe
        if use_graphs and (self._graphs is None or not self._graphs.valid_for(model)):
            self._graphs = CudaGraphDecoder(self._runner, self._next_tokens)

    def _device_tensor(self, values: list[Any]) -> torch.Tensor:
        device = self._next_tokens.device
        host = torch.tensor(values, dtype=torch.int64, pin_memory=device.type == "cuda")
        return host.to(device, non_blocking=True)  # pinned: the copy queues behind the step, no sync


@dataclass(eq=False)
class _InFlight:
    """A queued decode step whose sampled tokens are still on their way to the host."""

    samples: list[SampleState]
    slots_set: frozenset[int]
    host: tuple[torch.Tensor, torch.cuda.Event | None]  # (2, S) tokens/logprobs, and the copy's event

    def wait(self) -> torch.Tensor:
        tensor, event = self.host
        if event is not None:
            event.synchronize()
        return tensor


def _to_host_async(x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying x to (pinned) host memory; the event marks the copy done. On CPU: x itself."""
    if x.device.type != "cuda":
        return x, None
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event
