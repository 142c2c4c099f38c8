"""Input embeddings: word embeddings, optional learned absolute positions, embedding dropout."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn


class Embedding(nn.Module):
    """``word_embeddings[ids] (+ position_embeddings[pos])`` followed by dropout (``hidden_dropout``, as GPT-NeoX).

    The position table exists for ``pos_emb: learned`` and whenever BiPE is on (then it is indexed by the
    intra-segment ids, even when rotary or ALiBi also encode the inter-segment ids).
    """

    def __init__(self, vocab_size: int, hidden_size: int, max_positions: Optional[int], dropout: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_positions, hidden_size) if max_positions else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: Tensor, abs_positions: Optional[Tensor] = None) -> Tensor:
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            if abs_positions is None:
                raise ValueError("learned position embeddings need position ids")
            limit = self.position_embeddings.num_embeddings
            if abs_positions.numel() and int(abs_positions.max()) >= limit:
                raise ValueError(f"position id {int(abs_positions.max())} exceeds the learned position table "
                                 f"(max_position_embeddings = {limit}); raise max_position_embeddings or shorten "
                                 f"the sequence")
            x = x + self.position_embeddings(abs_positions)
        return self.dropout(x)
