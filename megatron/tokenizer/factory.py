"""Build a tokenizer from GPT-NeoX style settings (``tokenizer-type``, ``vocab-file``, ``merge-file``)."""

from __future__ import annotations

from megatron.tokenizer.base import Tokenizer, TokenizerError

TOKENIZER_TYPES: tuple[str, ...] = (
    "HFTokenizer",
    "HFGPT2Tokenizer",
    "GPT2BPETokenizer",
    "SPMTokenizer",
    "CharLevelTokenizer",
)


def build_tokenizer(
    tokenizer_type: str, vocab_file: str | None = None, merge_file: str | None = None
) -> Tokenizer:
    """Return the tokenizer named ``tokenizer_type`` (names as in GPT-NeoX configs, case-insensitive)."""
    by_lower = {t.lower(): t for t in TOKENIZER_TYPES}
    canonical = by_lower.get(str(tokenizer_type).lower())
    if canonical is None:
        raise TokenizerError(
            f"unknown tokenizer-type {tokenizer_type!r}; expected one of: {', '.join(TOKENIZER_TYPES)}"
        )
    vocab = None if vocab_file is None else str(vocab_file)
    merge = None if merge_file is None else str(merge_file)
    if canonical == "HFTokenizer":
        from megatron.tokenizer.hf import HFTokenizer

        return HFTokenizer(vocab)
    if canonical == "HFGPT2Tokenizer":
        from megatron.tokenizer.hf import HFGPT2Tokenizer

        return HFGPT2Tokenizer(vocab, merge)
    if canonical == "GPT2BPETokenizer":
        from megatron.tokenizer.hf import GPT2BPETokenizer

        return GPT2BPETokenizer(vocab, merge)
    if canonical == "SPMTokenizer":
        from megatron.tokenizer.spm import SPMTokenizer

        return SPMTokenizer(vocab)
    from megatron.tokenizer.char import CharLevelTokenizer

    return CharLevelTokenizer()
