"""prepare_data.py / preprocess_data.py / merge_datasets.py: round trips, named corpora, and one-line CLI errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from megatron.data import MMapIndexedDataset, PrepareError, tokenize_to_indexed
from megatron.data import corpus_registry
from megatron.data.corpus_registry import Corpus, CorpusError, fetch_corpus
from megatron.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
PREPARE = REPO / "prepare_data.py"
PREPROCESS = REPO / "tools" / "datasets" / "preprocess_data.py"
MERGE = REPO / "tools" / "datasets" / "merge_datasets.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.fixture(scope="module")
def neox(neox_tokenizer_file: Path):
    return build_tokenizer("HFTokenizer", str(neox_tokenizer_file))


@pytest.fixture()
def corpus(tmp_path: Path, pg19_dir: Path) -> dict:
    book = (pg19_dir / "9315.txt").read_text(encoding="utf-8")
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(book[:3000], encoding="utf-8")
    b.write_text(book[3000:5000], encoding="utf-8")
    records = [{"text": book[5000:5600], "title": "one"}, {"text": "", "title": "empty"},
               {"text": "Short, final; record!\n", "title": "three"}]
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    texts = [book[:3000], book[3000:5000], records[0]["text"], records[2]["text"]]
    return {"a": a, "b": b, "jsonl": jl, "texts": texts, "records": records, "dir": tmp_path}


def test_prepare_cli_round_trip(corpus: dict, neox, neox_tokenizer_file: Path) -> None:
    out_dir = corpus["dir"] / "out"
    inputs = f"{corpus['a']},{corpus['b']},{corpus['jsonl']}"
    proc = _run(PREPARE, "mini", "--input", inputs, "-t", "HFTokenizer", "-v", neox_tokenizer_file,
                "-d", out_dir, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    prefix = out_dir / "mini" / "mini_text_document"
    assert f"wrote {prefix}.bin/.idx: 4 documents" in proc.stdout
    assert "MB/s" in proc.stdout and "1 empty documents skipped" in proc.stdout
    ds = MMapIndexedDataset(prefix)
    assert ds.dtype == np.uint16 and ds.doc_idx.tolist() == [0, 1, 2, 3, 4]
    for i, text in enumerate(corpus["texts"]):
        assert ds[i].tolist() == neox.tokenize(text) + [neox.eod]
    tokens = sum(len(neox.tokenize(t)) + 1 for t in corpus["texts"])
    assert f"{tokens} tokens" in proc.stdout


def test_two_workers_write_identical_files(corpus: dict, neox, tmp_path: Path) -> None:
    inputs = [corpus["a"], corpus["b"], corpus["jsonl"]]
    r1 = tokenize_to_indexed(inputs, str(tmp_path / "w1"), tokenizer=neox, workers=1, progress=False)
    r2 = tokenize_to_indexed(inputs, str(tmp_path / "w2"), tokenizer=neox, workers=2, progress=False,
                             task_chars=1000)  # many small tasks so both workers share the work
    for ext in (".bin", ".idx"):
        assert Path(r1[0].prefix + ext).read_bytes() == Path(r2[0].prefix + ext).read_bytes()
    # a tokenizer that holds the GIL goes through the process pool instead of threads
    char = build_tokenizer("CharLevelTokenizer")
    assert not char.releases_gil and neox.releases_gil
    c1 = tokenize_to_indexed(inputs, str(tmp_path / "c1"), tokenizer=char, workers=1, progress=False)
    c2 = tokenize_to_indexed(inputs, str(tmp_path / "c2"), tokenizer=char, workers=2, progress=False, task_chars=1000)
    for ext in (".bin", ".idx"):
        assert Path(c1[0].prefix + ext).read_bytes() == Path(c2[0].prefix + ext).read_bytes()


def test_preprocess_cli_keys_and_eod(corpus: dict, neox, neox_tokenizer_file: Path) -> None:
    out = corpus["dir"] / "pp"
    proc = _run(PREPROCESS, "--input", corpus["jsonl"], "--output-prefix", out, "--tokenizer-type", "HFTokenizer",
                "--vocab-file", neox_tokenizer_file, "--jsonl-keys", "text", "title", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    text_ds = MMapIndexedDataset(f"{out}_text_document")
    title_ds = MMapIndexedDataset(f"{out}_title_document")
    assert text_ds[0].tolist() == neox.tokenize(corpus["records"][0]["text"])  # no --append-eod: no eod
    assert [title_ds[i].tolist() for i in range(3)] == [neox.tokenize(t) for t in ("one", "empty", "three")]
    proc = _run(PREPROCESS, "--input", corpus["a"], "--output-prefix", out, "--tokenizer-type", "HFTokenizer",
                "--vocab-file", neox_tokenizer_file, "--append-eod", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert MMapIndexedDataset(f"{out}_text_document")[0].tolist()[-1] == neox.eod


def test_merge_cli(corpus: dict, neox) -> None:
    d = corpus["dir"]
    a = tokenize_to_indexed([corpus["a"]], str(d / "A"), tokenizer=neox, progress=False)[0].prefix
    b = tokenize_to_indexed([corpus["b"], corpus["jsonl"]], str(d / "B"), tokenizer=neox, progress=False)[0].prefix
    proc = _run(MERGE, "--input", a, b + ".bin", "--output-prefix", d / "AB")
    assert proc.returncode == 0, proc.stderr
    merged = MMapIndexedDataset(d / "AB")
    assert merged.doc_idx.tolist() == [0, 1, 2, 3, 4]
    assert [merged[i].tolist() for i in range(4)] == [neox.tokenize(t) + [0] for t in corpus["texts"]]


@pytest.mark.slow
def test_shipped_pg19_sample(tmp_path: Path, neox, neox_tokenizer_file: Path) -> None:
    proc = _run(PREPARE, "pg19_sample", "-t", "HFTokenizer", "-v", neox_tokenizer_file, "-d", tmp_path,
                "--workers", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    ds = MMapIndexedDataset(tmp_path / "pg19_sample" / "pg19_sample_text_document")
    books = sorted((REPO / "megatron" / "data" / "corpora" / "pg19_sample").glob("*.txt"))
    assert len(ds) == len(books) == 5 and ds.num_tokens > 700_000
    for i, book in enumerate(books):
        assert ds[i].tolist() == neox.tokenize(book.read_text(encoding="utf-8")) + [0]


def _bad_inputs(tmp: Path) -> dict[str, Path]:
    (tmp / "empty.txt").write_text("", encoding="utf-8")
    (tmp / "nokey.jsonl").write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    (tmp / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    (tmp / "ok.txt").write_text("Some text.", encoding="utf-8")
    (tmp / "nul.txt").write_bytes(b"\0" * 64)                      # valid UTF-8, yet no text
    (tmp / "nul.jsonl").write_text(json.dumps({"text": "a\u0000b"}) + "\n", encoding="utf-8")
    return {"empty": tmp / "empty.txt", "nokey": tmp / "nokey.jsonl", "broken": tmp / "broken.jsonl",
            "ok": tmp / "ok.txt", "nul": tmp / "nul.txt", "nul_jsonl": tmp / "nul.jsonl"}


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_tokenizer_file", r"error: vocab-file: file not found: /no/such/tokenizer.json"),
        ("unknown_tokenizer_type", r"error: unknown tokenizer-type 'BPE2'; expected one of: HFTokenizer, "),
        ("empty_corpus", r"error: empty corpus: no non-empty documents for key 'text' in .*empty.txt"),
        ("jsonl_without_key", r"error: .*nokey.jsonl:1: JSONL record has no key 'text' \(keys: \['body'\]\)"),
        ("invalid_jsonl", r"error: .*broken.jsonl:2: invalid JSON"),
        ("missing_input", r"error: input path not found: /no/such/input.txt"),
        ("unknown_dataset", r"error: unknown dataset 'nope'; expected one of: enwik8, pg19_sample"),
        ("nul_bytes", r"error: .*nul.txt: NUL byte at offset 0: a binary file, not text"),
        ("nul_in_jsonl", r"error: .*nul.jsonl:1: key 'text' holds a NUL character at character 1"),
        ("vocab_file_needed", r"error: -t GPT2BPETokenizer reads its vocabulary from a file: give it with "
                              r"-v/--vocab-file"),
    ],
)
def test_prepare_cli_errors(tmp_path: Path, neox_tokenizer_file: Path, case: str, message: str) -> None:
    files = _bad_inputs(tmp_path)
    tok = ["-t", "HFTokenizer", "-v", str(neox_tokenizer_file)]
    args = {
        "missing_tokenizer_file": ["x", "--input", files["ok"], "-t", "HFTokenizer", "-v", "/no/such/tokenizer.json"],
        "unknown_tokenizer_type": ["x", "--input", files["ok"], "-t", "BPE2"],
        "empty_corpus": ["x", "--input", files["empty"], *tok],
        "jsonl_without_key": ["x", "--input", files["nokey"], *tok],
        "invalid_jsonl": ["x", "--input", files["broken"], *tok],
        "missing_input": ["x", "--input", "/no/such/input.txt", *tok],
        "unknown_dataset": ["nope", *tok],
        "nul_bytes": ["x", "--input", files["nul"], *tok],
        "nul_in_jsonl": ["x", "--input", files["nul_jsonl"], *tok],
        "vocab_file_needed": ["x", "--input", files["ok"], "-t", "GPT2BPETokenizer"],
    }[case]
    proc = _run(PREPARE, *args, "-d", tmp_path / "out", "--no-progress")
    assert proc.returncode == 2       # bad input (megatron/errors.py)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("prepare_data.py: error: ")
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()      # no empty data/<name>/ left behind


def test_prepare_defaults_to_the_bundled_tokenizer(tmp_path: Path, neox) -> None:
    """No -t / -v: the GPT-NeoX-20B tokenizer that ships (what configs/tiny-cpu.yml uses), said on stdout."""
    files = _bad_inputs(tmp_path)
    proc = _run(PREPARE, "mine", "--input", files["ok"], "-d", tmp_path / "out", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("tokenizer: HFTokenizer ") and "20B_tokenizer.json" in proc.stdout.splitlines()[0]
    ds = MMapIndexedDataset(tmp_path / "out" / "mine" / "mine_text_document")
    assert ds[0].tolist() == neox.tokenize("Some text.") + [0]


def test_preprocess_cli_error_is_one_line(tmp_path: Path) -> None:
    proc = _run(PREPROCESS, "--input", "/no/in.jsonl", "--output-prefix", tmp_path / "o", "--tokenizer-type",
                "CharLevelTokenizer")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["preprocess_data.py: error: input path not found: /no/in.jsonl"]


def _load_prepare_module():
    spec = importlib.util.spec_from_file_location("prepare_data_cli", PREPARE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_download_failure_is_one_clear_line(tmp_path: Path, monkeypatch, capsys, neox_tokenizer_file: Path) -> None:
    fake = {"fakecorpus": Corpus("fakecorpus", "unreachable", url="http://127.0.0.1:9/fake.zip", member="fake.txt")}
    monkeypatch.setattr(corpus_registry, "CORPORA", fake)
    mod = _load_prepare_module()
    monkeypatch.setattr(mod, "CORPORA", fake)
    from megatron.data.cli_utils import run_cli

    rc = run_cli(mod.main, "prepare_data.py", ["fakecorpus", "-v", str(neox_tokenizer_file), "-d", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert err[0].startswith("prepare_data.py: error: could not download http://127.0.0.1:9/fake.zip: ")
    assert "--input" in err[0]
    assert not list((tmp_path / "fakecorpus" / "raw").iterdir())  # no partial download left


def test_download_extract_reuse_and_force(tmp_path: Path, neox) -> None:
    archive = tmp_path / "src" / "tiny.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("tiny/book.txt", "A tiny book. It ends here.\n")
    registry = {"tiny": Corpus("tiny", "test", url=archive.as_uri(), member="tiny")}
    data_dir = tmp_path / "data"
    path = fetch_corpus("tiny", data_dir, registry=registry)
    assert path == data_dir / "tiny" / "raw" / "tiny" and (path / "book.txt").is_file()
    assert not (data_dir / "tiny" / "raw" / "tiny.zip").exists()
    res = tokenize_to_indexed(str(path), str(tmp_path / "t"), tokenizer=neox, progress=False)[0]
    assert MMapIndexedDataset(res.prefix)[0].tolist() == neox.tokenize("A tiny book. It ends here.\n") + [0]
    archive.unlink()  # already fetched: reused without touching the URL
    assert fetch_corpus("tiny", data_dir, registry=registry) == path
    with pytest.raises(CorpusError, match="could not download"):
        fetch_corpus("tiny", data_dir, force=True, registry=registry)


def test_api_errors(tmp_path: Path, neox) -> None:
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(PrepareError, match="has no .txt or .jsonl files"):
        tokenize_to_indexed(str(tmp_path / "empty_dir"), str(tmp_path / "o"), tokenizer=neox)
    with pytest.raises(PrepareError, match="workers must be >= 1"):
        tokenize_to_indexed(str(tmp_path), str(tmp_path / "o"), tokenizer=neox, workers=0)
    with pytest.raises(PrepareError, match="no tokenizer given"):
        tokenize_to_indexed(str(tmp_path), str(tmp_path / "o"))


def test_benchmark_smoke(tmp_path: Path, pg19_dir: Path, neox_tokenizer_file: Path) -> None:
    out = tmp_path / "bench.json"
    proc = _run(REPO / "benchmarks" / "prepare_data.py", "--limit", "2", "--workers", "1", "2", "--json", out,
                "--pg19-dir", pg19_dir, "--tokenizer-file", neox_tokenizer_file)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["method"], r["workers"]) for r in rows] == [("naive", 1), ("ours", 1), ("ours", 2)]
    for r in rows:
        assert {"method", "workers", "mb_per_s", "ratio_vs_naive"} <= set(r) and r["mb_per_s"] > 0
        assert r["identical"] is True  # same token ids as the naive loop
    assert rows[0]["ratio_vs_naive"] == 1.0
    assert "vs naive" in proc.stdout
