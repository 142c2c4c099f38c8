#!/usr/bin/env python
"""Benchmark SepLLM attention paths against plain causal SDPA on real text.

Token ids come from PG-19 books (GPT-NeoX-20B tokenizer), so separator density is realistic. For each local window
``w`` and sequence length ``S`` it times one attention layer (``B x H x S x D``, fp32 by default):

* ``sdpa_causal``: ``scaled_dot_product_attention(is_causal=True)`` on 4-D inputs (the fast path; the baseline);
* ``dense``:   SepLLM boolean mask into SDPA (reference semantics);
* ``compact``: gathered initial + separator keys and banded window in one exact softmax;
* ``flex``:    FlexAttention with a SepLLM BlockMask over the raw S x S layout (forward only on CPU: torch has no CPU
  flex backward);
* ``flex_compact``: FlexAttention over [gathered global keys] ++ [S keys] (staircase + band BlockMask; forward only on
  CPU);
* ``triton``: the same key layout through our Triton kernels (CUDA only; skipped on other devices).

Times are medians over ``--repeats`` runs after one warm-up (compilation excluded); the per-micro-batch plan
(mask / layout / BlockMask build) is timed separately as ``plan_ms`` because a model shares it across all layers.
Ratios are against ``sdpa_causal`` measured in the same run. ``density`` = attended entries / causal entries.

``--block-counts`` times nothing: it prints, per ``(S, w)``, the fraction of the causal 128 x 128 blocks that the
BlockMask of ``flex`` and of ``flex_compact`` keeps non-empty (mean over the batch rows), i.e. the share of causal
attention's tiles each FlexAttention path computes, and the share of causal 64 x 64 tiles the ``triton`` kernels walk.

Example: ``python benchmarks/sep_attention.py --seq-lens 1024 4096 --windows 256 --json out.json``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

sys.path.insert(0, str(Path(__file__).resolve().parent))   # benchmarks/corpus.py

from corpus import TOKENIZER, pg19_books  # noqa: E402
from report import print_table, write_json  # noqa: E402
from megatron.config.model import ModelConfig  # noqa: E402
from megatron.config.sepllm import SepLLMConfig  # noqa: E402
from megatron.sepllm.attention.auto_table import TABLE_PATH as AUTO_TABLE  # noqa: E402
from megatron.sepllm.attention.auto_table import table_entries, write_table  # noqa: E402
from megatron.sepllm.attention.backend import SepLLMBackend  # noqa: E402
from megatron.sepllm.attention.retention import pattern_counts  # noqa: E402

PYTHIA_SEPS = [15, 13, 32, 2, 28, 27, 209, 186, 187]
IMPLS = ("compact", "dense", "flex", "flex_compact", "triton")
CUDA_ONLY = ("triton",)
FORWARD_ONLY_ON_CPU = ("flex", "flex_compact")   # torch has no FlexAttention backward on CPU


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                   help="sequence lengths S to benchmark")
    p.add_argument("--windows", type=int, nargs="+", default=[64, 256], help="SepLLM local windows w")
    p.add_argument("--impls", nargs="+", default=None, choices=IMPLS,
                   help="SepLLM execution paths to time (sdpa_causal is always measured as the baseline; default: all "
                        "that run on --device, i.e. triton only on cuda)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--batch", type=int, default=1, help="batch size B (rows come from different books)")
    p.add_argument("--heads", type=int, default=12, help="attention heads H")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension D")
    p.add_argument("--num-initial", type=int, default=3, help="initial tokens a (init_tok_max_idx = a - 1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="q/k/v dtype")
    p.add_argument("--pg19-dir", type=Path, default=None,
                   help="folder of PG-19 *.txt books (default: the 75 shared books beside the checkout when present, "
                        "else the 5 bundled ones); the tokenizer is the bundled GPT-NeoX-20B one")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice); 1 gives steadier ratios on a busy machine")
    p.add_argument("--no-backward", action="store_true", help="time forward only (skip forward+backward)")
    p.add_argument("--block-counts", action="store_true",
                   help="time nothing: print the fraction of causal blocks that flex's and flex_compact's BlockMasks "
                        "keep non-empty (and of causal 64x64 tiles the triton kernels walk) per (S, w) over --batch "
                        "rows")
    p.add_argument("--block-size", type=int, default=128, help="FlexAttention block size for --block-counts")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as a JSON list to this path")
    p.add_argument("--write-auto-table", nargs="?", type=Path, const=AUTO_TABLE, default=None, metavar="PATH",
                   help="record the fastest trainable path (fwd+bwd) per (S, w) for this device type in the table "
                        "that sep_attention_impl 'auto' consults (PATH defaults to megatron/sepllm/attention/auto_table.json; "
                        "other device types' entries are kept)")
    return p.parse_args(argv)


def load_ids(pg19: Optional[Path], batch: int, seq_len: int) -> torch.Tensor:
    """``[batch, seq_len]`` ids: each row a different PG-19 book (books concatenated if one is too short)."""
    from tokenizers import Tokenizer

    books = pg19_books(pg19)
    tok = Tokenizer.from_file(str(TOKENIZER))
    rows, i = [], 0
    while len(rows) < batch:
        ids: list[int] = []
        while len(ids) < seq_len:
            ids += tok.encode(books[i % len(books)].read_text(encoding="utf-8", errors="replace")[: 12 * seq_len]).ids
            i += 1
        rows.append(ids[:seq_len])
    return torch.tensor(rows, dtype=torch.long)


def timed_ms(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def interleaved_medians(fns: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median ms of each callable; one warm-up each, then the callables take turns in every repeat, so a load
    change on a shared machine hits all of them alike (the ratios stay fair)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed_ms(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def make_backend(impl: str, window: int, num_initial: int) -> SepLLMBackend:
    cfg = SepLLMConfig(separator_token_ids=list(PYTHIA_SEPS), mode="sepllm", prefill_windows=[window],
                       generate_windows=[window], init_tok_max_idx=num_initial - 1, sep_attention_impl=impl)
    return SepLLMBackend(cfg, ModelConfig(num_layers=1))


def forward_fn(attn: Callable, q, k, v) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            attn(q, k, v)
    return run


def fwd_bwd_fn(attn: Callable, q, k, v, grad) -> Callable[[], None]:
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def run() -> None:
        attn(qg, kg, vg).backward(grad)
        qg.grad = kg.grad = vg.grad = None
    return run


def run(args: argparse.Namespace, on_rows: Optional[Callable[[list[dict]], None]] = None) -> list[dict]:
    """Time every (w, S) config; ``on_rows`` gets the rows so far after each one (a time limit keeps them)."""
    from tqdm import tqdm

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    scale = args.head_dim ** -0.5
    backward = not args.no_backward
    rows: list[dict] = []
    jobs = [(w, s) for w in args.windows for s in args.seq_lens]
    all_ids = load_ids(args.pg19_dir, args.batch, max(args.seq_lens))
    for w, s in tqdm(jobs, desc="sep_attention", unit="config", file=sys.stderr):
        ids = all_ids[:, :s].to(device)
        pos = torch.arange(s, device=device)[None].expand(args.batch, s)
        gen = torch.Generator(device="cpu").manual_seed(s)
        shape = (args.batch, args.heads, s, args.head_dim)
        q, k, v, grad = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(4))
        attns: dict[str, Callable] = {
            "sdpa_causal": lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, scale=scale)}
        plan_fns, density = {}, {"sdpa_causal": 1.0}
        for impl in args.impls:
            backend = make_backend(impl, w, args.num_initial)
            plan = backend.prepare(ids, pos, None)
            _, _, kept, total = pattern_counts(plan.pattern(0).global_keys, w, None)
            density[impl] = kept / total
            attns[impl] = (lambda a, b, c, _p=plan, _b=backend: _b(a, b, c, 0, _p, scale=scale))
            plan_fns[impl] = (lambda _b=backend: _b.prepare(ids, pos, None))
        fwd = interleaved_medians({n: forward_fn(a, q, k, v) for n, a in attns.items()}, args.repeats, device)
        fb: dict[str, float] = {}
        if backward:
            trainable = {n: a for n, a in attns.items() if not (n in FORWARD_ONLY_ON_CPU and device.type == "cpu")}
            fb = interleaved_medians({n: fwd_bwd_fn(a, q, k, v, grad) for n, a in trainable.items()},
                                     args.repeats, device)
        plan_ms = interleaved_medians(plan_fns, args.repeats, device) if plan_fns else {}
        for name in attns:
            rows.append(dict(impl=name, S=s, w=w, density=density[name], fwd_ms=fwd[name],
                             fwd_bwd_ms=fb.get(name), plan_ms=plan_ms.get(name, 0.0),
                             fwd_ratio_vs_causal=fwd[name] / fwd["sdpa_causal"],
                             fwd_bwd_ratio_vs_causal=(fb[name] / fb["sdpa_causal"]) if name in fb else None))
        if on_rows is not None:
            on_rows(rows)
    return rows


def block_count_rows(args: argparse.Namespace) -> list[dict]:
    """Per ``(S, w)``: non-empty blocks of the raw ``flex`` BlockMask and of the ``flex_compact`` one, as a fraction of
    the causal blocks ``nb (nb + 1) / 2`` (mean over the rows; BlockMasks built in query chunks to bound memory)."""
    from megatron.sepllm.attention.flex import sep_mask_mod
    from megatron.sepllm.attention.flex_compact import build_flex_compact_layout, count_nonempty_blocks
    from megatron.sepllm.attention.plan import global_keys_for
    from megatron.sepllm.attention.triton_compact import DEFAULT_BLOCK, visited_tiles

    bs = args.block_size
    all_ids = load_ids(args.pg19_dir, args.batch, max(args.seq_lens))
    rows = []
    for s in args.seq_lens:
        ids = all_ids[:, :s]
        g = global_keys_for(ids, PYTHIA_SEPS, args.num_initial, None, None, None)
        nb = -(-s // bs)
        causal = nb * (nb + 1) // 2
        for w in args.windows:
            raw = count_nonempty_blocks(sep_mask_mod(g, None, w), args.batch, s, s, bs)
            lay = build_flex_compact_layout(g, None, w, torch.arange(s)[None].expand(args.batch, s), block=bs)
            comp = count_nonempty_blocks(lay.mask_mod(), args.batch, s, lay.kv_len, bs)
            _, _, kept, total = pattern_counts(g, w, None)
            tri = visited_tiles(lay, DEFAULT_BLOCK, DEFAULT_BLOCK).float().mean()
            nt = -(-s // DEFAULT_BLOCK)
            rows.append(dict(S=s, w=w, block=bs, causal_blocks=causal, global_keys=int(lay.global_counts.max()),
                             slots=lay.num_slots, flex_blocks=float(raw.float().mean()),
                             flex_compact_blocks=float(comp.float().mean()),
                             flex_fraction=float(raw.float().mean()) / causal,
                             flex_compact_fraction=float(comp.float().mean()) / causal,
                             triton_tile=DEFAULT_BLOCK, triton_fraction=float(tri) / (nt * (nt + 1) // 2),
                             density=kept / total))
    return rows


BLOCK_COLUMNS = [("S", "S", ">"), ("w", "w", ">"), ("causal_blocks", "causal", ">"), ("global_keys", "N max", ">"),
                 ("slots", "N_pad", ">"), ("flex_blocks", "flex", ">.1f"), ("flex_compact_blocks", "flex_cmp", ">.1f"),
                 ("flex_pct", "flex %", ">.1f"), ("flex_compact_pct", "flex_cmp %", ">.1f"),
                 ("triton_pct", "triton %", ">.1f"), ("density", "density", ">.3f")]


def format_table(rows: list[dict]) -> str:
    def f(x, spec):
        return format("-", spec.replace(".3f", "").replace(".1f", "")) if x is None else format(x, spec)
    head = f"{'impl':<12}{'w':>6}{'S':>7}{'density':>9}{'plan_ms':>9}{'fwd_ms':>10}{'fwd/causal':>11}" \
           f"{'fwd+bwd_ms':>12}{'fb/causal':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['impl']:<12}{r['w']:>6}{r['S']:>7}{r['density']:>9.3f}{r['plan_ms']:>9.1f}"
                     f"{r['fwd_ms']:>10.1f}{f(r['fwd_ratio_vs_causal'], '>11.3f')}{f(r['fwd_bwd_ms'], '>12.1f')}"
                     f"{f(r['fwd_bwd_ratio_vs_causal'], '>10.3f')}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device} requested but CUDA is not available", file=sys.stderr)
        return 2
    if args.write_auto_table is not None and args.no_backward:
        print("error: --write-auto-table needs forward+backward times (drop --no-backward)", file=sys.stderr)
        return 2
    if args.block_counts and args.write_auto_table is not None:
        print("error: --block-counts times nothing, so it cannot --write-auto-table", file=sys.stderr)
        return 2
    if args.block_size < 16 or args.block_size & (args.block_size - 1):
        print(f"error: --block-size must be a power of two >= 16, got {args.block_size}", file=sys.stderr)
        return 2
    on_cuda = torch.device(args.device).type == "cuda"
    if args.impls is None:
        args.impls = [i for i in IMPLS if on_cuda or i not in CUDA_ONLY]
    elif not on_cuda and set(args.impls) & set(CUDA_ONLY):
        print(f"error: --impls {' '.join(sorted(set(args.impls) & set(CUDA_ONLY)))} runs on CUDA only "
              f"(--device {args.device})", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.block_counts:
        rows = block_count_rows(args)
        print(f"Non-empty {args.block_size}x{args.block_size} blocks of the FlexAttention BlockMasks (mean over "
              f"{args.batch} rows; triton: its 64x64 tiles), a={args.num_initial}, Pythia separators; % = of the "
              "causal blocks")
        print_table([dict(r, flex_pct=100 * r["flex_fraction"], flex_compact_pct=100 * r["flex_compact_fraction"],
                          triton_pct=100 * r["triton_fraction"]) for r in rows], BLOCK_COLUMNS)
        write_json(args.json, rows)
        return 0
    rows = run(args, on_rows=lambda rows_so_far: write_json(args.json, rows_so_far, announce=False))
    print(f"SepLLM attention, a={args.num_initial}, B={args.batch}, H={args.heads}, D={args.head_dim}, "
          f"{args.dtype}, device={args.device}, torch {torch.__version__}, threads={torch.get_num_threads()}")
    print(format_table(rows))
    write_json(args.json, rows)
    if args.write_auto_table is not None:
        entries = table_entries(rows)
        device_type = torch.device(args.device).type
        source = {"command": "benchmarks/sep_attention.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype,
                  "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
                  "date": time.strftime("%Y-%m-%d", time.gmtime())}
        write_table(device_type, entries, source, args.write_auto_table)
        print(f"wrote {len(entries)} {device_type} entries to {args.write_auto_table}: "
              + ", ".join(f"S={e['seq']} w={e['window']} -> {e['impl']}" for e in entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
