#!/usr/bin/env python
"""Plot a run's train and valid loss curves from its metrics.jsonl into a PNG.

usage: python tools/plot_logs.py RUN_LOG_DIR [--output loss.png] [--title TEXT]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plot_logs.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_log_dir", type=Path,
                        help="the run's log directory (holding metrics.jsonl), or the metrics.jsonl file itself")
    parser.add_argument("--output", "-o", type=Path, default=None,
                        help="PNG to write (default: RUN_LOG_DIR/loss.png)")
    parser.add_argument("--title", default=None, help="plot title (default: the run directory)")
    args = parser.parse_args(argv)

    from megatron.errors import NeoxError, report_error
    from megatron.training.plotting import plot_run

    run_dir = args.run_log_dir
    default_dir = run_dir.parent if run_dir.is_file() else run_dir
    output = args.output or default_dir / "loss.png"
    try:
        plot_run(run_dir, output, args.title)
    except NeoxError as exc:
        return report_error(exc)
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
