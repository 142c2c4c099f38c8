#!/usr/bin/env python
"""Print what a checkpoint holds: layout (world size = DP x TP x PP, ZeRO stage, precision, global batch),
iteration, samples and tokens seen, optimizer state (DeepSpeed's per-rank files, the layout-free copy, step count),
files with their sizes and every model tensor with its full shape, dtype and size. Tensors are memory-mapped, not
loaded.

    python tools/ckpts/inspect_checkpoint.py runs/tiny-cpu/checkpoints            # follows `latest`
    python tools/ckpts/inspect_checkpoint.py runs/tiny-cpu/checkpoints/global_step100 --no-tensors
    python tools/ckpts/inspect_checkpoint.py CKPT --json info.json                # the same as JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron.checkpoint.summary import describe_checkpoint, summary_lines
from megatron.errors import NeoxError, report_error


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a global_stepN folder, or a save folder whose 'latest' names one")
    parser.add_argument("--no-tensors", action="store_true", help="leave out the per-tensor table")
    parser.add_argument("--json", type=Path, default=None, help="also write everything as JSON to this file")
    args = parser.parse_args(argv)
    try:
        info = describe_checkpoint(args.checkpoint)
    except (NeoxError, OSError) as exc:  # the checkpoint is this tool's input
        return report_error(exc, "inspect_checkpoint", exit_code=2)
    print("\n".join(summary_lines(info, tensors=not args.no_tensors)))
    if args.json is not None:
        args.json.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
