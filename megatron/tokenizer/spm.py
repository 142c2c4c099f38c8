"""SentencePiece tokenizer (a ``.model`` file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from megatron.tokenizer.base import Tokenizer, TokenizerError


class SPMTokenizer(Tokenizer):
    """A SentencePiece model. ``eod`` is the model's EOS id; ``pad`` its pad id when it defines one."""

    name = "SPMTokenizer"

    def __init__(self, vocab_file: str) -> None:
        if vocab_file is None:
            raise TokenizerError("SPMTokenizer needs a file: set `vocab-file` to a SentencePiece .model (got none)")
        path = Path(vocab_file)
        if not path.is_file():
            raise TokenizerError(f"vocab-file: file not found: {vocab_file} (expected a SentencePiece .model file)")
        self._proto = path.read_bytes()
        self._source = str(path)
        self._load()
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"vocab-file {path}: the SentencePiece model defines no EOS id to use as eod")

    def _load(self) -> None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(self._proto)
        except Exception as exc:
            raise TokenizerError(f"vocab-file {self._source} is not a SentencePiece model: {exc}") from exc
        self._sp = sp

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_sp"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._load()

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def eod(self) -> int:
        return int(self._sp.eos_id())

    @property
    def pad(self) -> int | None:
        pad = int(self._sp.pad_id())
        return pad if pad >= 0 else None

    def tokenize(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(x) for x in self._sp.encode(list(texts), out_type=int)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= int(token_id) < self.vocab_size:
            raise TokenizerError(f"id {token_id} is outside the vocabulary of {self._source}")
        return self._sp.id_to_piece(int(token_id))

    def token_to_id(self, token: str) -> int:
        idx = int(self._sp.piece_to_id(token))
        if idx == self._sp.unk_id() and token != self._sp.id_to_piece(idx):
            raise TokenizerError(f"token {token!r} is not in the vocabulary of {self._source}")
        return idx
