"""The smallest and largest token id of a ``.bin/.idx`` dataset, cached next to it.

The trainer compares them with the tokenizer's vocabulary before training, so data tokenized with another tokenizer
fails at start instead of with an IndexError mid-run (or, worse, training silently on wrong embeddings). The scan is
a vectorised min/max over the memory-mapped ``.bin`` in chunks (flat memory, a progress bar on big files); the result
is cached in ``<prefix>.token_range.json`` (or in ``cache_dir``), keyed by the ``.bin`` size and modification time,
so later starts read a few bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


from megatron.atomic_io import atomic_write_text
from megatron.data.indexed_dataset import MMapIndexedDataset, data_file_path, normalize_prefix

CHUNK_TOKENS = 1 << 26  # 64 Mi tokens per numpy reduction (128 MiB of uint16)
PROGRESS_BYTES = 1 << 30  # show a progress bar from 1 GiB of tokens on
CACHE_SUFFIX = ".token_range.json"


@dataclass(frozen=True)
class TokenRange:
    """``min_id`` / ``max_id`` over all tokens (None for an empty dataset)."""

    min_id: Optional[int]
    max_id: Optional[int]


def _cache_path(prefix: str, cache_dir: Optional[str]) -> Path:
    if cache_dir:
        return Path(cache_dir) / (Path(prefix).name + CACHE_SUFFIX)
    return Path(prefix + CACHE_SUFFIX)


def _stamp(prefix: str) -> dict:
    st = os.stat(data_file_path(prefix))
    return {"bin_bytes": st.st_size, "bin_mtime_ns": st.st_mtime_ns}


def _read_cache(path: Path, stamp: dict) -> Optional[TokenRange]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or any(data.get(k) != v for k, v in stamp.items()):
        return None
    return TokenRange(data.get("min_id"), data.get("max_id"))


def _write_cache(path: Path, stamp: dict, found: TokenRange) -> None:
    """Atomic (temp + rename); a read-only data folder just means no cache."""
    try:
        atomic_write_text(path, json.dumps({**stamp, "min_id": found.min_id, "max_id": found.max_id}),
                          make_parents=True)
    except OSError:
        pass


def scan_token_range(prefix: str, progress: bool = True) -> TokenRange:
    """Min and max token id of ``prefix`` by a chunked reduction over the memory map."""
    ds = MMapIndexedDataset(prefix)
    tokens = ds._bin
    if tokens.size == 0:
        return TokenRange(None, None)
    bar = None
    if progress and tokens.nbytes >= PROGRESS_BYTES:
        from tqdm import tqdm

        bar = tqdm(total=tokens.nbytes, unit="B", unit_scale=True, desc=f"token ids of {Path(prefix).name}",
                   dynamic_ncols=True)
    low, high = None, None
    try:
        for start in range(0, tokens.size, CHUNK_TOKENS):
            chunk = tokens[start:start + CHUNK_TOKENS]
            cmin, cmax = int(chunk.min()), int(chunk.max())
            low = cmin if low is None else min(low, cmin)
            high = cmax if high is None else max(high, cmax)
            if bar is not None:
                bar.update(chunk.nbytes)
    finally:
        if bar is not None:
            bar.close()
    return TokenRange(low, high)


def token_range(prefix: str, cache_dir: Optional[str] = None, progress: bool = True) -> TokenRange:
    """Min and max token id of the dataset at ``prefix``, from the cache when the ``.bin`` is unchanged."""
    prefix = normalize_prefix(prefix)
    stamp = _stamp(prefix)
    path = _cache_path(prefix, cache_dir)
    cached = _read_cache(path, stamp)
    if cached is not None:
        return cached
    found = scan_token_range(prefix, progress=progress)
    _write_cache(path, stamp, found)
    return found


__all__ = ["TokenRange", "scan_token_range", "token_range"]
