"""Choosing the next token from logits: greedy, temperature, top-k, top-p (GPT-NeoX's keys and meaning)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingSettings:
    """Greedy when all three are 0 (GPT-NeoX); when sampling, ``temperature`` 0 means 1."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 and self.top_k == 0 and self.top_p == 0.0


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """``logits [B, V]`` with everything outside the top-k / nucleus set to -inf (the best token always stays)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p     # mass before this token already reaches top_p
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return logits


def next_tokens(logits: Tensor, settings: SamplingSettings, vocab_size: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """``[B]`` next-token ids from the last-position ``logits [B, V]``. Ids ``>= vocab_size`` (the embedding's
    padding rows, no real token) are never chosen."""
    logits = logits.to(torch.float32)
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits.clone()
        logits[:, vocab_size:] = float("-inf")
    if settings.greedy:
        return logits.argmax(dim=-1)
    temperature = settings.temperature if settings.temperature > 0 else 1.0
    logits = filter_logits(logits / temperature, settings.top_k, settings.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


__all__ = ["SamplingSettings", "filter_logits", "next_tokens"]
