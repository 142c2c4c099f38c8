"""Megatron "MMIDIDX" v1 ``.bin/.idx`` token files: an atomic writer and a validating, memory-mapped reader.

Layout of ``.idx`` (little-endian): 9-byte magic ``MMIDIDX\\x00\\x00``, u64 version (1), u8 dtype code, u64 N
(sequences), u64 D (``len(doc_idx)``), int32 ``sizes[N]``, int64 byte ``pointers[N]``, int64 ``doc_idx[D]``.
``.bin`` holds the token arrays back to back. The same files are read by Megatron-core and GPT-NeoX.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from types import TracebackType
from typing import Iterable, Sequence

import numpy as np

from megatron.data.errors import IndexedDatasetError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8

#: dtype codes shared by Megatron-core and GPT-NeoX; the float codes differ between them (tokens never use them):
#: 6 is GPT-NeoX's float32, the dtype of its precomputed reference log-probabilities (``precompute_model_name``)
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def best_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits with room to spare (vocab < 65,500), else int32 (Megatron's rule)."""
    return np.dtype(np.uint16) if vocab_size < 65_500 else np.dtype(np.int32)


def data_file_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.bin"


def index_file_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.idx"


def normalize_prefix(path: str | os.PathLike) -> str:
    """Accept ``x``, ``x.bin`` or ``x.idx`` and return the prefix ``x``."""
    s = os.fspath(path)
    for ext in (".bin", ".idx"):
        if s.endswith(ext):
            return s[: -len(ext)]
    return s


