"""Step time with synchronous vs asynchronous (``checkpoint_async: true``) saves every N steps, in one run.

Three modes train the same model through the real loop (``megatron.training.pretrain``, one process, fp32, Adam):
``nosave`` (the baseline), ``sync`` (``save`` every ``--every`` steps, written on the training thread) and ``async``
(the same saves, copied to host memory on the training thread and written by the background writer). The time of an
iteration is measured between the console lines of consecutive iterations (``log_interval 1``), so it includes the
save's stall on the training thread (and the validation, off here), but not set-up; the first ``--warmup``
iterations are left out. ``ms_per_iter`` is the mean over the timed iterations of all rounds; ``ratio_vs_nosave`` and
the ``async / sync`` ratio are of the same run. Rounds alternate the mode order so machine noise hits them alike.
The checkpoint folder lies in ``--workdir`` (default: a temp dir): its disk decides the write time.

Example: ``python benchmarks/checkpoint.py --iters 20 --every 5 --rounds 2 --json checkpoint.json``
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))   # benchmarks/corpus.py

from corpus import tokenized_slice, training_config  # noqa: E402
from report import add_model_size_args  # noqa: E402

MODES = ("nosave", "sync", "async")
_ITERATION = re.compile(r"^iteration (\d+)/")


def parse_args(argv: Any = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_size_args(p, layers=4, hidden=128, heads=4)
    p.add_argument("--seq", type=int, default=128, help="sequence length")
    p.add_argument("--micro", type=int, default=4, help="micro-batch")
    p.add_argument("--iters", type=int, default=20, help="training iterations per mode and round")
    p.add_argument("--every", type=int, default=5, help="save every N iterations (checkpoint_factor)")
    p.add_argument("--warmup", type=int, default=2, help="first iterations left out of the timing")
    p.add_argument("--rounds", type=int, default=2, help="rounds; the mode order alternates between rounds")
    p.add_argument("--workdir", default=None, help="folder for the corpus, runs and checkpoints (default: temp dir)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    args = p.parse_args(argv)
    if args.iters <= args.warmup + 1:
        p.error(f"--iters {args.iters} must be larger than --warmup {args.warmup} + 1")
    if args.every < 1:
        p.error("--every must be >= 1")
    return args


class _Clock:
    """A console stream that notes when each ``iteration k/N`` line arrives."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}

    def write(self, text: str) -> int:
        for line in text.splitlines():
            match = _ITERATION.match(line)
            if match:
                self.times.setdefault(int(match.group(1)), time.perf_counter())
        return len(text)

    def flush(self) -> None:
        pass


def build_config(args: argparse.Namespace, mode: str, data_prefix: str, run_dir: Path) -> Any:
    cfg = training_config(args.layers, args.hidden, args.heads, args.seq, args.iters, args.micro, data_prefix, run_dir)
    if mode != "nosave":
        ck = cfg.checkpoint
        ck.save, ck.checkpoint_factor, ck.keep_last_n_checkpoints = str(run_dir / "ckpt"), args.every, 2
        ck.checkpoint_async = mode == "async"
    return cfg


def run_mode(cfg: Any, warmup: int) -> list[float]:
    """Seconds of every timed iteration (from the previous iteration's line to this one's)."""
    from megatron.training import pretrain

    clock = _Clock()
    pretrain(cfg, stream=clock)
    its = sorted(k for k in clock.times if k > warmup)
    return [clock.times[k] - clock.times[k - 1] for k in its if k - 1 in clock.times]


def main(argv: Any = None) -> list[dict]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="checkpoint-bench-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        prefix = tokenized_slice(work)
        samples: dict[str, list[float]] = {m: [] for m in MODES}
        for rnd in range(args.rounds):
            for mode in (MODES if rnd % 2 == 0 else tuple(reversed(MODES))):
                run_dir = work / f"round{rnd}" / mode
                samples[mode] += run_mode(build_config(args, mode, prefix, run_dir), args.warmup)
                print(f"round {rnd} {mode}: {1000 * sum(samples[mode]) / len(samples[mode]):.1f} ms/iter so far",
                      flush=True)
    mean = {m: sum(v) / len(v) for m, v in samples.items()}
    rows = [{"mode": m, "save_every": None if m == "nosave" else args.every, "ms_per_iter": round(1000 * mean[m], 2),
             "ratio_vs_nosave": round(mean[m] / mean["nosave"], 4),
             "ratio_vs_sync": round(mean[m] / mean["sync"], 4)} for m in MODES]
    print(f"\ncheckpoint saves: {args.layers} layers, hidden {args.hidden}, seq {args.seq}, micro {args.micro}, save "
          f"every {args.every} of {args.iters} iterations, {args.rounds} round(s) x {args.iters - args.warmup - 1} "
          "timed iterations")
    print(f"{'mode':<8} {'ms_per_iter':>12} {'ratio_vs_nosave':>16} {'ratio_vs_sync':>14}")
    for r in rows:
        print(f"{r['mode']:<8} {r['ms_per_iter']:>12.1f} {r['ratio_vs_nosave']:>16.3f} {r['ratio_vs_sync']:>14.3f}")
    print(f"async / sync step time: {mean['async'] / mean['sync']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
