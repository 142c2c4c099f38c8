"""Tokenizers backed by the Rust ``tokenizers`` library: HF ``tokenizer.json`` files and classic GPT-2 BPE files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from megatron.tokenizer.base import Tokenizer, TokenizerError

# Splitting a document right after a single newline between two non-space characters never changes the ids of a
# byte-level BPE with the GPT-2 regex: such a point is always a pre-token boundary. Long documents are cut there and
# encoded as a batch, which the Rust side parallelises and which avoids quadratic work on megabyte-long strings.
_SAFE_SPLIT = re.compile(r"(?<=\S)\n(?=\S)")
_CHUNK_CHARS = 8_192
# Normalizers that act on single characters / canonical sequences, so they commute with splitting at a newline.
_LOCAL_NORMALIZERS = {None, "NFC", "NFD", "NFKC", "NFKD", "Lowercase"}


def _require_file(path: str | None, key: str, what: str) -> Path:
    if path is None:
        raise TokenizerError(f"{what} needs a file: set `{key}` (got none)")
    p = Path(path)
    if not p.is_file():
        raise TokenizerError(f"{key}: file not found: {path} (expected {what})")
    return p


def _chunk_safe(spec: dict[str, Any]) -> bool:
    """Whether cutting after a newline between two non-space characters keeps the ids of this tokenizer.json."""
    normalizer = spec.get("normalizer")
    norm_types = []
    if normalizer is not None:
        norm_types = [n.get("type") for n in normalizer.get("normalizers", [normalizer])]
    if any(t not in _LOCAL_NORMALIZERS or t == "Sequence" for t in norm_types):
        return False
    pre = spec.get("pre_tokenizer")
    if pre is None:
        return False
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if len(pres) != 1 or pres[0].get("type") != "ByteLevel":
        return False
    return not pres[0].get("add_prefix_space", False) and pres[0].get("use_regex", True)


def chunk_text(text: str, target_chars: int = _CHUNK_CHARS) -> list[str]:
    """Cut ``text`` at safe newline boundaries into pieces of roughly ``target_chars`` characters."""
    if len(text) <= target_chars:
        return [text]
    pieces: list[str] = []
    start = 0
    n = len(text)
    while start < n:
        if n - start <= target_chars:
            pieces.append(text[start:])
            break
        m = _SAFE_SPLIT.search(text, start + target_chars)
        if m is None:
            pieces.append(text[start:])
            break
        cut = m.end()  # just after the newline
        pieces.append(text[start:cut])
        start = cut
    return pieces


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (e.g. GPT-NeoX-20B / Pythia). ``eod`` is ``<|endoftext|>``."""

    name = "HFTokenizer"
    #: batch encoding runs in Rust with the GIL released, so worker threads (not processes) parallelise it
    releases_gil = True
    _eod_tokens: tuple[str, ...] = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")
    _pad_tokens: tuple[str, ...] = ("<|padding|>", "<pad>", "[PAD]")

    def __init__(self, vocab_file: str) -> None:
        path = _require_file(vocab_file, "vocab-file", "a Hugging Face tokenizer.json")
        try:
            text = path.read_text(encoding="utf-8")
            spec = json.loads(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenizerError(f"vocab-file {path} is not a readable tokenizer.json: {exc}") from exc
        self._init_from_json_str(text, spec, str(path))

    def _init_from_json_str(self, text: str, spec: dict[str, Any], source: str) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self._tok = RustTokenizer.from_str(text)
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise TokenizerError(f"vocab-file {source} could not be loaded as a tokenizer.json: {exc}") from exc
        self._json = text
        self._source = source
        self._chunk_safe = _chunk_safe(spec)
        self._eod = self._first_known(self._eod_tokens)
        if self._eod is None:
            raise TokenizerError(
                f"vocab-file {source} has none of the end-of-document tokens {list(self._eod_tokens)}"
            )
        self._pad = self._first_known(self._pad_tokens)

    def _first_known(self, candidates: Sequence[str]) -> int | None:
        for tok in candidates:
            idx = self._tok.token_to_id(tok)
            if idx is not None:
                return int(idx)
        return None

    # pickling: ship the json text, rebuild the Rust object (works with any tokenizers version)
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_tok"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.__dict__.update(state)
        self._tok = RustTokenizer.from_str(self._json)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int | None:
        return self._pad

    @property
    def backend(self) -> Any:
        """The underlying ``tokenizers.Tokenizer`` (for batch work that wants it directly)."""
        return self._tok

    @property
    def chunk_safe(self) -> bool:
        """True when long documents may be split at newlines without changing the ids."""
        return self._chunk_safe

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21) skips offset tracking we never use
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def tokenize_document(self, text: str) -> list[int]:
        if not self._chunk_safe or len(text) <= _CHUNK_CHARS:
            return self.tokenize(text)
        out: list[int] = []
        for ids in self.tokenize_batch(chunk_text(text)):
            out.extend(ids)
        return out

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str:
        tok = self._tok.id_to_token(int(token_id))
        if tok is None:
            raise TokenizerError(f"id {token_id} is outside the vocabulary of {self._source}")
        return tok

    def token_to_id(self, token: str) -> int:
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise TokenizerError(f"token {token!r} is not in the vocabulary of {self._source}")
        return int(idx)


class HFGPT2Tokenizer(HFTokenizer):
    """GPT-2 byte-level BPE from either an HF ``tokenizer.json`` or a classic ``vocab.json`` + ``merges.txt`` pair."""

    name = "HFGPT2Tokenizer"

    def __init__(self, vocab_file: str, merge_file: str | None = None) -> None:
        path = _require_file(vocab_file, "vocab-file", "a GPT-2 vocab.json or tokenizer.json")
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenizerError(f"vocab-file {path} is not valid JSON: {exc}") from exc
        if isinstance(spec, dict) and isinstance(spec.get("model"), dict):
            # a full tokenizer.json: no merges file needed
            self._init_from_json_str(path.read_text(encoding="utf-8"), spec, str(path))
            return
        merges = _require_file(merge_file, "merge-file", "a GPT-2 merges.txt next to vocab.json")
        text = _gpt2_json_from_files(path, merges)
        self._init_from_json_str(text, json.loads(text), f"{path} + {merges}")


class GPT2BPETokenizer(HFGPT2Tokenizer):
    """GPT-NeoX's name for GPT-2 BPE; same files and behaviour as :class:`HFGPT2Tokenizer`."""

    name = "GPT2BPETokenizer"


def _gpt2_json_from_files(vocab: Path, merges: Path) -> str:
    """Build a byte-level BPE tokenizer.json string from GPT-2's vocab.json + merges.txt."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    try:
        bpe = models.BPE.from_file(str(vocab), str(merges))
    except Exception as exc:
        raise TokenizerError(f"could not read GPT-2 BPE files vocab-file={vocab} merge-file={merges}: {exc}") from exc
    tok = RustTokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if tok.token_to_id("<|endoftext|>") is not None:
        tok.add_special_tokens(["<|endoftext|>"])
    return tok.to_str()
