"""MMIDIDX v1 .bin/.idx: byte layout, round trip, merge, and every corruption the reader must refuse."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from megatron.data import IndexedDatasetError, MMapIndexedDataset, MMapIndexedDatasetBuilder, best_dtype, merge_datasets

DOCS = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [65535, 0]]


def _write(prefix: Path, docs=DOCS, dtype=np.uint16) -> str:
    with MMapIndexedDatasetBuilder(prefix, dtype) as b:
        for d in docs:
            b.add_document(d)
        return b.finalize()


def _parse_idx(path: str) -> dict:
    """An independent reader written straight from the layout in design.md."""
    raw = Path(path).read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n, d = struct.unpack_from("<QBQQ", raw, 9)
    off = 9 + 8 + 1 + 8 + 8
    sizes = np.frombuffer(raw, "<i4", n, off)
    pointers = np.frombuffer(raw, "<i8", n, off + 4 * n)
    doc_idx = np.frombuffer(raw, "<i8", d, off + 12 * n)
    assert len(raw) == off + 12 * n + 8 * d
    return {"version": version, "code": code, "sizes": sizes.tolist(), "pointers": pointers.tolist(),
            "doc_idx": doc_idx.tolist()}


def test_byte_layout_matches_megatron(tmp_path: Path) -> None:
    prefix = _write(tmp_path / "ds")
    idx = _parse_idx(prefix + ".idx")
    assert idx == {"version": 1, "code": 8, "sizes": [3, 1, 5, 2], "pointers": [0, 6, 8, 18],
                   "doc_idx": [0, 1, 2, 3, 4]}
    raw = np.fromfile(prefix + ".bin", dtype="<u2")
    assert raw.tolist() == [t for d in DOCS for t in d]


def test_round_trip_and_accessors(tmp_path: Path) -> None:
    ds = MMapIndexedDataset(_write(tmp_path / "ds"))
    assert len(ds) == 4 and ds.num_documents == 4 and ds.num_tokens == 11 and ds.dtype == np.uint16
    assert [ds[i].tolist() for i in range(4)] == DOCS
    assert ds[-1].tolist() == [65535, 0]
    assert ds.get(2, 1, 3).tolist() == [10, 11, 12] and ds.get(2, 3).tolist() == [12, 13]
    assert ds.sizes.tolist() == [3, 1, 5, 2] and ds.doc_idx.tolist() == [0, 1, 2, 3, 4]
    assert [x.tolist() for x in ds[1:3]] == DOCS[1:3]
    assert not ds[0].flags.writeable  # a view into the memory map, not a copy
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(IndexError):
        ds.get(0, 2, 5)


def test_multi_sequence_documents_and_int32(tmp_path: Path) -> None:
    with MMapIndexedDatasetBuilder(tmp_path / "big", np.int32) as b:
        b.add_document([100000, 1, 2, 3], lengths=[1, 3])
        b.add_document([7])
        b.finalize()
    ds = MMapIndexedDataset(tmp_path / "big.idx")  # a suffix is accepted too
    assert ds.dtype == np.int32 and _parse_idx(str(tmp_path / "big.idx"))["code"] == 4
    assert ds.doc_idx.tolist() == [0, 2, 3] and ds.document(0).tolist() == [100000, 1, 2, 3]


def test_dtype_choice() -> None:
    assert best_dtype(50277) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(128256) == np.int32


def test_builder_rejects_ids_outside_dtype(tmp_path: Path) -> None:
    with pytest.raises(IndexedDatasetError, match="do not fit dtype uint16"):
        with MMapIndexedDatasetBuilder(tmp_path / "x", np.uint16) as b:
            b.add_document([70000])
    assert not list(tmp_path.iterdir())  # the failed build left nothing behind


def test_writes_are_atomic(tmp_path: Path) -> None:
    prefix = _write(tmp_path / "ds")
    before = Path(prefix + ".bin").read_bytes()
    b = MMapIndexedDatasetBuilder(prefix, np.uint16)
    b.add_document([1, 2, 3, 4, 5, 6, 7, 8])
    assert Path(prefix + ".bin").read_bytes() == before  # nothing visible until finalize
    b.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]


def test_merge(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", DOCS[:2])
    b = _write(tmp_path / "b", DOCS[2:])
    merged = merge_datasets([a, b], tmp_path / "ab")
    whole = MMapIndexedDataset(_write(tmp_path / "whole"))
    assert merged.doc_idx.tolist() == whole.doc_idx.tolist() == [0, 1, 2, 3, 4]
    assert [merged[i].tolist() for i in range(4)] == DOCS
    assert Path(merged.prefix + ".idx").read_bytes() == Path(whole.prefix + ".idx").read_bytes()
    c = _write(tmp_path / "c", [[1]], np.int32)
    with pytest.raises(IndexedDatasetError, match="dtype int32 differs"):
        merge_datasets([a, c], tmp_path / "bad")


def _corrupt(prefix: str, kind: str) -> None:
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    raw = bytearray(Path(idx).read_bytes())
    if kind == "magic":
        raw[:9] = b"NOTMMIDX\x00"
    elif kind == "version":
        raw[9:17] = struct.pack("<Q", 2)
    elif kind == "dtype":
        raw[17] = 7  # 6 is GPT-NeoX's float32 (precomputed DPO reference log-probabilities); 7 is no dtype here
    elif kind == "idx_truncated":
        raw = raw[:-4]
    elif kind == "idx_header":
        raw = raw[:20]
    elif kind == "pointers":
        n = 4
        off = 34 + 4 * n + 8  # second pointer
        raw[off : off + 8] = struct.pack("<q", 10)
    elif kind == "sizes":
        raw[34:38] = struct.pack("<i", 4)  # first size no longer matches the pointers
    elif kind == "doc_idx":
        raw[-8:] = struct.pack("<q", 3)
    elif kind == "bin_truncated":
        Path(bin_).write_bytes(Path(bin_).read_bytes()[:-2])
        return
    elif kind == "bin_missing":
        os.remove(bin_)
        return
    elif kind == "idx_missing":
        os.remove(idx)
        return
    Path(idx).write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "kind, message",
    [
        ("magic", r"ds\.idx: bad magic .* \(not an MMIDIDX index\)"),
        ("version", r"ds\.idx: unsupported index version 2, expected 1"),
        ("dtype", r"ds\.idx: unknown dtype code 7"),
        ("idx_truncated", r"ds\.idx: index is \d+ bytes but header .* implies \d+"),
        ("idx_header", r"ds\.idx: truncated index \(20 bytes"),
        ("pointers", r"ds\.idx: sizes and pointers disagree at sequence 1"),
        ("sizes", r"ds\.idx: sizes and pointers disagree at sequence 1"),
        ("doc_idx", r"ds\.idx: doc_idx must start at 0, never decrease and end at N=4"),
        ("bin_truncated", r"ds\.bin: data file is 20 bytes but the index describes 22 bytes \(truncated\)"),
        ("bin_missing", r"ds\.bin: data file not found"),
        ("idx_missing", r"ds\.idx: index file not found"),
    ],
)
def test_reader_refuses_bad_files(tmp_path: Path, kind: str, message: str) -> None:
    prefix = _write(tmp_path / "ds")
    _corrupt(prefix, kind)
    with pytest.raises(IndexedDatasetError, match=message):
        MMapIndexedDataset(prefix)


def test_pickles_as_prefix_and_reopens(tmp_path: Path) -> None:
    import pickle

    ds = MMapIndexedDataset(_write(tmp_path / "ds"))
    blob = pickle.dumps(ds)
    assert len(blob) < 200  # the prefix, not the tokens
    clone = pickle.loads(blob)
    assert [clone[i].tolist() for i in range(len(clone))] == DOCS
