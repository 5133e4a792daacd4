"""Pretraining samples: documents packed into fixed-length sequences that keep document boundaries.

Per epoch the documents are shuffled (seeded by (seed, epoch)), joined into one token stream with EOS
between documents, and cut into samples of seq_len + 1 tokens that overlap by one token (Megatron's
layout): sample k holds stream[k*S : k*S + S + 1], inputs are its first S tokens and labels its last S.
Over an epoch every stream token is an input exactly once and (except the first) a label exactly once.

Each sample carries, per input position:
  segment_ids   index of the document piece within the sample (0, 1, ...); padding is one extra segment.
                Attention should stay within a segment: `mask = causal & (seg[:, None] == seg[None, :])`.
  position_ids  position within the piece, restarting at 0 at every document start and at the sample start
                (a document continued from the previous sample restarts too, as in Megatron with
                reset_position_ids, so positions stay below seq_len).
  loss_mask     1.0 where the label is a real token, 0.0 where it is padding (only the last sample of an
                epoch is padded). The label of a document's last token (EOS) is the next document's first
                token; like Megatron we keep it in the loss.
Padding labels hold `pad_id` (a valid token id, so any cross-entropy kernel accepts them): mask them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from core.data.indexed import IndexedDataset
from core.errors import InputError

T = TypeVar("T")
Sample = dict[str, np.ndarray]  # input_ids, labels, loss_mask, position_ids, segment_ids: each (S,)


def _cached(cache: dict[int, T], epoch: int, build: Callable[[int], T], size: int = 2) -> T:
    """Per-epoch tables, the latest `size` kept (a plain dict, so datasets stay picklable for workers)."""
    if epoch not in cache:
        if len(cache) >= size:
            cache.pop(next(iter(cache)))
        cache[epoch] = build(epoch)
    return cache[epoch]


class SampleDataset(Protocol):
    """Samples indexed 0, 1, 2, ... without end; `len` is the number of samples in one epoch."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


class PackedDataset:
    """The documents of one indexed dataset, packed into samples of `seq_len` inputs (see module doc).

    `eos_id`: appended to every document that does not already end with it; None when the documents
    were tokenized with their EOS (`rl data tokenize --append-eos`).
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        seq_len: int,
        seed: int,
        eos_id: int | None = None,
        pad_id: int = 0,
    ) -> None:
        if seq_len < 1:
            raise InputError(f"{indexed.prefix}: seq_len must be >= 1, got {seq_len}")
        self.indexed, self.seq_len, self.seed = indexed, seq_len, seed
        self.eos_id, self.pad_id = eos_id, pad_id
        self._eos_added = self._documents_missing_eos()  # (n_docs,) bool
        self._doc_lengths = indexed.sizes.astype(np.int64) + self._eos_added  # (n_docs,) incl. EOS
        self._doc_ids = np.flatnonzero(self._doc_lengths > 0)  # empty documents take no place
        self.num_tokens = int(self._doc_lengths.sum())  # stream length, the same every epoch
        if self.num_tokens < 2:
            raise InputError(
                f"{indexed.prefix}: needs at least 2 tokens to make a sample, has {self.num_tokens}"
            )
        self.samples_per_epoch = -(-(self.num_tokens - 1) // seq_len)
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _documents_missing_eos(self) -> np.ndarray:
        sizes = self.indexed.sizes
        if self.eos_id is None:
            return np.zeros(len(sizes), dtype=bool)
        missing = np.ones(len(sizes), dtype=bool)
        nonempty = np.flatnonzero(sizes > 0)
        if len(nonempty):
            last = self.indexed.pointers[nonempty] // self.indexed.dtype.itemsize + sizes[nonempty] - 1
            missing[nonempty] = self.indexed.tokens[last] != self.eos_id
        return missing

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(doc order (n,), stream offsets (n + 1,)): document order[j] starts at offsets[j] in the stream."""
        return _cached(self._layouts, epoch, self._epoch_layout)

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self._doc_ids)
        offsets = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(self._doc_lengths[order], out=offsets[1:])
        return order, offsets

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __iter__(self) -> Iterator[Sample]:
        """One epoch (epoch 0) in stream order."""
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index: int) -> Sample:
        """Sample `index % len` of epoch `index // len`; any index >= 0 is valid."""
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        epoch, k = divmod(index, self.samples_per_epoch)
        order, offsets = self._layout(epoch)
        start = k * self.seq_len
        stop = min(start + self.seq_len + 1, self.num_tokens)
        pieces = self._pieces(order, offsets, start, stop)
        return self._assemble(pieces)

    def _pieces(self, order: np.ndarray, offsets: np.ndarray, start: int, stop: int) -> list[np.ndarray]:
        """The document pieces covering stream[start:stop], one per document touched."""
        pieces = []
        j = int(np.searchsorted(offsets, start, side="right")) - 1
        while j < len(order) and offsets[j] < stop:
            lo, hi = max(start - offsets[j], 0), min(stop, offsets[j + 1]) - offsets[j]
            pieces.append(self._document_slice(int(order[j]), int(lo), int(hi)))
            j += 1
        return pieces

    def _document_slice(self, doc: int, lo: int, hi: int) -> np.ndarray:
        """Tokens [lo, hi) of document `doc` with its EOS (if added) counted as the last token."""
        size = int(self.indexed.sizes[doc])
        tokens = self.indexed.get(doc, lo, max(min(hi, size) - lo, 0)).astype(np.int64)
        if hi > size:  # the range reaches the appended EOS
            tokens = np.append(tokens, self.eos_id)
        return tokens

    def _assemble(self, pieces: list[np.ndarray]) -> Sample:
        length = self.seq_len + 1
        tokens = np.full(length, self.pad_id, dtype=np.int64)  # (S + 1,)
        segments = np.full(length, len(pieces), dtype=np.int64)  # padding is the last segment
        positions = np.empty(length, dtype=np.int64)
        end = 0
        for segment, piece in enumerate(pieces):
            n = len(piece)
            tokens[end : end + n] = piece
            segments[end : end + n] = segment
            positions[end : end + n] = np.arange(n)
            end += n
        positions[end:] = np.arange(length - end)
        n_real = end  # tokens before the padding
        return {
            "input_ids": tokens[:-1],
            "labels": tokens[1:],
            "loss_mask": (np.arange(1, length) < n_real).astype(np.float32),
            "position_ids": positions[:-1],
            "segment_ids": segments[:-1],
        }


