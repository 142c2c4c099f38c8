#!/usr/bin/env python
"""Streaming at scale: tokens/s, process memory and KV bytes of SepLLM, StreamingLLM and full attention over long
PG-19 streams, fed in chunks and one token at a time (tools/sepllm/streaming_ppl.py, whole-book protocol).

Every (method, feeding) pair runs once in its own process (so RSS and peak RSS are that run's alone) up to the
longest length it is allowed, recording memory at each length on the way; full attention stops where its KV cache
would exceed --full-kv-budget-mb. In the same run the benchmark times the model's output layer alone, one token at a
time (projection + log-softmax NLL of one position): the bound no per-token loop can beat.

Columns:
  method            sepllm | streamingllm | full
  feeding           chunked (--chunk-size tokens per forward; equal to token-by-token) | per-token (1 per forward)
  tokens            stream length of the row (memory and speed are read at the end of the forward that reaches
                    it: measured_at_tokens in the JSON, up to one chunk later)
  tokens_per_s      tokens / wall seconds from the start of the stream to this length
  rss_mb            process resident set at this length (MiB)
  peak_rss_mb       peak resident set so far (MiB)
  kv_mb             bytes of the key/value tensors the cache holds at this length (MiB)
  ppl               perplexity of the first `tokens` tokens (exact, from the run's nll.npy)
  kv_vs_full        kv_mb / full attention's kv_mb at the same length and feeding (blank: full over budget)
  speed_vs_full     tokens_per_s / full attention's at the same length and feeding
  vs_output_bound   per-token rows: tokens_per_s / the output layer's tokens/s (1.0 = the loop costs nothing else)
  rss_vs_first      rss_mb / this run's rss_mb at its first length (flatness; 1.00 = flat)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence
sys.path.insert(0, str(Path(__file__).resolve().parent))   # benchmarks/report.py
from report import add_model_size_args  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TOOL = REPO / "tools" / "sepllm" / "streaming_ppl.py"
METHODS = ("sepllm", "streamingllm", "full")
FEEDINGS = ("chunked", "per-token")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from megatron.data.corpus_registry import SHIPPED_DIR
    from megatron.tokenizer import BUNDLED_NEOX_TOKENIZER

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="10000,100000,1000000",
                   help="comma-separated stream lengths to report (default: %(default)s)")
    p.add_argument("--per-token-lengths", help="lengths for per-token feeding (default: --lengths; one token per "
                                               "forward is ~10x slower, so long lengths take hours)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of %(default)s")
    p.add_argument("--feedings", default=",".join(FEEDINGS), help="comma-separated subset of %(default)s")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per forward when chunked (default 256)")
    p.add_argument("--full-kv-budget-mb", type=float, default=512.0,
                   help="full attention stops before its KV cache exceeds this (MiB; default 512)")
    p.add_argument("--data-dir", default=str(SHIPPED_DIR / "pg19_sample"),
                   help="directory of *.txt books (default: the bundled sample, ~0.77M tokens; pass a larger "
                        "corpus for 1M+)")
    p.add_argument("--tokenizer", default=str(BUNDLED_NEOX_TOKENIZER),
                   help="HF tokenizer.json (default: the bundled GPT-NeoX-20B tokenizer, vocabulary 50,277)")
    add_model_size_args(p, layers=2, hidden=256, heads=4)
    p.add_argument("--init-cache-size", type=int, default=4, help="a (default 4)")
    p.add_argument("--sep-cache-size", type=int, default=64, help="s, SepLLM (default 64)")
    p.add_argument("--local-size", type=int, default=224, help="w, SepLLM (default 224; StreamingLLM uses c - a)")
    p.add_argument("--cache-size", type=int, default=324, help="c (default 324)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--output-dir", help="keep every run's outputs here (default: a temporary folder)")
    p.add_argument("--json", dest="json_path", help="also write the rows (and the output-layer bound) as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"benchmarks/streaming.py: error: {flag}: expected comma-separated integers, got {text!r}")
    if not values or values[0] < 1:
        raise SystemExit(f"benchmarks/streaming.py: error: {flag}: lengths must be >= 1, got {text!r}")
    return values


def _names(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise SystemExit(f"benchmarks/streaming.py: error: {flag}: unknown {bad or names}; choose from "
                         f"{', '.join(allowed)}")
    return names


def output_layer_bound(args: argparse.Namespace, vocab: int, tokens: int = 300) -> float:
    """Tokens/s of the output layer alone, one position at a time (projection + NLL), best of 3 rounds."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, vocab, bias=False)
    x = torch.randn(tokens, 1, args.hidden)
    target = torch.randint(0, vocab, (tokens, 1))
    best = 0.0
    with torch.inference_mode():
        for _ in range(3):
            t0 = time.perf_counter()
            for i in range(tokens):
                torch.nn.functional.cross_entropy(head(x[i]).float(), target[i], reduction="none").numpy()
            best = max(best, tokens / (time.perf_counter() - t0))
    return best


