"""Tokenizers: separator ids, vocab padding, each backend, pickling, the factory's errors."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.tokenizer import (
    CharLevelTokenizer,
    GPT2BPETokenizer,
    HFGPT2Tokenizer,
    HFTokenizer,
    TokenizerError,
    build_tokenizer,
    pad_vocab_size,
    separator_ids,
    separator_table,
)
from megatron.tokenizer.hf import chunk_text

REPO = Path(__file__).resolve().parents[1]
NEOX_BASE_SEPARATORS = [15, 13, 32, 2, 28, 27, 209, 186, 187]


@pytest.fixture(scope="module")
def neox(neox_tokenizer_file: Path) -> HFTokenizer:
    return build_tokenizer("HFTokenizer", str(neox_tokenizer_file))


@pytest.fixture(scope="module")
def gpt2_json(gpt2_tokenizer_file: Path) -> Path:
    return gpt2_tokenizer_file


@pytest.fixture(scope="module")
def book_text(pg19_dir: Path) -> str:
    return (pg19_dir / "12204.txt").read_text(encoding="utf-8")


def test_neox_base_separator_ids_exact(neox: HFTokenizer) -> None:
    assert separator_ids(neox) == NEOX_BASE_SEPARATORS
    assert [t for t, _ in separator_table(neox)] == [".", ",", "?", "!", ";", ":", " ", "\t", "\n"]


def test_neox_separator_variants(neox: HFTokenizer) -> None:
    ids = separator_ids(neox, variants=True)
    assert ids[:9] == NEOX_BASE_SEPARATORS
    assert len(ids) == len(set(ids))
    # the single-token variants of the spec's 20-id list (' \n ' is a leading+trailing form we do not generate)
    for i in [964, 1157, 3736, 2195, 3706, 1163, 2490, 50276, 586, 50275]:
        assert i in ids
    for text, i in separator_table(neox, variants=True):
        assert neox.tokenize(text) == [i]


def test_separator_ids_on_transformers_tokenizer(neox_tokenizer_file: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(neox_tokenizer_file))
    assert separator_ids(hf) == NEOX_BASE_SEPARATORS
    from tokenizers import Tokenizer as RustTokenizer  # a raw Rust tokenizer returns Encoding objects

    assert separator_ids(RustTokenizer.from_file(str(neox_tokenizer_file))) == NEOX_BASE_SEPARATORS


def test_padded_vocab(neox: HFTokenizer) -> None:
    assert neox.vocab_size == 50277
    assert neox.padded_vocab_size() == 50304
    assert neox.padded_vocab_size(128, 2) == 50432
    assert pad_vocab_size(50304, 128, 1) == 50304
    with pytest.raises(TokenizerError, match="positive"):
        pad_vocab_size(100, 0)


def test_neox_special_ids_and_round_trip(neox: HFTokenizer, book_text: str) -> None:
    assert neox.eod == 0 and neox.pad == 1
    assert neox.id_to_token(0) == "<|endoftext|>" and neox.token_to_id("<|padding|>") == 1
    text = book_text[:3000]
    ids = neox.tokenize(text)
    assert neox.detokenize(ids) == text
    assert neox.tokenize("Hello world.") == [12092, 1533, 15]


def test_chunked_document_encoding_matches_whole(neox: HFTokenizer, pg19_dir: Path) -> None:
    text = (pg19_dir / "7412.txt").read_text(encoding="utf-8")
    assert neox.chunk_safe
    assert len(chunk_text(text, 4096)) > 5
    assert "".join(chunk_text(text, 4096)) == text
    assert neox.tokenize_document(text) == neox.tokenize(text)
    # paragraph breaks (\n\n) must never be cut: they tokenize differently at a string end
    assert all(not p.endswith("\n\n") for p in chunk_text(text, 4096)[:-1])


def test_gpt2_json_and_vocab_merges_agree(gpt2_json: Path, tmp_path: Path, book_text: str) -> None:
    spec = json.loads(gpt2_json.read_text(encoding="utf-8"))
    vocab = tmp_path / "vocab.json"
    merges = tmp_path / "merges.txt"
    vocab.write_text(json.dumps(spec["model"]["vocab"]), encoding="utf-8")
    lines = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    merges.write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    from_json = build_tokenizer("HFGPT2Tokenizer", str(gpt2_json))
    from_pair = build_tokenizer("GPT2BPETokenizer", str(vocab), str(merges))
    assert isinstance(from_pair, GPT2BPETokenizer) and isinstance(from_json, HFGPT2Tokenizer)
    text = book_text[:4000]
    assert from_json.tokenize(text) == from_pair.tokenize(text)
    assert from_json.eod == from_pair.eod == 50256
    assert from_json.vocab_size == from_pair.vocab_size == 50257
    assert from_pair.detokenize(from_pair.tokenize(text)) == text
    with pytest.raises(TokenizerError, match="merge-file"):
        build_tokenizer("GPT2BPETokenizer", str(vocab))


def test_spm_tokenizer(tmp_path: Path, book_text: str) -> None:
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(book_text[:20000], encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tiny"), vocab_size=300, model_type="bpe",
        pad_id=3, minloglevel=2,
    )
    tok = build_tokenizer("SPMTokenizer", str(tmp_path / "tiny.model"))
    assert tok.vocab_size == 300 and tok.eod == 2 and tok.pad == 3
    sentence = "The ship sailed at dawn, and nobody saw it go."
    ids = tok.tokenize(sentence)
    assert all(0 <= i < 300 for i in ids) and tok.detokenize(ids) == sentence
    assert tok.tokenize_batch([sentence, "Hello"]) == [ids, tok.tokenize("Hello")]
    assert tok.token_to_id(tok.id_to_token(ids[0])) == ids[0]
    assert pickle.loads(pickle.dumps(tok)).tokenize(sentence) == ids
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        build_tokenizer("SPMTokenizer", str(corpus))


def test_char_level_tokenizer() -> None:
    tok = build_tokenizer("CharLevelTokenizer")
    assert isinstance(tok, CharLevelTokenizer)
    assert tok.tokenize("Ab\n") == [65, 98, 10] and tok.detokenize([65, 98, 10]) == "Ab\n"
    assert tok.eod == 0 and tok.vocab_size == 512 and tok.padded_vocab_size() == 512
    assert tok.tokenize("a\u2014b") == [97, 511, 98]  # code points that do not fit map to unk, explicitly
    assert tok.detokenize([97, 511]) == "a\ufffd"
    with pytest.raises(TokenizerError, match="outside"):
        tok.detokenize([600])


def test_tokenizers_pickle(neox: HFTokenizer, gpt2_json: Path) -> None:
    for tok in (neox, build_tokenizer("HFGPT2Tokenizer", str(gpt2_json)), CharLevelTokenizer()):
        clone = pickle.loads(pickle.dumps(tok))
        assert clone.tokenize("Pickled, twice; fine.") == tok.tokenize("Pickled, twice; fine.")
        assert clone.eod == tok.eod


@pytest.mark.parametrize(
    "args, message",
    [
        (("HFTokenizer", "/no/such/20B_tokenizer.json"), r"vocab-file: file not found: /no/such/20B_tokenizer.json"),
        (("HFTokenizer", None), r"set `vocab-file`"),
        (("SPMTokenizer", "/no/such.model"), r"vocab-file: file not found: /no/such.model"),
        (("TiktokenTokenizerX", None), r"unknown tokenizer-type 'TiktokenTokenizerX'; expected one of: HFTokenizer"),
    ],
)
def test_factory_errors(args: tuple, message: str) -> None:
    with pytest.raises(TokenizerError, match=message):
        build_tokenizer(*args)


def test_factory_rejects_non_tokenizer_json(tmp_path: Path) -> None:
    bad = tmp_path / "tok.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match=str(bad)):
        build_tokenizer("HFTokenizer", str(bad))


def test_get_separator_ids_cli(neox_tokenizer_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "seps.json"
    script = REPO / "tools" / "sepllm" / "get_separator_ids.py"
    proc = subprocess.run(
        [sys.executable, str(script), "-t", "HFTokenizer", "-v", str(neox_tokenizer_file), "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"separator_token_ids: {NEOX_BASE_SEPARATORS}" in proc.stdout
    assert json.loads(out.read_text())["separator_token_ids"] == NEOX_BASE_SEPARATORS
    bad = subprocess.run([sys.executable, str(script), "-v", "/no/file.json"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "get_separator_ids.py: error: vocab-file: file not found: /no/file.json "
        "(expected a Hugging Face tokenizer.json)"
    ]


@pytest.mark.parametrize(
    "spec, safe",
    [
        ({"normalizer": {"type": "NFC"}, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}}, True),
        ({"normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True}}, False),
        ({"normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}},
         False),
        ({"normalizer": {"type": "Replace"}, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}},
         False),
        ({"normalizer": None, "pre_tokenizer": {"type": "Metaspace"}}, False),
        ({"normalizer": None, "pre_tokenizer": None}, False),
    ],
)
def test_chunking_only_where_provably_safe(spec: dict, safe: bool) -> None:
    from megatron.tokenizer.hf import _chunk_safe

    assert _chunk_safe(spec) is safe