class BlendedDataset:
    """Samples drawn from several datasets in proportion to `weights`, deterministically.

    Sample i comes from the dataset whose achieved count lags its target (weight * (i + 1)) the most
    (Megatron's greedy rule), so after any n samples each count is within one of weight * n. Each
    component is read in its own order (0, 1, 2, ...), running into its next epoch when exhausted.
    `len` is the sum of the components' epochs: a nominal epoch for the sampler's reshuffling.
    """

    def __init__(self, datasets: Sequence[SampleDataset], weights: Sequence[float]) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise InputError(f"blend: {len(datasets)} datasets but {len(weights)} weights")
        if any(not w > 0 for w in weights):
            raise InputError(f"blend: weights must be positive, got {list(weights)}")
        self.datasets = list(datasets)
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self._dataset_index: list[int] = []  # sample i -> which dataset
        self._dataset_sample_index: list[int] = []  # sample i -> index within that dataset
        self._counts = [0] * len(datasets)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def _extend_to(self, n: int) -> None:
        weights, counts = self.weights, self._counts
        for i in range(len(self._dataset_index), n):
            errors = [w * (i + 1) - c for w, c in zip(weights, counts)]
            d = errors.index(max(errors))
            self._dataset_index.append(d)
            self._dataset_sample_index.append(counts[d])
            counts[d] += 1

    def source(self, index: int) -> tuple[int, int]:
        """(dataset, index within it) of blended sample `index`."""
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        if index >= len(self._dataset_index):
            self._extend_to(max(index + 1, 2 * len(self._dataset_index), 1024))
        return self._dataset_index[index], self._dataset_sample_index[index]

    def __getitem__(self, index: int) -> Sample:
        d, k = self.source(index)
        return self.datasets[d][k]


def parse_data_paths(paths: Sequence[str]) -> list[tuple[str, float]]:
    """Megatron's --data-path list: "PREFIX" alone, or "W1 PREFIX1 W2 PREFIX2 ..." weighted."""
    if len(paths) == 1:
        return [(paths[0], 1.0)]
    if len(paths) % 2:
        raise InputError(f"data paths: expected PREFIX or pairs of WEIGHT PREFIX, got {list(paths)}")
    pairs = []
    for weight, prefix in zip(paths[::2], paths[1::2]):
        try:
            pairs.append((prefix, float(weight)))
        except ValueError as e:
            raise InputError(f"data paths: weight {weight!r} for {prefix} is not a number") from e
    return pairs


def build_pretrain_dataset(
    prefixes_with_weights: Sequence[tuple[str | Path, float]],
    seq_len: int,
    seed: int,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> PackedDataset | BlendedDataset:
    """Packed dataset over one prefix, or a blend over several (see PackedDataset for eos_id / pad_id)."""
    if not prefixes_with_weights:
        raise InputError("data paths: no dataset prefixes given")
    packed = [
        PackedDataset(IndexedDataset(prefix), seq_len, seed, eos_id=eos_id, pad_id=pad_id)
        for prefix, _ in prefixes_with_weights
    ]
    if len(packed) == 1:
        return packed[0]
    return BlendedDataset(packed, [w for _, w in prefixes_with_weights])


class PretrainBatches:
    """Endless batches over a dataset, reshuffled every epoch; resumable at an exact sample.

    Position p (counted in samples, over all data-parallel ranks) reads dataset index
    `epoch * n + perm_epoch[p % n]` with `epoch = p // n`, `perm_epoch` seeded by (seed, epoch).
    Rank r of `dp_size` takes positions [c + r * batch_size, c + (r + 1) * batch_size) of each step's
    global batch starting at c; every step advances c by batch_size * dp_size.

    Yields {input_ids, labels, position_ids, segment_ids: (B, S) int64, loss_mask: (B, S) float32}.
    """

    def __init__(
        self,
        dataset: SampleDataset,
        batch_size: int,
        seed: int,
        start_sample: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        if batch_size < 1 or not 0 <= dp_rank < dp_size:
            raise InputError(
                f"batches: need batch_size >= 1 and 0 <= dp_rank < dp_size, got "
                f"{batch_size=} {dp_rank=} {dp_size=}"
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = start_sample
        self._epoch_size = len(dataset)
        self._permutations: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        return _cached(self._permutations, epoch, self._epoch_permutation)

    def _epoch_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self._epoch_size)

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self._epoch_size

    def dataset_index(self, position: int) -> int:
        epoch, k = divmod(position, self._epoch_size)
        return epoch * self._epoch_size + int(self._permutation(epoch)[k])

    def __iter__(self) -> PretrainBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self.consumed_samples + self.dp_rank * self.batch_size
        samples = [self.dataset[self.dataset_index(p)] for p in range(first, first + self.batch_size)]
        self.consumed_samples += self.batch_size * self.dp_size
        return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the next unseen sample; the batch size may change, the seed may not."""
        if state["seed"] != self.seed:
            raise InputError(f"batches: checkpoint was taken with data seed {state['seed']}, not {self.seed}")
        self.consumed_samples = int(state["consumed_samples"])
