"""Weight transports: move a refit's HF-named tensors from the training side to engines elsewhere.

One refit on the wire (every transport):
    ("begin", version)  then per bucket  ("bucket", BucketMeta) + the bucket's bytes  then  ("end", None)
A bucket (see `rollout.refit.iter_buckets`) is packed into one flat uint8 buffer: each tensor's bytes
at a 64-byte aligned offset, so the receiver rebuilds every tensor as a view of that buffer without
copying (`unpack_bucket`). `BucketMeta` (names, shapes, dtypes, offsets) travels before the bytes.

Memory: the sender holds one bucket at a time (a process group: one packed flat buffer; shared memory:
none, it writes straight into the shared slots); the receiver holds one received bucket plus whatever
the engine keeps referencing from earlier ones (the native engine buffers the q/k/v pieces of a fused
parameter until all have come). Never a second full copy of the model.

Versions: the receiver side applies a whole refit with ONE `engine.update_weights(stream, version)`
(`receive_weights`), whose lock keeps generation out until the last bucket is in, so an engine never
serves a mix of versions.

Transports here (same host or cluster; none needs Ray):
- `ProcessGroupSender/Receiver`: a dedicated torch.distributed group (gloo on CPU, NCCL on GPU) of
  world 1 + receivers, built on its own TCPStore and never registered as (or through) the default
  group, so it collides neither with the trainer's default group nor with the one vLLM creates in an
  engine process. Messages are pickles broadcast from rank 0; each bucket is one flat broadcast.
  Several receivers (e.g. the ranks of a TP engine) get every bucket from one broadcast.
- `SharedMemorySender/Receiver`: same-host processes. The sender owns `num_slots` reusable buffers of
  `slot_bytes` (CPU: files in /dev/shm mapped shared; CUDA: device buffers shared by CUDA IPC handles) and writes
  each bucket's bytes into them slot by slot (a tensor larger than a slot spans several); control
  messages and slot-free acks go over a local socket. With two slots the sender fills one while the
  receiver copies the other out.
- Same process: `rollout.refit.refit_engine` (no transport).

Another transport (e.g. the Ray object store in rl/) subclasses `WeightSender`/`WeightReceiver` with
four methods, or ships `pack_bucket`'s (meta, flat) pairs itself and feeds `unpack_bucket` on the far
side into `engine.update_weights`.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import weakref
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing import connection
from typing import Any

import torch
import torch.distributed as dist

from core.errors import InputError
from rollout.engines.base import GenerationEngine
from rollout.refit import NamedTensor, RefitStats, iter_buckets, tensor_bytes

ALIGN_BYTES = 64
DEFAULT_TIMEOUT = timedelta(minutes=30)


# ---- bucket layout ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSlot:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes from the start of the bucket's flat buffer

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class BucketMeta:
    """Where each tensor of a bucket lives in its flat uint8 buffer of `nbytes` bytes."""

    tensors: tuple[TensorSlot, ...]
    nbytes: int

    @staticmethod
    def of(bucket: list[NamedTensor]) -> BucketMeta:
        slots, offset = [], 0
        for name, tensor in bucket:
            offset = -(-offset // ALIGN_BYTES) * ALIGN_BYTES
            slots.append(TensorSlot(name, tuple(tensor.shape), tensor.dtype, offset))
            offset += tensor_bytes(tensor)
        return BucketMeta(tuple(slots), offset)


def tensor_as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 view of the tensor's bytes (a copy only if it was not contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def pack_bucket(
    bucket: list[NamedTensor], device: torch.device | str = "cpu"
) -> tuple[BucketMeta, torch.Tensor]:
    """The bucket as (layout, one flat uint8 buffer on `device`)."""
    meta = BucketMeta.of(bucket)
    flat = torch.empty(meta.nbytes, dtype=torch.uint8, device=device)
    for slot, (_, tensor) in zip(meta.tensors, bucket):
        flat[slot.offset : slot.offset + slot.nbytes].copy_(tensor_as_bytes(tensor))
    return meta, flat


def unpack_bucket(meta: BucketMeta, flat: torch.Tensor) -> list[NamedTensor]:
    """The bucket's tensors as views of `flat` (no copy): they live as long as someone holds one."""
    if flat.dtype != torch.uint8 or flat.numel() != meta.nbytes:
        raise InputError(f"bucket buffer: expected {meta.nbytes} uint8, got {flat.numel()} {flat.dtype}")
    return [(s.name, flat[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape)) for s in meta.tensors]


