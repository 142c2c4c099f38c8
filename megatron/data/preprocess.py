"""Text / JSONL -> tokenized ``.bin/.idx``: the one implementation behind ``prepare_data.py`` and
``tools/datasets/preprocess_data.py``.

Why it is fast: the main process only reads files and writes numpy arrays; tokenization runs in worker tasks of
about a megabyte of text, and each task encodes its documents with one batched call into the Rust tokenizer (long
documents cut at newline points that provably do not change the ids). No per-token Python work.
Workers are threads sharing one tokenizer when the backend encodes without holding the GIL (the HF/Rust tokenizers:
no fork, no copies of the vocabulary, no pickling; a process pool spent ~40% more CPU for the same work in our
measurements), and a process pool otherwise (SentencePiece, char-level).
"""

from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import os
import time
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from megatron.data.errors import PrepareError
from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder, best_dtype
from megatron.tokenizer import Tokenizer, build_tokenizer
from megatron.tokenizer.hf import chunk_text

TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TASK_CHARS = 1 << 20  # about 1 MB of text per worker task


@dataclass
class PrepareResult:
    """What one output dataset holds."""

    prefix: str
    key: str
    documents: int
    tokens: int
    skipped_empty: int
    input_bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)


def is_jsonl(path: Path) -> bool:
    return path.name.endswith(JSONL_SUFFIXES)


def expand_inputs(inputs: Sequence[str | os.PathLike] | str) -> list[Path]:
    """Files to read, in a stable order: a file, a folder (its .txt/.jsonl files, recursively, sorted) or a
    comma-separated list of those."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [p for p in os.fspath(inputs).split(",") if p]
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and (f.name.endswith(TEXT_SUFFIXES) or is_jsonl(f))
            )
            if not found:
                raise PrepareError(f"input folder {p} has no .txt or .jsonl files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise PrepareError(f"input path not found: {p}")
    if not files:
        raise PrepareError("no input given (expected a file, a folder or a comma-separated list)")
    return files


def check_encodable(text: str, where: str) -> None:
    """JSON may spell a lone UTF-16 surrogate (``"\\ud800"``); no tokenizer can encode it (HF tokenizers raise a
    bare TypeError), so name the record instead. A NUL character (``"\\u0000"``) is refused too: text has none, and
    tokenizers map it to ordinary ids, so a binary payload would train silently."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PrepareError(f"{where} holds a lone UTF-16 surrogate \\u{ord(text[exc.start]):04x} at character "
                           f"{exc.start}, which is not text; fix or drop the record") from None
    if "\x00" in text:
        raise PrepareError(f"{where} holds a NUL character at character {text.index(chr(0))}, which is not text; fix "
                           "or drop the record")


def iter_documents(files: Sequence[Path], keys: Sequence[str]) -> Iterator[tuple[list[str], int]]:
    """Yield ``(texts per key, raw bytes)`` per document: one per text file, one per JSONL record.

    A plain text file fills the first key. A JSONL record missing a key is an error naming file, line and key.
    """
    for path in files:
        if not is_jsonl(path):
            data = path.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PrepareError(f"{path}: not UTF-8 text ({exc})") from exc
            if b"\x00" in data:      # valid UTF-8, but a binary file (or a disk image's zeros), not text
                raise PrepareError(f"{path}: NUL byte at offset {data.index(0)}: a binary file, not text; give text "
                                   f"files (or JSONL) only")
            yield [text] + [""] * (len(keys) - 1), len(data)
            continue
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PrepareError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
                if not isinstance(record, dict):
                    raise PrepareError(f"{path}:{lineno}: expected a JSON object per line, got {type(record).__name__}")
                texts = []
                for key in keys:
                    if key not in record:
                        raise PrepareError(
                            f"{path}:{lineno}: JSONL record has no key {key!r} (keys: {sorted(record)}); "
                            f"set --jsonl-keys"
                        )
                    value = record[key]
                    if not isinstance(value, str):
                        raise PrepareError(f"{path}:{lineno}: key {key!r} holds {type(value).__name__}, expected text")
                    check_encodable(value, f"{path}:{lineno}: key {key!r}")
                    texts.append(value)
                yield texts, len(line.encode("utf-8"))


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], dtype: np.dtype) -> list[np.ndarray]:
    """Encode whole documents with as few backend calls as possible; equal to ``tokenize`` per document."""
    if getattr(tokenizer, "chunk_safe", False):
        pieces: list[str] = []
        owners: list[int] = []
        for i, text in enumerate(texts):
            for piece in chunk_text(text):
                pieces.append(piece)
                owners.append(i)
        encoded = tokenizer.tokenize_batch(pieces)
        parts: list[list[np.ndarray]] = [[] for _ in texts]
        for owner, ids in zip(owners, encoded):
            parts[owner].append(np.asarray(ids, dtype=dtype))
        return [np.concatenate(p) if len(p) > 1 else (p[0] if p else np.zeros(0, dtype)) for p in parts]
    return [np.asarray(tokenizer.tokenize(t), dtype=dtype) for t in texts]


