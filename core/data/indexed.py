"""Megatron-style indexed token dataset: `prefix.bin` holds token ids, `prefix.idx` says where each document is.

`.idx` layout (little-endian; the same as Megatron-LM's MMIDIDX, so files are interchangeable):
    magic          9 bytes   b"MMIDIDX\\x00\\x00"
    version        uint64    1
    dtype code     uint8     see DTYPE_CODES
    n_sequences    uint64    one sequence per document here
    n_doc_indices  uint64    n_sequences + 1
    sizes          int32[n_sequences]     tokens per document
    pointers       int64[n_sequences]     byte offset of each document in .bin
    doc_indices    int64[n_doc_indices]   sequence index where each document starts (0, 1, ..., n)
`.bin` is the documents' token ids back to back in the dtype named by the code.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import numpy as np

from core.errors import InputError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n_sequences, n_doc_indices


def dtype_code(dtype: np.dtype | type) -> int:
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == np.dtype(dtype):
            return code
    raise InputError(f"indexed dataset: unsupported token dtype {np.dtype(dtype)}")


def best_fitting_dtype(vocab_size: int) -> type[np.generic]:
    """uint16 halves the .bin size for vocabularies below 65,536 (GPT-2, Llama-2); int32 otherwise."""
    return np.uint16 if vocab_size < 2**16 else np.int32


def data_file_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def index_file_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


class IndexedDatasetBuilder:
    """Appends documents to `prefix.bin`; `finalize()` writes `prefix.idx`.

    Both files are written under temporary names and renamed only in `finalize()` (`.bin` first, `.idx`
    last), so a reader never sees a half-written dataset and a crashed build leaves no valid prefix.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type = np.int32) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = Path(f"{self.prefix}.bin.tmp{os.getpid()}")
        self._idx_tmp = Path(f"{self.prefix}.idx.tmp{os.getpid()}")
        self._bin = open(self._bin_tmp, "wb")  # closed in finalize() / abort()
        self._sizes: list[int] = []

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise InputError(f"{self.prefix}: a document must be a 1-D token array, got shape {array.shape}")
        if array.size and (array.min() < np.iinfo(self.dtype).min or array.max() > np.iinfo(self.dtype).max):
            raise InputError(f"{self.prefix}: token id out of range for dtype {self.dtype}")
        self._bin.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sizes.append(int(array.size))

    def finalize(self) -> None:
        self._bin.close()
        sizes = np.asarray(self._sizes, dtype=np.int32)  # (n,)
        pointers = np.zeros(len(sizes), dtype=np.int64)  # (n,) byte offsets into .bin
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_indices = np.arange(len(sizes) + 1, dtype=np.int64)  # (n + 1,)
        with open(self._idx_tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, self._code, len(sizes), len(doc_indices)))
            f.write(sizes.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_indices.tobytes(order="C"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, data_file_path(self.prefix))
        os.replace(self._idx_tmp, index_file_path(self.prefix))

    def abort(self) -> None:
        self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            path.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class IndexedDataset:
    """Read-only view of `prefix.bin` / `prefix.idx`; both are memory-mapped, nothing is loaded eagerly."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise InputError(f"{path}: indexed dataset file not found")
        self.dtype, self.sizes, self.pointers, self.doc_indices = _read_index(idx_path)
        # (total tokens,) every document back to back; document i starts at pointers[i] // itemsize
        self.tokens = _map_bin(bin_path, self.dtype, self.sizes, self.pointers)

    def __getstate__(self) -> dict[str, Path]:
        return {"prefix": self.prefix}  # re-mapped on unpickling, never copied through a pipe

    def __setstate__(self, state: dict[str, Path]) -> None:
        self.__init__(state["prefix"])

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        """Document i as a (size,) array; a view into the memory map, so copy before writing to it."""
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of document i, read without touching the rest of the file."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents in {self.prefix}")
        i %= n
        size = int(self.sizes[i])
        length = size - offset if length is None else min(length, size - offset)
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self.tokens[start : start + length]

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))


def _read_index(path: Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    file_size = path.stat().st_size
    if file_size < _HEADER.size:
        raise InputError(f"{path}: truncated index ({file_size} bytes, header needs {_HEADER.size})")
    with open(path, "rb") as f:
        magic, version, code, n_seq, n_doc = _HEADER.unpack(f.read(_HEADER.size))
    if magic != MAGIC:
        raise InputError(f"{path}: not an indexed dataset index (bad magic {magic!r})")
    if version != VERSION:
        raise InputError(f"{path}: unsupported index version {version} (expected {VERSION})")
    if code not in DTYPE_CODES:
        raise InputError(f"{path}: unknown dtype code {code}")
    expected = _HEADER.size + n_seq * 4 + n_seq * 8 + n_doc * 8
    if file_size != expected:
        raise InputError(f"{path}: corrupt index: {file_size} bytes, header implies {expected}")
    index = np.memmap(path, dtype=np.uint8, mode="r")
    offset = _HEADER.size
    sizes = np.frombuffer(index, dtype=np.int32, count=n_seq, offset=offset)
    pointers = np.frombuffer(index, dtype=np.int64, count=n_seq, offset=offset + n_seq * 4)
    doc_indices = np.frombuffer(index, dtype=np.int64, count=n_doc, offset=offset + n_seq * 12)
    return np.dtype(DTYPE_CODES[code]), sizes, pointers, doc_indices


def _map_bin(path: Path, dtype: np.dtype, sizes: np.ndarray, pointers: np.ndarray) -> np.ndarray:
    file_size = path.stat().st_size
    if len(sizes):
        if (sizes < 0).any():
            raise InputError(f"{path.with_suffix('.idx')}: corrupt index: negative document size")
        end = int(pointers[-1]) + int(sizes[-1]) * dtype.itemsize
        if end > file_size or file_size % dtype.itemsize:
            raise InputError(f"{path}: truncated data file ({file_size} bytes, index needs {end})")
    if file_size == 0:  # np.memmap cannot map an empty file
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")
