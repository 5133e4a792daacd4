"""The generation-engine interface every engine (vLLM, our native engine) implements.

Contract (what the RL loops rely on):
- `generate` / `generate_stream` take token-id requests and return token ids + sampler logprobs.
- Weights have an integer version. A batch of requests runs start to finish under one version:
  one lock is held for a whole generation batch and for a whole `update_weights`, so an update
  waits for in-flight generation and a generation waits for an in-flight update.
- `update_weights` takes the *whole* model (HF names) in one call and consumes it lazily; a partial
  stream would leave fused layers (qkv, gate_up) half old, half new, so there is no per-bucket call.
  If an update fails midway the engine refuses to generate until a later update succeeds.

Subclasses implement the `_..._locked` hooks, which always run with the lock held.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import replace

import torch

from core.errors import InputError
from rollout.types import GenerationRequest, GenerationResult, Sample

# Called by an engine as each request finishes: (index in the batch, its samples).
EmitSamples = Callable[[int, list[Sample]], None]

_DONE = object()


class WeightUpdateRejected(InputError):
    """An engine refused an update before touching any weight: it keeps its old weights and version."""


class GenerationEngine(ABC):
    """Batched token-in/token-out generation with versioned, atomically refitted weights."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._weight_version = 0
        self._failed_update: int | None = None  # version whose update raised midway, if any
        self._sleeping = False
        self._unnamed_ids = itertools.count()

    # ---- what an engine provides -------------------------------------------------------------

    @property
    @abstractmethod
    def max_model_len(self) -> int:
        """Context length: prompt + max_tokens of every request must fit."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids the model embeds; larger ids are rejected."""

    @abstractmethod
    def _generate_locked(
        self, requests: list[GenerationRequest], emit: EmitSamples, cancelled: Callable[[], bool]
    ) -> None:
        """Run `requests` to completion, calling `emit` as each finishes (any order). Stop and drop
        the unfinished ones when `cancelled()` turns true or on error."""

    @abstractmethod
    def _load_weights_locked(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load a full set of HF-named weights in place and drop state derived from the old ones.
        Raise `WeightUpdateRejected` for a bad update caught before any weight changed; any other
        error leaves the engine refusing to generate until a later update succeeds."""

    def _sleep_locked(self, level: int) -> None:
        """Release memory (weights/KV cache) while idle; engines without sleep support do nothing."""
        return None

    def _wake_up_locked(self) -> None:
        """Undo `_sleep_locked`."""
        return None

    @abstractmethod
    def shutdown(self) -> None:
        """Free the engine's resources; the object is unusable afterwards."""

    # ---- public API --------------------------------------------------------------------------

    @property
    def weight_version(self) -> int:
        return self._weight_version

    @property
    def is_sleeping(self) -> bool:
        return self._sleeping

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate all requests as one batch; results come back in request order."""
        batch = self._prepare(requests)
        results: list[GenerationResult | None] = [None] * len(batch)

        def store(index: int, result: GenerationResult) -> None:
            results[index] = result

        self._run(batch, store, cancelled=lambda: False)
        return [r for r in results if r is not None]

    async def generate_stream(self, requests: Sequence[GenerationRequest]) -> AsyncIterator[GenerationResult]:
        """Yield each request's result as soon as it finishes (completion order, not request order).

        The batch runs in a worker thread so the event loop stays free. Leaving the loop early
        (break, aclose, task cancel) aborts the requests still running.
        """
        batch = self._prepare(requests)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()

        def emit(_: int, result: GenerationResult) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, result)

        worker = asyncio.ensure_future(asyncio.to_thread(self._run, batch, emit, stop.is_set))
        # Runs on the loop after every emit's put (both go through the loop's FIFO callback queue).
        worker.add_done_callback(lambda _: queue.put_nowait(_DONE))
        try:
            while (item := await queue.get()) is not _DONE:
                yield item  # type: ignore[misc]
            worker.result()  # re-raise an engine error after the results that did finish
        finally:
            stop.set()
            await asyncio.wait([worker])  # the lock is released before anyone may use the engine

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Replace all weights (HF names, any float dtype, CPU or device tensors) and set `version`.

        Blocks until in-flight generation finishes; generation waits for the update. `version` must
        be greater than the current one, so a stale refit cannot overwrite a newer one.
        """
        if not isinstance(version, int) or isinstance(version, bool):
            raise InputError(f"weight version must be an int, got {version!r}")
        with self._lock:
            if version <= self._weight_version:
                raise InputError(
                    f"weight version must increase: engine has {self._weight_version}, got {version}"
                )
            if self._sleeping:
                raise RuntimeError("update_weights on a sleeping engine: call wake_up() first")
            self._failed_update = version
            try:
                self._load_weights_locked(named_tensors)
            except WeightUpdateRejected:
                self._failed_update = None
                raise
            self._failed_update = None
            self._weight_version = version

    def sleep(self, level: int = 1) -> None:
        """Free memory between rollouts (level 1: offload weights, drop KV cache; 2: drop both).
        Waits for in-flight generation; generate() raises until wake_up()."""
        with self._lock:
            if not self._sleeping:
                self._sleep_locked(level)
                self._sleeping = True

    def wake_up(self) -> None:
        with self._lock:
            if self._sleeping:
                self._wake_up_locked()
                self._sleeping = False

    def __enter__(self) -> GenerationEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- shared plumbing ---------------------------------------------------------------------

    def _prepare(self, requests: Sequence[GenerationRequest]) -> list[GenerationRequest]:
        """Validate the whole batch before any of it reaches the engine; name unnamed requests."""
        if isinstance(requests, GenerationRequest) or not isinstance(requests, Sequence):
            raise InputError(f"requests must be a list of GenerationRequest, got {type(requests).__name__}")
        batch = []
        for req in requests:
            if not isinstance(req, GenerationRequest):
                raise InputError(f"requests must hold GenerationRequest objects, got {type(req).__name__}")
            req.check_fits(self.max_model_len, self.vocab_size)
            if req.request_id is None:
                req = replace(req, request_id=f"req-{next(self._unnamed_ids)}")
            batch.append(req)
        return batch

    def _run(
        self,
        batch: list[GenerationRequest],
        on_result: Callable[[int, GenerationResult], None],
        cancelled: Callable[[], bool],
    ) -> None:
        with self._lock:
            self._check_can_generate()
            version = self._weight_version

            def emit(index: int, samples: list[Sample]) -> None:
                req = batch[index]
                on_result(
                    index, GenerationResult(req.request_id or "", req.prompt_token_ids, samples, version)
                )

            if batch:
                self._generate_locked(batch, emit, cancelled)

    def _check_can_generate(self) -> None:
        if self._sleeping:
            raise RuntimeError("generate on a sleeping engine: call wake_up() first")
        if self._failed_update is not None:
            raise RuntimeError(
                f"the update to weight version {self._failed_update} failed midway, so the engine holds "
                "a mix of old and new weights: call update_weights with a complete set first"
            )
