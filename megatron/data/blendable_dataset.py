"""Weighted mixture of datasets with exact proportions at every prefix (see ``build_blending_indices``)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megatron.data.errors import DataError
from megatron.data.sample_index import build_blending_indices


def blend_counts(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Blending index for ``size`` samples and how many samples each dataset must provide."""
    try:
        ds_index, ds_sample = build_blending_indices(np.asarray(weights, dtype=np.float64), size)
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    counts = np.bincount(ds_index.astype(np.int64), minlength=len(weights)).tolist()
    return ds_index, ds_sample, counts


class BlendableDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights`` (normalised)."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], weights: Sequence[float], size: int) -> None:
        if len(datasets) != len(weights):
            raise DataError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.size = int(size)
        self.dataset_index, self.dataset_sample_index, counts = blend_counts(weights, self.size)
        for j, (ds, need) in enumerate(zip(self.datasets, counts)):
            if len(ds) < need:
                raise DataError(f"blend: dataset {j} has {len(ds)} samples but the blend needs {need}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if not -self.size <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for a blend of {self.size}")
        j = int(self.dataset_index[idx])
        return self.datasets[j][int(self.dataset_sample_index[idx])]
