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
import contextlib
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from megatron.data.corpus_registry import SHIPPED_DIR  # noqa: E402
from megatron.tokenizer import BUNDLED_NEOX_TOKENIZER  # noqa: E402

DEFAULT_DATA = SHIPPED_DIR / "pg19_sample"      # the five bundled books; pass --data-dir for a bigger corpus
DEFAULT_TOKENIZER = BUNDLED_NEOX_TOKENIZER


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
                        "SepCache (<= c - 1 keys) (default: %(default)s)")
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


def list_books(data_dir: Path) -> list[Path]:
    books = sorted(data_dir.glob("*.txt"))
    if not books:
        raise CliError(f"--data-dir: no *.txt files in {data_dir}")
    return books


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


class RecordFile:
    """Per-forward records appended to a raw file next to the output (not held in memory: RSS stays flat over
    millions of tokens), turned into ``<name>.npy`` at the end (written to a temp file, then renamed)."""

    def __init__(self, path: Path, dtype: str, width: int = 1):
        import numpy as np

        self.path, self.dtype, self.width = path, np.dtype(dtype), width
        self.part = path.with_name(path.name + ".part")
        self.file = open(self.part, "wb")
        self.rows = 0

    def append(self, values) -> None:
        import numpy as np

        arr = np.ascontiguousarray(values, dtype=self.dtype)
        self.file.write(arr.tobytes())
        self.rows += arr.shape[0] if self.width > 1 else arr.size

    def finish(self) -> Path:
        import shutil

        import numpy as np

        self.file.close()
        shape = (self.rows,) if self.width == 1 else (self.rows, self.width)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as out:
            np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                        "fortran_order": False, "shape": shape})
            with open(self.part, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, self.path)
        self.part.unlink()
        return self.path

    def discard(self) -> None:
        self.file.close()
        self.part.unlink(missing_ok=True)


def build_cache(args: argparse.Namespace, model, seps: list[int]):
    """The KV cache of ``--method`` and the settings recorded in the summary."""
    from transformers import DynamicCache

    from megatron.sepllm.hf.cache import SepCache

    a, s, w, c = args.init_cache_size, args.sep_cache_size, args.local_size, args.cache_size
    if args.method == "full":
        return DynamicCache(config=model.config), {}
    if args.method == "streamingllm":
        s, w, seps = 0, c - a, [-1]     # the streaming manager's StreamingLLM: w = c - a
    cache = SepCache(init_cache_size=a, sep_cache_size=s, local_size=w, cache_size=c, USE_MAX_SEP_CACHE=True,
                     SEP_ACCUMULATION=True, separator_token_ids=seps, APPLY_PE_SHIFT=args.pos_shift,
                     prefill_attention="stream", eviction_timing=args.eviction_timing, model=model)
    return cache, {"init_cache_size": a, "sep_cache_size": s, "local_size": w, "cache_size": c,
                   "pos_shift": args.pos_shift, "eviction_timing": args.eviction_timing}


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from tqdm import tqdm

    from megatron.sepllm.hf.generation import sepllm_attention, sepllm_forward
    from megatron.sepllm.hf.compat import cache_kwargs
    from megatron.sepllm.attention.separator_presets import preset_for_model_type, separator_ids_from_tokenizer
    from megatron.sepllm.hf.stream_tokens import TokenFeed, token_stream

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num_tokens < 1 or args.chunk_size < 1:
        raise CliError(f"--num-tokens and --chunk-size must be >= 1, got {args.num_tokens} and {args.chunk_size}")
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise CliError(f"--data-dir: not a directory: {data_dir}")
    books = list_books(data_dir)
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
    try:
        checkpoints = sorted(int(x) for x in args.memory_checkpoints.split(",") if x.strip())
    except ValueError:
        raise CliError(f"--memory-checkpoints: expected comma-separated token counts, got {args.memory_checkpoints!r}")
    model = build_model(args, tok.get_vocab_size())
    device = torch.device(args.device)
    cache, settings = build_cache(args, model, seps)
    sep_cache = args.method != "full"

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nll_file = RecordFile(out_dir / "nll.npy", "float32")
    len_file = RecordFile(out_dir / "cache_len.npy", "int64", width=2)
    n = args.num_tokens
    nll_sum = 0.0
    mem_at: dict = {}
    peak_kv = 0
    done = 0
    feed = TokenFeed(token_stream(books, tok, bos, args.protocol))
    bar = tqdm(total=n, unit="tok", disable=args.no_progress, desc=f"{args.method}/{args.protocol}")
    ctx = sepllm_attention(model) if sep_cache else contextlib.nullcontext()
    kv_of = cache.kv_bytes if sep_cache else (lambda: kv_bytes(cache))
    row = np.zeros((1, 2), dtype=np.int64)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode(), ctx:
            while done < n:
                chunk = feed.take(min(args.chunk_size, n - done))
                if chunk is None:
                    break
                fed, tgt = chunk
                take = len(fed)
                ids = torch.from_numpy(fed).unsqueeze(0).to(device)
                if sep_cache:
                    out = sepllm_forward(model, cache, ids)
                    length = cache.get_seq_length(0)
                else:
                    pos = torch.arange(done, done + take, device=device).unsqueeze(0)
                    out = model(input_ids=ids, position_ids=pos, use_cache=True, **cache_kwargs(model, cache))
                    length = cache.get_seq_length()
                losses = torch.nn.functional.cross_entropy(out.logits[0].float(), torch.from_numpy(tgt).to(device),
                                                           reduction="none").cpu().numpy()
                nll_file.append(losses)
                nll_sum += float(losses.sum(dtype=np.float64))
                before = done
                done += take
                kv_now = kv_of()
                peak_kv = max(peak_kv, kv_now)
                row[0, 0], row[0, 1] = done, length
                len_file.append(row)
                for cp in checkpoints:
                    if before < cp <= done:
                        mem_at[str(cp)] = {"peak_kv_cache_mb": peak_kv / 2**20, "kv_cache_mb": kv_now / 2**20,
                                           "rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb(),
                                           "tokens_per_s": done / (time.perf_counter() - t0),
                                           "ppl": math.exp(nll_sum / done), "at_tokens": done}
                bar.update(take)
    except BaseException:
        nll_file.discard()
        len_file.discard()
        raise
    finally:
        feed.close()
    bar.close()
    wall = time.perf_counter() - t0
    final_len = int(row[0, 1]) if done else 0
    rss_end, peak_end = rss_mb(), peak_rss_mb()
    nll_path, len_path = nll_file.finish(), len_file.finish()
    if done < n:
        print(f"streaming_ppl: corpus exhausted after {done} tokens (asked for {n})", file=sys.stderr)
    mean = nll_sum / done if done else float("nan")
    summary = {
        "method": args.method, "protocol": args.protocol, "model": args.model or f"tiny-random-{args.tiny_random}",
        "num_tokens": int(done), "ppl": float(math.exp(mean)) if done else float("nan"),
        "mean_nll": mean, "tokens_per_s": done / wall if wall else 0.0,
        "wall_s": wall, "chunk_size": args.chunk_size, "peak_kv_cache_mb": peak_kv / 2**20,
        "final_cache_len": final_len, "rss_mb": rss_end, "peak_rss_mb": peak_end,
        "memory_at_tokens": mem_at, "separator_token_ids": seps if args.method == "sepllm" else [],
        "bos_id": bos, "dtype": args.dtype, **settings,
    }
    if sep_cache:
        summary["retention"] = cache.retention()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if not args.no_plots and done:
        plot(out_dir, np.load(nll_path, mmap_mode="r"), np.load(len_path, mmap_mode="r"), summary)
    return summary


