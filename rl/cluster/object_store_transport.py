"""A weight transport through the Ray object store: refits between any Ray processes, any nodes.

    sender = ObjectStoreSender(num_receivers=2, bucket_bytes=256 << 20)    # policy rank 0 (or the driver)
    receiver = ObjectStoreReceiver(sender.address, index=i)                # engine worker i, any node
    sender.send(hf_weights, version)        ||      receive_weights(engine, receiver)

The wire protocol is rollout/transport.py's (begin, then per bucket its `BucketMeta` and its bytes, then
end or abort); this module only says how messages and bytes travel:
- bytes: each bucket is ONE `ray.put` of its tensors as uint8 numpy arrays (Ray serialises numpy
  zero-copy, ~10x faster than torch tensors; ENVIRONMENT.md). A bucket is shared by every receiver
  (each `ray.get`s the same object) and never split: `bucket_bytes` bounds it as for the other
  transports (a tensor larger than that travels alone).
- messages: a small async `_Channel` actor, created by the sender next to itself (num_cpus=0), holds a
  FIFO mailbox per receiver. Messages pass through it as pickled bytes plus a list of ObjectRefs (a
  bucket's message carries its ref; inside a list Ray hands the reference over instead of resolving
  it), so the channel's process never unpickles a BucketMeta and starts in ~1 s without torch.

Memory bound: the sender keeps the ObjectRef of every bucket it has put and that some receiver has not
acknowledged yet (`_in_flight`). A receiver acknowledges a bucket once it has copied the bytes into a
buffer of its own and dropped its reference. Before putting bucket k the sender waits until fewer than
`max_buckets_in_flight` buckets are unacknowledged (default 2: the sender serialises one bucket while
the receivers copy the previous one out), then drops the references of the acknowledged ones, which
frees them in the object store (Ray frees an object when its last reference is gone). So at most
`max_buckets_in_flight` buckets of the stream are ever referenced, hence alive in the object store of
a node, whatever the model size; `peak_buckets_in_flight` records the largest count the sender saw.
The sender process holds the one bucket it is serialising (numpy views of the producer's tensors); each
receiver holds one copied-out bucket plus what its engine still references (see rollout/transport.py).

Versions travel with the stream ("begin", version); the engine applies the whole refit as one
versioned `update_weights` (rollout.transport.receive_weights).

Failures: a producer that raises mid-stream makes the sender post "abort" (WeightSender.send), and the
receiver's update fails with "the sender aborted this refit" exactly as over the other transports. A
sender process that dies takes the channel actor with it (Ray kills an actor whose owner dies), so a
receiver waiting for its next message fails at once with RuntimeError instead of waiting for its
timeout. A receiver that stops acknowledging makes the sender raise TimeoutError after `timeout`.
"""

from __future__ import annotations

import asyncio
import pickle
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import ray
import torch
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from core.errors import InputError
from rollout.refit import NamedTensor
from rollout.transport import (
    DEFAULT_TIMEOUT,
    BucketMeta,
    WeightReceiver,
    WeightSender,
    tensor_as_bytes,
)


@dataclass(frozen=True)
class ObjectStoreAddress:
    """What a receiver needs: the sender's channel actor and how many receivers it serves."""

    channel: ActorHandle
    num_receivers: int


def _channel_class() -> type:
    """The channel actor's class. Defined inside a function so that Ray pickles it by value: the actor's
    process then imports asyncio only, not this module (torch and the core: ~10 s on 2 cores, vs ~1 s)."""

    class _Channel:
        """Per-receiver FIFO mailboxes and bucket acknowledgements (an async actor: waiters never block it).

        Messages carry the sender's sequence number: Ray does not promise to run an async actor's calls in
        submission order, so they are released to the mailboxes in sequence order."""

        def __init__(self, num_receivers: int) -> None:
            self._mailboxes: list[asyncio.Queue] = [asyncio.Queue() for _ in range(num_receivers)]
            self._early: dict[int, Any] = {}  # messages that overtook an earlier one
            self._next = 0
            self._acked = [0] * num_receivers  # highest bucket sequence number each receiver copied out
            self._ack_changed = asyncio.Condition()

        async def put(self, seq: int, blob: bytes, refs: list[Any]) -> None:
            self._early[seq] = (blob, refs)
            while self._next in self._early:
                message = self._early.pop(self._next)
                for mailbox in self._mailboxes:
                    mailbox.put_nowait(message)
                self._next += 1

        async def get(self, receiver: int, timeout_s: float) -> Any:
            return await asyncio.wait_for(self._mailboxes[receiver].get(), timeout_s)

        async def ack(self, receiver: int, bucket_seq: int) -> None:
            async with self._ack_changed:
                self._acked[receiver] = max(self._acked[receiver], bucket_seq)
                self._ack_changed.notify_all()

        async def wait_acked(self, bucket_seq: int, timeout_s: float) -> int:
            """Wait until every receiver acknowledged `bucket_seq`; returns the lowest acknowledged one."""

            async def acked() -> None:
                async with self._ack_changed:
                    await self._ack_changed.wait_for(lambda: min(self._acked) >= bucket_seq)

            await asyncio.wait_for(acked(), timeout_s)
            return min(self._acked)

    return _Channel


_CHANNEL = ray.remote(_channel_class())


