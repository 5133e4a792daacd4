"""Refit over the Ray object store (rl/cluster/object_store_transport.py) on a real local Ray cluster.

A tp2 policy worker group (2 gloo ranks) holds model A; generation workers start from a different
model B and are refitted through TransportWeightSync(transport="object_store"), the path a run with
`weight_transport: object_store` takes. Models are tiny random fp32 Llamas with peaked logits
(tests/hf_tiny_gen.py), so greedy token-for-token equality with HF transformers is a stable check.

- native engine: after the refit its greedy output is HF greedy of A (it was B's before) and it reports
  the refit's version;
- bounded memory: with 32 KiB buckets (~40 of them for the ~1.2 MB model) the sender never had more
  than `max_buckets_in_flight` (2) buckets put and not yet acknowledged by the receivers;
- abort: the producer failing mid-stream (on both tp ranks, so the gathers stay in step) fails the
  engine's update with the sender's error. The engine keeps its previous version and, having loaded part
  of the stream already, refuses to generate rather than serve a mix of versions (the GenerationEngine
  contract, as over the other transports: going back to the old weights would need a second full copy);
  the next complete refit restores generation;
- RayGenerator.update_weights streams from the driver over the same transport;
- vLLM (in-process engine inside a Ray actor): the same refit, greedy == HF greedy of A.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hf_tiny_gen import EOS_ID, build_tiny_llama
from ray_local import local_ray
from test_refit_layouts import MAX_MODEL_LEN, MAX_TOKENS, PROMPTS, hf_greedy

from core.config import ParallelConfig
from core.parallel.dims import ParallelDims
from rl.cluster import ResourcePool, WorkerGroup, WorkerGroupError
from rl.workers import PolicyWorker
from rollout.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow

CALL_TIMEOUT_S = 120.0
BUCKET_BYTES = 32 << 10


def _dying(stream: Iterator[tuple[str, torch.Tensor]], after: int) -> Iterator[tuple[str, torch.Tensor]]:
    for i, item in enumerate(stream):
        if i == after:
            raise ConnectionError("policy rank lost mid-refit")
        yield item


class ProbedPolicyWorker(PolicyWorker):
    """A PolicyWorker whose next refit can be made to fail, reporting its sender's bookkeeping."""

    def fail_next_refit(self, after: int) -> None:
        """The next send_weights' stream raises after `after` tensors (call on every rank)."""
        self._fail_after = after

    def send_weights(self, version: int) -> int:
        from rollout.transport import send_weights

        stream, after = self.model.hf_weights(), getattr(self, "_fail_after", None)
        self._fail_after = None
        self._last_stats = send_weights(
            self._sender, stream if after is None else _dying(stream, after), version
        )
        return version

    def sender_report(self) -> dict:
        return {
            "stats": self._last_stats,
            "peak": self._sender.peak_buckets_in_flight,
            "bound": self._sender.max_buckets_in_flight,
        }


# ---- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors need not import this test file
    with local_ray(object_store_mb=128):
        yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_llama")
    return {"a": build_tiny_llama(root / "a", seed=0), "b": build_tiny_llama(root / "b", seed=1)}


@pytest.fixture(scope="module")
def hf_expected(checkpoints) -> dict[str, list[list[int]]]:
    from transformers import AutoModelForCausalLM

    expected = {}
    for name, path in checkpoints.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        expected[name] = [hf_greedy(model, p) for p in PROMPTS]
    assert expected["a"] != expected["b"]
    return expected


def _group(worker_cls, name: str, world: int, dims: ParallelDims, *args, **kw):
    pool = ResourcePool(1, {"CPU": 1}, name=name, timeout_s=CALL_TIMEOUT_S)
    group = WorkerGroup(worker_cls, pool, world, dims, args, name=name, timeout_s=CALL_TIMEOUT_S, **kw)
    return group, pool


@pytest.fixture(scope="module")
def policy(ray_cluster, checkpoints) -> Iterator[WorkerGroup]:
    from rl.workers import PolicySpec

    spec = PolicySpec(init_from=str(checkpoints["a"]), parallel=ParallelConfig(tp=2))
    group, pool = _group(ProbedPolicyWorker, "policy", 2, ParallelDims(tp=2, world_size=2), spec)
    yield group
    group.shutdown()
    pool.remove()