def _binned(x, y, bins: int):
    """Per-bin (x mid, min, mean, max) of a long series, for plots that stay readable at millions of points."""
    import numpy as np

    edges = np.linspace(0, len(y), min(bins, len(y)) + 1).astype(np.int64)
    lo, mid, hi, xs = [], [], [], []
    for a, b in zip(edges[:-1], edges[1:]):
        if b > a:
            seg = np.asarray(y[a:b], dtype=np.float64)
            lo.append(seg.min()), mid.append(seg.mean()), hi.append(seg.max()), xs.append(x[(a + b - 1) // 2])
    return np.asarray(xs), np.asarray(lo), np.asarray(mid), np.asarray(hi)


def plot(out_dir: Path, nll, cache_len, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    count = len(nll)
    x = np.arange(1, count + 1)
    cs = np.cumsum(np.asarray(nll, dtype=np.float64))
    step = max(1, count // 4000)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x[step - 1::step], np.exp(cs[step - 1::step] / x[step - 1::step]), label="running PPL")
    win = min(max(1024, count // 200), count)
    if win > 1:
        mov = (cs[win - 1:] - np.concatenate([[0.0], cs[:-win]])) / win
        ax.plot(x[win - 1:][::step], np.exp(mov[::step]), label=f"PPL of the last {win} tokens", alpha=0.7)
    ax.set_xlabel("tokens processed")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    if count >= 100_000:
        ax.set_xscale("log")
    ax.set_title(f"{summary['method']} / {summary['protocol']}: PPL {summary['ppl']:.2f} over {count:,} tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "ppl.png", dpi=100)
    plt.close(fig)
    cl = np.asarray(cache_len)
    xs, lo, _, hi = _binned(cl[:, 0], cl[:, 1], 2000)
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    c = summary.get("cache_size")
    floor = (summary["init_cache_size"] + summary["sep_cache_size"] + summary["local_size"]
             if summary.get("method") == "sepllm" and c is not None else None)
    ax.fill_between(xs, lo, hi, step="mid", alpha=0.5, label="cached tokens (min-max per bin)")
    ax.plot(xs, hi, linewidth=0.8)
    tail = cl[-min(len(cl), 64):]          # the last forwards: the sawtooth between compressions
    zoom.step(tail[:, 0], tail[:, 1], where="post", linewidth=1.0)
    for a in (ax, zoom):
        if c is not None:
            a.axhline(c, color="black", linestyle="--", linewidth=0.8, label=f"cache_size c = {c}")
            a.set_ylim(0, c * 1.15)
        if floor is not None:
            a.axhline(floor, color="tab:red", linestyle=":", linewidth=0.8, label=f"a + s + w = {floor}")
        a.set_xlabel("tokens processed")
    ax.set_ylabel("cached tokens (layer 0)")
    ax.set_title(f"{summary['method']}: KV cache size over {count:,} tokens (peak {summary['peak_kv_cache_mb']:.2f} MiB)")
    zoom.set_title(f"last {len(tail)} forwards")
    ax.legend(loc="lower right")
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
