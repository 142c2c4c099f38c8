"""Tokenizers behind one interface (:class:`Tokenizer`), a factory and SepLLM separator-id derivation."""

from pathlib import Path

from megatron.tokenizer.base import Tokenizer, TokenizerError, pad_vocab_size
from megatron.tokenizer.char import CharLevelTokenizer
from megatron.tokenizer.factory import TOKENIZER_TYPES, build_tokenizer
from megatron.tokenizer.hf import GPT2BPETokenizer, HFGPT2Tokenizer, HFTokenizer
from megatron.tokenizer.separators import BASE_SEPARATORS, separator_ids, separator_table
from megatron.tokenizer.spm import SPMTokenizer

#: the GPT-NeoX-20B tokenizer shipped inside the package (the demo configs and the tests use it)
BUNDLED_NEOX_TOKENIZER = Path(__file__).resolve().parent / "assets" / "20B_tokenizer.json"

__all__ = [
    "BASE_SEPARATORS",
    "BUNDLED_NEOX_TOKENIZER",
    "CharLevelTokenizer",
    "GPT2BPETokenizer",
    "HFGPT2Tokenizer",
    "HFTokenizer",
    "SPMTokenizer",
    "TOKENIZER_TYPES",
    "Tokenizer",
    "TokenizerError",
    "build_tokenizer",
    "pad_vocab_size",
    "separator_ids",
    "separator_table",
]
