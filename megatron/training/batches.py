"""Turn data-loader samples (``{"text": int64[seq + 1]}``) into model inputs, labels and loss masks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor


@dataclass
class Batch:
    tokens: Tensor      # [B, S]   inputs
    labels: Tensor      # [B, S]   next-token targets (tokens shifted by one)
    loss_mask: Tensor   # [B, S]   float, 1 = counted

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


def make_batch(sample: Mapping[str, Any], eod_token: int | None, eod_mask_loss: bool,
               device: torch.device | str) -> Batch:
    """GPT-NeoX convention: ``tokens = text[:, :-1]``, ``labels = text[:, 1:]``. With ``eod_mask_loss`` the
    positions whose INPUT is the end-of-document token do not count (no loss on guessing the next document's first
    token from across the boundary), as in GPT-NeoX/Megatron."""
    text = sample["text"]
    if not isinstance(text, Tensor):
        text = torch.as_tensor(text)
    if text.dim() != 2 or text.shape[1] < 2:
        raise ValueError(f"expected a batch of token rows [batch, seq+1], got shape {tuple(text.shape)}")
    text = text.to(device=device, dtype=torch.long, non_blocking=True)
    tokens = text[:, :-1].contiguous()
    labels = text[:, 1:].contiguous()
    loss_mask = torch.ones(tokens.shape, dtype=torch.float32, device=tokens.device)
    if eod_mask_loss:
        if eod_token is None:
            raise ValueError("eod_mask_loss is set but the tokenizer has no end-of-document token")
        loss_mask[tokens == eod_token] = 0.0
    return Batch(tokens=tokens, labels=labels, loss_mask=loss_mask)


def cycle_batches(loader: Any) -> Iterator[Any]:
    """Iterate a loader forever (a new pass starts where the sampler says: it handles epochs itself)."""
    while True:
        yielded = False
        for item in loader:
            yielded = True
            yield item
        if not yielded:
            raise RuntimeError("the data loader produced no batch: the dataset is smaller than one micro-batch")
