"""The tokenizer interface every backend implements.

The trainer, the data pipeline and the SepLLM tools only talk to this interface, so a backend can be swapped by
name in a config without touching them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence
from megatron.errors import UserInputError


class TokenizerError(UserInputError, ValueError):
    """A tokenizer could not be built or used (bad file, unknown type, unknown token): input the user named (exit
    2)."""


def pad_vocab_size(vocab_size: int, divisible_by: int = 128, model_parallel_size: int = 1) -> int:
    """Round ``vocab_size`` up to a multiple of ``divisible_by * model_parallel_size``.

    Megatron pads the embedding so that every tensor-parallel shard has the same, well-aligned number of rows.
    """
    if vocab_size <= 0:
        raise TokenizerError(f"vocab_size must be positive, got {vocab_size}")
    if divisible_by <= 0 or model_parallel_size <= 0:
        raise TokenizerError(
            f"divisible_by and model_parallel_size must be positive, got {divisible_by} and {model_parallel_size}"
        )
    multiple = divisible_by * model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


class Tokenizer(ABC):
    """Abstract tokenizer: text <-> ids, plus the special ids the data pipeline needs.

    ``eod`` is the id appended after each document. ``pad`` is ``None`` where the backend defines no padding id.
    """

    #: short backend name, e.g. ``"HFTokenizer"``
    name: str = "Tokenizer"
    #: True when ``tokenize_batch`` runs native code without the GIL (then threads parallelise it)
    releases_gil: bool = False

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the backend can produce (before padding for the embedding)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """End-of-document id appended after every document."""

    @property
    def pad(self) -> int | None:
        """Padding id, or ``None`` if the backend has none."""
        return None

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Encode ``text`` to ids, without adding any special tokens."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Decode ids back to text."""

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode several texts; backends with a native batch encoder override this for speed."""
        return [self.tokenize(t) for t in texts]

    def tokenize_document(self, text: str) -> list[int]:
        """Encode one whole document; equal to ``tokenize(text)`` but may be faster on long documents."""
        return self.tokenize(text)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id`` (backends without a vocabulary raise ``NotImplementedError``)."""
        raise NotImplementedError(f"{self.name} has no id_to_token")

    def token_to_id(self, token: str) -> int:
        """The id of vocabulary entry ``token`` (backends without a vocabulary raise ``NotImplementedError``)."""
        raise NotImplementedError(f"{self.name} has no token_to_id")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Alias of :meth:`tokenize` with the Hugging Face signature, so duck-typed tools accept us too."""
        return self.tokenize(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Alias of :meth:`detokenize` with the Hugging Face name."""
        return self.detokenize(ids)

    def padded_vocab_size(self, divisible_by: int = 128, model_parallel_size: int = 1) -> int:
        """Embedding rows to allocate: ``vocab_size`` rounded up to ``divisible_by * model_parallel_size``."""
        return pad_vocab_size(self.vocab_size, divisible_by, model_parallel_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod})"
