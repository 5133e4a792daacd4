"""`GenerationEngine` on our own GPTModel: KV cache, continuous batching, on-device sampling.

Scheduling. Each request expands to n samples, queued in order. Every engine step first admits queued
samples into free KV-cache slots (one batched prefill of right-padded prompts, capped at
max_prefill_tokens padded tokens; the n samples of a prompt admitted together share one prefill, its K/V
copied slot to slot), then runs one decode step for every running sample. A finished sample (EOS, stop
token, stop string, max_tokens) frees its slot at once, the next step refills it from the queue, and its
request is emitted as soon as all of its samples are done.

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

import json
import os
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from core.bridge.convert import resolve_architecture
from core.bridge.hf import SafetensorsCheckpoint, default_dtype, read_hf_config
from core.errors import InputError
from core.models import Architecture
from core.transformer.model import GPTModel
from rollout.engines.base import EmitSamples, GenerationEngine
from rollout.engines.native.kv_cache import KVCache, SlotAllocator
from rollout.engines.native.runner import CudaGraphDecoder, ModelRunner, check_runnable, full_vocab_logits
from rollout.engines.native.sampler import SlotSamplingTable, sample
from rollout.engines.native.sequence import RequestResults, SampleState, StopChecker
from rollout.engines.native.weights import HFWeightLoader
from rollout.types import GenerationRequest

PathLike = str | os.PathLike[str]


class NativeEngine(GenerationEngine):
    """Generation on a GPTModel (given, or loaded from an HF checkpoint directory) with a KV cache.

    model: run on this model's parameters in place (colocated); its device, dtype and tp_group are used.
    model_dir: else load an HF checkpoint (in `dtype`, default fp32, on `device`, sharded over tp_group).
    tokenizer: a tokenizer object (`decode`) or a local path; default: model_dir's tokenizer if it has one.
        Needed for stop strings and Sample.text.
    eos_token_ids: default from model_dir's generation_config.json / config.json, else the tokenizer's,
        else none (then only stop_token_ids, stop strings and max_tokens end a sample).
    max_model_len: context per sequence (prompt + max_tokens); with max_num_seqs it sizes the KV cache:
        2 * layers * max_num_seqs * max_model_len * kv_heads/tp * head_dim * dtype bytes.
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
    ) -> None:
        super().__init__()
        if (model is None) == (model_dir is None):
            raise InputError("NativeEngine takes exactly one of model (a GPTModel) and model_dir")
        sizes = {"max_model_len": max_model_len, "max_num_seqs": max_num_seqs}
        for name, value in {**sizes, "max_prefill_tokens": max_prefill_tokens}.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"NativeEngine: {name} must be an int >= 1, got {value!r}")
        if model_dir is not None:
            model, arch = _load_model_dir(Path(model_dir), device, dtype or torch.float32, tp_group)
        else:
            _check_given_model(model, device, dtype, tp_group)
        if max_model_len > model.config.max_position_embeddings:
            raise InputError(
                f"NativeEngine: max_model_len={max_model_len} exceeds the model's "
                f"max_position_embeddings={model.config.max_position_embeddings}"
            )
        self._max_model_len, self._max_num_seqs = max_model_len, max_num_seqs
        self._max_prefill_tokens = max_prefill_tokens
        self._cuda_graphs = cuda_graphs
        self._owns_weights = model_dir is not None
        self._offloaded_from: torch.device | None = None
        self._tokenizer = _resolve_tokenizer(tokenizer, model_dir)
        self._eos_token_ids = _resolve_eos(eos_token_ids, model_dir, self._tokenizer)
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
        return 0 if self._cache is None else self._cache.nbytes

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
            _check_given_model(model, None, None, None)
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
        device = _device_of(self._model)
        if self._owns_weights and device.type != "cpu":
            self._model.to("cpu")
            self._offloaded_from = device
        _empty_device_cache(device)

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
        in_flight: _InFlight | None = None
        while (waiting or running) and not cancelled():
            if waiting and self._slots.num_free:
                in_flight = self._finish(in_flight, running, results)
                self._prefill(self._admit(waiting, running), running, results)
            # One step ahead: the next decode is queued on the device before the previous step's tokens
            # are read back, so the host's bookkeeping overlaps the GPU's work.
            launched = self._launch_decode(running, in_flight) if running else None
            self._finish(in_flight, running, results)
            in_flight = launched
        self._finish(in_flight, running, results)

    def _samples_of(self, requests: list[GenerationRequest]) -> list[SampleState]:
        out = []
        for index, req in enumerate(requests):
            seed = req.params.seed
            for i in range(req.params.n):
                key = seed + i if seed is not None else self._rng.getrandbits(64)
                out.append(SampleState(index, i, req.prompt_token_ids, req.params, key))
        return out

    def _admit(self, waiting: deque[SampleState], running: dict[int, SampleState]) -> list[SampleState]:
        """Move queued samples into free slots, in order, while the prefill stays within
        max_prefill_tokens (padded; samples of an admitted prompt add nothing). At least one."""
        admitted: list[SampleState] = []
        prompts: set[int] = set()
        longest = 0
        while waiting and self._slots.num_free:
            state = waiting[0]
            new_prompts = len(prompts | {state.request})
            new_longest = max(longest, len(state.prompt))
            if admitted and new_prompts * new_longest > self._max_prefill_tokens:
                break
            waiting.popleft()
            state.slot = self._slots.allocate()
            running[state.slot] = state
            admitted.append(state)
            prompts.add(state.request)
            longest = new_longest
        self._sampling.assign(
            [s.slot for s in admitted], [s.params for s in admitted], [s.key for s in admitted]
        )
        return admitted

    def _prefill(
        self, admitted: list[SampleState], running: dict[int, SampleState], results: RequestResults
    ) -> None:
        """Prefill one slot per admitted prompt, copy its K/V to its other samples' slots, sample every
        admitted sample's first token."""
        leaders: dict[int, SampleState] = {}
        for state in admitted:
            leaders.setdefault(state.request, state)
        prompts = [s.prompt for s in leaders.values()]
        T = max(len(p) for p in prompts)
        input_ids = self._device_tensor([p + [0] * (T - len(p)) for p in prompts])  # (P, T)
        last_index = self._device_tensor([len(p) - 1 for p in prompts])  # (P,)
        leader_slots = self._device_tensor([s.slot for s in leaders.values()])  # (P,)
        logits_local = self._runner.prefill(input_ids, last_index, leader_slots)  # (P, V/tp)
        followers = [s for s in admitted if leaders[s.request] is not s]
        if followers:
            src = self._device_tensor([leaders[s.request].slot for s in followers])
            self._cache.copy_prefix(src, self._device_tensor([s.slot for s in followers]), T)
        row_of_prompt = {request: row for row, request in enumerate(leaders)}
        rows = self._device_tensor([row_of_prompt[s.request] for s in admitted])  # (A,)
        logits = full_vocab_logits(logits_local, self._tp_group).index_select(0, rows)  # (A, V)
        slots = [s.slot for s in admitted]
        self._sample_and_record(logits, slots, [0] * len(admitted), admitted, running, results)

    def _launch_decode(
        self, running: dict[int, SampleState], in_flight: _InFlight | None
    ) -> _InFlight | None:
        """Queue one decode step for every running sample, assuming the in-flight step's samples have one
        more token (theirs, not read yet). Samples that surely finish with that token are left out; a
        sample that stops on it decodes one wasted token, which _finish drops. No host sync."""
        pending = in_flight.slots_set if in_flight is not None else frozenset()
        slots, positions, steps = [], [], []
        for slot in sorted(running):
            state = running[slot]
            ahead = 1 if slot in pending else 0
            if len(state.tokens) + ahead >= state.params.max_tokens:
                continue
            slots.append(slot)
            positions.append(state.next_position + ahead)
            steps.append(len(state.tokens) + ahead)
        if not slots:
            return None
        num_rows = slots[-1] + 1
        row_positions = [0] * num_rows  # free slots in between decode a dummy token at position 0
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
        host = in_flight.wait()
        live = [(i, s) for i, s in enumerate(in_flight.samples) if running.get(s.slot) is s]
        self._record(host[:, [i for i, _ in live]], [s for _, s in live], running, results)
        return None

    def _decode_logits(self, positions: list[int], kv_len: int) -> torch.Tensor:
        """Vocab-local logits (>= len(positions) rows) of the decode step; graphs pad to their buckets."""
        if self._graphs is None:
            rows = len(positions)
            return self._runner.decode(self._next_tokens[:rows], self._device_tensor(positions), kv_len)
        rows, kv_len = self._graphs.buckets(len(positions), kv_len)
        padded = positions + [0] * (rows - len(positions))
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
                del running[state.slot]
                self._slots.free(state.slot)
                results.add(state, self._stops.to_sample(state, reason))

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
        device, dtype = _device_of(model), next(model.parameters()).dtype
        if self._cache is None:
            attention = next(iter(model.layers.values())).self_attention
            self._cache = KVCache(
                model.layers.keys(),
                self._max_num_seqs,
                self._max_model_len,
                attention.n_kv_local,
                attention.head_dim,
                dtype,
                device,
            )
            self._runner = ModelRunner(model, self._cache)
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


