"""Derive SepLLM separator token ids from any tokenizer (spec section 2).

A separator character is only usable when it encodes to exactly one id; multi-id encodings are dropped.
"""

from __future__ import annotations

from typing import Any, Sequence

#: the 9 base separator strings of SepLLM: . , ? ! ; : space tab newline
BASE_SEPARATORS: tuple[str, ...] = (".", ",", "?", "!", ";", ":", " ", "\t", "\n")


def separator_candidates(chars: Sequence[str] = BASE_SEPARATORS, variants: bool = False) -> list[str]:
    """The strings to try: ``chars`` and, with ``variants``, each with 1-2 leading / trailing spaces.

    With variants the whitespace runs of two and three spaces are tried as well (as the reference script does).
    """
    out = list(chars)
    if variants:
        for prefix, suffix in ((" ", ""), ("  ", ""), ("", " "), ("", "  ")):
            out.extend(prefix + c + suffix for c in chars)
        out.extend(["  ", "   "])
    seen: set[str] = set()
    return [c for c in out if not (c in seen or seen.add(c))]


def _encode(tokenizer: Any, text: str) -> list[int]:
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:  # an encoder without that keyword
        ids = tokenizer.encode(text)
    if hasattr(ids, "ids"):  # a raw ``tokenizers.Encoding``
        ids = ids.ids
    return [int(i) for i in ids]


def separator_table(
    tokenizer: Any, chars: Sequence[str] = BASE_SEPARATORS, variants: bool = False
) -> list[tuple[str, int]]:
    """``(string, id)`` for every candidate that encodes to exactly one id, first occurrence of each id kept."""
    table: list[tuple[str, int]] = []
    seen: set[int] = set()
    for cand in separator_candidates(chars, variants):
        ids = _encode(tokenizer, cand)
        if len(ids) == 1 and ids[0] not in seen:
            seen.add(ids[0])
            table.append((cand, ids[0]))
    return table


def separator_ids(tokenizer: Any, chars: Sequence[str] = BASE_SEPARATORS, variants: bool = False) -> list[int]:
    """Separator ids of ``tokenizer``, in candidate order.

    ``tokenizer`` is one of ours or anything with ``encode(text, add_special_tokens=False)`` (a transformers
    tokenizer, a ``tokenizers.Tokenizer``). For GPT-NeoX-20B the base list is
    ``[15, 13, 32, 2, 28, 27, 209, 186, 187]``.
    """
    return [i for _, i in separator_table(tokenizer, chars, variants)]
