"""Documents inside a packed sample: which document each token belongs to, and positions that restart per document.

GPT-NeoX / Megatron convention: the end-of-document token is the LAST token of its document; the token after it
starts the next one. A sample that starts mid-document simply begins with that document's tail.
"""

from __future__ import annotations

import torch
from torch import Tensor


def document_ids(tokens: Tensor, eod_token: int) -> Tensor:
    """``[B, S]`` int64: 0 for the row's first document, +1 after every end-of-document token."""
    is_eod = (tokens == eod_token).to(torch.long)
    return torch.cumsum(is_eod, dim=-1) - is_eod


def document_starts(doc_ids: Tensor) -> Tensor:
    """``[B, S]`` int64: the position of the first token of each token's document (from :func:`document_ids`)."""
    pos = torch.arange(doc_ids.shape[-1], device=doc_ids.device).expand_as(doc_ids)
    first = torch.ones_like(doc_ids, dtype=torch.bool)
    first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), dim=-1).values


def document_positions(doc_ids: Tensor) -> Tensor:
    """``[B, S]`` int64 positions restarting at 0 on each document's first token (``reset_position_ids``)."""
    pos = torch.arange(doc_ids.shape[-1], device=doc_ids.device).expand_as(doc_ids)
    return pos - document_starts(doc_ids)
