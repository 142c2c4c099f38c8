"""Time per optimizer step of pipeline parallelism against one process without a pipeline, same global batch.

Modes (each trains the same tiny GPT on the same global batch = micro x accumulation, fp32, ZeRO-0, AdamW):

* ``plain`` -- 1 process, ``GPTModel`` in a DeepSpeed engine, ``accum`` micro-batches per step (the baseline);
* ``pp1``   -- 1 process, the pipeline engine with one stage (GPT-NeoX ``pipe-parallel-size: 1``): engine overhead;
* ``pp2``   -- 2 processes (gloo), two stages, the 1F1B schedule over ``accum`` micro-batches.

Each mode runs in fresh processes; modes are repeated for ``--rounds`` rounds in alternating order so machine noise
hits them alike. ``step_ms`` is the median over all timed steps of a mode (for ``pp2`` the slower rank's step);
``ratio_vs_plain`` = median step time / the plain median of the same run (< 1 = faster than one process). On a CPU
machine with few cores the two stages compete for the same cores, so expect ratios >= 1 there: pipelines pay off
when each stage has its own device.

Example: ``python benchmarks/pipeline_overhead.py --steps 6 --rounds 2 --json pp.json``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODES = {"plain": 1, "pp1": 1, "pp2": 2}  # mode -> processes


def parse_args(argv: Any = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="transformer layers (split evenly over the stages)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--seq", type=int, default=128, help="sequence length")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary size (random token ids)")
    p.add_argument("--micro", type=int, default=2, help="micro-batch size")
    p.add_argument("--accum", type=int, default=4, help="micro-batches per step (= pipeline micro-batches)")
    p.add_argument("--attention", choices=["full", "sepllm"], default="full",
                   help="full causal attention or SepLLM (compact path, window seq/4, every 8th token a separator)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per mode and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode and round")
    p.add_argument("--rounds", type=int, default=2, help="rounds; mode order alternates between rounds")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--modes", default="plain,pp1,pp2", help="comma-separated subset of plain, pp1, pp2")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the rows (mode, processes, stages, global_batch, step_ms, ratio_vs_plain) as JSON")
    return p.parse_args(argv)


def _configs(args: argparse.Namespace) -> tuple[Any, Any]:
    from megatron.config.model import ModelConfig
    from megatron.config.sepllm import SepLLMConfig

    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                      seq_length=args.seq, padded_vocab_size=args.vocab, pos_emb="rotary")
    if args.attention == "full":
        return cfg, None
    w = max(args.seq // 4, 1)
    sep = SepLLMConfig(separator_token_ids=[1], mode="sepllm", prefill_windows=[w] * args.layers,
                       generate_windows=[w] * args.layers, prefill_local_window_size=w,
                       generate_local_window_size=w, sep_attention_impl="compact")
    return cfg, sep


def _batches(args: argparse.Namespace, n: int) -> list[Any]:
    from megatron.training.batches import Batch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        text = torch.randint(2, args.vocab, (args.micro, args.seq + 1), generator=g)
        text[:, ::8] = 1  # the SepLLM separator id
        out.append(Batch(tokens=text[:, :-1].contiguous(), labels=text[:, 1:].contiguous(),
                         loss_mask=torch.ones(args.micro, args.seq)))
    return out


def _ds_config(args: argparse.Namespace) -> dict:
    return {"train_batch_size": args.micro * args.accum, "train_micro_batch_size_per_gpu": args.micro,
            "gradient_accumulation_steps": args.accum, "steps_per_print": 10 ** 9,
            "zero_optimization": {"stage": 0}, "gradient_clipping": 1.0}


def _worker(rank: int, mode: str, world: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    import deepspeed
    import torch.distributed as dist

    from megatron.model.gpt import GPTModel
    from megatron.model.loss import lm_loss
    from megatron.parallel.pipeline import build_pipeline_model, pipeline_data_iter, pipeline_train_step
    from megatron.training.engine import quiet_deepspeed_logs
    from megatron.training.optimizer import build_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    quiet_deepspeed_logs()
    cfg, sep = _configs(args)
    torch.manual_seed(0)
    model = GPTModel(cfg, sep) if mode == "plain" else build_pipeline_model(cfg, sep, MODES[mode])
    opt = build_optimizer(model, SimpleNamespace(type="adamw", lr=1e-3, params={}))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=_ds_config(args),
                                           dist_init_required=False)
    data = _batches(args, args.accum)
    times = []
    for step in range(args.warmup + args.steps):
        dist.barrier()
        tick = time.perf_counter()
        if mode == "plain":
            for b in data:
                loss = lm_loss(engine(b.tokens), b.labels, b.loss_mask)
                engine.backward(loss)
                engine.step()
        else:
            pipeline_train_step(engine, pipeline_data_iter(iter(data)))
        elapsed = torch.tensor([time.perf_counter() - tick])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank ends
        if step >= args.warmup:
            times.append(float(elapsed))
    if rank == 0:
        queue.put(times)
    dist.barrier()
    dist.destroy_process_group()


def run_mode(mode: str, args: argparse.Namespace) -> list[float]:
    """Step times (s) of one mode, in fresh processes."""
    import torch.multiprocessing as mp

    from megatron.training.distributed import find_free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    world = MODES[mode]
    mp.start_processes(_worker, args=(mode, world, find_free_port(), args, queue), nprocs=world, join=True,
                       start_method="spawn")
    return queue.get()


def main(argv: Any = None) -> list[dict]:
    args = parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or "plain" not in modes:
        print(f"pipeline_overhead: --modes {args.modes!r}: expected a subset of {list(MODES)} that includes plain "
              f"(the baseline)", file=sys.stderr)
        raise SystemExit(2)
    from tqdm import tqdm

    samples: dict[str, list[float]] = {m: [] for m in modes}
    order = list(modes)
    with tqdm(total=args.rounds * len(modes), desc="pipeline_overhead", unit="run") as bar:
        for _ in range(args.rounds):
            for mode in order:
                samples[mode].extend(run_mode(mode, args))
                bar.update(1)
            order.reverse()
    base = statistics.median(samples["plain"])
    rows = []
    for mode in modes:
        med = statistics.median(samples[mode])
        rows.append({"mode": mode, "processes": MODES[mode], "stages": 0 if mode == "plain" else MODES[mode],
                     "global_batch": args.micro * args.accum, "micro_batch": args.micro,
                     "grad_accum": args.accum, "seq_length": args.seq, "attention": args.attention,
                     "step_ms": round(1000 * med, 2), "ratio_vs_plain": round(med / base, 3)})
    print(f"{'mode':<6} {'procs':>5} {'stages':>6} {'global batch':>12} {'step ms':>9} {'ratio vs plain':>15}")
    for r in rows:
        print(f"{r['mode']:<6} {r['processes']:>5} {r['stages']:>6} {r['global_batch']:>12} {r['step_ms']:>9.1f} "
              f"{r['ratio_vs_plain']:>15.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
