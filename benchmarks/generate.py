#!/usr/bin/env python
"""Decode speed of our generate loop vs Hugging Face ``generate`` on the same weights (converted with
``megatron.checkpoint``), for a full-attention and a SepLLM-trained model, at several generation lengths.

Setup: a Pythia-shaped random model (parallel residual, partial rotary, untied head) built as ``GPTModel``; the
full-attention variant is exported to ``GPTNeoXForCausalLM``. Every runner decodes greedily from the same prompt
for exactly N new tokens (no end-of-document stop), batch 1, in this process:

  ours_plain        megatron.inference.generate_batch, plain KV cache                  (full-attention model)
  ours_compressed   megatron.inference.generate_batch, compressed SepLLM cache         (SepLLM model)
  hf_generate       transformers generate, DynamicCache, on the converted weights      (the baseline of both)
  hf_sepcache       transformers generate + SepCache (custom_generate=megatron.sepllm.generate), SepLLM sizes

Columns:
  model             full | sepllm
  runner            see above
  new_tokens        N
  ms_per_token      time of the whole generate call (prefill included) / N by --clock (wall, or process CPU
                    time), best of --repeats rounds
                    (each round runs every length and runner once, interleaving them)
  wall_ms_per_token, cpu_ms_per_token   both clocks of that best round
  tokens_per_sec    1000 / ms_per_token
  ratio_vs_hf       tokens_per_sec / hf_generate's tokens_per_sec at the same N (> 1 = ours faster)
  ratio_vs_first_n  ms_per_token / the same runner's ms_per_token at the first N (flatness; SepLLM target <= 1.2)
  same_tokens_as_hf ours_plain only: length of the common prefix of our and HF's greedy tokens (numerics check)
  kv_mb             KV bytes held by our cache after generating N tokens (MiB)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))   # benchmarks/report.py
from report import add_model_size_args, write_json  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", default="512,4096", help="comma-separated generation lengths (default %(default)s)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default 64)")
    add_model_size_args(p, layers=2, hidden=128, heads=4, vocab=4096)
    p.add_argument("--window", type=int, default=64, help="SepLLM local window (default 64)")
    p.add_argument("--sep-cache-size", type=int, default=64, help="SepLLM cache separators (default 64)")
    p.add_argument("--repeats", type=int, default=2, help="rounds over all lengths and runners; best kept (default 2)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="wall",
                   help="time behind ms_per_token and the ratios: wall clock, or this process's CPU time (steadier "
                        "on a shared machine; meaningful with --threads 1) (default %(default)s)")
    p.add_argument("--skip-hf-sepcache", action="store_true", help="leave out the hf_sepcache runner")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and prompt (default 0)")
    p.add_argument("--json", dest="json_path", help="also write the rows as a JSON list to this path")
    return p.parse_args(argv)


def build_models(args: argparse.Namespace, max_len: int) -> tuple[Any, Any, Any, list[int]]:
    """(ours full, ours SepLLM with the same weights, HF GPT-NeoX of the full model, separator ids)."""
    from transformers import GPTNeoXForCausalLM

    from megatron.config import load_config
    from megatron.checkpoint.hf.mapping import hf_gpt_neox_config, to_hf_gpt_neox_state_dict
    from megatron.model.gpt import GPTModel

    seps = list(range(5, 14))      # 9 ids, like Pythia's separator list
    base = {"num_layers": args.layers, "hidden_size": args.hidden, "num_attention_heads": args.heads,
            "seq_length": max_len, "max_position_embeddings": max_len, "pos_emb": "rotary", "rotary_pct": 0.25,
            "gpt_j_residual": True, "no_weight_tying": True, "padded_vocab_size": args.vocab}
    full_cfg = load_config({**base, "USE_ORIGINAL_FULL_ATTEN": True})
    sep_cfg = load_config({**base, "separator_token_ids": seps, "prefill_local_window_size": args.window,
                           "generate_local_window_size": args.window, "init_tok_max_idx": 3})
    torch.manual_seed(args.seed)
    full = GPTModel(full_cfg.model, full_cfg.sepllm).eval()
    sepllm = GPTModel(sep_cfg.model, sep_cfg.sepllm).eval()
    sepllm.load_state_dict(full.state_dict())
    hf = GPTNeoXForCausalLM(hf_gpt_neox_config(full_cfg.model, pad_token_id=0, eos_token_id=None,
                                               bos_token_id=None)).eval()
    hf.load_state_dict(to_hf_gpt_neox_state_dict(full.state_dict(), full_cfg.model))
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return full, sepllm, hf, seps


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.new_tokens.split(",")]
    full, sepllm, hf, seps = build_models(args, args.prompt_len + max(lengths) + 8)
    from tqdm import tqdm

    import megatron.sepllm
    from megatron.inference.generator import generate_batch
    from megatron.inference.kv_cache import KVCacheSettings, build_kv_cache

    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(14, args.vocab, (args.prompt_len,), generator=gen)
    prompt[::5] = torch.tensor(seps)[torch.arange(0, args.prompt_len, 5) % len(seps)]   # separators in the prompt
    ids = prompt.tolist()
    settings = KVCacheSettings(kind="compressed", sep_cache_size=args.sep_cache_size)
    a, w, s = 4, args.window, args.sep_cache_size

    def ours(model, n, cache):
        return generate_batch(model, [ids], max_new_tokens=n, eos_id=None, cache=cache)[0].tokens

    def hf_run(n, **extra):
        with torch.no_grad():
            out = hf.generate(prompt.unsqueeze(0), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=n, min_new_tokens=n, **extra)
        seq = out.sequences if hasattr(out, "sequences") else out
        return seq[0, len(ids):].tolist()

    hf_sep = dict(custom_generate=megatron.sepllm.generate, init_cache_size=a, sep_cache_size=s, local_size=w,
                  cache_size=a + s + 2 * w, USE_MAX_SEP_CACHE=True, separator_token_ids=seps, PADDING_ID=0)
    runners: list[tuple[str, str, Callable[[int], Any]]] = []
    plain_cache = build_kv_cache(full)
    sep_cache = build_kv_cache(sepllm, settings)
    runners.append(("full", "hf_generate", lambda n: hf_run(n)))
    runners.append(("full", "ours_plain", lambda n: ours(full, n, plain_cache)))
    runners.append(("sepllm", "hf_generate", lambda n: hf_run(n)))
    if not args.skip_hf_sepcache:
        runners.append(("sepllm", "hf_sepcache", lambda n: hf_run(n, **hf_sep)))
    runners.append(("sepllm", "ours_compressed", lambda n: ours(sepllm, n, sep_cache)))

    for _, _, fn in runners:      # warm-up: first-call allocations and dispatch
        fn(4)
    # rounds: every round times every (length, runner) once, so load changes on a shared machine hit all alike;
    # the best round of each pair is kept
    caches = {"ours_plain": plain_cache, "ours_compressed": sep_cache}
    best: dict[tuple[int, int], tuple[float, list[int], float, float]] = {}
    kv_bytes: dict[tuple[int, int], int] = {}
    measured = [(i, r) for i, r in enumerate(runners) if not (r[0] == "sepllm" and r[1] == "hf_generate")]
    for _ in tqdm(range(args.repeats), desc="rounds", file=sys.stderr):
        for n in lengths:
            for i, (_, runner, fn) in measured:
                start, cpu_start = time.perf_counter(), time.process_time()
                tokens = fn(n)
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                seconds = cpu if args.clock == "cpu" else wall
                if len(tokens) != n:
                    raise RuntimeError(f"{runner} produced {len(tokens)} tokens, expected {n}")
                if (n, i) not in best or seconds < best[(n, i)][0]:
                    best[(n, i)] = (seconds, tokens, wall, cpu)
                if runner in caches:
                    kv_bytes[(n, i)] = caches[runner].kv_bytes()
    hf_index = next(i for i, r in enumerate(runners) if r[1] == "hf_generate")   # same HF model for both
    rows: list[dict] = []
    for n in lengths:
        for i, (model_name, runner, _) in enumerate(runners):
            seconds, tokens, wall, cpu = best[(n, hf_index if runner == "hf_generate" else i)]
            row = {"model": model_name, "runner": runner, "new_tokens": n, "ms_per_token": 1000 * seconds / n,
                   "wall_ms_per_token": 1000 * wall / n, "cpu_ms_per_token": 1000 * cpu / n}
            if runner == "ours_plain":
                ref = best[(n, hf_index)][1]
                row["same_tokens_as_hf"] = next((k for k, (x, y) in enumerate(zip(tokens, ref)) if x != y), n)
            if runner in caches:
                row["kv_mb"] = kv_bytes[(n, i)] / 2 ** 20
            rows.append(row)
    for row in rows:
        row["tokens_per_sec"] = 1000.0 / row["ms_per_token"]
        hf_row = next(r for r in rows if r["runner"] == "hf_generate" and r["new_tokens"] == row["new_tokens"])
        row["ratio_vs_hf"] = row["tokens_per_sec"] / hf_row["tokens_per_sec"]
        first = next(r for r in rows if r["runner"] == row["runner"] and r["model"] == row["model"])
        row["ratio_vs_first_n"] = row["ms_per_token"] / first["ms_per_token"]
    print_table(rows, args)
    write_json(args.json_path, rows)
    return 0


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"# generate ({args.clock} clock): {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab "
          f"{args.vocab}, prompt {args.prompt_len}, SepLLM window {args.window} / separators {args.sep_cache_size}, "
          f"threads {torch.get_num_threads()}")
    cols = ["model", "runner", "new_tokens", "ms_per_token", "wall_ms_per_token", "cpu_ms_per_token", "tokens_per_sec",
            "ratio_vs_hf", "ratio_vs_first_n", "same_tokens_as_hf", "kv_mb"]
    print(" | ".join(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        print(" | ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
