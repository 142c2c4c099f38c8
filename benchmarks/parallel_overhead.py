"""Time per training step of DP=2, TP=2 and PP=2 against one process on the same global batch, through the real
training loop (``megatron.training.pretrain``: DeepSpeed engine, data loader, SepLLM backend, logging).

Modes (every mode trains the same tiny GPT on the same global batch ``G = 2 x micro`` per step, fp32, ZeRO-1):

* ``single`` -- 1 process, micro-batch ``G`` (the baseline);
* ``dp2``    -- 2 processes, data parallel, micro-batch ``G / 2`` each;
* ``tp2``    -- 2 processes, ``model-parallel-size 2`` (column/row-parallel blocks, vocab-parallel head), micro ``G``;
* ``tp2sp``  -- as ``tp2`` with ``sequence_parallel``;
* ``pp2``    -- 2 processes, ``pipe-parallel-size 2`` (DeepSpeed pipeline engine, 1F1B), 2 micro-batches of ``G/2``.

Each mode runs in fresh processes (gloo on CPU); rounds alternate the mode order so machine noise hits them alike.
``step_ms`` is the median of the loop's logged ``step_time_ms`` after ``--warmup`` iterations (rank 0; every rank
finishes a step together); ``ratio_vs_single`` = ``step_ms`` / the single-process median of the same run. On a CPU
box with few cores two processes compete for the same cores: expect ratios >= 1 here; the point is the overhead of
the parallel machinery, not a speed-up.

Example: ``python benchmarks/parallel_overhead.py --iters 8 --rounds 2 --json parallel.json``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))   # benchmarks/corpus.py

from corpus import tokenized_slice, training_config  # noqa: E402
from report import add_model_size_args  # noqa: E402

MODES = {"single": 1, "dp2": 2, "tp2": 2, "tp2sp": 2, "pp2": 2}  # mode -> processes
PYTHIA_SEPARATORS = [15, 13, 32, 2, 28, 27, 209, 186, 187]


def parse_args(argv: Any = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_size_args(p, layers=4, hidden=128, heads=4)
    p.add_argument("--seq", type=int, default=128, help="sequence length")
    p.add_argument("--micro", type=int, default=2, help="per-process micro-batch of dp2 (global batch = 2 x micro)")
    p.add_argument("--attention", choices=["full", "sepllm"], default="sepllm",
                   help="full causal attention or SepLLM (Pythia separators, window seq/4)")
    p.add_argument("--iters", type=int, default=8, help="training iterations per mode and round")
    p.add_argument("--warmup", type=int, default=2, help="first iterations left out of the median")
    p.add_argument("--rounds", type=int, default=2, help="rounds; the mode order alternates between rounds")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--modes", default="single,dp2,tp2,tp2sp,pp2", help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--workdir", default=None, help="folder for the tokenized corpus and run logs (default: a temp dir)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the rows (mode, processes, global_batch, step_ms, ratio_vs_single) as JSON")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"--modes: unknown mode(s) {', '.join(unknown)}; expected a subset of {', '.join(MODES)}")
    if "single" not in modes:
        p.error("--modes must include 'single' (the baseline of the ratios)")
    if args.iters <= args.warmup:
        p.error(f"--iters {args.iters} must be larger than --warmup {args.warmup}")
    args.mode_list = modes
    return args


def build_config(args: argparse.Namespace, mode: str, data_prefix: str, run_dir: Path) -> Any:
    """The resolved config of one mode (same model, weights and global batch in every mode)."""
    from megatron.config.sepllm import SepLLMConfig

    global_batch = 2 * args.micro
    micro, gas = {"dp2": (args.micro, 1), "pp2": (args.micro, 2)}.get(mode, (global_batch, 1))
    cfg = training_config(args.layers, args.hidden, args.heads, args.seq, args.iters, micro, data_prefix, run_dir)
    cfg.model.padded_vocab_size = 50432  # a multiple of 128 x 2: identical weights with and without TP
    if args.attention != "full":
        w = max(args.seq // 4, 1)
        cfg.sepllm = SepLLMConfig(separator_token_ids=list(PYTHIA_SEPARATORS), mode="sepllm",
                                  prefill_windows=[w] * args.layers, generate_windows=[w] * args.layers,
                                  prefill_local_window_size=w, generate_local_window_size=w)
    t = cfg.training
    t.gradient_accumulation_steps, t.train_batch_size = gas, global_batch
    t.zero_optimization, t.zero_stage = {"stage": 1}, 1
    cfg.parallel.model_parallel_size = 2 if mode in ("tp2", "tp2sp") else 1
    cfg.parallel.sequence_parallel = mode == "tp2sp"
    cfg.parallel.pipe_parallel_size = 2 if mode == "pp2" else 0
    return cfg


def _worker(rank: int, world_size: int, port: int, cfg: Any, threads: int) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    from megatron.training import pretrain

    pretrain(cfg, stream=open(os.devnull, "w"))


def run_mode(cfg: Any, processes: int, threads: int, timeout: float = 600.0) -> None:
    """Train ``cfg`` on ``processes`` fresh gloo processes (spawned, so every mode starts cold alike)."""
    from megatron.training.distributed import find_free_port, spawn_and_wait

    spawn_and_wait(_worker, processes, (processes, find_free_port(), cfg, threads), timeout, "benchmark mode")


def step_times(log_dir: Path, warmup: int) -> list[float]:
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_ms"] for r in rows if "step_time_ms" in r and r["iteration"] > warmup]


def main(argv: Any = None) -> list[dict]:
    args = parse_args(argv)
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="parallel-overhead-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        prefix = tokenized_slice(work)
        samples: dict[str, list[float]] = {m: [] for m in args.mode_list}
        plan = [(r, m) for r in range(args.rounds)
                for m in (args.mode_list if r % 2 == 0 else list(reversed(args.mode_list)))]
        for rnd, mode in tqdm(plan, desc="modes x rounds", unit="run"):
            run_dir = work / f"round{rnd}" / mode
            run_mode(build_config(args, mode, prefix, run_dir), MODES[mode], args.threads)
            samples[mode] += step_times(run_dir / "logs", args.warmup)
    base = statistics.median(samples["single"])
    rows = [{"mode": m, "processes": MODES[m], "global_batch": 2 * args.micro,
             "step_ms": round(statistics.median(samples[m]), 3),
             "ratio_vs_single": round(statistics.median(samples[m]) / base, 4)} for m in args.mode_list]
    print(f"\nparallel overhead: {args.layers} layers, hidden {args.hidden}, seq {args.seq}, global batch "
          f"{2 * args.micro}, {args.attention} attention, {args.threads} thread(s)/process, "
          f"{args.rounds} round(s) x {args.iters - args.warmup} timed steps")
    print(f"{'mode':<8} {'procs':>5} {'step_ms':>10} {'ratio_vs_single':>16}")
    for r in rows:
        print(f"{r['mode']:<8} {r['processes']:>5} {r['step_ms']:>10.1f} {r['ratio_vs_single']:>16.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