# --- worker side: the tokenizer lives in a per-process object, created by the pool initializer -----------------
class _Worker:
    tokenizer: Tokenizer | None = None
    dtype: np.dtype | None = None


def _init_worker(tokenizer: Tokenizer, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool already uses every core
    _Worker.tokenizer = tokenizer
    _Worker.dtype = np.dtype(dtype)


def encode_batch(tokenizer: Tokenizer, task: list[list[str]], dtype: np.dtype) -> list[list[np.ndarray]]:
    """Encode a batch of documents given as ``[doc][key] -> text``; returns ``[doc][key] -> ids``."""
    n_keys = len(task[0]) if task else 0
    by_key = [encode_texts(tokenizer, [doc[k] for doc in task], dtype) for k in range(n_keys)]
    return [[by_key[k][d] for k in range(n_keys)] for d in range(len(task))]


def _encode_task(task: list[list[str]]) -> list[list[np.ndarray]]:
    assert _Worker.tokenizer is not None and _Worker.dtype is not None
    return encode_batch(_Worker.tokenizer, task, _Worker.dtype)


def _executor(tokenizer: Tokenizer, dtype: np.dtype, workers: int) -> Executor:
    """Threads for tokenizers that encode without the GIL, else processes holding their own tokenizer copy."""
    if getattr(tokenizer, "releases_gil", False):
        return ThreadPoolExecutor(workers, thread_name_prefix="tokenize")
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(tokenizer, dtype.str))


def _batched(docs: Iterator[tuple[list[str], int]], task_chars: int) -> Iterator[tuple[list[list[str]], int]]:
    batch: list[list[str]] = []
    chars = nbytes = 0
    for texts, size in docs:
        batch.append(texts)
        chars += sum(len(t) for t in texts)
        nbytes += size
        if chars >= task_chars:
            yield batch, nbytes
            batch, chars, nbytes = [], 0, 0
    if batch:
        yield batch, nbytes


def _describe(files: Sequence[Path], limit: int = 3) -> str:
    names = ", ".join(map(str, files[:limit]))
    return names + (f" and {len(files) - limit} more files" if len(files) > limit else "")


def output_prefix_for_key(output_prefix: str, key: str) -> str:
    """GPT-NeoX naming: ``<output-prefix>_<key>_document``."""
    return f"{output_prefix}_{key}_document"


