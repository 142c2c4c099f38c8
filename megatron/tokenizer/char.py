"""Character-level tokenizer: one id per Unicode code point, no vocabulary file."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from megatron.tokenizer.base import Tokenizer, TokenizerError

_REPLACEMENT = "\ufffd"


class CharLevelTokenizer(Tokenizer):
    """Ids are code points below ``vocab_size``.

    Id 0 (NUL, never in real text) is the end-of-document id, as in GPT-NeoX. Code points that do not fit are mapped
    to ``unk = vocab_size - 1`` and decode as U+FFFD, so the mapping is explicit instead of silently clamped.
    """

    name = "CharLevelTokenizer"

    def __init__(self, vocab_size: int = 512) -> None:
        if vocab_size < 128:
            raise TokenizerError(f"CharLevelTokenizer vocab_size must be >= 128 (ASCII), got {vocab_size}")
        self._vocab_size = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return 0

    @property
    def unk(self) -> int:
        """Id used for code points >= ``vocab_size - 1``."""
        return self._vocab_size - 1

    def tokenize(self, text: str) -> list[int]:
        # UTF-32 gives one code point per 4 bytes: vectorised, no per-character Python work
        points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        return np.minimum(points, self.unk).tolist()

    def detokenize(self, ids: Sequence[int]) -> str:
        unk = self.unk
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self._vocab_size:
                raise TokenizerError(f"id {i} is outside the CharLevelTokenizer vocabulary of {self._vocab_size}")
            out.append(_REPLACEMENT if i == unk else chr(i))
        return "".join(out)

    def id_to_token(self, token_id: int) -> str:
        return self.detokenize([token_id])

    def token_to_id(self, token: str) -> int:
        if len(token) != 1:
            raise TokenizerError(f"CharLevelTokenizer tokens are single characters, got {token!r}")
        return self.tokenize(token)[0]
