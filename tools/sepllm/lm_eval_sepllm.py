#!/usr/bin/env python
"""Run lm_eval offline on a local HF model with training-free SepLLM masks and/or SepCache generation.

Example (from the repository root):

    python tools/sepllm/lm_eval_sepllm.py --model-path ./tiny-llama \\
        --sepllm-config tests/fixtures/reference_configs/llama3_sepllm_a3_n256.yml --sepllm-override Layer_num=2 \\
        --tasks sepllm_pg19_mc --include-path tests/fixtures/lm_eval --batch-size 4 --limit 8 --output results.json

Retention statistics are printed and stored in the output JSON under ``"sepllm_retention"``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="lm_eval (offline) with training-free SepLLM attention and/or SepCache on a local HF model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-path", required=True, help="local directory with the HF model and its tokenizer")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory if not stored with the model")
    p.add_argument("--sepllm-config", default=None,
                   help="training-free SepLLM YAML (llama3_*.yml keys); applies the SepLLM mask to every forward")
    p.add_argument("--sepllm-override", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key of --sepllm-config (YAML value), repeatable, e.g. Layer_num=2")
    p.add_argument("--attn-impl", choices=["sdpa", "eager"], default=None,
                   help="attention function of the mask path (default: the model's, sdpa unless it uses eager)")
    p.add_argument("--tasks", required=True, help="comma-separated lm_eval task names")
    p.add_argument("--include-path", default=None,
                   help="directory of local task YAMLs; with it only these tasks are indexed (offline)")
    p.add_argument("--include-default-tasks", action="store_true",
                   help="also index lm_eval's built-in tasks (most need the Hugging Face Hub)")
    p.add_argument("--batch-size", type=int, default=1, help="requests per forward / generate call")
    p.add_argument("--limit", type=float, default=None, help="max documents per task (int) or fraction (<1)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (task default)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16 or auto")
    p.add_argument("--max-length", type=int, default=None, help="context length limit (default: model's)")
    p.add_argument("--seed", type=int, default=1234, help="seed for lm_eval's random, numpy and torch")
    p.add_argument("--sepcache", action="store_true", help="generate_until uses SepCache (megatron.sepllm.generate)")
    p.add_argument("--init-cache-size", default="4", help="SepCache initial tokens a (int or 'a0;a1;...' per layer)")
    p.add_argument("--sep-cache-size", default="128", help="SepCache separator slots s (int or per-layer list)")
    p.add_argument("--local-size", default="256", help="SepCache local window w (int or per-layer list)")
    p.add_argument("--cache-size", default="512", help="SepCache capacity c (int or per-layer list)")
    p.add_argument("--use-max-sep-cache", action="store_true", help="SepCache: cap separators at s (evict oldest)")
    p.add_argument("--no-sep-accumulation", action="store_true", help="SepCache: SEP_ACCUMULATION=False")
    p.add_argument("--apply-pe-shift", action="store_true", help="SepCache: re-encode positions inside the cache")
    p.add_argument("--sepcache-prefill-attention", choices=["full", "sepllm"], default="full",
                   help="SepCache: attention over the prompt at prefill")
    p.add_argument("--sepcache-separator-ids", default=None,
                   help="SepCache separator ids 'i;j;k' (default: --sepllm-config's, else the model-type preset)")
    p.add_argument("--output", default=None, help="write the lm_eval results (+ sepllm_retention) as JSON here")
    p.add_argument("--online", action="store_true", help="allow Hugging Face Hub access (default: offline)")
    return p


def _size(value: str) -> Any:
    return int(value) if ";" not in value else value


def run(args: argparse.Namespace) -> dict:
    """Build the model, evaluate, attach retention; returns the results dict."""
    if not args.online:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from megatron.sepllm.hf.config import parse_override
    from megatron.sepllm.hf.lm_eval_model import SepLLMHFLM

    if not os.path.isdir(args.model_path):
        raise FileNotFoundError(f"--model-path {args.model_path}: not a directory")
    if args.include_path is not None and not os.path.isdir(args.include_path):
        raise FileNotFoundError(f"--include-path {args.include_path}: not a directory")
    if not args.sepllm_config and not args.sepcache:
        raise ValueError("give --sepllm-config and/or --sepcache (plain models: use lm_eval --model hf)")
    overrides = dict(parse_override(o) for o in args.sepllm_override)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = SepLLMHFLM(
        pretrained=args.model_path, tokenizer=args.tokenizer, device=device, dtype=args.dtype,
        batch_size=args.batch_size, max_length=args.max_length,
        sepllm_config=args.sepllm_config, sepllm_overrides=overrides or None, sepllm_attn_impl=args.attn_impl,
        sepcache=args.sepcache, init_cache_size=_size(args.init_cache_size),
        sep_cache_size=_size(args.sep_cache_size), local_size=_size(args.local_size),
        cache_size=_size(args.cache_size), USE_MAX_SEP_CACHE=args.use_max_sep_cache,
        SEP_ACCUMULATION=not args.no_sep_accumulation, APPLY_PE_SHIFT=args.apply_pe_shift,
        sepcache_prefill_attention=args.sepcache_prefill_attention,
        sepcache_separator_ids=args.sepcache_separator_ids)
    manager = TaskManager(include_path=args.include_path, include_defaults=args.include_default_tasks or
                          args.include_path is None)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown} (include path: {args.include_path})")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                              num_fewshot=args.num_fewshot, random_seed=args.seed, numpy_random_seed=args.seed,
                              torch_random_seed=args.seed, fewshot_random_seed=args.seed, log_samples=False)
    if results is None:
        raise RuntimeError("lm_eval returned no results")
    results["sepllm_retention"] = lm.sepllm_retention()
    return results


def _print_table(results: dict) -> None:
    for task, metrics in sorted(results.get("results", {}).items()):
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {shown}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron.config.errors import ConfigError
    from megatron.sepllm.hf.trainingfree import SepLLMRuntimeError

    try:
        results = run(args)
    except (ConfigError, SepLLMRuntimeError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"lm_eval_sepllm: error: {exc}", file=sys.stderr)
        return 2
    _print_table(results)
    if args.output:
        from lm_eval.utils import handle_non_serializable

        out_dir = os.path.dirname(os.path.abspath(args.output))
        os.makedirs(out_dir, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2, default=handle_non_serializable)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
