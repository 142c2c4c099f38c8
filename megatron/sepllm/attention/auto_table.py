"""The measured table behind ``sep_attention_impl: auto``: which SepLLM path trains fastest per device and length.

``benchmarks/sep_attention.py --write-auto-table`` times every trainable path (forward + backward, real PG-19 text)
and records the fastest one per ``(device type, sequence length, window)`` in ``auto_table.json`` beside this file.
``SepLLMBackend.resolve_impl`` consults it: the entry with the largest measured length ``<= S`` (longer sequences only
favour the sparse paths more), at the measured window closest to the layer's. Below the smallest measured length,
for a device type with no entries (CUDA until a GPU run fills it) or without a sequence length, the written rule
applies (compact on CPU, flex_compact on CUDA).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

from megatron.atomic_io import atomic_write_text
from megatron.errors import UserInputError

TABLE_PATH = Path(__file__).with_name("auto_table.json")
TRAINABLE = ("compact", "dense", "flex", "flex_compact", "triton")


class AutoTableError(UserInputError, ValueError):
    """The table file is malformed (names the file and the entry)."""


def _validate(table: dict, path: Path) -> dict:
    if not isinstance(table, dict):
        raise AutoTableError(f"{path}: expected a JSON object keyed by device type")
    for device, block in table.items():
        entries = block.get("entries") if isinstance(block, dict) else None
        if not isinstance(entries, list):
            raise AutoTableError(f"{path}: {device!r} needs an 'entries' list")
        for i, e in enumerate(entries):
            if not (isinstance(e, dict) and isinstance(e.get("seq"), int) and isinstance(e.get("window"), int)
                    and e.get("impl") in TRAINABLE):
                raise AutoTableError(f"{path}: {device}.entries[{i}] = {e!r}: expected seq (int), window (int), "
                                     f"impl in {TRAINABLE}")
    return table


@lru_cache(maxsize=4)
def load_table(path: Path) -> dict:
    """The table at ``path`` as ``{device_type: {"entries": [...], ...}}``; ``{}`` when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AutoTableError(f"{path}: not valid JSON ({exc})") from None
    return _validate(table, path)


def lookup(device_type: str, seq_len: Optional[int], window: int,
           path: Optional[Path] = None) -> Optional[str]:
    """The measured fastest path for ``(device_type, seq_len, window)``, or None where nothing applies
    (``path`` defaults to the shipped table)."""
    if seq_len is None:
        return None
    device_entries = load_table(Path(path or TABLE_PATH)).get(device_type, {}).get("entries", [])
    entries = [e for e in device_entries if e["seq"] <= seq_len]
    if not entries:
        return None
    best_seq = max(e["seq"] for e in entries)
    at_seq = [e for e in entries if e["seq"] == best_seq]
    return min(at_seq, key=lambda e: (abs(e["window"] - window), e["window"]))["impl"]


def table_entries(rows: Iterable[dict]) -> list[dict]:
    """One entry per ``(S, w)`` of benchmark rows: the trainable path with the lowest forward+backward time.

    Paths without a backward measurement (flex / flex_compact on CPU: no CPU backward) cannot be chosen for training.
    """
    best: dict[tuple[int, int], dict] = {}
    for r in rows:
        if r["impl"] not in TRAINABLE or r.get("fwd_bwd_ms") is None:
            continue
        key = (int(r["S"]), int(r["w"]))
        if key not in best or r["fwd_bwd_ms"] < best[key]["fwd_bwd_ms"]:
            best[key] = r
    return [{"seq": s, "window": w, "impl": r["impl"], "fwd_bwd_ratio_vs_causal": r["fwd_bwd_ratio_vs_causal"],
             "candidates": sorted({x["impl"] for x in rows if x["impl"] in TRAINABLE and x.get("fwd_bwd_ms")
                                   is not None and int(x["S"]) == s and int(x["w"]) == w})}
            for (s, w), r in sorted(best.items())]


def write_table(device_type: str, entries: list[dict], source: dict, path: Path) -> None:
    """Replace ``device_type``'s entries in the table file (other devices kept), atomically."""
    path = Path(path)
    table = dict(load_table(path)) if path.is_file() else {}
    table[device_type] = {"source": source, "entries": entries}
    atomic_write_text(path, json.dumps(table, indent=1, sort_keys=True) + "\n")
    load_table.cache_clear()
