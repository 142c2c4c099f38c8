"""Turn data-loader samples (``{"text": int64[seq + 1]}``, optionally ``"label"``) into model inputs, labels, loss
masks and, for packed samples whose documents stay apart, document ids and restarted positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional

import torch
from torch import Tensor

from megatron.data.documents import document_ids, document_positions

if TYPE_CHECKING:
    from megatron.config.neox import NeoXConfig


@dataclass
class Batch:
    tokens: Tensor      # [B, S]   inputs
    labels: Tensor      # [B, S]   next-token targets (tokens shifted by one)
    loss_mask: Tensor   # [B, S]   float, 1 = counted
    position_ids: Optional[Tensor] = None   # [B, S] restarted per document (reset_position_ids), else None
    document_ids: Optional[Tensor] = None   # [B, S] document of each token (reset_attention_mask), else None

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


@dataclass(frozen=True)
class BatchRules:
    """How samples become batches: GPT-NeoX's ``eod_mask_loss``, ``reset_position_ids``, ``reset_attention_mask``."""

    eod_token: Optional[int] = None
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False

    @classmethod
    def of(cls, cfg: NeoXConfig, eod_token: Optional[int]) -> "BatchRules":
        t = cfg.training
        return cls(eod_token=eod_token, eod_mask_loss=t.eod_mask_loss,
                   reset_position_ids=t.reset_position_ids, reset_attention_mask=t.reset_attention_mask)

    def needs_eod(self) -> bool:
        return self.eod_mask_loss or self.reset_position_ids or self.reset_attention_mask


def make_batch(sample: Mapping[str, Any], rules: BatchRules, device: torch.device | str) -> Batch:
    """GPT-NeoX convention: ``tokens = text[:, :-1]``, ``labels = text[:, 1:]``.

    * ``sample["label"]`` (fine-tuning label data, aligned with ``text``): ``labels = label[:, 1:]``; a negative
      label (-100 on prompt tokens and padding) is never counted.
    * ``eod_mask_loss``: positions whose INPUT is the end-of-document token do not count (no loss on guessing the
      next document's first token from across the boundary), as in GPT-NeoX/Megatron.
    * ``reset_attention_mask``: ``document_ids`` tell the model which document each input token is in (the
      end-of-document token closes its document); ``reset_position_ids``: positions restart at 0 per document.
    """
    text = _rows(sample["text"], "text")
    text = text.to(device=device, dtype=torch.long, non_blocking=True)
    tokens = text[:, :-1].contiguous()
    if "label" in sample and sample["label"] is not None:
        label = _rows(sample["label"], "label").to(device=device, dtype=torch.long, non_blocking=True)
        if label.shape != text.shape:
            raise ValueError(f"label rows {tuple(label.shape)} must match text rows {tuple(text.shape)}")
        labels = label[:, 1:].contiguous()
    else:
        labels = text[:, 1:].contiguous()
    loss_mask = (labels >= 0).to(torch.float32)
    if rules.needs_eod() and rules.eod_token is None:
        raise ValueError("eod_mask_loss / reset_position_ids / reset_attention_mask need the tokenizer's "
                         "end-of-document token, and this tokenizer has none")
    if rules.eod_mask_loss:
        loss_mask[tokens == rules.eod_token] = 0.0
    docs = document_ids(tokens, rules.eod_token) if (rules.reset_position_ids or rules.reset_attention_mask) else None
    return Batch(tokens=tokens, labels=labels, loss_mask=loss_mask,
                 position_ids=document_positions(docs) if rules.reset_position_ids else None,
                 document_ids=docs if rules.reset_attention_mask else None)


def _rows(value: Any, name: str) -> Tensor:
    rows = value if isinstance(value, Tensor) else torch.as_tensor(value)
    if rows.dim() != 2 or rows.shape[1] < 2:
        raise ValueError(f"expected a batch of {name} rows [batch, seq+1], got shape {tuple(rows.shape)}")
    return rows


def cycle_batches(loader: Any) -> Iterator[Any]:
    """Iterate a loader forever (a new pass starts where the sampler says: it handles epochs itself)."""
    while True:
        yielded = False
        for item in loader:
            yielded = True
            yield item
        if not yielded:
            raise RuntimeError("the data loader produced no batch: the dataset is smaller than one micro-batch")
