"""GPT samples of ``seq_length + 1`` tokens: windows stitched across documents (``pack_impl`` packed, pre-training)
or whole documents padded (pack_until_overflow / unpacked, :mod:`megatron.data.packing`), with an optional label row.

The three indices (see :mod:`megatron.data.sample_index`) are built once per parameter set, with a seeded RNG, and
cached as ``.npy`` files whose name hashes every parameter, so a changed seed / length / split / dataset rebuilds
them and the same config gives the same sample ``i`` on any machine. Files are written under a temporary name and
renamed, so several processes starting at once at worst build the same bytes twice, never read a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from megatron.atomic_io import atomic_open
from megatron.data.errors import DataError
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.packing import DOCUMENT_PACK_IMPLS, build_document_samples, fit_document
from megatron.data.sample_index import build_doc_idx, build_sample_idx, build_shuffle_idx, num_epochs_needed

INDEX_VERSION = 1
PACK_IMPLS = ("packed", *DOCUMENT_PACK_IMPLS)
_KINDS = ("doc_idx", "sample_idx", "shuffle_idx")


def default_cache_dir(data_prefix: str) -> Path:
    """Next to the data when that folder is writable, else ``$XDG_CACHE_HOME/sepllm-neox/index-cache``."""
    folder = Path(data_prefix).resolve().parent
    if os.access(folder, os.W_OK):
        return folder
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "sepllm-neox" / "index-cache"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def check_label_dataset(text: MMapIndexedDataset, label: MMapIndexedDataset) -> None:
    """A label dataset must hold one row per text row, of the same length (they are read in lockstep)."""
    if len(label) != len(text):
        raise DataError(f"label data {label.prefix} has {len(label)} sequences but text data {text.prefix} has "
                        f"{len(text)}: they must come from the same prepare_data.py --sft run")
    differ = np.flatnonzero(np.asarray(label.sizes) != np.asarray(text.sizes))
    if differ.size:
        i = int(differ[0])
        raise DataError(f"label data {label.prefix} and text data {text.prefix} differ in length at sequence {i} "
                        f"({int(label.sizes[i])} vs {int(text.sizes[i])} tokens; {differ.size} sequences differ): "
                        f"they must come from the same prepare_data.py --sft run")


def _has_target(label: MMapIndexedDataset, documents: np.ndarray, width: int) -> np.ndarray:
    """Per document: does any of its first ``width`` labels count (>= 0)? (GPT-NeoX skips documents that do not.)"""
    return np.fromiter((bool((label.get(int(d), 0, min(int(label.sizes[d]), width)) >= 0).any()) for d in documents),
                       dtype=bool, count=documents.size)


class GPTDataset(torch.utils.data.Dataset):
    """Samples ``{"text": int64[seq_length + 1]}`` drawn from ``documents`` of one indexed dataset, plus ``"label"``
    (same length, -100 = not counted) with a label dataset or a whole-document ``pack_impl``.

    ``packed``: windows stitched across documents (the label rows stitched the same way). ``pack_until_overflow`` /
    ``unpacked``: whole documents, padded (:mod:`megatron.data.packing`); ``dropped_documents`` counts those left
    out (too long without ``allow_chopped``, or no counted label). ``len(self)`` is every sample of the epochs
    needed to provide ``num_samples`` (at least ``num_samples``). ``built_index`` tells whether this instance built
    the indices (False: loaded from the cache).
    """

    def __init__(
        self,
        name: str,
        indexed: MMapIndexedDataset,
        documents: np.ndarray,
        num_samples: int,
        seq_length: int,
        seed: int,
        cache_dir: str | os.PathLike | None = None,
        label_indexed: MMapIndexedDataset | None = None,
        pack_impl: str = "packed",
        allow_chopped: bool = True,
    ) -> None:
        if seq_length < 1:
            raise DataError(f"seq_length must be >= 1, got {seq_length}")
        if pack_impl not in PACK_IMPLS:
            raise DataError(f"pack_impl {pack_impl!r}: expected one of {', '.join(PACK_IMPLS)}")
        if label_indexed is not None:
            check_label_dataset(indexed, label_indexed)
        self.label_indexed = label_indexed
        self.pack_impl = pack_impl
        self.allow_chopped = bool(allow_chopped)
        self.dropped_documents = {"too_long": 0, "no_target": 0}
        if num_samples < 0:
            raise DataError(f"num_samples must be >= 0, got {num_samples}")
        self.name = name
        self.indexed = indexed
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.documents = np.asarray(documents, dtype=np.int64)
        if self.documents.size == 0:
            raise DataError(f"{indexed.prefix}: the {name} split has no documents")
        if self.documents.min() < 0 or self.documents.max() >= len(indexed):
            raise DataError(f"{indexed.prefix}: document ids outside [0, {len(indexed)})")
        self.tokens_per_epoch = int(indexed.sizes[self.documents].astype(np.int64).sum())
        if self.tokens_per_epoch < 2:
            raise DataError(
                f"{indexed.prefix}: empty corpus for the {name} split ({self.documents.size} documents, "
                f"{self.tokens_per_epoch} tokens)"
            )
        self.requested_samples = int(num_samples)
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir(indexed.prefix)
        folder.mkdir(parents=True, exist_ok=True)
        self.cache_paths = {k: folder / f"{self._cache_stem()}_{k}.npy" for k in _KINDS}
        self.built_index = False
        arrays = self._load_cached()
        if arrays is None:
            arrays = self._build()
            for k, p in self.cache_paths.items():
                _save_atomic(p, arrays[k])
            self.built_index = True
        self.doc_idx, self.sample_idx, self.shuffle_idx = (arrays[k] for k in _KINDS)
        if self.pack_impl != "packed":
            self.dropped_documents = self._count_dropped()

    def _load_cached(self) -> dict[str, np.ndarray] | None:
        """The cached indices if all three files exist and agree with each other, else None (rebuild)."""
        if not all(p.is_file() for p in self.cache_paths.values()):
            return None
        try:
            arrays = {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in self.cache_paths.items()}
        except (OSError, ValueError):
            return None
        doc_idx, sample_idx, shuffle_idx = (arrays[k] for k in _KINDS)
        consistent = (
            doc_idx.ndim == 1 and sample_idx.ndim == 2 and sample_idx.shape == (shuffle_idx.shape[0] + 1, 2)
            and shuffle_idx.shape[0] >= self.requested_samples
        )
        if self.pack_impl == "packed":
            consistent = consistent and doc_idx.size % self.documents.size == 0
        else:
            consistent = consistent and int(sample_idx[-1, 0]) == doc_idx.size
        return arrays if consistent else None

    def _params(self) -> dict:
        docs = self.documents
        return {
            "version": INDEX_VERSION,
            "data": os.path.basename(self.indexed.prefix),
            "sequences": len(self.indexed),
            "tokens": self.indexed.num_tokens,
            "sizes_sha1": hashlib.sha1(np.ascontiguousarray(self.indexed.sizes).tobytes()).hexdigest(),
            "split": self.name,
            "documents_sha1": hashlib.sha1(docs.tobytes()).hexdigest(),
            "num_samples": self.requested_samples,
            "seq_length": self.seq_length,
            "seed": self.seed,
            **({} if self.pack_impl == "packed" else {
                "pack_impl": self.pack_impl, "allow_chopped": self.allow_chopped, "labels": self._label_stamp()}),
        }

    def _label_stamp(self) -> dict | None:
        """Which label file the whole-document index read (it drops documents without a counted label): name, size
        and modification time, so labels prepared again (say with --only-last) rebuild the index."""
        if self.label_indexed is None:
            return None
        stat = os.stat(f"{self.label_indexed.prefix}.bin")
        return {"name": os.path.basename(self.label_indexed.prefix), "bytes": stat.st_size,
                "mtime_ns": stat.st_mtime_ns}

    def _cache_stem(self) -> str:
        digest = hashlib.sha256(json.dumps(self._params(), sort_keys=True).encode()).hexdigest()[:16]
        return f"{os.path.basename(self.indexed.prefix)}_{self.name}_indexmap_{digest}"

    def _build(self) -> dict[str, np.ndarray]:
        rng = np.random.RandomState(self.seed)
        if self.pack_impl != "packed":
            has_target = None if self.label_indexed is None else _has_target(
                self.label_indexed, self.documents, self.seq_length + 1)
            built = build_document_samples(self.indexed.sizes, self.documents, self.seq_length,
                                           self.requested_samples, rng, self.pack_impl, self.allow_chopped,
                                           has_target)
            return {"doc_idx": built.doc_idx, "sample_idx": built.sample_idx, "shuffle_idx": built.shuffle_idx}
        epochs = num_epochs_needed(self.tokens_per_epoch, self.seq_length, self.requested_samples)
        doc_idx = build_doc_idx(self.documents, epochs, rng)
        total = (epochs * self.tokens_per_epoch - 1) // self.seq_length
        sample_idx = build_sample_idx(self.indexed.sizes, doc_idx, self.seq_length, total)
        full = ((epochs - 1) * self.tokens_per_epoch - 1) // self.seq_length if epochs > 1 else total
        shuffle_idx = build_shuffle_idx(total, full, rng)
        return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}

    def __len__(self) -> int:
        return int(self.shuffle_idx.shape[0])

    def _count_dropped(self) -> dict[str, int]:
        """How many of the split's documents the whole-document index leaves out, and why (for the run's log)."""
        width = self.seq_length + 1
        too_long = 0 if self.allow_chopped else int((self.indexed.sizes[self.documents] > width).sum())
        used = np.unique(np.asarray(self.doc_idx))
        return {"too_long": too_long, "no_target": int(self.documents.size - used.size - too_long)}

    def _sample(self, idx: int) -> int:
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sample {idx} out of range for {n} samples of {self.indexed.prefix}")
        return int(self.shuffle_idx[idx])

    def _stitched(self, data: MMapIndexedDataset, j: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens of packed sample ``j`` (before shuffling) read from ``data``."""
        d0, o0 = (int(v) for v in self.sample_idx[j])
        d1, o1 = (int(v) for v in self.sample_idx[j + 1])
        if d0 == d1:
            out = data.get(int(self.doc_idx[d0]), o0, o1 - o0 + 1)
        else:
            parts = [data.get(int(self.doc_idx[d0]), o0)]
            parts.extend(data[int(self.doc_idx[d])] for d in range(d0 + 1, d1))
            parts.append(data.get(int(self.doc_idx[d1]), 0, o1 + 1))
            out = np.concatenate(parts)
        return out.astype(np.int64)

    def _whole_documents(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Text and label rows of whole-document sample ``j``: its documents (each cut to the sample), padded."""
        width = self.seq_length + 1
        docs = [int(d) for d in self.doc_idx[int(self.sample_idx[j, 0]):int(self.sample_idx[j + 1, 0])]]
        text = np.concatenate([self.indexed.get(d, 0, min(int(self.indexed.sizes[d]), width)) for d in docs])
        label = None if self.label_indexed is None else np.concatenate(
            [self.label_indexed.get(d, 0, min(int(self.label_indexed.sizes[d]), width)) for d in docs])
        return fit_document(text.astype(np.int64), None if label is None else label.astype(np.int64), width)

    def tokens(self, idx: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens of sample ``idx`` (after shuffling), as int64."""
        j = self._sample(idx)
        if self.pack_impl != "packed":
            return self._whole_documents(j)[0]
        return self._stitched(self.indexed, j)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        j = self._sample(idx)
        if self.pack_impl != "packed":
            text, label = self._whole_documents(j)
            return {"text": text, "label": label}
        if self.label_indexed is None:
            return {"text": self._stitched(self.indexed, j)}
        return {"text": self._stitched(self.indexed, j), "label": self._stitched(self.label_indexed, j)}
