"""Token streams for long-stream evaluation (PG-19 books), with host memory that does not grow with the stream.

A stream of millions of tokens must not leave its traces in the evaluating process: lines are read and tokenised a
bounded batch at a time, and a whole book (the whole-book protocol) is tokenised in a worker process, because a
tokenizer ``Encoding`` of a long book costs ~200 bytes per token (tokens, offsets, masks) and the allocator keeps
that high-water mark after it is freed. The evaluating process only receives the ids, 4 bytes per token.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

#: lines tokenised per batch in the per-line protocol
LINES_PER_BATCH = 256
_REPO_ROOT = Path(__file__).resolve().parents[2]

def _encode_book_to(tokenizer_file: str, book: str, out: str) -> None:
    """Worker side: write the ids of one book (no special tokens) to ``out`` as an int32 ``.npy``."""
    from tokenizers import Tokenizer

    text = Path(book).read_text(encoding="utf-8", errors="replace")
    ids = np.asarray(Tokenizer.from_file(tokenizer_file).encode(text, add_special_tokens=False).ids, dtype=np.int32)
    tmp = out + ".tmp.npy"
    np.save(tmp, ids)
    os.replace(tmp, out)


class _BookWorker:
    """One book tokenised by ``python -m megatron.sepllm.hf.stream_tokens`` in a child process (started right away,
    so the next book is tokenised while the current one streams)."""

    def __init__(self, tokenizer_file: Path, book: Path, out: Path):
        self.out, self.book = out, book
        self.proc = subprocess.Popen([sys.executable, "-m", "megatron.sepllm.hf.stream_tokens", str(tokenizer_file),
                                      str(book), str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     cwd=str(_REPO_ROOT))

    def result(self) -> np.ndarray:
        _, err = self.proc.communicate()
        if self.proc.returncode != 0:
            last = (err or b"").decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"tokenising {self.book} failed: {last[-1] if last else 'exit ' + str(self.proc.returncode)}")
        ids = np.load(self.out)
        self.out.unlink()
        return ids

    def cancel(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()
        self.out.unlink(missing_ok=True)


def line_batches(path: Path, size: int = LINES_PER_BATCH) -> Iterator[list[str]]:
    """The lines of a text file (``str.splitlines`` semantics), ``size`` at a time, without reading the whole file."""
    batch: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            batch.extend(raw.splitlines() or [""])
            if len(batch) >= size:
                yield batch
                batch = []
    if batch:
        yield batch


def token_stream(books: list[Path], tok: Any, bos: int, protocol: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(fed ids, target ids) per line (``per-line``: BOS + the line, its last token never fed) or per book
    (``whole-book``: BOS + the book; int32 views of one array), in the given order."""
    if protocol == "per-line":
        for book in books:
            for lines in line_batches(book):
                for enc in tok.encode_batch(lines, add_special_tokens=False):
                    if enc.ids:
                        ids = np.asarray([bos] + enc.ids, dtype=np.int64)
                        yield ids[:-1], ids[1:]
        return
    if protocol != "whole-book":
        raise ValueError(f"protocol must be 'per-line' or 'whole-book', got {protocol!r}")
    with tempfile.TemporaryDirectory(prefix="stream_tokens_") as tmp:
        tokenizer_file = Path(tmp) / "tokenizer.json"
        tokenizer_file.write_text(tok.to_str())
        start = lambda i: _BookWorker(tokenizer_file, books[i], Path(tmp) / f"book{i}.npy")  # noqa: E731
        pending = start(0) if books else None
        try:
            for i in range(len(books)):
                body = pending.result()
                pending = start(i + 1) if i + 1 < len(books) else None
                ids = np.empty(len(body) + 1, dtype=np.int32)     # 4 bytes a token; views below, no copies
                ids[0] = bos
                ids[1:] = body
                del body
                if len(ids) > 1:
                    yield ids[:-1], ids[1:]
        finally:
            if pending is not None:
                pending.cancel()


class TokenFeed:
    """The stream's (fed, target) ids a chunk at a time. Holds the current book (or line) as views of one array plus
    at most one chunk of copies, so host memory does not grow with the stream."""

    def __init__(self, stream: Iterator[tuple[np.ndarray, np.ndarray]]):
        self.stream = stream
        self.segments: list[tuple[np.ndarray, np.ndarray]] = []
        self.available = 0

    def take(self, n: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """Up to ``n`` (fed, target) pairs as int64 arrays; None when the stream is exhausted."""
        while self.available < n:
            try:
                fed, tgt = next(self.stream)
            except StopIteration:
                break
            self.segments.append((fed, tgt))
            self.available += len(fed)
        k = min(n, self.available)
        if k <= 0:
            return None
        feds, tgts, need = [], [], k
        while need:
            fed, tgt = self.segments[0]
            part = min(need, len(fed))
            feds.append(fed[:part])
            tgts.append(tgt[:part])
            if part == len(fed):
                self.segments.pop(0)
            else:
                self.segments[0] = (fed[part:], tgt[part:])
            need -= part
        self.available -= k
        if len(feds) == 1:
            return feds[0].astype(np.int64), tgts[0].astype(np.int64)
        return np.concatenate(feds).astype(np.int64), np.concatenate(tgts).astype(np.int64)

    def close(self) -> None:
        """Stop the stream (and its worker process, if any)."""
        close = getattr(self.stream, "close", None)
        if close is not None:
            close()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Tokenise one book into an int32 .npy (the whole-book worker of "
                                            "token_stream; run by it, not by hand).")
    p.add_argument("tokenizer", help="HF tokenizer.json")
    p.add_argument("book", help="UTF-8 text file")
    p.add_argument("out", help="output .npy (written to a temp file, then renamed)")
    args = p.parse_args(argv)
    _encode_book_to(args.tokenizer, args.book, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