def tokenize_to_indexed(
    inputs: Sequence[str | os.PathLike] | str,
    output_prefix: str,
    tokenizer: Tokenizer | None = None,
    tokenizer_type: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    jsonl_keys: Sequence[str] = ("text",),
    append_eod: bool = True,
    workers: int = 1,
    progress: bool = True,
    task_chars: int = TASK_CHARS,
    log_interval: int = 0,
    fix_text: Callable[[str], str] | None = None,
    num_docs: int | None = None,
) -> list[PrepareResult]:
    """Tokenize ``inputs`` into one ``.bin/.idx`` per key at ``<output_prefix>_<key>_document``.

    One document per text file / JSONL record; ``eod`` appended when ``append_eod``; empty documents are skipped.
    ``fix_text`` (e.g. ``ftfy.fix_text``) is applied to every text before tokenizing; ``num_docs`` (GPT-NeoX
    ``--num-docs``, when known) makes the progress bar count documents against that total instead of bytes.
    Raises :class:`PrepareError` for missing inputs, missing JSONL keys and a corpus with no documents.
    """
    if tokenizer is None:
        if tokenizer_type is None:
            raise PrepareError("no tokenizer given: set tokenizer-type (and vocab-file/merge-file)")
        tokenizer = build_tokenizer(tokenizer_type, vocab_file, merge_file)
    keys = list(jsonl_keys) or ["text"]
    if workers < 1:
        raise PrepareError(f"workers must be >= 1, got {workers}")
    files = expand_inputs(inputs)
    total_bytes = sum(f.stat().st_size for f in files)
    dtype = best_dtype(tokenizer.vocab_size)
    eod = np.asarray([tokenizer.eod], dtype=dtype)
    prefixes = [output_prefix_for_key(output_prefix, k) for k in keys]
    builders = [MMapIndexedDatasetBuilder(p, dtype) for p in prefixes]
    skipped = [0] * len(keys)
    docs_seen = [0]
    done_bytes = 0
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        compressed = any(f.name.endswith(".gz") for f in files)  # sizes on disk are not text bytes
        if num_docs:
            bar = tqdm(total=num_docs, unit="doc", desc="tokenizing", dynamic_ncols=True)
        else:
            bar = tqdm(total=None if compressed else total_bytes, unit="B", unit_scale=True, desc="tokenizing",
                       dynamic_ncols=True)

    def write(results: list[list[np.ndarray]], nbytes: int) -> None:
        nonlocal done_bytes
        docs_seen[0] += len(results)
        for doc in results:
            for k, ids in enumerate(doc):
                if ids.size == 0:
                    skipped[k] += 1
                    continue
                builders[k].add_document(np.concatenate([ids, eod]) if append_eod else ids)
        done_bytes += nbytes
        if bar is not None:
            bar.update(len(results) if num_docs else nbytes)
        elif log_interval and docs_seen[0] // log_interval > (docs_seen[0] - len(results)) // log_interval:
            secs = time.perf_counter() - start
            print(f"processed {docs_seen[0]} documents ({done_bytes / 1e6 / secs:.2f} MB/s)", flush=True)

    try:
        docs = iter_documents(files, keys)
        if fix_text is not None:
            docs = (([fix_text(t) for t in texts], nbytes) for texts, nbytes in docs)
        tasks = _batched(docs, task_chars)
        if workers == 1:
            for batch, nbytes in tasks:
                write(encode_batch(tokenizer, batch, dtype), nbytes)
        else:
            with _executor(tokenizer, dtype, workers) as pool:
                pending: deque = deque()
                for batch, nbytes in tasks:  # bounded queue: memory stays flat on any corpus size
                    if getattr(tokenizer, "releases_gil", False):
                        pending.append((pool.submit(encode_batch, tokenizer, batch, dtype), nbytes))
                    else:
                        pending.append((pool.submit(_encode_task, batch), nbytes))
                    if len(pending) >= 2 * workers:
                        fut, nb = pending.popleft()
                        write(fut.result(), nb)
                while pending:
                    fut, nb = pending.popleft()
                    write(fut.result(), nb)
        for k, b in enumerate(builders):
            if b.num_documents == 0:
                raise PrepareError(
                    f"empty corpus: no non-empty documents for key {keys[k]!r} in {_describe(files)}"
                )
        seconds = time.perf_counter() - start
        results = []
        for k, b in enumerate(builders):
            n_docs, n_tokens = b.num_documents, b.num_tokens
            b.finalize()
            results.append(PrepareResult(prefixes[k], keys[k], n_docs, n_tokens, skipped[k], total_bytes, seconds))
        return results
    finally:
        if bar is not None:
            bar.close()
        for b in builders:
            if not b.finalized:
                b.abort()
