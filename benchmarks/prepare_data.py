#!/usr/bin/env python
"""Tokenization throughput of our prepare pipeline vs a naive single-process loop, on PG-19 books.

The naive baseline is what most people write first: for each book, read it, ``tokenizer.encode`` the whole text with
the Rust tokenizer, and write the ids with numpy. Ours is ``megatron.data.preprocess.tokenize_to_indexed`` (the
code behind prepare_data.py) with 1 and 2 worker processes. Both use the same GPT-NeoX-20B tokenizer.json, run in
the same process, round-robin over groups of books (so load from other users of a shared machine hits every method
alike), and the token ids are checked to be identical. Reported: MB of input text per second and the ratio against
the naive loop (best of --repeats runs each).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))   # benchmarks/corpus.py

from corpus import TOKENIZER, pg19_dir  # noqa: E402


def naive_loop(files: list[Path], tok, out_path: Path) -> list[np.ndarray]:
    """Read, encode each whole book with a loaded ``tokenizers.Tokenizer``, write with numpy: the baseline."""
    arrays = []
    with open(out_path, "wb") as out:
        for f in files:
            ids = np.asarray(tok.encode(f.read_text(encoding="utf-8"), add_special_tokens=False).ids, dtype=np.uint16)
            ids.tofile(out)
            arrays.append(ids)
    return arrays


def run_ours(files: list[Path], tokenizer, prefix: str, workers: int) -> list[np.ndarray]:
    from megatron.data import MMapIndexedDataset
    from megatron.data.preprocess import tokenize_to_indexed

    res = tokenize_to_indexed([str(f) for f in files], prefix, tokenizer=tokenizer, workers=workers, progress=False)
    ds = MMapIndexedDataset(res[0].prefix)
    return [np.asarray(ds[i][:-1]) for i in range(len(ds))]  # drop the EOD for the comparison


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the worker pools)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pg19-dir", default=str(pg19_dir()),
                   help="folder of PG-19 .txt books (default: the 75 shared books beside the checkout when present, "
                        "else the 5 bundled ones)")
    p.add_argument("--tokenizer-file", default=str(TOKENIZER),
                   help="HF tokenizer.json used by every method (default: GPT-NeoX-20B)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N books (sorted by name)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure (default: 1 2)")
    p.add_argument("--repeats", type=int, default=1, help="runs per method; the best is reported (default: 1)")
    p.add_argument("--groups", type=int, default=5,
                   help="split the books into this many groups and run the methods round-robin per group, "
                   "rotating their order, so a busy shared machine slows every method alike (default: 5)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write rows [{method, workers, mb_per_s, ratio_vs_naive, seconds, identical, cpu_s, "
                   "mb_per_cpu_s}] to PATH (CPU time: this process plus its worker processes)")
    args = p.parse_args(argv)

    from megatron.tokenizer import build_tokenizer
    from tqdm import tqdm

    files = sorted(Path(args.pg19_dir).glob("*.txt"))[: args.limit]
    if not files:
        print(f"benchmarks/prepare_data.py: error: no .txt files in {args.pg19_dir}", file=sys.stderr)
        return 1
    mb = sum(f.stat().st_size for f in files) / 1e6
    tokenizer = build_tokenizer("HFTokenizer", args.tokenizer_file)  # both sides get a loaded tokenizer
    from tokenizers import Tokenizer

    rust_tokenizer = Tokenizer.from_file(args.tokenizer_file)
    methods = [("naive", 1)] + [("ours", w) for w in args.workers]
    best: dict[tuple[str, int], float] = {}
    best_cpu: dict[tuple[str, int], float] = {}
    outputs: dict[tuple[str, int], list[np.ndarray]] = {}
    n_groups = max(1, min(args.groups, len(files)))
    groups = [files[g::n_groups] for g in range(n_groups)]
    with tempfile.TemporaryDirectory() as tmp:
        for rep in tqdm(range(args.repeats), desc="repeats", disable=args.repeats == 1):
            total = {m: 0.0 for m in methods}
            cpu_total = {m: 0.0 for m in methods}
            arrays_of: dict[tuple[str, int], list[np.ndarray]] = {m: [] for m in methods}
            for g, group in enumerate(tqdm(groups, desc=f"book groups (run {rep + 1})", leave=False)):
                order = methods[g % len(methods):] + methods[: g % len(methods)]
                for name, w in order:
                    start, cpu_start = time.perf_counter(), cpu_seconds()
                    if name == "naive":
                        arrays = naive_loop(group, rust_tokenizer, Path(tmp) / "naive.bin")
                    else:
                        arrays = run_ours(group, tokenizer, f"{tmp}/ours_w{w}", w)
                    total[(name, w)] += time.perf_counter() - start
                    cpu_total[(name, w)] += cpu_seconds() - cpu_start
                    arrays_of[(name, w)].extend(arrays)
            for m in methods:
                if total[m] < best.get(m, float("inf")):
                    best[m], best_cpu[m] = total[m], cpu_total[m]
                outputs[m] = arrays_of[m]
    ref = outputs[("naive", 1)]
    rows = []
    for name, w in methods:
        secs = best[(name, w)]
        identical = len(outputs[(name, w)]) == len(ref) and all(
            np.array_equal(a, b) for a, b in zip(outputs[(name, w)], ref))
        rows.append({
            "method": name, "workers": w, "mb_per_s": round(mb / secs, 3),
            "ratio_vs_naive": round(best[("naive", 1)] / secs, 3), "seconds": round(secs, 3),
            "identical": identical, "cpu_s": round(best_cpu[(name, w)], 3),
            "mb_per_cpu_s": round(mb / max(best_cpu[(name, w)], 1e-9), 3),
        })
    print(f"{len(files)} books, {mb:.2f} MB, tokenizer {Path(args.tokenizer_file).name}, best of {args.repeats}, "
          f"{n_groups} interleaved groups")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'method':<8}{'workers':>8}{'seconds':>10}{'MB/s':>9}{'vs naive':>10}{'CPU s':>8}{'MB/CPU-s':>10}"
          f"{'same ids':>10}")
    for r in rows:
        print(f"{r['method']:<8}{r['workers']:>8}{r['seconds']:>10.2f}{r['mb_per_s']:>9.2f}"
              f"{r['ratio_vs_naive']:>9.2f}x{r['cpu_s']:>8.1f}{r['mb_per_cpu_s']:>10.2f}{str(r['identical']):>10}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0 if all(r["identical"] for r in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