# ---- sender / receiver interface -------------------------------------------------------------------


class WeightSender(ABC):
    """Ships refits (one `send` each) to the receivers connected to it."""

    def __init__(self, bucket_bytes: int) -> None:
        self.bucket_bytes = bucket_bytes

    def send(self, named_tensors: Iterable[NamedTensor], version: int) -> RefitStats:
        """Stream a full set of HF-named weights as `version`. Returns once every receiver has taken
        every byte out of the transport (not necessarily loaded it yet)."""
        tensors = num_bytes = buckets = 0
        self._send_message(("begin", version))
        producing = iter(iter_buckets(named_tensors, self.bucket_bytes))
        while True:
            try:
                bucket = next(producing, None)
            except Exception as exc:
                # The producer died (e.g. a training rank): tell the receivers, whose update fails.
                self._send_message(("abort", f"{type(exc).__name__}: {exc}"))
                raise
            if bucket is None:
                break
            meta = BucketMeta.of(bucket)
            self._send_message(("bucket", meta))
            self._send_bucket(meta, bucket)
            tensors, num_bytes, buckets = tensors + len(bucket), num_bytes + meta.nbytes, buckets + 1
        self._send_message(("end", None))
        self._flush()
        return RefitStats(tensors, num_bytes, buckets)

    @abstractmethod
    def _send_message(self, message: tuple[str, Any]) -> None:
        """Deliver a small picklable message to every receiver, in order."""

    @abstractmethod
    def _send_bucket(self, meta: BucketMeta, bucket: list[NamedTensor]) -> None:
        """Deliver the bucket's bytes (laid out as `meta`) to every receiver."""

    def _flush(self) -> None:
        """Wait until the receivers have everything (transports with shared buffers)."""
        return None

    def close(self) -> None:
        return None


class WeightReceiver(ABC):
    """The engine side of a transport: yields each refit's tensors as they arrive."""

    def receive(self) -> tuple[int, Iterator[NamedTensor]]:
        """Wait for the next refit; return its version and its tensor stream. The stream must be
        consumed to the end before the next `receive` (the sender blocks until it is)."""
        kind, version = self._recv_message()
        if kind != "begin":
            raise RuntimeError(f"weight transport: expected the start of a refit, got {kind!r}")
        return version, self._stream()

    def _stream(self) -> Iterator[NamedTensor]:
        while True:
            kind, payload = self._recv_message()
            if kind == "end":
                return
            if kind == "abort":
                raise RuntimeError(f"weight transport: the sender aborted this refit ({payload})")
            if kind != "bucket":
                raise RuntimeError(f"weight transport: unexpected message {kind!r} inside a refit")
            yield from unpack_bucket(payload, self._recv_bucket(payload))

    @abstractmethod
    def _recv_message(self) -> tuple[str, Any]: ...

    @abstractmethod
    def _recv_bucket(self, meta: BucketMeta) -> torch.Tensor:
        """The bucket's flat uint8 buffer, owned by the caller (never reused by the transport)."""

    def close(self) -> None:
        return None


def send_weights(
    sender: WeightSender | None, named_tensors: Iterable[NamedTensor], version: int
) -> RefitStats | None:
    """Called by every rank that produces the stream (it is collective over tp/ep/pp): the rank that
    holds the sender ships it, the others only drive their part of the gathers."""
    if sender is None:
        for _ in named_tensors:
            pass
        return None
    return sender.send(named_tensors, version)


def receive_weights(engine: GenerationEngine, receiver: WeightReceiver) -> int:
    """Receive one refit into `engine` as a single versioned `update_weights`; returns the version.

    If the engine refuses or fails the update, the rest of the stream is still drained so the sender
    is not left blocked, and the engine's error is raised.
    """
    version, stream = receiver.receive()
    try:
        engine.update_weights(stream, version)
    finally:
        for _ in stream:
            pass
    return version


# ---- torch.distributed process group ------------------------------------------------------------------


@dataclass(frozen=True)
class GroupAddress:
    """Where receivers meet the sender: its TCPStore, the group size and backend."""

    host: str
    port: int
    world_size: int  # 1 sender + receivers
    backend: str


