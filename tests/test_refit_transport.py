"""Weight transports (rollout/transport.py): refits cross process boundaries bitwise and versioned.

(a) Fast, one process: a sender thread and a receiver on the main thread, over a gloo group and over
    shared memory, with slots smaller than a tensor (a tensor spans chunks) and buckets smaller than a
    tensor. Every tensor arrives bitwise with its dtype and shape. An update the engine refuses still
    drains the stream, so the sender finishes; a producer dying midway aborts the receiver's update
    (the engine then refuses to generate); either way the next refit lands.
(b) Across processes: a tp2 training world (gloo default group of its own) streams its gathered HF
    tensors from rank 0 to an engine process hosting a NativeEngine (which has its own default group,
    as a vLLM process would). The engine starts on model B; refit 1 sends A over the dedicated gloo
    group, refit 2 sends B back over shared memory (32 KiB slots: tensors span slots). After each, the
    engine's greedy outputs equal HF generate of the weights just sent.
(c) GPU only: CUDA IPC slots (1 GPU) and an NCCL group (2 GPUs).
"""

from __future__ import annotations

import os
import threading
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist import _PRELOAD, DistributedTestError, free_port, run_distributed
from hf_tiny_gen import build_tiny_llama
from test_refit_layouts import MAX_MODEL_LEN, MAX_TOKENS, PROMPTS, hf_greedy

from core.errors import InputError
from rollout.engines.base import GenerationEngine, WeightUpdateRejected
from rollout.transport import (
    GroupAddress,
    ProcessGroupReceiver,
    ProcessGroupSender,
    SharedMemoryAddress,
    SharedMemoryReceiver,
    SharedMemorySender,
    WeightReceiver,
    WeightSender,
    pack_bucket,
    receive_weights,
    unpack_bucket,
)
from rollout.types import GenerationRequest, SamplingParams

TIMEOUT = timedelta(seconds=60)


def _tensors(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        ("embed", torch.randn(100, 100, generator=g)),  # 40 KB: several slots, a bucket of its own
        ("bf16", torch.randn(7, 3, generator=g).to(torch.bfloat16)),
        ("scalar", torch.tensor(seed + 0.5)),
        ("empty", torch.empty(0, 4)),
        ("ids", torch.arange(seed, seed + 33)),
        ("mask", torch.rand(5, generator=g) > 0.5),
        ("transposed", torch.randn(8, 16, generator=g).t()),  # not contiguous
    ]


def test_pack_unpack_is_bitwise_and_views_one_buffer() -> None:
    bucket = _tensors(0)
    meta, flat = pack_bucket(bucket)
    out = unpack_bucket(meta, flat)
    assert [n for n, _ in out] == [n for n, _ in bucket]
    for (_, got), (_, want) in zip(out, bucket):
        assert got.dtype == want.dtype and torch.equal(got, want)
        assert got.numel() == 0 or got.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    assert all(s.offset % 64 == 0 for s in meta.tensors)


