#!/usr/bin/env python
"""Convert a checkpoint's model weights between tensor-parallel sizes (TP=N -> TP=M, e.g. 2 -> 1 or 1 -> 4).

Reads a ``global_stepN`` folder (or a save folder with a ``latest`` file) holding ``model_states.pt`` (TP=1) or
``mp_rank_XX_model_states.pt`` (one per TP rank), merges the shards into the full weights and splits them for the
target size. Writes ``<save>/global_stepN/`` with the new model files, ``meta.json``, ``config.yml`` and RNG files
copied, and ``<save>/latest``. The layout-free optimizer files (``optim_full_tp*_pp*.pt``) are copied as they are
(any TP size resumes them); DeepSpeed's per-rank ``optim_rank*.pt`` fit only the old layout and are left out, so a
checkpoint written before the layout-free files existed resumes with ``no_load_optim: true`` (weights only). Set
``model_parallel_size`` to ``--tp`` when resuming.
Whether the MLP is gated (SwiGLU) is read off the tensor shapes, so no config is needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron.errors import NeoxError, report_error
from megatron.parallel.reshard import reshard_checkpoint


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", type=Path, required=True,
                        help="checkpoint to read: a global_stepN folder, or a save folder whose 'latest' names one")
    parser.add_argument("--save", type=Path, required=True,
                        help="folder to write <save>/global_stepN and <save>/latest into (the step folder must not "
                             "exist yet)")
    parser.add_argument("--tp", type=int, required=True, help="target tensor-parallel size (model_parallel_size)")
    parser.add_argument("--no-check-replicated", action="store_true",
                        help="do not verify that replicated tensors (norms, biases) are equal in every input shard")
    args = parser.parse_args(argv)
    if args.tp < 1:
        print(f"reshard_tp: --tp {args.tp}: expected a positive tensor-parallel size", file=sys.stderr)
        return 2
    try:
        dst = reshard_checkpoint(args.load, args.save, args.tp, check_replicated=not args.no_check_replicated)
    except (NeoxError, OSError, json.JSONDecodeError) as exc:  # the checkpoint is this tool's input
        return report_error(exc, "reshard_tp", exit_code=2)
    has_optim = any(dst.glob("optim_full_tp*_pp*.pt"))
    print(f"wrote TP={args.tp} checkpoint {dst} " + ("(weights and the layout-free optimizer state)" if has_optim
                                                     else "(model weights only: resume with no_load_optim: true)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
