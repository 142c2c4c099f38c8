"""tools/sepllm/streaming_ppl.py: protocols, chunked == token-by-token, outputs, errors, and flat memory at 100k."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOOL = Path(__file__).resolve().parents[1] / "tools" / "sepllm" / "streaming_ppl.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("streaming_ppl_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


from test_sepcache import one_thread  # noqa: E402,F401  (autouse fixture: one intra-op thread)


@pytest.fixture()
def books(tmp_path):
    d = tmp_path / "books"
    d.mkdir()
    (d / "a.txt").write_text("It was late. The rain, heavy and cold, fell!\n\nShe said: no; not now?\nEnd.\n")
    (d / "b.txt").write_text("Another book, with words. And more words, and more.\n" * 40)
    return d


def _run(tool, tmp_path, tokenizer, data, *extra):
    out = tmp_path / ("out" + "_".join(e.strip("-") for e in extra))
    rc = tool.main(["--tiny-random", "llama", "--tiny-hidden", "16", "--tokenizer", str(tokenizer),
                    "--data-dir", str(data), "--output-dir", str(out), "--no-progress", "--no-plots", *extra])
    assert rc == 0
    return json.loads((out / "summary.json").read_text()), np.load(out / "nll.npy"), out


def test_per_line_protocol_token_count(tool, tmp_path, neox_tokenizer_file, books):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(neox_tokenizer_file))
    expected = 0
    for book in sorted(books.glob("*.txt")):
        for line in book.read_text().splitlines():
            expected += len(tok.encode(line, add_special_tokens=False).ids)   # BOS + n tokens -> n predictions
    summary, nll, _ = _run(tool, tmp_path, neox_tokenizer_file, books, "--num-tokens", "100000")
    assert summary["num_tokens"] == expected == len(nll)
    whole, nll_b, _ = _run(tool, tmp_path, neox_tokenizer_file, books, "--num-tokens", "100000",
                           "--protocol", "whole-book")
    book_tokens = sum(len(tok.encode(b.read_text(), add_special_tokens=False).ids) for b in sorted(books.glob("*")))
    assert whole["num_tokens"] == book_tokens


@pytest.mark.parametrize("method,shift", [("sepllm", True), ("sepllm", False), ("streamingllm", True)])
def test_chunked_equals_token_by_token(tool, tmp_path, neox_tokenizer_file, books, method, shift):
    flags = ["--method", method, "--num-tokens", "400", "--init-cache-size", "2", "--sep-cache-size", "8",
             "--local-size", "16", "--cache-size", "32", "--pos-shift" if shift else "--no-pos-shift"]
    one, nll_1, _ = _run(tool, tmp_path, neox_tokenizer_file, books, *flags, "--chunk-size", "1")
    many, nll_64, out = _run(tool, tmp_path, neox_tokenizer_file, books, *flags, "--chunk-size", "64")
    np.testing.assert_allclose(nll_64, nll_1, atol=2e-4, rtol=0)
    assert many["final_cache_len"] == one["final_cache_len"] <= 33
    cache_len = np.load(out / "cache_len.npy")
    assert cache_len[:, 1].max() <= 33      # after_step timing: c + 1 until the next step evicts


def test_full_attention_differs_and_plots(tool, tmp_path, neox_tokenizer_file, books):
    full, nll_full, _ = _run(tool, tmp_path, neox_tokenizer_file, books, "--method", "full", "--num-tokens", "300")
    sep, nll_sep, _ = _run(tool, tmp_path, neox_tokenizer_file, books, "--num-tokens", "300", "--cache-size", "64",
                           "--local-size", "32", "--sep-cache-size", "16", "--no-pos-shift")
    assert full["final_cache_len"] == 300 and sep["final_cache_len"] <= 64
    np.testing.assert_allclose(nll_full[:64], nll_sep[:64], atol=1e-4)     # identical until the first eviction
    assert not np.allclose(nll_full, nll_sep, atol=1e-4)
    out = tmp_path / "plots"
    assert tool.main(["--tiny-random", "gpt_neox", "--tiny-hidden", "16", "--tokenizer", str(neox_tokenizer_file),
                      "--data-dir", str(books), "--output-dir", str(out), "--no-progress", "--num-tokens",
                      "200"]) == 0
    assert (out / "ppl.png").stat().st_size > 1000 and (out / "cache.png").stat().st_size > 1000


def test_local_model_directory(tool, tmp_path, neox_tokenizer_file, books):
    """--model loads a saved HF model (safetensors) and its tokenizer.json from the directory, offline."""
    import shutil

    from tokenizers import Tokenizer
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    vocab = Tokenizer.from_file(str(neox_tokenizer_file)).get_vocab_size()
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, rotary_pct=0.25))
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    shutil.copy(neox_tokenizer_file, model_dir / "tokenizer.json")
    out = tmp_path / "from_dir"
    assert tool.main(["--model", str(model_dir), "--data-dir", str(books), "--output-dir", str(out),
                      "--num-tokens", "150", "--no-progress", "--no-plots", "--cache-size", "48",
                      "--local-size", "24", "--sep-cache-size", "8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_tokens"] == 150 and summary["final_cache_len"] <= 49
    assert summary["separator_token_ids"] == [15, 13, 32, 2, 28, 27, 209, 186, 187]
    out2 = tmp_path / "preset"
    assert tool.main(["--model", str(model_dir), "--data-dir", str(books), "--output-dir", str(out2),
                      "--num-tokens", "20", "--no-progress", "--no-plots", "--separator-preset", "gpt_neox"]) == 0
    assert len(json.loads((out2 / "summary.json").read_text())["separator_token_ids"]) == 20


def test_cli_errors_are_one_line(tool, tmp_path, capsys, neox_tokenizer_file):
    rc = tool.main(["--tiny-random", "llama", "--data-dir", str(tmp_path / "missing"), "--tokenizer",
                    str(neox_tokenizer_file), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--data-dir" in err[0]
    rc = tool.main(["--tiny-random", "llama", "--tokenizer", str(tmp_path / "nope.json"), "--no-progress"])
    assert rc == 2 and "--tokenizer" in capsys.readouterr().err


def _byte_tokenizer(path: Path) -> Path:
    """A byte-level tokenizer (256 byte tokens + <|endoftext|>): a real tokenizer with a 257-entry vocabulary, so the
    100k-token stream measures the cache rather than a 50k-wide LM head."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return path


