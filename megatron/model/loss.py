"""Language-model loss."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def token_weights(labels: Tensor, loss_mask: Optional[Tensor], who: str = "lm_loss") -> Tensor:
    """fp32 weight of each target token: 0 where the label is negative (-100) or ``loss_mask`` is 0, else the mask's
    value (1 without a mask). The one rule every loss path (plain, fused, vocab-parallel) counts tokens by."""
    weights = (labels >= 0).to(torch.float32)
    if loss_mask is not None:
        if loss_mask.shape != labels.shape:
            raise ValueError(f"{who}: loss_mask {tuple(loss_mask.shape)} must match labels {tuple(labels.shape)}")
        weights = weights * loss_mask.to(torch.float32)
    return weights


def lm_loss(logits: Tensor, labels: Tensor, loss_mask: Optional[Tensor] = None, *, upcast: bool = True) -> Tensor:
    """Mean token cross-entropy over unmasked tokens, computed in fp32 (``upcast=False``: in the logits' dtype, as
    GPT-NeoX's ``fp16_lm_cross_entropy`` does; the mean is still taken in fp32).

    ``logits [B, S, V]`` and ``labels [B, S]`` are already aligned (``labels[:, t]`` is the target of position ``t``,
    i.e. the caller shifted the tokens, GPT-NeoX style). ``loss_mask [B, S]`` weights tokens (1 = count,
    0 = ignore); labels < 0 (e.g. -100) are ignored too. With no counted token the loss is 0 (still differentiable).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"lm_loss: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    weights = token_weights(labels, loss_mask)
    flat = logits.reshape(-1, logits.shape[-1])
    per_token = F.cross_entropy(flat.to(torch.float32) if upcast else flat, labels.clamp(min=0).reshape(-1),
                                reduction="none").to(torch.float32)
    return (per_token * weights.reshape(-1)).sum() / weights.sum().clamp(min=1.0)
