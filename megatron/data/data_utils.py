"""Build the train/valid/test datasets from plain arguments (the training loop adapts its config to these).

Two ways to name data, as in GPT-NeoX: one ``data_prefixes`` list whose documents are split by ``split``
(``data-path``), or separate ``train/valid/test_prefixes`` lists used whole (``train-data-paths`` ...). Several
prefixes in one list are blended by weight. Fine-tuning label datasets (``train-label-data-paths`` ...) pair up with
the separate lists, one label prefix per data prefix.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import torch

from megatron.data.blendable_dataset import BlendableDataset, blend_counts
from megatron.data.errors import DataError
from megatron.data.gpt_dataset import GPTDataset
from megatron.data.indexed_dataset import MMapIndexedDataset, normalize_prefix

SPLIT_NAMES = ("train", "valid", "test")
Dataset = torch.utils.data.Dataset


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` (or ``/``-separated) -> three non-negative weights summing to 1."""
    parts = [p for p in re.split(r"[,/]", str(split).strip()) if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise DataError(f"split {split!r}: expected up to three numbers like '969,30,1'") from None
    if not 1 <= len(values) <= 3 or any(v < 0 or not math.isfinite(v) for v in values) or sum(values) <= 0:
        raise DataError(f"split {split!r}: expected 1-3 non-negative numbers with a positive sum, like '969,30,1'")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def split_document_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """``[start, end)`` document ranges of train/valid/test (Megatron's rounding: the last boundary is exact)."""
    fractions = parse_split(split)
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + int(round(f * num_documents)))
    diff = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def _open(prefix: str) -> MMapIndexedDataset:
    ds = MMapIndexedDataset(normalize_prefix(prefix))
    if len(ds) == 0 or ds.num_tokens == 0:
        raise DataError(f"{ds.prefix}: empty corpus ({len(ds)} documents, {ds.num_tokens} tokens)")
    return ds


def _weights(prefixes: Sequence[str], weights: Sequence[float] | None, what: str) -> list[float]:
    if weights is None:
        return [1.0] * len(prefixes)
    if len(weights) != len(prefixes):
        raise DataError(f"{what}: {len(prefixes)} data paths but {len(weights)} weights")
    return [float(w) for w in weights]


def _blend(
    split_name: str,
    sources: list[tuple[MMapIndexedDataset, np.ndarray]],
    weights: list[float],
    num_samples: int,
    seq_length: int,
    seed: int,
    cache_dir: str | None,
    labels: Sequence[MMapIndexedDataset | None] | None = None,
    pack_impl: str = "packed",
    allow_chopped: bool = True,
) -> Dataset:
    labels = list(labels) if labels is not None else [None] * len(sources)
    if len(sources) == 1:
        ds, docs = sources[0]
        return GPTDataset(split_name, ds, docs, num_samples, seq_length, seed, cache_dir, label_indexed=labels[0],
                          pack_impl=pack_impl, allow_chopped=allow_chopped)
    _, _, counts = blend_counts(weights, num_samples)
    parts = [
        GPTDataset(split_name, ds, docs, max(count, 1), seq_length, seed, cache_dir, label_indexed=label,
                   pack_impl=pack_impl, allow_chopped=allow_chopped)
        for (ds, docs), count, label in zip(sources, counts, labels)
    ]
    return BlendableDataset(parts, weights, num_samples)


def build_train_valid_test_datasets(
    data_prefixes: list[str] | None,
    data_weights: list[float] | None,
    split: str,
    seq_length: int,
    seed: int,
    train_valid_test_num_samples: tuple[int, int, int],
    train_prefixes: list[str] | None = None,
    valid_prefixes: list[str] | None = None,
    test_prefixes: list[str] | None = None,
    train_weights: list[float] | None = None,
    valid_weights: list[float] | None = None,
    test_weights: list[float] | None = None,
    cache_dir: str | None = None,
    train_label_prefixes: list[str] | None = None,
    valid_label_prefixes: list[str] | None = None,
    test_label_prefixes: list[str] | None = None,
    pack_impl: str = "packed",
    allow_chopped: bool = True,
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """Datasets for the three splits; a split with 0 requested samples (or no data) is ``None``.

    Items are ``{"text": int64[seq_length + 1]}``, plus ``"label"`` (same length, -100 = not counted) when the
    split has label prefixes or ``pack_impl`` keeps documents whole. Raises :class:`DataError` for a missing file
    (naming it), an empty corpus, an empty split that is asked for samples, inconsistent weights, or label data that
    does not match its text data.
    """
    if len(train_valid_test_num_samples) != 3:
        raise DataError(f"train_valid_test_num_samples must have 3 entries, got {train_valid_test_num_samples}")
    separate = any(p for p in (train_prefixes, valid_prefixes, test_prefixes))
    if data_prefixes and separate:
        raise DataError("give either data_prefixes (data-path) or train/valid/test_prefixes, not both")
    if not data_prefixes and not separate:
        raise DataError("no data: set data_prefixes (data-path) or train_prefixes (train-data-paths)")
    label_lists = (train_label_prefixes, valid_label_prefixes, test_label_prefixes)
    if data_prefixes and any(label_lists):
        raise DataError("label data (train/valid/test-label-data-paths) pairs with train/valid/test-data-paths, not "
                        "with data-path: name the text and label prefixes of each split")
    out: list[Dataset | None] = [None, None, None]
    if data_prefixes:
        weights = _weights(data_prefixes, data_weights, "data-path")
        opened = [_open(p) for p in data_prefixes]
        ranges = [split_document_ranges(split, len(ds)) for ds in opened]
        for i, name in enumerate(SPLIT_NAMES):
            n = int(train_valid_test_num_samples[i])
            if n <= 0:
                continue
            keep = [(ds, np.arange(*r[i], dtype=np.int64), w) for ds, r, w in zip(opened, ranges, weights)]
            keep = [k for k in keep if k[1].size > 0 and k[2] > 0]
            if not keep:
                raise DataError(
                    f"split {split!r} leaves no documents for {name} in {', '.join(d.prefix for d in opened)} "
                    f"but {n} {name} samples were requested"
                )
            out[i] = _blend(name, [(k[0], k[1]) for k in keep], [k[2] for k in keep], n, seq_length, seed, cache_dir,
                            pack_impl=pack_impl, allow_chopped=allow_chopped)
        return out[0], out[1], out[2]
    lists = (train_prefixes, valid_prefixes, test_prefixes)
    wlists = (train_weights, valid_weights, test_weights)
    for i, name in enumerate(SPLIT_NAMES):
        prefixes, n = lists[i], int(train_valid_test_num_samples[i])
        if not prefixes or n <= 0:
            continue
        weights = _weights(prefixes, wlists[i], f"{name}-data-paths")
        opened = [_open(p) for p in prefixes]
        label_prefixes = label_lists[i]
        if label_prefixes and len(label_prefixes) != len(prefixes):
            raise DataError(f"{name}-label-data-paths has {len(label_prefixes)} prefixes but {name}-data-paths has "
                            f"{len(prefixes)}: give one label dataset per data prefix")
        labels = [_open(p) for p in label_prefixes] if label_prefixes else None
        sources = [(ds, np.arange(len(ds), dtype=np.int64)) for ds in opened]
        out[i] = _blend(name, sources, weights, n, seq_length, seed, cache_dir, labels=labels, pack_impl=pack_impl,
                        allow_chopped=allow_chopped)
    return out[0], out[1], out[2]
