"""Time per optimizer step of tensor parallelism against one process, same model and global batch.

Modes (each trains the same tiny GPT on the same global batch = micro x accumulation, fp32, ZeRO-0, AdamW, in a
DeepSpeed engine; TP modes pass the ``mpu`` of ``build_parallel_groups`` so clipping uses the TP-aware norm):

* ``plain``  -- 1 process, ``GPTModel`` (the baseline);
* ``tp2``    -- 2 processes (gloo), ``apply_tensor_parallel`` with TP=2, vocab-parallel loss;
* ``tp2_sp`` -- as ``tp2`` plus sequence parallelism.

Each mode runs in fresh processes; modes are repeated for ``--rounds`` rounds in alternating order so machine noise
hits them alike. ``step_ms`` is the median over all timed steps of a mode (the slower rank's step);
``ratio_vs_plain`` = median step time / the plain median of the same run (< 1 = faster than one process). Each TP
rank does half the matmul work but adds two all-reduces per layer (forward and backward); on a CPU machine whose
cores are shared by both ranks expect ratios near or above 1: TP pays off with one fast interconnect per device.

Example: ``python benchmarks/tensor_parallel_overhead.py --steps 6 --rounds 2 --json tp.json``
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

MODES = {"plain": 1, "tp2": 2, "tp2_sp": 2}  # mode -> processes


def parse_args(argv: Any = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="transformer layers")
    p.add_argument("--hidden", type=int, default=128, help="hidden size")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--seq", type=int, default=128, help="sequence length")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary size (random token ids)")
    p.add_argument("--micro", type=int, default=2, help="micro-batch size")
    p.add_argument("--accum", type=int, default=4, help="micro-batches per step (gradient accumulation)")
    p.add_argument("--attention", choices=["full", "sepllm"], default="full",
                   help="full causal attention or SepLLM (compact path, window seq/4, every 8th token a separator)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per mode and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode and round")
    p.add_argument("--rounds", type=int, default=2, help="rounds; mode order alternates between rounds")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--modes", default="plain,tp2,tp2_sp", help="comma-separated subset of plain, tp2, tp2_sp")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the rows (mode, processes, tensor_parallel, sequence_parallel, global_batch, "
                        "step_ms, ratio_vs_plain) as JSON")
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
    from megatron.parallel.mesh import build_parallel_groups
    from megatron.parallel.tensor_parallel import apply_tensor_parallel, loss_fn_for
    from megatron.training.engine import quiet_deepspeed_logs
    from megatron.training.optimizer import build_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    quiet_deepspeed_logs()
    cfg, sep = _configs(args)
    torch.manual_seed(0)
    model = GPTModel(cfg, sep)
    mpu = None
    if mode != "plain":
        groups = build_parallel_groups(world, rank, tp=world, pp=1, device_type="cpu")
        model = apply_tensor_parallel(model, groups, sequence_parallel=mode.endswith("_sp"))
        mpu = groups.deepspeed_mpu()
    loss_fn = loss_fn_for(model)
    opt = build_optimizer(model, SimpleNamespace(type="adamw", lr=1e-3, params={}))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=_ds_config(args), mpu=mpu,
                                           dist_init_required=False)
    data = _batches(args, args.accum)
    times = []
    for step in range(args.warmup + args.steps):
        dist.barrier()
        tick = time.perf_counter()
        for b in data:
            loss = loss_fn(engine(b.tokens), b.labels, b.loss_mask)
            engine.backward(loss)
            engine.step()
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
        print(f"tensor_parallel_overhead: --modes {args.modes!r}: expected a subset of {list(MODES)} that includes "
              f"plain (the baseline)", file=sys.stderr)
        raise SystemExit(2)
    from tqdm import tqdm

    samples: dict[str, list[float]] = {m: [] for m in modes}
    order = list(modes)
    with tqdm(total=args.rounds * len(modes), desc="tensor_parallel_overhead", unit="run") as bar:
        for _ in range(args.rounds):
            for mode in order:
                samples[mode].extend(run_mode(mode, args))
                bar.update(1)
            order.reverse()
    base = statistics.median(samples["plain"])
    rows = []
    for mode in modes:
        med = statistics.median(samples[mode])
        rows.append({"mode": mode, "processes": MODES[mode], "tensor_parallel": MODES[mode],
                     "sequence_parallel": mode.endswith("_sp"),
                     "global_batch": args.micro * args.accum, "micro_batch": args.micro,
                     "grad_accum": args.accum, "seq_length": args.seq, "attention": args.attention,
                     "step_ms": round(1000 * med, 2), "ratio_vs_plain": round(med / base, 3)})
    print(f"{'mode':<7} {'procs':>5} {'TP':>3} {'SP':>3} {'global batch':>12} {'step ms':>9} {'ratio vs plain':>15}")
    for r in rows:
        sp = "yes" if r["sequence_parallel"] else "no"
        print(f"{r['mode']:<7} {r['processes']:>5} {r['tensor_parallel']:>3} {sp:>3} {r['global_batch']:>12} "
              f"{r['step_ms']:>9.1f} {r['ratio_vs_plain']:>15.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