def _new_group(address: GroupAddress, rank: int, store: dist.Store, timeout: timedelta) -> Any:
    """A process group object used directly (pg.broadcast), outside torch.distributed's registry."""
    prefixed = dist.PrefixStore("tandem-weights", store)
    if address.backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, address.world_size, timeout)
    if address.backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, address.world_size, options)
    raise InputError(f"weight transport backend must be 'gloo' or 'nccl', got {address.backend!r}")


def _default_device(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


class _GroupEndpoint:
    """Rank `rank` of the transport group; the group is built on first use (it waits for all ranks)."""

    def __init__(
        self,
        address: GroupAddress,
        rank: int,
        store: dist.Store | None,
        device: torch.device,
        timeout: timedelta,
    ):
        self.address, self.rank, self.device, self._timeout = address, rank, device, timeout
        self._store = store  # None: connect to the sender's store on first use
        self._pg: Any = None

    def broadcast(self, tensor: torch.Tensor) -> None:
        if self._pg is None:
            if self._store is None:
                a = self.address
                self._store = dist.TCPStore(a.host, a.port, a.world_size, False, self._timeout)
            self._pg = _new_group(self.address, self.rank, self._store, self._timeout)
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self._pg.broadcast([tensor], options).wait()
        if tensor.is_cuda:
            torch.cuda.current_stream(tensor.device).synchronize()

    def broadcast_object(self, obj: object = None) -> object:
        """Rank 0 sends `obj`; every rank returns it."""
        length = torch.zeros(1, dtype=torch.int64, device=self.device)
        data = pickle.dumps(obj) if self.rank == 0 else b""
        length[0] = len(data)
        self.broadcast(length)
        if self.rank == 0:
            payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        else:
            payload = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
        self.broadcast(payload)
        return obj if self.rank == 0 else pickle.loads(payload.cpu().numpy().tobytes())

    def close(self) -> None:
        self._pg = None


class ProcessGroupSender(WeightSender):
    """Rank 0 of a dedicated group. Hand `address` to the receivers (ranks 1..num_receivers).

    host/port: where this process serves the group's TCPStore (port 0: a free one, see `address`).
    backend: "gloo" (CPU buffers) or "nccl" (buffers on this process's current CUDA device).
    """

    def __init__(
        self,
        num_receivers: int = 1,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        backend: str = "gloo",
        bucket_bytes: int = 256 << 20,
        timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(bucket_bytes)
        if num_receivers < 1:
            raise InputError(f"num_receivers must be >= 1, got {num_receivers}")
        store = dist.TCPStore(host, port, 1 + num_receivers, True, timeout, wait_for_workers=False)
        self.address = GroupAddress(host, store.port, 1 + num_receivers, backend)
        self._group = _GroupEndpoint(self.address, 0, store, _default_device(backend), timeout)

    def _send_message(self, message: tuple[str, Any]) -> None:
        self._group.broadcast_object(message)

    def _send_bucket(self, meta: BucketMeta, bucket: list[NamedTensor]) -> None:
        self._group.broadcast(pack_bucket(bucket, self._group.device)[1])

    def close(self) -> None:
        self._group.close()


class ProcessGroupReceiver(WeightReceiver):
    """Rank `rank` (1..) of the sender's group; buckets arrive on `device` (default: CPU for gloo,
    the current CUDA device for NCCL)."""

    def __init__(
        self,
        address: GroupAddress,
        rank: int = 1,
        *,
        device: torch.device | str | None = None,
        timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        if not 1 <= rank < address.world_size:
            raise InputError(f"receiver rank must be in 1..{address.world_size - 1}, got {rank}")
        self.device = torch.device(device) if device is not None else _default_device(address.backend)
        self._group = _GroupEndpoint(address, rank, None, self.device, timeout)

    def _recv_message(self) -> tuple[str, Any]:
        return self._group.broadcast_object()  # type: ignore[return-value]

    def _recv_bucket(self, meta: BucketMeta) -> torch.Tensor:
        flat = torch.empty(meta.nbytes, dtype=torch.uint8, device=self._group.device)
        self._group.broadcast(flat)
        return flat

    def close(self) -> None:
        self._group.close()


# ---- shared memory (same host) ----------------------------------------------------------------------


@dataclass(frozen=True)
class SharedMemoryAddress:
    """The sender's local control socket and its key (hand both to the receivers)."""

    host: str
    port: int
    authkey: bytes


class _CpuSlots:
    """`count` buffers in files under /dev/shm, mapped shared (MAP_SHARED) by sender and receivers.
    The files are unlinked as soon as every receiver has mapped them, so a crash leaks nothing."""

    def __init__(self, count: int, nbytes: int) -> None:
        root = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self._paths = []
        for _ in range(count):
            fd, path = tempfile.mkstemp(prefix="tandem-weights-", dir=root)
            os.close(fd)
            self._paths.append(path)
        self.tensors = [torch.from_file(p, shared=True, size=nbytes, dtype=torch.uint8) for p in self._paths]
        self._cleanup = weakref.finalize(self, _unlink_all, list(self._paths))  # also at exit

    def descriptor(self) -> tuple[str, Any]:
        return "cpu", [(p, t.numel()) for p, t in zip(self._paths, self.tensors)]

    def attached(self) -> None:
        self._cleanup()

    def close(self) -> None:
        self._cleanup()
        self.tensors = []


def _unlink_all(paths: list[str]) -> None:
    for path in paths:
        if os.path.exists(path):
            os.unlink(path)


class _CudaSlots:
    """`count` device buffers on the sender's GPU; receivers map them through CUDA IPC handles."""

    def __init__(self, count: int, nbytes: int, device: torch.device) -> None:
        self.tensors = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(count)]

    def descriptor(self) -> tuple[str, Any]:
        from torch.multiprocessing.reductions import reduce_tensor

        return "cuda", [reduce_tensor(t) for t in self.tensors]

    def attached(self) -> None:
        return None

    def close(self) -> None:
        self.tensors = []


def _attach_slots(descriptor: tuple[str, Any]) -> list[torch.Tensor]:
    kind, items = descriptor
    if kind == "cuda":
        return [rebuild(*args) for rebuild, args in items]
    return [torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8) for path, nbytes in items]


class SharedMemorySender(WeightSender):
    """Same-host transport through `num_slots` reusable shared buffers of `slot_bytes` each.

    device "cpu": files in /dev/shm, mapped shared; a CUDA device: buffers there, shared by CUDA IPC (the
    receivers must see that GPU under the same index). Hand `address` to the receivers; they connect
    before the first `send`, which waits for all `num_receivers` of them.
    """

    def __init__(
        self,
        num_receivers: int = 1,
        *,
        slot_bytes: int = 64 << 20,
        num_slots: int = 2,
        device: torch.device | str = "cpu",
        bucket_bytes: int = 256 << 20,
        host: str = "127.0.0.1",
        port: int = 0,
        authkey: bytes | None = None,
    ) -> None:
        super().__init__(bucket_bytes)
        if num_receivers < 1 or num_slots < 1 or slot_bytes < 4096:
            raise InputError(
                f"SharedMemorySender: need num_receivers >= 1, num_slots >= 1, slot_bytes >= 4096; got "
                f"{num_receivers}, {num_slots}, {slot_bytes}"
            )
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError("SharedMemorySender: device is CUDA but CUDA is not available")
        if device.type not in ("cpu", "cuda"):
            raise InputError(f"SharedMemorySender: device must be cpu or cuda, got {device}")
        self.slot_bytes, self.num_receivers, self.device = slot_bytes, num_receivers, device
        authkey = authkey or os.urandom(16)
        self._listener = connection.Listener((host, port), authkey=authkey)
        self.address = SharedMemoryAddress(host, self._listener.address[1], authkey)
        self._slots = (
            _CudaSlots(num_slots, slot_bytes, device)
            if device.type == "cuda"
            else _CpuSlots(num_slots, slot_bytes)
        )
        self._conns: list[connection.Connection] = []
        self._free: deque[int] = deque(range(num_slots))
        self._acks = [0] * num_slots  # receivers that still hold slot i
        self._chunk: tuple[int, int] | None = None  # (chunk index in the bucket, slot) being filled

    def connect(self) -> None:
        """Wait for every receiver to connect and hand them the slots (done by the first send)."""
        descriptor = self._slots.descriptor()
        while len(self._conns) < self.num_receivers:
            conn = self._listener.accept()
            conn.send(("slots", descriptor))
            self._conns.append(conn)
        for conn in self._conns:
            if conn.recv() != ("attached", None):
                raise RuntimeError("shared-memory transport: a receiver failed to map the slots")
        self._slots.attached()

    def _send_message(self, message: tuple[str, Any]) -> None:
        if not self._conns:
            self.connect()
        for conn in self._conns:
            conn.send(message)

    def _send_bucket(self, meta: BucketMeta, bucket: list[NamedTensor]) -> None:
        for slot, (_, tensor) in zip(meta.tensors, bucket):
            data = tensor_as_bytes(tensor)
            done = 0
            while done < slot.nbytes:  # a tensor may span several chunks, a chunk several tensors
                chunk, within = divmod(slot.offset + done, self.slot_bytes)
                buffer = self._slots.tensors[self._open_chunk(chunk)]
                n = min(slot.nbytes - done, self.slot_bytes - within)
                buffer[within : within + n].copy_(data[done : done + n])
                done += n
        self._ship_chunk(meta.nbytes)

    def _open_chunk(self, chunk: int) -> int:
        """The slot that holds bytes [chunk * slot_bytes, ...) of the current bucket."""
        if self._chunk is not None and self._chunk[0] == chunk:
            return self._chunk[1]
        if self._chunk is not None:
            self._ship_chunk(chunk * self.slot_bytes)
        while not self._free:
            self._wait_ack()
        self._chunk = (chunk, self._free.popleft())
        return self._chunk[1]

    def _ship_chunk(self, end: int) -> None:
        """Tell the receivers the open chunk is ready: bucket bytes [start, end) are in its slot."""
        if self._chunk is None:
            return
        chunk, slot = self._chunk
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        start = chunk * self.slot_bytes
        self._send_message(("chunk", (slot, start, min(end, start + self.slot_bytes))))
        self._acks[slot] = len(self._conns)
        self._chunk = None

    def _wait_ack(self) -> None:
        ready = connection.wait(self._conns)
        for conn in ready:
            kind, slot = conn.recv()
            if kind != "free":
                raise RuntimeError(f"shared-memory transport: unexpected reply {kind!r}")
            self._acks[slot] -= 1
            if self._acks[slot] == 0:
                self._free.append(slot)

    def _flush(self) -> None:
        while any(self._acks):
            self._wait_ack()

    def close(self) -> None:
        for conn in self._conns:
            conn.close()
        self._conns = []
        self._listener.close()
        self._slots.close()


def _connect(address: SharedMemoryAddress, timeout: timedelta) -> connection.Connection:
    """Connect to the sender's socket, retrying while it is not listening yet."""
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        try:
            return connection.Client((address.host, address.port), authkey=address.authkey)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class SharedMemoryReceiver(WeightReceiver):
    """Connects to a `SharedMemorySender` (on the first `receive`, so building one never blocks);
    copies each bucket out of the shared slots into a buffer of its own on `device` (default: CPU, or
    the sender's GPU for CUDA slots)."""

    def __init__(
        self,
        address: SharedMemoryAddress,
        *,
        device: torch.device | str | None = None,
        timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        self._address, self._timeout = address, timeout
        self.device = torch.device(device) if device is not None else None
        self._conn: connection.Connection | None = None
        self._slots: list[torch.Tensor] = []

    def _connect(self) -> connection.Connection:
        conn = _connect(self._address, self._timeout)
        kind, descriptor = conn.recv()
        if kind != "slots":
            raise RuntimeError(f"shared-memory transport: expected the slot descriptor, got {kind!r}")
        self._slots = _attach_slots(descriptor)
        conn.send(("attached", None))
        self.device = self.device or self._slots[0].device
        return conn

    def _recv_message(self) -> tuple[str, Any]:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn.recv()

    def _recv_bucket(self, meta: BucketMeta) -> torch.Tensor:
        flat = torch.empty(meta.nbytes, dtype=torch.uint8, device=self.device)
        received = 0
        while received < meta.nbytes:
            kind, (slot, start, end) = self._recv_message()
            if kind != "chunk":
                raise RuntimeError(f"shared-memory transport: expected a chunk, got {kind!r}")
            flat[start:end].copy_(self._slots[slot][: end - start])
            if self._slots[slot].is_cuda or flat.is_cuda:
                torch.cuda.synchronize()
            self._conn.send(("free", slot))
            received += end - start
        return flat

    def close(self) -> None:
        self._slots = []
        if self._conn is not None:
            self._conn.close()
            self._conn = None