def run_one(args: argparse.Namespace, method: str, feeding: str, lengths: list[int], out: Path) -> dict:
    """One streaming_ppl run in its own process; returns its summary."""
    cmd = [sys.executable, str(TOOL), "--tiny-random", "llama", "--tiny-layers", str(args.layers),
           "--tiny-hidden", str(args.hidden), "--tiny-heads", str(args.heads), "--tokenizer", args.tokenizer,
           "--data-dir", args.data_dir, "--protocol", "whole-book", "--method", method,
           "--num-tokens", str(max(lengths)), "--memory-checkpoints", ",".join(map(str, lengths)),
           "--chunk-size", str(args.chunk_size if feeding == "chunked" else 1), "--threads", str(args.threads),
           "--init-cache-size", str(args.init_cache_size), "--sep-cache-size", str(args.sep_cache_size),
           "--local-size", str(args.local_size), "--cache-size", str(args.cache_size),
           "--output-dir", str(out), "--no-progress", "--no-plots"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SystemExit(f"benchmarks/streaming.py: error: {method}/{feeding} failed: {last}")
    return json.loads((out / "summary.json").read_text())


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import numpy as np
    from tokenizers import Tokenizer
    from tqdm import tqdm

    lengths = _ints(args.lengths, "--lengths")
    per_token_lengths = _ints(args.per_token_lengths, "--per-token-lengths") if args.per_token_lengths else lengths
    methods = _names(args.methods, METHODS, "--methods")
    feedings = _names(args.feedings, FEEDINGS, "--feedings")
    if not Path(args.tokenizer).is_file():
        raise SystemExit(f"benchmarks/streaming.py: error: --tokenizer: file not found: {args.tokenizer}")
    vocab = Tokenizer.from_file(args.tokenizer).get_vocab_size()
    kv_per_token = 2 * args.layers * args.hidden * 4            # K and V, fp32, every layer (full attention)
    full_max = int(args.full_kv_budget_mb * 2**20 // kv_per_token)
    bound = output_layer_bound(args, vocab)
    root = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="bench_streaming_"))
    jobs = []
    for feeding in feedings:
        for method in methods:
            wanted = per_token_lengths if feeding == "per-token" else lengths
            if method == "full":
                wanted = [n for n in wanted if n <= full_max]
            if wanted:
                jobs.append((method, feeding, wanted))
    rows = []
    for method, feeding, wanted in tqdm(jobs, desc="runs", unit="run", disable=args.no_progress):
        summary = run_one(args, method, feeding, wanted, root / f"{method}_{feeding}")
        nll = np.load(root / f"{method}_{feeding}" / "nll.npy", mmap_mode="r")
        first_rss = None
        for n in wanted:
            mem = summary["memory_at_tokens"].get(str(n))
            if mem is None:           # the corpus ended before this length
                continue
            first_rss = first_rss or mem["rss_mb"]
            rows.append({"method": method, "feeding": feeding, "tokens": n, "measured_at_tokens": mem["at_tokens"],
                         "tokens_per_s": round(mem["tokens_per_s"], 1), "rss_mb": round(mem["rss_mb"], 1),
                         "peak_rss_mb": round(mem["peak_rss_mb"], 1), "kv_mb": round(mem["kv_cache_mb"], 4),
                         "peak_kv_mb": round(mem["peak_kv_cache_mb"], 4),
                         "ppl": float(np.exp(np.mean(np.asarray(nll[:n], dtype=np.float64)))),
                         "rss_vs_first": round(mem["rss_mb"] / first_rss, 4)})
    full = {(r["feeding"], r["tokens"]): r for r in rows if r["method"] == "full"}
    for r in rows:
        base = full.get((r["feeding"], r["tokens"]))
        r["kv_vs_full"] = round(r["kv_mb"] / base["kv_mb"], 4) if base else None
        r["speed_vs_full"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3) if base else None
        r["vs_output_bound"] = round(r["tokens_per_s"] / bound, 3) if r["feeding"] == "per-token" else None
    print(f"layers={args.layers} hidden={args.hidden} heads={args.heads} vocab={vocab} threads={args.threads} "
          f"a={args.init_cache_size} s={args.sep_cache_size} w={args.local_size} c={args.cache_size} "
          f"chunk={args.chunk_size}; output layer alone: {bound:.0f} tokens/s; full attention budget "
          f"{args.full_kv_budget_mb:.0f} MiB = {full_max} tokens")
    head = (f"{'method':>12} {'feeding':>9} {'tokens':>8} {'tok/s':>8} {'rss MiB':>8} {'peak rss':>8} "
            f"{'KV MiB':>9} {'ppl':>9} {'KV/full':>8} {'speed/full':>10} {'/bound':>7} {'rss/first':>9}")
    print(head)
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        print(f"{r['method']:>12} {r['feeding']:>9} {r['tokens']:>8} {r['tokens_per_s']:>8.1f} {r['rss_mb']:>8.1f} "
              f"{r['peak_rss_mb']:>8.1f} {r['kv_mb']:>9.3f} {fmt(r['ppl'], '9.2f'):>9} "
              f"{fmt(r['kv_vs_full'], '.4f'):>8} {fmt(r['speed_vs_full'], '.2f'):>10} "
              f"{fmt(r['vs_output_bound'], '.2f'):>7} {r['rss_vs_first']:>9.3f}")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps({"output_layer_tokens_per_s": bound, "vocab": vocab,
                                                    "full_max_tokens": full_max, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