def _get(ref: ray.ObjectRef, what: str) -> Any:
    """ray.get, with the sender's (or channel's) death turned into one RuntimeError that aborts the refit."""
    try:
        return ray.get(ref)
    except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise RuntimeError(
            f"object-store weight transport: the sender is gone while {what} ({type(exc).__name__}: "
            f"{first_line}); this refit is aborted"
        ) from exc


class ObjectStoreSender(WeightSender):
    """Streams refits to `num_receivers` ObjectStoreReceivers; hand them `address` (picklable).

    Call from a Ray driver or actor. bucket_bytes: the size bound of one bucket (one object). At most
    `max_buckets_in_flight` buckets are alive in the object store at once (see the module docstring).
    timeout: how long to wait for the receivers to acknowledge a bucket."""

    def __init__(
        self,
        num_receivers: int = 1,
        *,
        bucket_bytes: int = 256 << 20,
        max_buckets_in_flight: int = 2,
        timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(bucket_bytes)
        if num_receivers < 1 or max_buckets_in_flight < 1:
            raise InputError(
                "ObjectStoreSender: need num_receivers >= 1 and max_buckets_in_flight >= 1; got "
                f"{num_receivers}, {max_buckets_in_flight}"
            )
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self._channel = _CHANNEL.options(num_cpus=0, scheduling_strategy=here).remote(num_receivers)
        self.address = ObjectStoreAddress(self._channel, num_receivers)
        self.max_buckets_in_flight = max_buckets_in_flight
        self.peak_buckets_in_flight = 0
        self._timeout_s = timeout.total_seconds()
        self._message_seq = 0
        self._bucket_seq = 0
        self._in_flight: deque[tuple[int, ray.ObjectRef]] = deque()  # (bucket seq, ref), oldest first

    def _send_message(self, message: tuple[str, Any], refs: list[ray.ObjectRef] | None = None) -> None:
        # Not awaited: the channel orders messages by sequence number; a dead channel shows at the next ack.
        self._channel.put.remote(self._message_seq, pickle.dumps(message), refs or [])
        self._message_seq += 1

    def _send_bucket(self, meta: BucketMeta, bucket: list[NamedTensor]) -> None:
        while len(self._in_flight) >= self.max_buckets_in_flight:
            self._wait_acked(self._in_flight[0][0])
        # uint8 views of the tensors (CPU: no copy); ray.put copies them into the object store
        arrays = [tensor_as_bytes(tensor).cpu().numpy() for _, tensor in bucket]
        self._bucket_seq += 1
        ref = ray.put(arrays)
        del arrays
        self._in_flight.append((self._bucket_seq, ref))
        self.peak_buckets_in_flight = max(self.peak_buckets_in_flight, len(self._in_flight))
        self._send_message(("data", self._bucket_seq), [ref])

    def _wait_acked(self, bucket_seq: int) -> None:
        """Block until every receiver acknowledged `bucket_seq`; release the acknowledged buckets."""
        try:
            acked = _get(self._channel.wait_acked.remote(bucket_seq, self._timeout_s), "waiting for acks")
        except TimeoutError:
            raise TimeoutError(
                f"object-store weight transport: the receivers did not take bucket {bucket_seq} within "
                f"{self._timeout_s:g}s"
            ) from None
        while self._in_flight and self._in_flight[0][0] <= acked:
            self._in_flight.popleft()

    def _flush(self) -> None:
        if self._in_flight:
            self._wait_acked(self._in_flight[-1][0])

    def close(self) -> None:
        """Drop the buckets still referenced and end the channel (receivers waiting on it fail)."""
        self._in_flight.clear()
        ray.kill(self._channel)


class ObjectStoreReceiver(WeightReceiver):
    """Receiver `index` (0..num_receivers-1) of an ObjectStoreSender. Each bucket is copied out of the
    object store into a buffer of its own on `device` (default CPU), then acknowledged."""

    def __init__(
        self,
        address: ObjectStoreAddress,
        index: int = 0,
        *,
        device: torch.device | str | None = None,
        timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        if not 0 <= index < address.num_receivers:
            raise InputError(f"receiver index must be in 0..{address.num_receivers - 1}, got {index}")
        self._channel, self.index = address.channel, index
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._timeout_s = timeout.total_seconds()

    def _recv(self) -> tuple[tuple[str, Any], list[ray.ObjectRef]]:
        """The next message and the ObjectRefs that came with it."""
        try:
            blob, refs = _get(self._channel.get.remote(self.index, self._timeout_s), "waiting for a message")
        except TimeoutError:
            raise TimeoutError(
                f"object-store weight transport: no message from the sender within {self._timeout_s:g}s"
            ) from None
        return pickle.loads(blob), refs

    def _recv_message(self) -> tuple[str, Any]:
        return self._recv()[0]

    def _recv_bucket(self, meta: BucketMeta) -> torch.Tensor:
        (kind, bucket_seq), refs = self._recv()
        if kind != "data":
            raise RuntimeError(f"object-store weight transport: expected a bucket's data, got {kind!r}")
        arrays = _get(refs[0], "fetching a bucket")  # read-only views of the (local) object store
        flat = torch.empty(meta.nbytes, dtype=torch.uint8)
        out = flat.numpy()
        for slot, array in zip(meta.tensors, arrays, strict=True):
            np.copyto(out[slot.offset : slot.offset + slot.nbytes], array)
        del arrays, refs  # our reference is gone before the ack lets the sender drop its own
        self._channel.ack.remote(self.index, bucket_seq)
        return flat if self.device.type == "cpu" else flat.to(self.device)
