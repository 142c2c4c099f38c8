"""Pure numpy builders of the three Megatron sample indices (no compiled helpers needed).

* ``doc_idx``: the document order, one shuffled permutation per epoch.
* ``sample_idx``: ``[num_samples + 1, 2]`` (position in doc_idx, token offset) where each sample starts; sample i
  covers the token stream from its start to the next sample's start *inclusive* (``seq_length + 1`` tokens).
* ``shuffle_idx``: the order in which samples are served; full epochs are shuffled apart from the last, partial
  epoch, so a run that stops inside the last epoch has still seen full epochs evenly.
"""

from __future__ import annotations

import numpy as np


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest number of epochs whose token stream yields ``num_samples`` samples of ``seq_length + 1`` tokens."""
    if tokens_per_epoch <= 0:
        raise ValueError("tokens_per_epoch must be positive")
    # (e * T - 1) // S >= n  <=>  e >= (n * S + 1) / T
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """Each epoch is an independent permutation of ``documents``."""
    documents = np.asarray(documents, dtype=np.int64)
    return np.concatenate([rng.permutation(documents) for _ in range(num_epochs)]).astype(np.int64)


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """Start ``(doc_idx position, offset)`` of samples ``0..num_samples`` (one extra row closes the last sample).

    Sample ``i`` starts at token ``i * seq_length`` of the stream formed by the documents in ``doc_idx`` order; a
    start that falls exactly on a document end moves to the next non-empty document (Megatron's semantics).
    """
    lengths = np.asarray(sizes, dtype=np.int64)[doc_idx]
    ends = np.cumsum(lengths)
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if num_samples and positions[-1] >= ends[-1]:
        raise ValueError(f"token stream of {int(ends[-1])} tokens is too short for {num_samples} samples")
    where = np.searchsorted(ends, positions, side="right")
    offsets = positions - (ends[where] - lengths[where])
    return np.stack([where, offsets], axis=1).astype(np.int64)


def build_shuffle_idx(num_samples: int, num_samples_full_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """Permutation of the first ``num_samples_full_epochs`` samples followed by one of the rest."""
    first = rng.permutation(num_samples_full_epochs).astype(np.int64)
    rest = (num_samples_full_epochs + rng.permutation(num_samples - num_samples_full_epochs)).astype(np.int64)
    return np.concatenate([first, rest])


def build_blending_indices(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Interleave datasets so that every prefix of the output has each dataset close to its weight.

    Dataset ``j``'s ``k``-th sample is due at time ``(k + 1/2) / w_j`` and samples are served in due order (ties
    go to the lower dataset index). After ``n`` samples dataset ``j`` has within about one sample of ``w_j * n``,
    like Megatron's greedy rule, but the whole index is one vectorised sort. Returns ``(dataset_index,
    dataset_sample_index)``.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"blend weights must be non-negative with a positive sum, got {list(weights)}")
    w = w / w.sum()
    due_parts, ds_parts, k_parts = [], [], []
    for j, wj in enumerate(w):
        if wj == 0:
            continue
        count = int(np.ceil(wj * size)) + 2
        k = np.arange(count, dtype=np.int64)
        due_parts.append((k + 0.5) / wj)
        ds_parts.append(np.full(count, j, dtype=np.int64))
        k_parts.append(k)
    due = np.concatenate(due_parts)
    ds = np.concatenate(ds_parts)
    ks = np.concatenate(k_parts)
    order = np.lexsort((ds, due))[:size]
    return ds[order].astype(np.int16 if w.size < 2**15 else np.int64), ks[order]