# ---- construction helpers --------------------------------------------------------------------


def _device_of(model: GPTModel) -> torch.device:
    return next(model.parameters()).device


def _empty_device_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _check_given_model(
    model: GPTModel,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    tp_group: dist.ProcessGroup | None,
) -> None:
    """A given model is used as is (no copy): device, dtype and tp_group must be its own."""
    if not isinstance(model, GPTModel):
        raise InputError(f"model must be a core.transformer.model.GPTModel, got {type(model).__name__}")
    param = next(model.parameters())
    if device is not None and torch.device(device) != param.device:
        raise InputError(f"device={device} but the model is on {param.device}; the engine does not copy it")
    if dtype is not None and dtype != param.dtype:
        raise InputError(f"dtype={dtype} but the model is {param.dtype}; the engine does not cast it")
    if tp_group is not None and tp_group is not model.output_layer.tp_group:
        raise InputError("tp_group differs from the one the model was built with")


def _load_model_dir(
    path: Path, device: str | torch.device | None, dtype: torch.dtype, tp_group: dist.ProcessGroup | None
) -> tuple[GPTModel, Architecture]:
    """Build GPTModel(config, tp_group) on `device` and load this rank's shards of the checkpoint."""
    arch, config = read_hf_config(path)
    target = torch.device(device) if device is not None else _default_device()
    with default_dtype(dtype):
        model = GPTModel(config, tp_group=tp_group).to(target).eval()
    checkpoint = SafetensorsCheckpoint(path, arch.hf_base_prefix)
    try:
        HFWeightLoader(model, arch, tp_group).load((name, checkpoint.get(name)) for name in checkpoint.keys())
    finally:
        checkpoint.close()
    return model, arch


def _default_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def _resolve_tokenizer(tokenizer: Any | None, model_dir: PathLike | None) -> Any | None:
    from core.data.tokenizer import load_tokenizer

    if isinstance(tokenizer, str | os.PathLike):
        return load_tokenizer(tokenizer)
    if tokenizer is None and model_dir is not None:
        has_files = any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        return load_tokenizer(model_dir) if has_files else None
    return tokenizer


def _resolve_eos(
    eos_token_ids: Sequence[int] | None, model_dir: PathLike | None, tokenizer: Any | None
) -> frozenset[int]:
    """Explicit ids, else generation_config.json's, else config.json's (what HF generate stops at),
    else the tokenizer's eos_token_id, else none."""
    if eos_token_ids is not None:
        return frozenset(int(t) for t in eos_token_ids)
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name if model_dir is not None else None
        if path is not None and path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return frozenset(eos if isinstance(eos, list) else [eos])
    eos = getattr(tokenizer, "eos_token_id", None)
    return frozenset() if eos is None else frozenset([eos])
