"""GPT pre-training samples: fixed-length windows of ``seq_length + 1`` tokens stitched across documents.

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
from megatron.data.sample_index import build_doc_idx, build_sample_idx, build_shuffle_idx, num_epochs_needed

INDEX_VERSION = 1
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


class GPTDataset(torch.utils.data.Dataset):
    """Samples ``{"text": int64[seq_length + 1]}`` drawn from ``documents`` of one indexed dataset.

    ``len(self)`` is every sample of the epochs needed to provide ``num_samples`` (at least ``num_samples``).
    ``built_index`` tells whether this instance built the indices (False: loaded from the cache).
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
    ) -> None:
        if seq_length < 1:
            raise DataError(f"seq_length must be >= 1, got {seq_length}")
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
            doc_idx.ndim == 1 and doc_idx.size % self.documents.size == 0
            and sample_idx.ndim == 2 and sample_idx.shape == (shuffle_idx.shape[0] + 1, 2)
            and shuffle_idx.shape[0] >= self.requested_samples
        )
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
        }

    def _cache_stem(self) -> str:
        digest = hashlib.sha256(json.dumps(self._params(), sort_keys=True).encode()).hexdigest()[:16]
        return f"{os.path.basename(self.indexed.prefix)}_{self.name}_indexmap_{digest}"

    def _build(self) -> dict[str, np.ndarray]:
        rng = np.random.RandomState(self.seed)
        epochs = num_epochs_needed(self.tokens_per_epoch, self.seq_length, self.requested_samples)
        doc_idx = build_doc_idx(self.documents, epochs, rng)
        total = (epochs * self.tokens_per_epoch - 1) // self.seq_length
        sample_idx = build_sample_idx(self.indexed.sizes, doc_idx, self.seq_length, total)
        full = ((epochs - 1) * self.tokens_per_epoch - 1) // self.seq_length if epochs > 1 else total
        shuffle_idx = build_shuffle_idx(total, full, rng)
        return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}

    def __len__(self) -> int:
        return int(self.shuffle_idx.shape[0])

    def tokens(self, idx: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens of sample ``idx`` (after shuffling), as int64."""
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sample {idx} out of range for {n} samples of {self.indexed.prefix}")
        j = int(self.shuffle_idx[idx])
        d0, o0 = (int(v) for v in self.sample_idx[j])
        d1, o1 = (int(v) for v in self.sample_idx[j + 1])
        if d0 == d1:
            out = self.indexed.get(int(self.doc_idx[d0]), o0, o1 - o0 + 1)
        else:
            parts = [self.indexed.get(int(self.doc_idx[d0]), o0)]
            parts.extend(self.indexed[int(self.doc_idx[d])] for d in range(d0 + 1, d1))
            parts.append(self.indexed.get(int(self.doc_idx[d1]), 0, o1 + 1))
            out = np.concatenate(parts)
        return out.astype(np.int64)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        return {"text": self.tokens(idx)}
