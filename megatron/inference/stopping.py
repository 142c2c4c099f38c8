"""Stop strings for :func:`megatron.inference.generator.generate_batch` (lm_eval's ``until``).

A row ends as soon as the text of its generated tokens contains one of its stop strings. The check decodes the
row's whole continuation (a stop string can span several tokens, and byte-level BPE pieces only become text
together), so it never misses a stop string that a later decode of the same tokens would show; the caller cuts the
text at the first occurrence afterwards (lm_eval's ``postprocess_generated_text``).
"""

from __future__ import annotations

from typing import Callable, Sequence


class StopStrings:
    """``stop(row, tokens)`` for ``generate_batch``: True once ``detokenize(tokens)`` contains one of row's strings.

    ``per_row[row]`` lists that row's stop strings (empty strings are ignored, as lm_eval does)."""

    def __init__(self, detokenize: Callable[[list], str], per_row: Sequence[Sequence[str]]) -> None:
        self.detokenize = detokenize
        self.per_row = [[s for s in stops if s] for stops in per_row]

    def __call__(self, row: int, tokens: list) -> bool:
        stops = self.per_row[row]
        if not stops:
            return False
        text = self.detokenize(list(tokens))
        return any(s in text for s in stops)


__all__ = ["StopStrings"]