def _tmp_name(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


class MMapIndexedDatasetBuilder:
    """Append token sequences and write ``prefix.bin``/``prefix.idx`` atomically on :meth:`finalize`.

    Both files are written under temporary names and renamed at the end, so a reader never sees a half-written pair
    and a failed run leaves the previous files untouched. Use as a context manager to clean up on error.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type = np.uint16) -> None:
        self.prefix = normalize_prefix(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise IndexedDatasetError(
                f"{self.prefix}: dtype {self.dtype} cannot be stored; expected one of "
                f"{sorted(str(np.dtype(d)) for d in DTYPE_CODES.values())}"
            )
        parent = Path(self.prefix).parent
        parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = _tmp_name(data_file_path(self.prefix))
        self._idx_tmp = _tmp_name(index_file_path(self.prefix))
        self._bin = open(self._bin_tmp, "wb")
        self._sizes: list[int] = []
        self._doc_idx: list[int] = [0]
        self._finalized = False
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else np.finfo(self.dtype)

    # -- writing ------------------------------------------------------------------------------------------------
    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one sequence (not yet closing a document)."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise IndexedDatasetError(f"{self.prefix}: a sequence must be 1-D, got shape {arr.shape}")
        if arr.dtype != self.dtype:
            if arr.size and (arr.min() < self._info.min or arr.max() > self._info.max):
                raise IndexedDatasetError(
                    f"{self.prefix}: token ids [{arr.min()}, {arr.max()}] do not fit dtype {self.dtype}"
                )
            arr = arr.astype(self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self._sizes.append(int(arr.size))

    def end_document(self) -> None:
        """Close the current document: record where it ends in ``doc_idx``."""
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens: Sequence[int] | np.ndarray, lengths: Sequence[int] | None = None) -> None:
        """Append one document, optionally cut into sequences of ``lengths``, and close it."""
        arr = np.asarray(tokens)
        if lengths is None:
            self.add_item(arr)
        else:
            if sum(lengths) != arr.size:
                raise IndexedDatasetError(f"{self.prefix}: lengths sum to {sum(lengths)} but document has {arr.size}")
            start = 0
            for n in lengths:
                self.add_item(arr[start : start + n])
                start += n
        self.end_document()

    def merge_file(self, other_prefix: str | os.PathLike) -> None:
        """Append every sequence and document boundary of another ``.bin/.idx`` pair (same dtype)."""
        other = MMapIndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"{other.prefix}: dtype {other.dtype} differs from the output dtype {self.dtype}; cannot merge"
            )
        offset = len(self._sizes)
        self._sizes.extend(int(s) for s in other.sizes)
        self._doc_idx.extend(int(d) + offset for d in other.doc_idx[1:])
        with open(data_file_path(other.prefix), "rb") as f:
            while chunk := f.read(1 << 24):
                self._bin.write(chunk)

    def finalize(self) -> str:
        """Write the index and move both files into place. Returns the prefix."""
        if self._finalized:
            raise IndexedDatasetError(f"{self.prefix}: finalize() called twice")
        self._bin.close()
        sizes = np.asarray(self._sizes, dtype=np.int64)
        if sizes.size and sizes.max() > np.iinfo(np.int32).max:
            raise IndexedDatasetError(f"{self.prefix}: a sequence longer than 2**31-1 tokens cannot be indexed")
        pointers = np.zeros(sizes.size, dtype=np.int64)
        if sizes.size > 1:
            np.cumsum(sizes[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.asarray(self._doc_idx, dtype=np.int64)
        with open(self._idx_tmp, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", _CODE_OF[self.dtype]))
            f.write(struct.pack("<Q", sizes.size))
            f.write(struct.pack("<Q", doc_idx.size))
            f.write(sizes.astype("<i4").tobytes(order="C"))
            f.write(pointers.astype("<i8").tobytes(order="C"))
            f.write(doc_idx.astype("<i8").tobytes(order="C"))
        os.replace(self._bin_tmp, data_file_path(self.prefix))
        os.replace(self._idx_tmp, index_file_path(self.prefix))
        self._finalized = True
        return self.prefix

    def abort(self) -> None:
        """Drop the temporary files (nothing at ``prefix`` is touched)."""
        if not self._bin.closed:
            self._bin.close()
        for p in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(p):
                os.remove(p)
        self._finalized = True

    @property
    def finalized(self) -> bool:
        """True once the files were moved into place (or the build was aborted)."""
        return self._finalized

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        return int(sum(self._sizes))

    def __enter__(self) -> "MMapIndexedDatasetBuilder":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None or not self._finalized:
            self.abort()


class MMapIndexedDataset:
    """Read-only, zero-copy view of a ``.bin/.idx`` pair.

    The index is checked on open (magic, version, dtype code, file lengths, contiguous pointers, monotone doc_idx)
    so a damaged file raises :class:`IndexedDatasetError` instead of yielding garbage tokens.
    ``ds[i]`` is sequence ``i`` as a read-only numpy view into the memory-mapped ``.bin``.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = normalize_prefix(prefix)
        idx_path, bin_path = index_file_path(self.prefix), data_file_path(self.prefix)
        for p, what in ((idx_path, "index"), (bin_path, "data")):
            if not os.path.isfile(p):
                raise IndexedDatasetError(f"{p}: {what} file not found (expected a Megatron .bin/.idx pair)")
        self._read_index(idx_path)
        self._open_bin(bin_path)

    def _read_index(self, path: str) -> None:
        size = os.path.getsize(path)
        if size < HEADER_BYTES:
            raise IndexedDatasetError(f"{path}: truncated index ({size} bytes, header needs {HEADER_BYTES})")
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
        if header[: len(MAGIC)] != MAGIC:
            raise IndexedDatasetError(
                f"{path}: bad magic {header[: len(MAGIC)]!r}, expected {MAGIC!r} (not an MMIDIDX index)"
            )
        pos = len(MAGIC)
        (version,) = struct.unpack_from("<Q", header, pos)
        if version != VERSION:
            raise IndexedDatasetError(f"{path}: unsupported index version {version}, expected {VERSION}")
        (code,) = struct.unpack_from("<B", header, pos + 8)
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(
                f"{path}: unknown dtype code {code}, expected one of {sorted(DTYPE_CODES)}"
            )
        n, d = struct.unpack_from("<QQ", header, pos + 9)
        expected = HEADER_BYTES + 4 * n + 8 * n + 8 * d
        if size != expected:
            raise IndexedDatasetError(
                f"{path}: index is {size} bytes but header (N={n} sequences, D={d} doc entries) implies {expected}"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        self._idx_map = np.memmap(path, mode="r", dtype=np.uint8) if size else None
        buf = self._idx_map
        self.sizes = np.frombuffer(buf, dtype="<i4", count=n, offset=HEADER_BYTES)
        self.pointers = np.frombuffer(buf, dtype="<i8", count=n, offset=HEADER_BYTES + 4 * n)
        self.doc_idx = np.frombuffer(buf, dtype="<i8", count=d, offset=HEADER_BYTES + 12 * n)
        self._check_index(path, n)

    def _check_index(self, path: str, n: int) -> None:
        if n and int(self.sizes.min()) < 0:
            raise IndexedDatasetError(f"{path}: negative sequence size at {int(np.argmin(self.sizes))}")
        if n:
            expected = np.zeros(n, dtype=np.int64)
            np.cumsum(self.sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=expected[1:])
            bad = np.flatnonzero(expected != self.pointers)
            if bad.size:
                i = int(bad[0])
                raise IndexedDatasetError(
                    f"{path}: sizes and pointers disagree at sequence {i} "
                    f"(pointer {int(self.pointers[i])}, sizes imply {int(expected[i])})"
                )
        di = self.doc_idx
        if di.size == 0 or int(di[0]) != 0 or int(di[-1]) != n or (di.size > 1 and bool(np.any(np.diff(di) < 0))):
            raise IndexedDatasetError(
                f"{path}: doc_idx must start at 0, never decrease and end at N={n} "
                f"(got {di.size} entries, first {int(di[0]) if di.size else None}, "
                f"last {int(di[-1]) if di.size else None})"
            )
        self._nbytes = int(self.sizes.astype(np.int64).sum()) * self.dtype.itemsize

    def _open_bin(self, path: str) -> None:
        size = os.path.getsize(path)
        if size != self._nbytes:
            raise IndexedDatasetError(
                f"{path}: data file is {size} bytes but the index describes {self._nbytes} bytes"
                f" ({'truncated' if size < self._nbytes else 'trailing bytes'})"
            )
        if size == 0:
            self._bin = np.zeros(0, dtype=self.dtype)
        else:
            self._bin = np.memmap(path, mode="r", dtype=self.dtype)

    # pickling (DataLoader workers, spawn): ship only the prefix and re-map the files on the other side
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    # -- reading ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.sizes.size)

    @property
    def num_documents(self) -> int:
        return int(self.doc_idx.size - 1)

    @property
    def num_tokens(self) -> int:
        return self._nbytes // self.dtype.itemsize

    def _start(self, idx: int) -> int:
        return int(self.pointers[idx]) // self.dtype.itemsize

    def __getitem__(self, idx: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        i = int(idx)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.prefix}: sequence index {idx} out of range for {n} sequences")
        start = self._start(i)
        return self._bin[start : start + int(self.sizes[i])]

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end when ``length`` is None)."""
        seq = self[idx]
        if offset < 0 or offset > seq.size:
            raise IndexError(f"{self.prefix}: offset {offset} outside sequence {idx} of length {seq.size}")
        end = seq.size if length is None else offset + length
        if length is not None and (length < 0 or end > seq.size):
            raise IndexError(f"{self.prefix}: [{offset}, {end}) outside sequence {idx} of length {seq.size}")
        return seq[offset:end]

    def document(self, doc: int) -> np.ndarray:
        """All tokens of document ``doc`` (its sequences concatenated)."""
        lo, hi = int(self.doc_idx[doc]), int(self.doc_idx[doc + 1])
        if hi == lo:
            return np.zeros(0, dtype=self.dtype)
        start = self._start(lo)
        return self._bin[start : self._start(hi - 1) + int(self.sizes[hi - 1])]

    def __iter__(self) -> Iterable[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"MMapIndexedDataset({self.prefix!r}, sequences={len(self)}, dtype={self.dtype})"


def dataset_exists(prefix: str | os.PathLike) -> bool:
    p = normalize_prefix(prefix)
    return os.path.isfile(index_file_path(p)) and os.path.isfile(data_file_path(p))


def merge_datasets(prefixes: Sequence[str | os.PathLike], output_prefix: str | os.PathLike) -> MMapIndexedDataset:
    """Concatenate datasets (same dtype) into ``output_prefix``; documents keep their order and boundaries."""
    if not prefixes:
        raise IndexedDatasetError("merge: no input datasets given")
    first = MMapIndexedDataset(prefixes[0])
    with MMapIndexedDatasetBuilder(output_prefix, first.dtype) as builder:
        for p in prefixes:
            builder.merge_file(p)
        builder.finalize()
    return MMapIndexedDataset(output_prefix)
