"""Cost of the training-free SepLLM mask path (``apply_sepllm``) on a Hugging Face Llama, against the same model with
plain SDPA attention measured in the same run.

Rows (one per phase and sequence length), ``ratio`` = SepLLM time / plain time (> 1 means the mask path is slower;
it never saves compute, it reproduces the sparsity pattern over the full KV):

* ``prefill`` -- one forward over ``batch x seq`` tokens (left padding on half the rows, BATCH_ADAPTIVE_INIT_POS);
* ``decode``  -- one single-token step over a cached history of ``seq`` tokens.

``final_step_kv_retention`` is the retention the handle measured (what fraction of the history the last query sees).

Example: ``python benchmarks/hf_trainingfree.py --seq 256 1024 --json out.json``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron.sepllm.hf.trainingfree import apply_sepllm  # noqa: E402
from megatron.sepllm.hf.compat import cache_kwargs, output_cache  # noqa: E402
from megatron.sepllm.hf.config import sepllm_config_from_mapping  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, nargs="+", default=[256, 1024], help="sequence lengths (default 256 1024)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--layers", type=int, default=2, help="Llama layers (default 2)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (default 256; 8 heads, 2 KV heads)")
    p.add_argument("--window", type=int, default=64, help="SepLLM local window, prefill and decode (default 64)")
    p.add_argument("--init", type=int, default=3, help="initial tokens a (default 3)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions; median reported (default 5)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as a JSON list to this path")
    return p.parse_args(argv)


def _median_ms(fn: Callable[[object], object], repeats: int, device: str,
               setup: Callable[[], object] = lambda: None) -> float:
    """Median wall time of ``fn(setup())`` in ms; ``setup`` runs untimed before every repetition."""
    fn(setup())                                            # warm-up
    times = []
    for _ in range(repeats):
        state = setup()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(state)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = 1024
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                                         max_position_embeddings=max(args.seq) + 8)).to(args.device).eval()
    model.set_attn_implementation("sdpa")
    cfg = {"Layer_num": args.layers, "separator_token_ids": [13, 11, 30, 0, 26, 25, 198, 220],
           "prefill_local_window_size": args.window, "generate_local_window_size": args.window,
           "init_tok_max_idx": args.init - 1, "BATCH_ADAPTIVE_INIT_POS": True}
    rows = []
    for seq in args.seq:
        gen = torch.Generator().manual_seed(seq)
        ids = torch.randint(0, 1000, (args.batch, seq), generator=gen).to(args.device)   # ~1% separators
        mask = torch.ones_like(ids)
        mask[: args.batch // 2, : seq // 8] = 0
        nxt = ids[:, :1]
        mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)

        def prefill(_: object = None) -> object:
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)

        def decode(cache: object) -> object:
            with torch.no_grad():
                return model(input_ids=nxt, attention_mask=mask2, use_cache=True, **cache_kwargs(model, cache))

        def fresh_cache() -> object:
            return output_cache(prefill())

        plain_pre = _median_ms(prefill, args.repeats, args.device)
        plain_dec = _median_ms(decode, args.repeats, args.device, setup=fresh_cache)
        with apply_sepllm(model, sepllm_config_from_mapping(cfg)) as handle:
            sep_pre = _median_ms(prefill, args.repeats, args.device)
            kv_pre = handle.retention()["last_batch"]["final_step_kv_retention"]
            sep_dec = _median_ms(decode, args.repeats, args.device, setup=fresh_cache)
            kv_dec = handle.retention()["last_batch"]["final_step_kv_retention"]
        for phase, plain, sep, kv in (("prefill", plain_pre, sep_pre, kv_pre), ("decode", plain_dec, sep_dec, kv_dec)):
            rows.append({"phase": phase, "seq_len": seq, "batch": args.batch, "window": args.window,
                         "plain_ms": round(plain, 3), "sepllm_ms": round(sep, 3), "ratio": round(sep / plain, 3),
                         "final_step_kv_retention": round(kv, 4), "device": args.device})
    print(f"{'phase':8s} {'seq':>6s} {'plain ms':>10s} {'sepllm ms':>10s} {'ratio':>7s} {'KV kept':>8s}")
    for r in rows:
        print(f"{r['phase']:8s} {r['seq_len']:6d} {r['plain_ms']:10.2f} {r['sepllm_ms']:10.2f} {r['ratio']:7.2f} "
              f"{r['final_step_kv_retention']:8.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