@pytest.mark.slow
def test_sepllm_streams_100k_tokens_at_flat_memory(tool, tmp_path, pg19_dir):
    """100,000 PG-19 tokens (whole-book protocol) through a 1-layer hidden-32 model with SepLLM (PE shift on): the
    cache's KV bytes and the process RSS at 10k, 50k and 100k tokens stay within 2% (per-token records go to disk,
    books are tokenised in a worker); full attention's KV grows with the stream (20k tokens: twice the bytes of
    10k)."""
    tokenizer = _byte_tokenizer(tmp_path / "bytes.json")
    common = ["--tiny-random", "llama", "--tiny-layers", "1", "--tiny-hidden", "32", "--tokenizer", str(tokenizer),
              "--data-dir", str(pg19_dir), "--no-progress", "--no-plots", "--chunk-size", "512"]
    sep_out, full_out = tmp_path / "sep", tmp_path / "full"
    # its own process: RSS is then this stream's alone, not the test session's
    run = subprocess.run([sys.executable, str(TOOL), *common, "--num-tokens", "100000", "--memory-checkpoints",
                          "10000,50000,100000", "--protocol", "whole-book", "--threads", "1", "--output-dir",
                          str(sep_out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert tool.main(common + ["--method", "full", "--num-tokens", "20000", "--memory-checkpoints",
                               "10000,20000", "--output-dir", str(full_out)]) == 0
    sep = json.loads((sep_out / "summary.json").read_text())
    full = json.loads((full_out / "summary.json").read_text())
    assert sep["num_tokens"] == 100000
    m10, m50, m100 = (sep["memory_at_tokens"][k] for k in ("10000", "50000", "100000"))
    assert m100["peak_kv_cache_mb"] == m10["peak_kv_cache_mb"]
    assert abs(m100["rss_mb"] - m10["rss_mb"]) < 0.02 * m10["rss_mb"]
    assert abs(m100["rss_mb"] - m50["rss_mb"]) < 0.01 * m50["rss_mb"]
    assert len(np.load(sep_out / "nll.npy")) == 100000 and len(np.load(sep_out / "cache_len.npy")) == 100000 // 512 + 1
    assert not list(sep_out.glob("*.part")) and not list(sep_out.glob("*.tmp*"))
    f10, f20 = full["memory_at_tokens"]["10000"], full["memory_at_tokens"]["20000"]
    assert f20["kv_cache_mb"] > 1.9 * f10["kv_cache_mb"]
    assert f10["kv_cache_mb"] > 10 * m100["peak_kv_cache_mb"]
    assert np.isfinite(np.load(sep_out / "nll.npy")).all()
    assert sep["retention"]["compressions_per_layer"][0] > 100