def _engine_group(kind: str, checkpoints) -> tuple[WorkerGroup, ResourcePool]:
    from rl.workers import EngineSpec, GenerationWorker

    start = str(checkpoints["b"])
    spec = EngineSpec(
        kind=kind,
        init_from=start,
        hf_dir=start,
        max_model_len=MAX_MODEL_LEN,
        eos_token_ids=(EOS_ID,),
        kv_cache_gib=0.0625,
    )
    return _group(GenerationWorker, kind, 1, ParallelDims(world_size=1), spec, None, backend="none")


@pytest.fixture(scope="module")
def native(ray_cluster, checkpoints) -> Iterator[WorkerGroup]:
    group, pool = _engine_group("native", checkpoints)
    yield group
    group.shutdown()
    pool.remove()


def connect(policy: WorkerGroup, engines: WorkerGroup):
    from rl.workers import TransportWeightSync

    sync = TransportWeightSync(policy, engines, "object_store", bucket_bytes=BUCKET_BYTES)
    sync.connect()
    return sync


def greedy(engines: WorkerGroup) -> list[list[int]]:
    from rl.workers import RayGenerator

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    results = RayGenerator(engines).generate([GenerationRequest(p, params) for p in PROMPTS])
    return [r.samples[0].token_ids for r in results]


def version_of(engines: WorkerGroup) -> int:
    from rl.workers import RayGenerator

    return RayGenerator(engines).weight_version


# ---- tests -----------------------------------------------------------------------------------------------


def test_tp2_policy_refits_a_native_engine_through_the_object_store(policy, native, hf_expected) -> None:
    sync = connect(policy, native)
    version = version_of(native) + 1
    if version == 1:  # run alone or first: the engine still serves the model it was built from
        assert greedy(native) == hf_expected["b"]
    sync(version)
    assert version_of(native) == version
    assert greedy(native) == hf_expected["a"]


def test_sender_keeps_at_most_two_buckets_in_the_object_store(policy, native, hf_expected) -> None:
    sync = connect(policy, native)
    version = version_of(native) + 1
    sync(version)
    report = policy.run("sender_report", dispatch="rank0")
    assert report["bound"] == 2 and report["stats"].num_buckets >= 20  # far more buckets than the bound
    assert 1 <= report["peak"] <= report["bound"]
    assert version_of(native) == version and greedy(native) == hf_expected["a"]


def test_producer_failure_aborts_the_refit_and_the_engine_serves_no_mix(policy, native, hf_expected) -> None:
    sync = connect(policy, native)
    before = version_of(native) + 1
    sync(before)
    policy.run("fail_next_refit", 12, dispatch="all")  # a dozen tensors: several buckets already loaded
    with pytest.raises(WorkerGroupError, match="policy rank lost mid-refit"):
        sync(before + 1)
    assert version_of(native) == before  # queued behind the engine's failed receive
    with pytest.raises(WorkerGroupError, match="mix of old and new weights"):
        greedy(native)
    assert policy.run("sender_report", dispatch="rank0")["peak"] <= 2
    sync(before + 2)  # the next complete refit lands
    assert version_of(native) == before + 2 and greedy(native) == hf_expected["a"]


def test_ray_generator_update_weights_streams_from_the_driver(native, checkpoints, hf_expected) -> None:
    from safetensors.torch import load_file

    from rl.workers import RayGenerator

    version = version_of(native) + 1
    weights = load_file(checkpoints["b"] / "model.safetensors")
    RayGenerator(native).update_weights(iter(weights.items()), version)
    assert version_of(native) == version and greedy(native) == hf_expected["b"]


def test_vllm_engine_in_ray_accepts_an_object_store_refit(policy, checkpoints, hf_expected) -> None:
    pytest.importorskip("vllm")
    engines, pool = _engine_group("vllm", checkpoints)
    try:
        assert greedy(engines) == hf_expected["b"] and version_of(engines) == 0
        connect(policy, engines)(1)
        assert version_of(engines) == 1 and greedy(engines) == hf_expected["a"]
    finally:
        engines.shutdown()
        pool.remove()
