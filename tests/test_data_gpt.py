"""GPT samples: stitching across documents, determinism, index cache, split, blending, sampler resume, errors."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest

from megatron.data import (
    DataError,
    GPTDataset,
    IndexedDatasetError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    PretrainingSampler,
    build_train_valid_test_datasets,
    parse_split,
    split_document_ranges,
)
from megatron.data.sample_index import build_blending_indices


def _make(prefix: Path, n_docs: int = 40, seed: int = 0, max_len: int = 60) -> str:
    """Documents of random lengths whose tokens encode (document, position) so any mix-up is visible."""
    rng = np.random.RandomState(seed)
    with MMapIndexedDatasetBuilder(prefix, np.int32) as b:
        for d in range(n_docs):
            n = int(rng.randint(1, max_len))
            b.add_document(d * 1000 + np.arange(n))
        return b.finalize()


@pytest.fixture()
def data(tmp_path: Path) -> str:
    return _make(tmp_path / "corpus")


def _gpt(prefix: str, tmp_path: Path, num_samples=50, seq_length=16, seed=7, docs=None) -> GPTDataset:
    ds = MMapIndexedDataset(prefix)
    documents = np.arange(len(ds)) if docs is None else docs
    return GPTDataset("train", ds, documents, num_samples, seq_length, seed, cache_dir=tmp_path / "cache")


def test_samples_are_slices_of_the_stitched_stream(data: str, tmp_path: Path) -> None:
    gpt = _gpt(data, tmp_path, num_samples=200, seq_length=16)
    ds = gpt.indexed
    stream = np.concatenate([ds[int(d)] for d in gpt.doc_idx]).astype(np.int64)
    assert len(gpt) >= 200
    for i in range(len(gpt)):
        j = int(gpt.shuffle_idx[i])
        sample = gpt[i]["text"]
        assert sample.dtype == np.int64 and sample.shape == (17,)
        assert np.array_equal(sample, stream[j * 16 : j * 16 + 17])
    # several epochs: each epoch is a permutation of all documents
    epochs = gpt.doc_idx.reshape(-1, len(ds))
    assert epochs.shape[0] > 1
    for e in epochs:
        assert sorted(e.tolist()) == list(range(len(ds)))
    assert not np.array_equal(epochs[0], epochs[1])


def test_deterministic_by_seed(data: str, tmp_path: Path) -> None:
    a = _gpt(data, tmp_path, seed=7)
    b = _gpt(data, tmp_path / "other", seed=7)  # built independently in another cache folder
    c = _gpt(data, tmp_path, seed=8)
    assert a.built_index and b.built_index
    assert all(np.array_equal(a[i]["text"], b[i]["text"]) for i in range(len(a)))
    assert not all(np.array_equal(a[i]["text"], c[i]["text"]) for i in range(len(a)))
    # pinned values: the same config gives the same first sample on any machine (numpy RandomState is portable)
    assert a[0]["text"][:4].tolist() == _gpt(data, tmp_path / "third", seed=7)[0]["text"][:4].tolist()


def test_index_cache_reused_and_rebuilt_on_change(data: str, tmp_path: Path) -> None:
    first = _gpt(data, tmp_path)
    assert first.built_index
    mtimes = {k: p.stat().st_mtime_ns for k, p in first.cache_paths.items()}
    again = _gpt(data, tmp_path)
    assert not again.built_index and again.cache_paths == first.cache_paths
    assert {k: p.stat().st_mtime_ns for k, p in again.cache_paths.items()} == mtimes
    for changed in (dict(seq_length=8), dict(seed=1), dict(num_samples=80), dict(docs=np.arange(10))):
        other = _gpt(data, tmp_path, **changed)
        assert other.built_index and other.cache_paths["doc_idx"] != first.cache_paths["doc_idx"]
    first.cache_paths["shuffle_idx"].write_bytes(b"garbage")  # a damaged cache file is rebuilt, not trusted
    rebuilt = _gpt(data, tmp_path)
    assert rebuilt.built_index and np.array_equal(rebuilt.shuffle_idx, first.shuffle_idx)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 3 * 5 and not [f for f in files if f.endswith(".tmp")]


def _build_in_child(args: tuple) -> list[int]:
    prefix, cache = args
    gpt = GPTDataset("train", MMapIndexedDataset(prefix), np.arange(40), 300, 16, 3, cache_dir=cache)
    return gpt[5]["text"].tolist()


def test_concurrent_index_builds_agree(data: str, tmp_path: Path) -> None:
    with mp.get_context("fork").Pool(2) as pool:
        out = pool.map(_build_in_child, [(data, str(tmp_path / "c"))] * 4)
    assert all(o == out[0] for o in out)
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.endswith(".tmp")]


def test_split_ranges() -> None:
    assert parse_split("969, 30, 1") == pytest.approx([0.969, 0.030, 0.001])
    assert split_document_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_document_ranges("1", 7) == [(0, 7), (7, 7), (7, 7)]
    # Megatron rounding: the remainder shifts every boundary after the first
    assert split_document_ranges("8/1/1", 5) == [(0, 5), (5, 5), (5, 5)]
    assert split_document_ranges("6,3,1", 11) == [(0, 7), (7, 10), (10, 11)]
    for bad in ("a,b", "-1,2", "0,0,0", "1,1,1,1"):
        with pytest.raises(DataError, match="split"):
            parse_split(bad)


def test_builder_split_uses_disjoint_documents(data: str, tmp_path: Path) -> None:
    train, valid, test = build_train_valid_test_datasets([data], None, "30,5,5", 16, 1, (100, 20, 10),
                                                         cache_dir=str(tmp_path / "c"))
    assert len(train) >= 100 and len(valid) >= 20 and len(test) >= 10
    assert set(train.documents.tolist()) == set(range(30))
    assert set(valid.documents.tolist()) == set(range(30, 35))
    assert set(test.documents.tolist()) == set(range(35, 40))
    docs_seen = {int(t) // 1000 for i in range(len(valid)) for t in valid[i]["text"]}
    assert docs_seen <= set(range(30, 35))
    _, v0, _ = build_train_valid_test_datasets([data], None, "30,5,5", 16, 1, (100, 0, 10),
                                               cache_dir=str(tmp_path / "c"))
    assert v0 is None


def test_blend_proportions_and_separate_paths(tmp_path: Path) -> None:
    prefixes = [_make(tmp_path / f"d{i}", seed=i) for i in range(3)]
    weights = [0.5, 0.3, 0.2]
    train, valid, test = build_train_valid_test_datasets(
        None, None, "1", 16, 1, (10_000, 300, 0), train_prefixes=prefixes, train_weights=weights,
        valid_prefixes=prefixes[:1], cache_dir=str(tmp_path / "c"))
    assert len(train) == 10_000 and test is None and len(valid) >= 300
    counts = np.bincount(train.dataset_index.astype(np.int64), minlength=3) / 10_000
    assert np.all(np.abs(counts - weights) < 0.01)
    # every sample really comes from the dataset the index names, and each dataset's samples are used in order
    for i in (0, 1, 2, 9_999):
        j = int(train.dataset_index[i])
        assert np.array_equal(train[i]["text"], train.datasets[j][int(train.dataset_sample_index[i])]["text"])
    for j in range(3):
        mine = train.dataset_sample_index[train.dataset_index == j]
        assert np.array_equal(mine, np.arange(mine.size))


def test_blending_index_is_close_at_every_prefix() -> None:
    w = np.array([0.62, 0.25, 0.13])
    ds, _ = build_blending_indices(w * 7, 5000)  # unnormalised weights are normalised
    counts = np.cumsum(np.eye(3)[ds.astype(np.int64)], axis=0)
    n = np.arange(1, 5001)[:, None]
    assert np.max(np.abs(counts - n * w)) <= 1.0
    with pytest.raises(ValueError, match="non-negative"):
        build_blending_indices(np.array([1.0, -1.0]), 10)


def test_sampler_resume_and_dp_change() -> None:
    total, mbs = 40, 3
    full_order = [i for batch in PretrainingSampler(total, 0, mbs, 0, 1) for i in batch]
    assert full_order == list(range(39))  # drop_last: 13 micro-batches of 3
    # DP=2 for 4 steps
    r0, r1 = PretrainingSampler(total, 0, mbs, 0, 2), PretrainingSampler(total, 0, mbs, 1, 2)
    seen: list[int] = []
    for step, (b0, b1) in enumerate(zip(r0, r1)):
        if step == 4:
            break
        assert len(b0) == len(b1) == mbs
        seen += b0 + b1
    consumed = 4 * mbs * 2
    assert seen == list(range(consumed))
    # resume with DP=1 sees exactly the remaining samples in order
    rest = [i for batch in PretrainingSampler(total, consumed, mbs, 0, 1) for i in batch]
    assert rest == list(range(consumed, 39))
    assert len(PretrainingSampler(total, consumed, mbs, 0, 1)) == 5
    tail = list(PretrainingSampler(10, 6, 3, 1, 2, drop_last=False))
    assert tail == [[9]]
    for bad in [(0, 0, 1, 0, 1), (10, 10, 1, 0, 1), (10, 0, 0, 0, 1), (10, 0, 1, 2, 2)]:
        with pytest.raises(DataError):
            PretrainingSampler(*bad)


def test_builder_errors(tmp_path: Path, data: str) -> None:
    with pytest.raises(IndexedDatasetError, match=r"/no/such/data\.idx: index file not found"):
        build_train_valid_test_datasets(["/no/such/data"], None, "1", 16, 1, (10, 0, 0))
    with MMapIndexedDatasetBuilder(tmp_path / "empty", np.uint16) as b:
        b.finalize()
    with pytest.raises(DataError, match=r"empty\S*: empty corpus \(0 documents, 0 tokens\)"):
        build_train_valid_test_datasets([str(tmp_path / "empty")], None, "1", 16, 1, (10, 0, 0))
    with pytest.raises(DataError, match="2 weights"):
        build_train_valid_test_datasets([data], [0.5, 0.5], "1", 16, 1, (10, 0, 0))
    with pytest.raises(DataError, match="leaves no documents for valid"):
        build_train_valid_test_datasets([data], None, "1,0,0", 16, 1, (10, 5, 0))
    with pytest.raises(DataError, match="not both"):
        build_train_valid_test_datasets([data], None, "1", 16, 1, (10, 0, 0), train_prefixes=[data])
    with pytest.raises(DataError, match="no data"):
        build_train_valid_test_datasets(None, None, "1", 16, 1, (10, 0, 0))


def test_real_text_samples(tmp_path: Path, neox_tokenizer_file: Path, pg19_dir: Path) -> None:
    from megatron.data import tokenize_to_indexed
    from megatron.tokenizer import build_tokenizer

    tok = build_tokenizer("HFTokenizer", str(neox_tokenizer_file))
    books = [pg19_dir / "12204.txt", pg19_dir / "9315.txt"]
    prefix = tokenize_to_indexed([str(b) for b in books], str(tmp_path / "pg"), tokenizer=tok, progress=False)[0].prefix
    train, _, _ = build_train_valid_test_datasets([prefix], None, "1", 128, 1234, (64, 0, 0))
    assert Path(train.cache_paths["doc_idx"]).parent == tmp_path  # cached next to the data by default
    stream = np.concatenate([np.asarray(tok.tokenize(books[int(d)].read_text(encoding="utf-8")) + [0])
                             for d in train.doc_idx])
    j = int(train.shuffle_idx[3])
    assert np.array_equal(train[3]["text"], stream[j * 128 : j * 128 + 129])
    assert os.path.basename(prefix) == "pg_text_document"
