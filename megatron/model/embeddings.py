"""Input embeddings: word embeddings, optional learned or sinusoidal absolute positions, embedding dropout."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def sinusoidal_table(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """GPT-NeoX's ``pos_emb: sinusoidal``: ``[sin(p * f), cos(p * f)]`` over the frequencies ``f = base^(-2i/dim)``
    (sines first, then cosines, not interleaved), computed in fp32. ``positions [B, S]`` -> ``[B, S, dim]``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


class Embedding(nn.Module):
    """``word_embeddings[ids] (+ position_embeddings[pos])`` followed by dropout (``hidden_dropout``, as GPT-NeoX).

    The position table exists for ``pos_emb: learned`` and whenever BiPE is on (then it is indexed by the
    intra-segment ids, even when rotary or ALiBi also encode the inter-segment ids).
    """

    def __init__(self, vocab_size: int, hidden_size: int, max_positions: Optional[int], dropout: float,
                 sinusoidal: bool = False, position_offset: int = 0) -> None:
        super().__init__()
        if sinusoidal and max_positions:
            raise ValueError("a model has either a learned or a sinusoidal position table, not both")
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_positions, hidden_size) if max_positions else None
        self.sinusoidal = sinusoidal
        # GPT-NeoX opt_pos_emb_offset: OPT's learned table is read at position + offset
        self.position_offset = position_offset
        self.dropout = nn.Dropout(dropout)

    @property
    def uses_positions(self) -> bool:
        """Whether ``forward`` needs absolute positions (a learned or sinusoidal table)."""
        return self.position_embeddings is not None or self.sinusoidal

    def forward(self, input_ids: Tensor, abs_positions: Optional[Tensor] = None) -> Tensor:
        x = self.word_embeddings(input_ids)
        if self.uses_positions and abs_positions is not None and self.position_offset:
            abs_positions = abs_positions + self.position_offset
        if self.sinusoidal:
            if abs_positions is None:
                raise ValueError("sinusoidal position embeddings need position ids")
            x = x + sinusoidal_table(abs_positions, x.shape[-1]).to(x.dtype)
        elif self.position_embeddings is not None:
            if abs_positions is None:
                raise ValueError("learned position embeddings need position ids")
            limit = self.position_embeddings.num_embeddings
            if abs_positions.numel() and int(abs_positions.max()) >= limit:
                raise ValueError(f"position id {int(abs_positions.max())} exceeds the learned position table "
                                 f"(max_position_embeddings = {limit}); raise max_position_embeddings or shorten "
                                 f"the sequence")
            x = x + self.position_embeddings(abs_positions)
        return self.dropout(x)