class _RecordingEngine(GenerationEngine):
    """Keeps the last complete update; refuses one that carries a tensor named 'reject'."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: dict[str, torch.Tensor] = {}

    max_model_len = 8
    vocab_size = 8

    def _generate_locked(self, requests, emit, cancelled) -> None:
        raise NotImplementedError

    def _load_weights_locked(self, named_tensors) -> None:
        received = {}
        for name, tensor in named_tensors:
            if name == "reject":
                raise WeightUpdateRejected("refused")
            received[name] = tensor.clone()
        self.weights = received

    def shutdown(self) -> None:
        pass


def _in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Start fn in a thread; the returned callable joins it and returns (or raises) its result."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 -- re-raised by join()
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(timeout=60)
        assert not thread.is_alive(), "sender thread hung"
        if "error" in box:
            raise box["error"]
        return box["result"]

    return join


def _pair(kind: str) -> tuple[Callable[[], WeightSender], Callable[[], WeightReceiver]]:
    """(make sender, make receiver): each end is built on the thread that uses it."""
    if kind == "process_group":
        port = free_port()
        address = GroupAddress("127.0.0.1", port, 2, "gloo")
        return (
            lambda: ProcessGroupSender(port=port, bucket_bytes=16 << 10, timeout=TIMEOUT),
            lambda: ProcessGroupReceiver(address, timeout=TIMEOUT),
        )
    port, key = free_port(), os.urandom(16)
    return (
        lambda: SharedMemorySender(slot_bytes=4096, bucket_bytes=16 << 10, port=port, authkey=key),
        lambda: SharedMemoryReceiver(SharedMemoryAddress("127.0.0.1", port, key), timeout=TIMEOUT),
    )


@pytest.mark.parametrize("kind", ["process_group", "shared_memory"])
def test_transport_delivers_bitwise_and_survives_a_refused_update(kind: str) -> None:
    make_sender, make_receiver = _pair(kind)

    def dying_producer() -> Iterator[tuple[str, torch.Tensor]]:
        yield from _tensors(3)[:3]
        raise ConnectionError("training rank died")

    refits = [(_tensors(1), 1), (_tensors(2) + [("reject", torch.ones(3))], 2), (dying_producer(), 3)]
    refits.append((_tensors(4), 4))

    def send_all() -> list[Any]:
        sender = make_sender()
        stats = []
        try:
            for tensors, version in refits:
                try:
                    stats.append(sender.send(tensors, version))
                except ConnectionError:
                    stats.append(None)
            return stats
        finally:
            sender.close()

    join = _in_thread(send_all)
    receiver, engine = make_receiver(), _RecordingEngine()
    try:
        assert receive_weights(engine, receiver) == 1
        first = dict(engine.weights)
        with pytest.raises(WeightUpdateRejected):
            receive_weights(engine, receiver)
        assert engine.weight_version == 1 and all(engine.weights[n] is t for n, t in first.items())
        with pytest.raises(RuntimeError, match="aborted .*training rank died"):
            receive_weights(engine, receiver)
        with pytest.raises(RuntimeError, match="mix of old and new weights"):
            engine.generate([GenerationRequest([1], SamplingParams(max_tokens=1))])
        assert receive_weights(engine, receiver) == 4
    finally:
        receiver.close()
    stats = join()
    assert stats[0].num_tensors == 7 and stats[0].num_buckets >= 2 and stats[2] is None
    for weights, (sent, _) in ((first, refits[0]), (engine.weights, refits[3])):
        assert list(weights) == [n for n, _ in sent]
        for name, tensor in sent:
            assert weights[name].dtype == tensor.dtype and torch.equal(weights[name], tensor), name
    assert engine.weight_version == 4


def test_receive_weights_rejects_a_stale_version_and_stays_in_sync() -> None:
    make_sender, make_receiver = _pair("process_group")

    def send_all() -> None:
        sender = make_sender()
        for version in (2, 1, 3):
            sender.send(_tensors(version), version)

    join = _in_thread(send_all)
    receiver, engine = make_receiver(), _RecordingEngine()
    assert receive_weights(engine, receiver) == 2
    with pytest.raises(InputError, match="must increase"):
        receive_weights(engine, receiver)
    assert receive_weights(engine, receiver) == 3
    join()
    assert torch.equal(engine.weights["ids"], torch.arange(3, 36))


# ---- (b) tp2 training world -> engine process ------------------------------------------------------


def _greedy(engine: GenerationEngine) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    return [r.samples[0].token_ids for r in engine.generate([GenerationRequest(p, params) for p in PROMPTS])]


def _engine_process(engine_dir: str, pg: GroupAddress, shm: SharedMemoryAddress, out_dir: str) -> None:
    from rollout.engines.native import NativeEngine

    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        # This process's own default group (a vLLM engine makes one): the transport must not touch it.
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        engine = NativeEngine(model_dir=engine_dir, max_model_len=MAX_MODEL_LEN, max_num_seqs=4)
        result: dict[str, Any] = {"before": _greedy(engine)}
        for name, receiver in (
            ("process_group", ProcessGroupReceiver(pg, timeout=TIMEOUT)),
            ("shared_memory", SharedMemoryReceiver(shm, timeout=TIMEOUT)),
        ):
            result[f"{name}_version"] = receive_weights(engine, receiver)
            result[name] = _greedy(engine)
            receiver.close()
        assert dist.get_world_size() == 1
        torch.save(result, out / "engine.pt")
    except BaseException:
        (out / "engine.err").write_text(traceback.format_exc())
        os._exit(1)


def _training_world(
    rank: int, world_size: int, dirs: list[str], pg_port: int, shm: SharedMemoryAddress
) -> Any:
    from core.bridge import load_hf
    from core.engine import load_full_weights
    from core.parallel import ParallelDims, build_groups
    from core.transformer.model import GPTModel
    from rollout.refit import training_weights_to_hf
    from rollout.transport import send_weights

    tp = build_groups(ParallelDims(tp=2, world_size=world_size), rank)
    senders: list[WeightSender | None] = [None, None]
    if rank == 0:
        senders = [
            ProcessGroupSender(port=pg_port, bucket_bytes=64 << 10, timeout=TIMEOUT),
            SharedMemorySender(
                slot_bytes=32 << 10, bucket_bytes=64 << 10, port=shm.port, authkey=shm.authkey
            ),
        ]
    stats = []
    for version, (hf_dir, sender) in enumerate(zip(dirs, senders), start=1):
        full = load_hf(hf_dir)
        model = GPTModel(full.config, tp_group=tp.tp_group)
        load_full_weights([model], full.state_dict(), tp)
        stats.append(send_weights(sender, training_weights_to_hf([model], tp, full.config), version))
    for sender in senders:
        if sender is not None:
            sender.close()
    return stats


@pytest.mark.slow
def test_tp2_training_world_refits_an_engine_process_over_a_group_then_shared_memory(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    # The engine starts on model B; refit 1 (process group) sends A, refit 2 (shared memory) sends B back.
    dirs = [build_tiny_llama(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 1))]
    pg_port, shm = free_port(), SharedMemoryAddress("127.0.0.1", free_port(), os.urandom(16))
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    engine_proc = ctx.Process(
        target=_engine_process,
        args=(str(dirs[1]), GroupAddress("127.0.0.1", pg_port, 2, "gloo"), shm, str(tmp_path)),
        daemon=True,
    )
    engine_proc.start()
    try:
        stats = run_distributed(_training_world, 2, [str(d) for d in dirs], pg_port, shm, timeout=180)
        engine_proc.join(timeout=60)
    except DistributedTestError:
        if (tmp_path / "engine.err").exists():
            raise AssertionError((tmp_path / "engine.err").read_text()) from None
        raise
    finally:
        if engine_proc.is_alive():
            engine_proc.kill()
    assert not (tmp_path / "engine.err").exists(), (tmp_path / "engine.err").read_text()
    got = torch.load(tmp_path / "engine.pt")
    assert stats[1] == [None, None] and stats[0][0].num_buckets > 1 and stats[0][1].num_buckets > 1
    hf = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in dirs]
    expected = [[hf_greedy(model, p) for p in PROMPTS] for model in hf]
    assert expected[0] != expected[1] and got["before"] == expected[1]
    assert got["process_group_version"] == 1 and got["process_group"] == expected[0]
    assert got["shared_memory_version"] == 2 and got["shared_memory"] == expected[1]


# ---- (c) GPU: CUDA IPC slots, NCCL group ----------------------------------------------------------


def _cuda_ipc_receiver(address: SharedMemoryAddress, out_path: str) -> None:
    engine, receiver = _RecordingEngine(), SharedMemoryReceiver(address, timeout=TIMEOUT)
    receive_weights(engine, receiver)
    torch.save({n: t.cpu() for n, t in engine.weights.items()} | {"_device": str(receiver.device)}, out_path)
    receiver.close()


@pytest.mark.slow
@pytest.mark.gpu
def test_cuda_ipc_slots_deliver_bitwise(tmp_path) -> None:
    sender = SharedMemorySender(slot_bytes=4096, bucket_bytes=16 << 10, device="cuda")
    proc = mp.get_context("spawn").Process(
        target=_cuda_ipc_receiver, args=(sender.address, str(tmp_path / "out.pt"))
    )
    proc.start()
    tensors = [(n, t.cuda()) for n, t in _tensors(5)]
    sender.send(tensors, 1)
    proc.join(timeout=120)
    sender.close()
    assert proc.exitcode == 0
    got = torch.load(tmp_path / "out.pt")
    assert got.pop("_device").startswith("cuda")
    for name, tensor in tensors:
        assert torch.equal(got[name], tensor.cpu()), name


def _nccl_receiver(address: GroupAddress, out_path: str) -> None:
    torch.cuda.set_device(1)
    engine, receiver = _RecordingEngine(), ProcessGroupReceiver(address, timeout=TIMEOUT)
    receive_weights(engine, receiver)
    torch.save({n: t.cpu() for n, t in engine.weights.items()} | {"_device": str(receiver.device)}, out_path)
    receiver.close()


@pytest.mark.slow
@pytest.mark.gpu(2)  # one NCCL rank per device
def test_nccl_group_delivers_bitwise(tmp_path) -> None:
    torch.cuda.set_device(0)
    sender = ProcessGroupSender(backend="nccl", bucket_bytes=16 << 10, timeout=TIMEOUT)
    proc = mp.get_context("spawn").Process(
        target=_nccl_receiver, args=(sender.address, str(tmp_path / "out.pt"))
    )
    proc.start()
    tensors = [(n, t.cuda()) for n, t in _tensors(6)]
    sender.send(tensors, 1)
    proc.join(timeout=120)
    sender.close()
    assert proc.exitcode == 0
    got = torch.load(tmp_path / "out.pt")
    assert got.pop("_device") == "cuda:1"
    for name, tensor in tensors:
        assert torch.equal(got[name], tensor.cpu()), name
