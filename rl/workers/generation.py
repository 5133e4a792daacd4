"""Generation workers: a rollout engine in its own actor (or inside a policy worker, colocated).

A GenerationWorker group runs with backend="none": each actor is one engine replica owning its process
(vLLM's in-process engine creates or adopts the default process group, see rl/cluster/worker.py), and
requests are split over the replicas like a batch over dp ranks. Weights arrive through a weight
receiver (`connect_weight_receiver`, then `receive_weights` per refit, applied as one versioned update):
a rollout.transport one (process group, shared memory) or an rl.cluster.object_store_transport one,
chosen by the type of the sender's address. Every path streams bucket by bucket; none ships the whole
model at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from core.config import PrecisionConfig
from rl.cluster.worker import Worker
from rl.workers.specs import EngineSpec
from rollout.types import GenerationRequest, GenerationResult


def _tokenizer(spec: EngineSpec) -> Any:
    if spec.tokenizer_dir is None:
        return None
    from core.data.tokenizer import load_tokenizer

    return load_tokenizer(spec.tokenizer_dir)


def build_native_engine(spec: EngineSpec, model: Any) -> Any:
    """A NativeEngine on `model`'s parameters in place (its device, dtype and tp group)."""
    from rollout.engines.native import NativeEngine

    return NativeEngine(
        model,
        tokenizer=_tokenizer(spec),
        max_model_len=spec.max_model_len,
        max_num_seqs=spec.max_num_seqs,
        seed=spec.seed,
        eos_token_ids=list(spec.eos_token_ids),
    )


def build_engine(spec: EngineSpec, device: torch.device, param_dtype: torch.dtype) -> Any:
    """An engine that owns its weights: native on a copy of the initial model, or vLLM on spec.hf_dir."""
    if spec.kind == "native":
        from algorithms.rl_inputs import load_init_model, resolve_init

        model = load_init_model(resolve_init(spec.init_from)).to(device=device, dtype=param_dtype).eval()
        return build_native_engine(spec, model)
    # in-process vLLM: without this a requested "uni" executor silently becomes multiprocess
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from rollout.engines.vllm_engine import VLLMEngine

    if spec.hf_dir is None:
        raise ValueError("EngineSpec(kind='vllm') needs hf_dir")
    return VLLMEngine(
        spec.hf_dir, max_model_len=spec.max_model_len, kv_cache_gib=spec.kv_cache_gib, seed=spec.seed
    )


class EngineHostMixin:
    """The generator methods of a worker holding `self.engine` (a rollout GenerationEngine)."""

    engine: Any

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return self.engine.generate(list(requests))

    def weight_version(self) -> int:
        return self.engine.weight_version

    def sleep(self, level: int = 1) -> None:
        self.engine.sleep(level)

    def wake_up(self) -> None:
        self.engine.wake_up()


class GenerationWorker(EngineHostMixin, Worker):
    """One engine replica (backend="none" group: no torch.distributed world of ours)."""

    role = "generation"

    def __init__(self, spec: EngineSpec, precision: PrecisionConfig | None = None) -> None:
        self.spec, self.precision = spec, precision or PrecisionConfig()
        self.engine: Any = None
        self._receiver: Any = None

    def setup(self) -> None:
        from core.utils.device import param_dtype

        self.close()
        self.engine = build_engine(self.spec, self.device, param_dtype(self.precision, self.device))

    def connect_weight_receiver(self, address: Any, timeout_s: float) -> None:
        """Join the policy's weight sender (a process group forms at the first refit)."""
        self._close_receiver()
        self._receiver = self._weight_receiver(address, timeout_s)

    def _weight_receiver(self, address: Any, timeout_s: float) -> Any:
        """A receiver for a sender's address: object store (receiver `rank`), shared memory, or a process
        group (receiver `rank + 1`: the sender is rank 0)."""
        from datetime import timedelta

        from rl.cluster.object_store_transport import ObjectStoreAddress, ObjectStoreReceiver
        from rollout.transport import ProcessGroupReceiver, SharedMemoryAddress, SharedMemoryReceiver

        timeout = timedelta(seconds=timeout_s)
        if isinstance(address, ObjectStoreAddress):
            return ObjectStoreReceiver(address, self.rank, device=self.device, timeout=timeout)
        if isinstance(address, SharedMemoryAddress):
            return SharedMemoryReceiver(address, device=self.device, timeout=timeout)
        return ProcessGroupReceiver(address, self.rank + 1, device=self.device, timeout=timeout)

    def receive_weights(self) -> int:
        """One refit from the connected sender, applied as one versioned update; returns the version."""
        from rollout.transport import receive_weights

        self.engine.wake_up()  # a sleeping engine refuses updates
        return receive_weights(self.engine, self._receiver)

    def receive_weights_from(self, address: Any, timeout_s: float) -> int:
        """One refit from a one-off sender (RayGenerator.update_weights streams from the driver), leaving
        the connected receiver as it is; returns the version."""
        from rollout.transport import receive_weights

        receiver = self._weight_receiver(address, timeout_s)
        try:
            self.engine.wake_up()
            return receive_weights(self.engine, receiver)
        finally:
            receiver.close()

    def _close_receiver(self) -> None:
        if self._receiver is not None:
            self._receiver.close()
        self._receiver = None

    def close(self) -> None:
        self._close_receiver()
        if self.engine is not None:
            self.engine.shutdown()
        self.engine = None
