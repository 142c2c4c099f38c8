#!/usr/bin/env python
"""Streaming perplexity of a Hugging Face causal LM on PG-19 with SepLLM, StreamingLLM or full attention (spec §4.1).

The corpus is fed as one endless stream (the cache is never reset between lines or books); every fed token predicts
the next one and its negative log-likelihood is recorded.

Protocols (spec §4.1 / §7 item 10):
  per-line    the reference protocol: every line of every book is tokenised separately with BOS in front; the last
              token of each line is never fed (its successor is on the next line). Empty lines give nothing.
  whole-book  each book is tokenised as one text with BOS in front; the last token of each book is never fed.

Methods:
  sepllm        SepCache (initial + at most --sep-cache-size separators + local window, budget --cache-size)
  streamingllm  SepCache without separators: --init-cache-size initial + (cache - init) most recent tokens
  full          ordinary DynamicCache: the whole history (memory grows linearly)

Tokens are fed --chunk-size at a time; SepCache's "stream" step gives every query of a chunk exactly the keys it
would see when fed alone (same eviction schedule, and with --pos-shift the same re-encoded positions), so a chunk of
256 equals token-by-token feeding up to float rounding while running ~100x fewer forwards.

Memory is reported two ways: kv_cache_mb = bytes of the key/value tensors the cache holds after each forward
(exact; this is what SepLLM bounds) and rss_mb = the process resident set from /proc/self/statm (model, allocator
and Python included; informational, noisy).

Outputs in --output-dir: nll.npy (float32, one per evaluated token), cache_len.npy ([tokens, cache length] after each
forward), summary.json (PPL, tokens/s, memory, settings), ppl.png and cache.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from megatron.data.corpus_registry import SHIPPED_DIR  # noqa: E402
from megatron.tokenizer import BUNDLED_NEOX_TOKENIZER  # noqa: E402

DEFAULT_DATA = SHIPPED_DIR / "pg19_sample"      # the five bundled books; pass --data-dir for a bigger corpus
DEFAULT_TOKENIZER = BUNDLED_NEOX_TOKENIZER
LINES_PER_BATCH = 256


class CliError(Exception):
    """A user error reported as one line."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local HF model directory (config + safetensors); no downloads")
    src.add_argument("--tiny-random", choices=["llama", "gpt_neox"],
                     help="build a random tiny model of this family from a config (demos/tests)")
    p.add_argument("--tiny-layers", type=int, default=1, help="layers of the --tiny-random model (default 1)")
    p.add_argument("--tiny-hidden", type=int, default=32, help="hidden size of the --tiny-random model (default 32)")
    p.add_argument("--tiny-heads", type=int, default=2, help="attention heads of the --tiny-random model (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random tiny model (default 0)")
    p.add_argument("--tokenizer", help="HF tokenizer.json; default: the model directory's tokenizer, or the "
                                       f"GPT-NeoX-20B tokenizer for --tiny-random ({DEFAULT_TOKENIZER})")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="directory of *.txt books (default: %(default)s)")
    p.add_argument("--protocol", choices=["per-line", "whole-book"], default="per-line",
                   help="per-line = reference protocol (BOS per line, last token of a line never fed); "
                        "whole-book = one stream per book (default: %(default)s)")
    p.add_argument("--method", choices=["sepllm", "streamingllm", "full"], default="sepllm",
                   help="KV policy (default: %(default)s)")
    p.add_argument("--pos-shift", action=argparse.BooleanOptionalAction, default=True,
                   help="re-encode kept keys with their index in the cache (reference enable_pos_shift; default on; "
                        "ignored for --method full)")
    p.add_argument("--init-cache-size", type=int, default=4, help="a: initial tokens kept (default 4)")
    p.add_argument("--sep-cache-size", type=int, default=64, help="s: separators kept (sepllm; default 64)")
    p.add_argument("--local-size", type=int, default=224,
                   help="w: local window (sepllm; default 224; streamingllm uses cache - init)")
    p.add_argument("--cache-size", type=int, default=324, help="c: cache budget (default 324)")
    p.add_argument("--eviction-timing", choices=["after_step", "in_update"], default="after_step",
                   help="after_step = the reference streaming manager (a query sees <= c+1 keys); in_update = "
                        "SepCache (<= c keys) (default: %(default)s)")
    p.add_argument("--separator-ids", help="comma-separated separator ids; default: derived from the tokenizer")
    p.add_argument("--separator-preset", choices=["llama", "llama-streaming", "gpt_neox", "falcon"],
                   help="use a known family's list instead (spec §2); llama-streaming = the reference streaming "
                        "manager's Llama-3 list (the SepCache list without BOS 128000)")
    p.add_argument("--bos-id", type=int, help="BOS id put before every line/book; default: the tokenizer's BOS "
                                              "(or <|endoftext|>)")
    p.add_argument("--num-tokens", type=int, default=20480, help="number of evaluated tokens (default 20480)")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per forward (1 = token by token; default 256)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="model dtype (default float32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice; 1 is fastest for "
                                               "tiny models on a busy machine)")
    p.add_argument("--memory-checkpoints", default="",
                   help="comma-separated token counts at which to record memory (e.g. 10000,100000)")
    p.add_argument("--output-dir", default="outputs/streaming_ppl", help="where results go (default: %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def load_tokenizer(args: argparse.Namespace):
    from tokenizers import Tokenizer

    path = args.tokenizer
    if path is None and args.model is not None:
        path = str(Path(args.model) / "tokenizer.json")
    if path is None:
        path = str(DEFAULT_TOKENIZER)
    if not Path(path).is_file():
        raise CliError(f"--tokenizer: file not found: {path} (expected a HF tokenizer.json)")
    return Tokenizer.from_file(path)


def resolve_bos(tok, bos_id: Optional[int]) -> int:
    if bos_id is not None:
        return bos_id
    for name in ("<|begin_of_text|>", "<s>", "<|endoftext|>", "<bos>"):
        if (i := tok.token_to_id(name)) is not None:
            return int(i)
    raise CliError("--bos-id: the tokenizer has no known BOS token; pass --bos-id")


def token_stream(data_dir: Path, tok, bos: int, protocol: str) -> Iterator[tuple[list[int], list[int]]]:
    """Yields (fed ids, target ids) per line (per-line) or per book (whole-book), in sorted file order."""
    books = sorted(data_dir.glob("*.txt"))
    if not books:
        raise CliError(f"--data-dir: no *.txt files in {data_dir}")
    for book in books:
        text = book.read_text(encoding="utf-8", errors="replace")
        if protocol == "per-line":
            lines = text.splitlines()
            for start in range(0, len(lines), LINES_PER_BATCH):   # bounded batches: memory stays flat on long books
                for enc in tok.encode_batch(lines[start:start + LINES_PER_BATCH], add_special_tokens=False):
                    ids = [bos] + enc.ids
                    if len(ids) > 1:
                        yield ids[:-1], ids[1:]
        else:
            ids = [bos] + tok.encode(text, add_special_tokens=False).ids
            if len(ids) > 1:
                yield ids[:-1], ids[1:]


def build_model(args: argparse.Namespace, vocab_size: int):
    import torch

    dtype = getattr(torch, args.dtype)
    if args.model is not None:
        from transformers import AutoModelForCausalLM

        if not Path(args.model).is_dir():
            raise CliError(f"--model: not a directory: {args.model}")
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, local_files_only=True)
    else:
        torch.manual_seed(args.seed)
        common = dict(vocab_size=vocab_size, hidden_size=args.tiny_hidden, intermediate_size=2 * args.tiny_hidden,
                      num_hidden_layers=args.tiny_layers, num_attention_heads=args.tiny_heads,
                      max_position_embeddings=4096)
        if args.tiny_random == "llama":
            from transformers import LlamaConfig, LlamaForCausalLM

            model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=args.tiny_heads, **common))
        else:
            from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

            model = GPTNeoXForCausalLM(GPTNeoXConfig(rotary_pct=0.25, **common))
        model = model.to(dtype)
    model.set_attn_implementation("sdpa")
    return model.to(args.device).eval()


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc/self/statm), in MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def kv_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from tqdm import tqdm
    from transformers import DynamicCache

    from megatron.sepllm.cache import SepCache
    from megatron.sepllm.generation import sepllm_attention, sepllm_forward
    from megatron.sepllm.hf_compat import cache_kwargs
    from megatron.sepllm.separator_presets import preset_for_model_type, separator_ids_from_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num_tokens < 1 or args.chunk_size < 1:
        raise CliError(f"--num-tokens and --chunk-size must be >= 1, got {args.num_tokens} and {args.chunk_size}")
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise CliError(f"--data-dir: not a directory: {data_dir}")
    tok = load_tokenizer(args)
    bos = resolve_bos(tok, args.bos_id)
    if args.separator_ids:
        try:
            seps = [int(x) for x in args.separator_ids.split(",") if x.strip()]
        except ValueError:
            raise CliError(f"--separator-ids: expected comma-separated integers, got {args.separator_ids!r}")
    elif args.separator_preset:
        family = args.separator_preset.replace("-streaming", "")
        seps = list(preset_for_model_type(family).separator_token_ids)
        if args.separator_preset == "llama-streaming":
            seps = [i for i in seps if i != 128000]
    else:
        seps = separator_ids_from_tokenizer(tok)
    checkpoints = sorted(int(x) for x in args.memory_checkpoints.split(",") if x.strip())
    model = build_model(args, tok.get_vocab_size())
    device = torch.device(args.device)

    a, s, w, c = args.init_cache_size, args.sep_cache_size, args.local_size, args.cache_size
    if args.method == "full":
        cache = DynamicCache(config=model.config)
        settings = {}
    else:
        if args.method == "streamingllm":
            s, w, seps = 0, c - a, [-1]
        cache = SepCache(init_cache_size=a, sep_cache_size=s, local_size=w, cache_size=c, USE_MAX_SEP_CACHE=True,
                         SEP_ACCUMULATION=True, separator_token_ids=seps, APPLY_PE_SHIFT=args.pos_shift,
                         prefill_attention="stream", eviction_timing=args.eviction_timing, model=model)
        settings = {"init_cache_size": a, "sep_cache_size": s, "local_size": w, "cache_size": c,
                    "pos_shift": args.pos_shift, "eviction_timing": args.eviction_timing}

    n = args.num_tokens
    nll = np.zeros(n, dtype=np.float32)
    cache_len: list[tuple[int, int]] = []
    mem_at: dict = {}
    peak_kv = 0
    done = 0
    pending_fed: list[int] = []
    pending_tgt: list[int] = []
    stream = token_stream(data_dir, tok, bos, args.protocol)
    bar = tqdm(total=n, unit="tok", disable=args.no_progress, desc=f"{args.method}/{args.protocol}")
    ctx = sepllm_attention(model) if args.method != "full" else torch.inference_mode()
    t0 = time.perf_counter()
    with torch.inference_mode(), ctx:
        while done < n:
            while len(pending_fed) < args.chunk_size:
                try:
                    fed, tgt = next(stream)
                except StopIteration:
                    break
                pending_fed += fed
                pending_tgt += tgt
            if not pending_fed:
                break
            take = min(args.chunk_size, n - done, len(pending_fed))
            ids = torch.tensor([pending_fed[:take]], device=device)
            tgt = torch.tensor(pending_tgt[:take], device=device)
            del pending_fed[:take], pending_tgt[:take]
            if args.method == "full":
                pos = torch.arange(done, done + take, device=device).unsqueeze(0)
                out = model(input_ids=ids, position_ids=pos, use_cache=True, **cache_kwargs(model, cache))
                length = cache.get_seq_length()
            else:
                out = sepllm_forward(model, cache, ids)
                length = cache.get_seq_length(0)
            losses = torch.nn.functional.cross_entropy(out.logits[0].float(), tgt, reduction="none")
            nll[done:done + take] = losses.cpu().numpy()
            before = done
            done += take
            peak_kv = max(peak_kv, kv_bytes(cache))
            cache_len.append((done, length))
            for cp in checkpoints:
                if before < cp <= done:
                    mem_at[str(cp)] = {"peak_kv_cache_mb": peak_kv / 2**20, "kv_cache_mb": kv_bytes(cache) / 2**20,
                                       "rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb()}
            bar.update(take)
    bar.close()
    wall = time.perf_counter() - t0
    nll = nll[:done]
    if done < n:
        print(f"streaming_ppl: corpus exhausted after {done} tokens (asked for {n})", file=sys.stderr)
    summary = {
        "method": args.method, "protocol": args.protocol, "model": args.model or f"tiny-random-{args.tiny_random}",
        "num_tokens": int(done), "ppl": float(math.exp(float(nll.mean()))) if done else float("nan"),
        "mean_nll": float(nll.mean()) if done else float("nan"), "tokens_per_s": done / wall if wall else 0.0,
        "wall_s": wall, "chunk_size": args.chunk_size, "peak_kv_cache_mb": peak_kv / 2**20,
        "final_cache_len": cache_len[-1][1] if cache_len else 0, "rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb(),
        "memory_at_tokens": mem_at, "separator_token_ids": seps if args.method == "sepllm" else [],
        "bos_id": bos, "dtype": args.dtype, **settings,
    }
    if args.method != "full":
        summary["retention"] = cache.retention()
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "nll.npy", nll)
    np.save(out_dir / "cache_len.npy", np.asarray(cache_len, dtype=np.int64))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if not args.no_plots and done:
        plot(out_dir, nll, cache_len, summary)
    return summary


def plot(out_dir: Path, nll, cache_len, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(1, len(nll) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, np.exp(np.cumsum(nll) / x), label="running PPL")
    win = min(1024, len(nll))
    if win > 1:
        mov = np.convolve(nll, np.ones(win) / win, mode="valid")
        ax.plot(np.arange(win, len(nll) + 1), np.exp(mov), label=f"PPL of the last {win} tokens", alpha=0.7)
    ax.set_xlabel("tokens processed")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(f"{summary['method']} / {summary['protocol']}: PPL {summary['ppl']:.2f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "ppl.png", dpi=100)
    plt.close(fig)
    cl = np.asarray(cache_len)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(cl[:, 0], cl[:, 1])
    ax.set_xlabel("tokens processed")
    ax.set_ylabel("cached tokens (layer 0)")
    ax.set_title(f"{summary['method']}: KV cache size")
    fig.tight_layout()
    fig.savefig(out_dir / "cache.png", dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (CliError, ValueError, FileNotFoundError) as err:
        print(f"streaming_ppl: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("method", "protocol", "num_tokens", "ppl", "tokens_per_s",
                                              "peak_kv_cache_mb", "final_cache_len")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
