"""Whole documents as samples (GPT-NeoX ``pack_impl`` ``pack_until_overflow`` and ``unpacked``), for fine-tuning.

``packed`` (pre-training) stitches the token stream into full windows and cuts documents anywhere; it lives in
:mod:`megatron.data.sample_index`. The two modes here keep every document whole inside one sample of
``seq_length + 1`` positions and pad the rest: text with :data:`PAD_TOKEN` (GPT-NeoX pads with 0), labels with
:data:`IGNORE_LABEL`, so padding is never counted. A document longer than the sample is cut to its first
``seq_length + 1`` tokens when ``allow_chopped`` is true and dropped otherwise.

:func:`fit_document` is the one "one document (+ labels) into a fixed length" rule; a pairwise (preference) dataset
reuses it for its chosen / rejected rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron.data.errors import DataError
from megatron.data.sample_index import build_shuffle_idx

#: the text id of padding positions (GPT-NeoX's ``np.pad(..., constant_values=0)``)
PAD_TOKEN = 0
#: the label of positions that carry no loss (prompt tokens, user turns, padding)
IGNORE_LABEL = -100
DOCUMENT_PACK_IMPLS = ("pack_until_overflow", "unpacked")


def fit_document(tokens: np.ndarray, labels: Optional[np.ndarray], length: int,
                 pad_token: int = PAD_TOKEN) -> tuple[np.ndarray, np.ndarray]:
    """``(text, label)`` int64 rows of exactly ``length``: the document's first ``length`` tokens, then padding.

    ``labels`` (aligned with ``tokens``, -100 = not counted) default to the tokens themselves; padding gets
    ``pad_token`` as text and :data:`IGNORE_LABEL` as label. Raises DataError when the rows disagree in length.
    """
    tokens = np.asarray(tokens)
    labels = tokens if labels is None else np.asarray(labels)
    if labels.shape != tokens.shape or tokens.ndim != 1:
        raise DataError(f"fit_document: label row {labels.shape} must match the text row {tokens.shape} (1-D)")
    n = min(int(tokens.size), int(length))
    text = np.full(length, pad_token, dtype=np.int64)
    label = np.full(length, IGNORE_LABEL, dtype=np.int64)
    text[:n] = tokens[:n]
    label[:n] = labels[:n]
    return text, label


@dataclass(frozen=True)
class DocumentSamples:
    """Samples made of whole documents: sample ``j`` holds documents ``doc_idx[sample_idx[j, 0]:sample_idx[j + 1,
    0]]`` (column 1 is always 0, the layout of the packed index), served in ``shuffle_idx`` order."""

    doc_idx: np.ndarray
    sample_idx: np.ndarray
    shuffle_idx: np.ndarray
    dropped_too_long: int      # documents longer than the sample, dropped (allow_chopped false)
    dropped_no_target: int     # documents whose first seq_length + 1 labels are all negative (nothing to learn)


def _epoch_samples(lengths: np.ndarray, order: np.ndarray, width: int, pack: bool) -> list[int]:
    """Start positions (into ``order``) of the samples of one epoch."""
    if not pack:
        return list(range(order.size))
    starts: list[int] = []
    running = 0
    for i, doc in enumerate(order):
        n = min(int(lengths[doc]), width)
        if not starts or running + n > width:
            starts.append(i)
            running = 0
        running += n
    return starts


def build_document_samples(sizes: np.ndarray, documents: np.ndarray, seq_length: int, num_samples: int,
                           rng: np.random.RandomState, pack_impl: str, allow_chopped: bool,
                           has_target: Optional[np.ndarray] = None) -> DocumentSamples:
    """The index of ``pack_impl`` ``pack_until_overflow`` / ``unpacked`` over ``documents`` (ids into ``sizes``).

    Each epoch is a fresh permutation of the usable documents, packed on its own (a sample never spans two epochs);
    epochs are added until there are ``num_samples`` samples. ``has_target[k]`` (per entry of ``documents``) False
    drops a document with no counted label. The shuffle is the packed mode's: full epochs shuffled together, the
    last one apart.
    """
    if pack_impl not in DOCUMENT_PACK_IMPLS:
        raise DataError(f"pack_impl {pack_impl!r}: expected one of {', '.join(DOCUMENT_PACK_IMPLS)}")
    width = int(seq_length) + 1
    documents = np.asarray(documents, dtype=np.int64)
    lengths = np.asarray(sizes, dtype=np.int64)
    keep = np.ones(documents.size, dtype=bool)
    too_long = lengths[documents] > width
    dropped_too_long = 0 if allow_chopped else int(too_long.sum())
    if not allow_chopped:
        keep &= ~too_long
    dropped_no_target = 0
    if has_target is not None:
        no_target = keep & ~np.asarray(has_target, dtype=bool)
        dropped_no_target = int(no_target.sum())
        keep &= ~no_target
    usable = documents[keep]
    if usable.size == 0:
        raise DataError(f"pack_impl {pack_impl}: no usable document ({dropped_too_long} longer than seq_length + 1 = "
                        f"{width} tokens with allow_chopped false, {dropped_no_target} without any counted label)")
    doc_parts: list[np.ndarray] = []
    starts: list[int] = []
    epoch_sizes: list[int] = []
    offset = 0
    while not starts or len(starts) < num_samples:
        order = rng.permutation(usable)
        epoch = _epoch_samples(lengths, order, width, pack_impl == "pack_until_overflow")
        starts.extend(offset + s for s in epoch)
        epoch_sizes.append(len(epoch))
        doc_parts.append(order)
        offset += order.size
    doc_idx = np.concatenate(doc_parts).astype(np.int64)
    sample_idx = np.zeros((len(starts) + 1, 2), dtype=np.int64)
    sample_idx[:-1, 0] = starts
    sample_idx[-1, 0] = doc_idx.size
    total = len(starts)
    full = total - epoch_sizes[-1] if len(epoch_sizes) > 1 else total
    shuffle_idx = build_shuffle_idx(total, full, rng)
    return DocumentSamples(doc_idx, sample_idx, shuffle_idx, dropped_too_long, dropped_no_target)
