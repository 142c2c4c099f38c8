"""Preference pairs for DPO: GPT-NeoX's pairwise dataset (``dataset_impl: pairwise``).

Document ``i`` of the chosen (``pos``) dataset pairs with document ``i`` of the rejected (``neg``) dataset. A sample
is one pair, each side fitted into ``seq_length + 1`` positions by :func:`megatron.data.packing.fit_document` (cut
to its first ``seq_length + 1`` tokens, padded with token 0 and label -100), GPT-NeoX's ``unpacked`` layout::

    {"pos": int64[S+1], "pos_label": int64[S+1], "neg": int64[S+1], "neg_label": int64[S+1]}
    (+ "pos_ref", "neg_ref": float32[S+1] with precomputed reference log-probabilities)

Without label data every token of a side is its own label (padding still -100: GPT-NeoX counted its padding). The
order is one seeded permutation of the pairs per epoch (:func:`megatron.data.packing.build_document_samples`), so
the same seed gives the same samples on any machine, and sample ``i`` is a pure function of ``i`` (a resume that
starts its sampler at the consumed count continues exactly). The index is cheap (one permutation per epoch) and is
rebuilt on every start instead of cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from megatron.data.blendable_dataset import BlendableDataset, blend_counts
from megatron.data.errors import DataError
from megatron.data.indexed_dataset import MMapIndexedDataset, normalize_prefix
from megatron.data.packing import build_document_samples, fit_document

SIDES = ("pos", "neg")


@dataclass(frozen=True)
class PairSource:
    """The datasets of one chosen / rejected prefix pair: text, optional labels, optional reference log-probs."""

    pos: MMapIndexedDataset
    neg: MMapIndexedDataset
    pos_label: Optional[MMapIndexedDataset] = None
    neg_label: Optional[MMapIndexedDataset] = None
    pos_ref: Optional[MMapIndexedDataset] = None
    neg_ref: Optional[MMapIndexedDataset] = None

    @classmethod
    def open(cls, pos: str, neg: str, pos_label: Optional[str] = None, neg_label: Optional[str] = None,
             reference_name: Optional[str] = None) -> "PairSource":
        """Open the prefixes; ``reference_name`` reads GPT-NeoX's ``<prefix>_<name>`` reference datasets."""
        ref = (lambda prefix: _open(f"{normalize_prefix(prefix)}_{reference_name}")) if reference_name else None
        source = cls(pos=_open(pos), neg=_open(neg),
                     pos_label=_open(pos_label) if pos_label else None,
                     neg_label=_open(neg_label) if neg_label else None,
                     pos_ref=ref(pos) if ref else None, neg_ref=ref(neg) if ref else None)
        source.check()
        return source

    def check(self) -> None:
        """Every dataset holds one sequence per pair, and label / reference rows match their text rows."""
        n = len(self.pos)
        if len(self.neg) != n:
            raise DataError(f"{self.neg.prefix}: {len(self.neg)} rejected documents but {self.pos.prefix} holds {n} "
                            f"chosen ones; pair i is chosen document i with rejected document i")
        for side in SIDES:
            text = getattr(self, side)
            for kind in ("label", "ref"):
                other = getattr(self, f"{side}_{kind}")
                if other is None:
                    continue
                if len(other) != n:
                    raise DataError(f"{other.prefix}: {len(other)} rows but {text.prefix} holds {n}")
                if kind == "label" and not np.array_equal(other.sizes, text.sizes):
                    bad = int(np.flatnonzero(other.sizes != text.sizes)[0])
                    raise DataError(f"{other.prefix}: label row {bad} has {int(other.sizes[bad])} entries but its text "
                                    f"row in {text.prefix} has {int(text.sizes[bad])}")


def _open(prefix: str) -> MMapIndexedDataset:
    ds = MMapIndexedDataset(normalize_prefix(prefix))
    if len(ds) == 0:
        raise DataError(f"{ds.prefix}: no documents")
    return ds


class PairwiseDataset(torch.utils.data.Dataset):
    """``num_samples`` (or more: whole epochs) chosen / rejected pairs of one :class:`PairSource`."""

    def __init__(self, name: str, source: PairSource, num_samples: int, seq_length: int, seed: int) -> None:
        if seq_length < 1:
            raise DataError(f"seq_length must be >= 1, got {seq_length}")
        self.name, self.source = name, source
        self.seq_length = int(seq_length)
        width = self.seq_length + 1
        sizes = np.maximum(source.pos.sizes, source.neg.sizes).astype(np.int64)
        index = build_document_samples(sizes, np.arange(len(source.pos), dtype=np.int64), self.seq_length,
                                       max(int(num_samples), 1), np.random.RandomState(seed), "unpacked",
                                       allow_chopped=True)
        self.pairs = index.doc_idx[index.sample_idx[:-1, 0]][index.shuffle_idx]  # the pair of every sample
        self.width = width

    def __len__(self) -> int:
        return int(self.pairs.size)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sample {idx} out of range for {n} pairs of {self.source.pos.prefix}")
        pair = int(self.pairs[idx])
        out: dict[str, np.ndarray] = {}
        for side in SIDES:
            text = getattr(self.source, side)[pair]
            label_ds = getattr(self.source, f"{side}_label")
            out[side], out[f"{side}_label"] = fit_document(text, None if label_ds is None else label_ds[pair],
                                                           self.width)
            ref_ds = getattr(self.source, f"{side}_ref")
            if ref_ds is not None:
                ref = np.zeros(self.width, dtype=np.float32)
                row = np.asarray(ref_ds[pair], dtype=np.float32)[: self.width]
                ref[: row.size] = row
                out[f"{side}_ref"] = ref
        return out


def build_pairwise_dataset(name: str, sources: Sequence[PairSource], num_samples: int, seq_length: int,
                           seed: int) -> Optional[torch.utils.data.Dataset]:
    """One split: a single source as is, several blended with equal weights (None when no samples are asked)."""
    if num_samples <= 0 or not sources:
        return None
    if len(sources) == 1:
        return PairwiseDataset(name, sources[0], num_samples, seq_length, seed)
    weights = [1.0] * len(sources)
    _, _, counts = blend_counts(weights, num_samples)
    parts = [PairwiseDataset(name, s, max(c, 1), seq_length, seed) for s, c in zip(sources, counts)]
    return BlendableDataset(parts, weights, num_samples)


__all__ = ["PairSource", "PairwiseDataset", "SIDES", "build_pairwise_dataset"]
