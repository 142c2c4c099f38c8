#!/usr/bin/env python
"""Precompute DPO reference log-probabilities from a checkpoint (GPT-NeoX's ``precompute_model_name`` data).

For each --prefix (the chosen and rejected datasets of every split), writes <prefix>_<name>.bin/.idx: per document,
the float32 log-probability of each token under the checkpoint's model (megatron/training/reference_logps.py). A DPO
config with precompute_model_name: <name> and the same seq_length then trains without a reference model in memory.

  python tools/datasets/precompute_reference_logps.py --load runs/sft/checkpoints --name sft --seq-length 128 \
      --prefix data/prefs/train_chosen_document data/prefs/train_rejected_document
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from megatron.checkpoint.trained import load_trained_model
from megatron.data.cli_utils import run_cli
from megatron.device import resolve_device
from megatron.training.reference_logps import write_reference_logps


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="precompute_reference_logps.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint folder (a run's checkpoints/ or a global_stepN folder)")
    p.add_argument("--name", required=True, help="the precompute_model_name the DPO config will give")
    p.add_argument("--prefix", nargs="+", required=True, help="chosen / rejected dataset prefixes")
    p.add_argument("--seq-length", type=int, default=None,
                   help="the DPO run's seq_length (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=8, help="documents per forward (default: 8)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device, key="--device")
    trained = load_trained_model(args.load)
    model = trained.model.to(device)
    seq_length = args.seq_length or int(trained.config.model.seq_length)
    for prefix in args.prefix:
        out = write_reference_logps(model, prefix, args.name, seq_length, args.batch_size, device)
        print(f"wrote {out}.bin/.idx (seq_length {seq_length}, from {trained.checkpoint_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "precompute_reference_logps.py"))
