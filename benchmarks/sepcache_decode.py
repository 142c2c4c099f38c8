#!/usr/bin/env python
"""Decode latency and KV memory: SepCache vs transformers' DynamicCache on a small random Llama (CPU by default).

For each context length the context is prefilled in chunks (no grad) into each cache; then --steps rounds of greedy
decoding are timed, each round stepping every (cache, context) pair once, so load changes on a shared machine hit
all pairs alike. The per-token time is the median step time. Everything runs in one process, on the same model and
the same token ids, so the ratios are like for like.

Columns:
  cache               dynamic | sepcache
  context             prefilled tokens before decoding
  ms_per_token        median wall time of one decode step (forward + cache update), milliseconds
  peak_mem_mb         peak bytes of the key/value tensors held by the cache after any forward (prefill chunks
                      and decode steps), MiB — exact, and the memory a KV policy controls
  ratio_vs_dynamic    ms_per_token / the DynamicCache's ms_per_token at the same context (< 1 = faster)
  ratio_vs_first      ms_per_token / the same cache's ms_per_token at the first (smallest) context (flatness)

The context is random ids in which a fraction --sep-density are separator ids (real text has ~15-30%), so the
SepCache keeps a realistic mix of separators.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))   # benchmarks/report.py
from report import add_model_size_args, print_table, write_json  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="2048,8192,32768",
                   help="comma-separated context lengths (default: %(default)s)")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per context (default 32)")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps before timing (default 4)")
    p.add_argument("--prefill-chunk", type=int, default=1024, help="prefill chunk size (default 1024)")
    add_model_size_args(p, layers=2, hidden=256, heads=4, vocab=32000)
    p.add_argument("--init-cache-size", type=int, default=4, help="SepCache a (default 4)")
    p.add_argument("--sep-cache-size", type=int, default=128, help="SepCache s (default 128)")
    p.add_argument("--local-size", type=int, default=256, help="SepCache w (default 256)")
    p.add_argument("--cache-size", type=int, default=512, help="SepCache c (default 512)")
    p.add_argument("--sep-density", type=float, default=0.15, help="fraction of separator ids in the context")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and ids (default 0)")
    p.add_argument("--json", dest="json_path", help="also write the rows as a JSON list to this path")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=max(131072, 2 * max_context(args)))
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


def max_context(args: argparse.Namespace) -> int:
    return max(int(x) for x in args.contexts.split(","))


def context_ids(args: argparse.Namespace, length: int, separators: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(args.seed + length)
    ids = torch.randint(len(separators), args.vocab, (1, length), generator=g)
    is_sep = torch.rand(1, length, generator=g) < args.sep_density
    pick = torch.tensor(separators)[torch.randint(0, len(separators), (1, length), generator=g)]
    return torch.where(is_sep, pick, ids)


def kv_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


class DecodeState:
    """One (cache kind, context) pair: its cache, the next token and its timings."""

    def __init__(self, model, kind: str, ids: torch.Tensor, args: argparse.Namespace, separators: list[int]):
        from transformers import DynamicCache

        from megatron.sepllm.hf.cache import SepCache

        self.model, self.kind, self.context = model, kind, ids.shape[1]
        self.times: list[float] = []
        self.peak = 0
        if kind == "dynamic":
            self.cache = DynamicCache(config=model.config)
        else:
            self.cache = SepCache(init_cache_size=args.init_cache_size, sep_cache_size=args.sep_cache_size,
                                  local_size=args.local_size, cache_size=args.cache_size, USE_MAX_SEP_CACHE=True,
                                  separator_token_ids=separators, model=model,
                                  # chunks evict like token-by-token feeding (a plain multi-token step is never
                                  # compressed, as in the reference), so the cache stays within its budget
                                  prefill_attention="stream")
        self.pos = 0
        out = None
        with self.mode():
            for start in range(0, self.context, args.prefill_chunk):
                out = self.forward(ids[:, start:start + args.prefill_chunk])
        self.tok = out.logits[:, -1].argmax(-1, keepdim=True)

    def mode(self):
        from megatron.sepllm.hf.generation import sepllm_attention

        return sepllm_attention(self.model) if self.kind == "sepcache" else contextlib.nullcontext()

    def forward(self, tok: torch.Tensor):
        from megatron.sepllm.hf.generation import sepllm_forward
        from megatron.sepllm.hf.compat import cache_kwargs

        if self.kind == "dynamic":
            positions = torch.arange(self.pos, self.pos + tok.shape[1]).unsqueeze(0)
            out = self.model(input_ids=tok, position_ids=positions, use_cache=True, logits_to_keep=1,
                             **cache_kwargs(self.model, self.cache))
        else:
            out = sepllm_forward(self.model, self.cache, tok, logits_to_keep=1)
        self.pos += tok.shape[1]
        self.peak = max(self.peak, kv_bytes(self.cache))
        return out

    def timed_step(self, record: bool) -> None:
        with self.mode():
            t0 = time.perf_counter()
            out = self.forward(self.tok)
            self.tok = out.logits[:, -1].argmax(-1, keepdim=True)
            dt = time.perf_counter() - t0
        if record:
            self.times.append(dt)

    def row(self) -> dict:
        return {"cache": self.kind, "context": self.context, "ms_per_token": 1e3 * statistics.median(self.times),
                "peak_mem_mb": self.peak / 2**20, "cached_tokens": self.cache.get_seq_length()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        contexts = [int(x) for x in args.contexts.split(",") if x.strip()]
    except ValueError:
        print(f"sepcache_decode: error: --contexts must be comma-separated integers, got {args.contexts!r}",
              file=sys.stderr)
        return 2
    if not contexts or min(contexts) < 1 or args.steps < 1:
        print("sepcache_decode: error: need at least one context >= 1 and --steps >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm import tqdm

    model = build_model(args)
    separators = list(range(10))          # ids 0..9 play the separators of this synthetic vocabulary
    states = []
    with torch.inference_mode():
        for length in tqdm(contexts, desc="prefill", unit="ctx"):
            ids = context_ids(args, length, separators)
            for kind in ("dynamic", "sepcache"):
                states.append(DecodeState(model, kind, ids, args, separators))
        # round-robin: every round times one step of every (cache, context), so load changes hit all alike
        for r in tqdm(range(args.warmup + args.steps), desc="decode rounds", unit="round"):
            for state in states:
                state.timed_step(record=r >= args.warmup)
    rows = [state.row() for state in states]
    dyn = {r["context"]: r["ms_per_token"] for r in rows if r["cache"] == "dynamic"}
    first = {}
    for r in rows:
        r["ratio_vs_dynamic"] = r["ms_per_token"] / dyn[r["context"]]
        first.setdefault(r["cache"], r["ms_per_token"])
        r["ratio_vs_first"] = r["ms_per_token"] / first[r["cache"]]
    print(f"threads={torch.get_num_threads()} layers={args.layers} hidden={args.hidden} heads={args.heads} "
          f"vocab={args.vocab} sepcache a={args.init_cache_size} s={args.sep_cache_size} w={args.local_size} "
          f"c={args.cache_size}")
    print_table(rows, [("cache", "cache", ">"), ("context", "context", ">"), ("ms_per_token", "ms/token", ">.2f"),
                       ("peak_mem_mb", "peak KV MiB", ">.2f"), ("ratio_vs_dynamic", "vs dynamic", ">.2fx"),
                       ("ratio_vs_first", "vs first ctx", ">.2fx")])
    write_json(args.json_path, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
