#!/usr/bin/env python
"""The loss of a checkpoint on a fine-tuning dataset (text + label ``.bin/.idx`` from ``prepare_data.py --sft``):
the mean cross-entropy over every counted label (label >= 0), each document read once, whole and on its own.

What the fine-tuning demo reports before and after training (README "Fine-tune", docs/finetuning.md):

  python tools/eval_label_loss.py --load runs/tiny-cpu/checkpoints --data data/instructions_demo/heldout
  python tools/eval_label_loss.py --load runs/tiny-cpu-sft/checkpoints --data data/instructions_demo/heldout

A document longer than the model's seq_length + 1 tokens is cut to it (its first seq_length + 1 tokens count).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np
import torch

from megatron.data.cli_utils import run_cli
from megatron.data.errors import DataError
from megatron.data.gpt_dataset import check_label_dataset
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.packing import fit_document
from megatron.data.preprocess import output_prefix_for_key


def label_loss(model: torch.nn.Module, text: MMapIndexedDataset, label: MMapIndexedDataset, seq_length: int,
               batch_size: int = 8) -> tuple[float, int]:
    """``(mean loss over counted targets, number of counted targets)``; one padded row per document."""
    check_label_dataset(text, label)
    total, count = 0.0, 0
    for start in range(0, len(text), batch_size):
        rows = [fit_document(np.asarray(text[i], dtype=np.int64), np.asarray(label[i], dtype=np.int64),
                             seq_length + 1) for i in range(start, min(start + batch_size, len(text)))]
        tokens = torch.as_tensor(np.stack([r[0] for r in rows]))[:, :-1]
        targets = torch.as_tensor(np.stack([r[1] for r in rows]))[:, 1:]
        with torch.no_grad():
            logits = model(tokens).float()
        counted = targets >= 0
        nll = torch.nn.functional.cross_entropy(logits[counted], targets[counted], reduction="sum")
        total += float(nll)
        count += int(counted.sum())
    if count == 0:
        raise DataError(f"{label.prefix}: no counted label (every label is negative)")
    return total / count, count


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eval_label_loss.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="a run's checkpoints/ folder (its latest) or a global_stepN folder")
    p.add_argument("--data", required=True,
                   help="the --output-prefix of prepare_data.py --sft: reads <data>_text_document and "
                   "<data>_label_document")
    p.add_argument("--batch-size", type=int, default=8, help="documents per forward pass (default: 8)")
    args = p.parse_args(argv)
    from megatron.checkpoint.trained import load_trained_model

    trained = load_trained_model(args.load)
    trained.model.eval()
    text = MMapIndexedDataset(output_prefix_for_key(args.data, "text"))
    label = MMapIndexedDataset(output_prefix_for_key(args.data, "label"))
    loss, count = label_loss(trained.model, text, label, trained.config.model.seq_length, args.batch_size)
    print(f"{args.data}: loss {loss:.4f} over {count} counted tokens in {len(text)} documents "
          f"(checkpoint {trained.checkpoint_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "eval_label_loss.py"))
