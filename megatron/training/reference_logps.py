"""Precomputed DPO reference log-probabilities (``precompute_model_name``), written in GPT-NeoX's layout.

For every document ``i`` of a chosen / rejected dataset ``<prefix>``, the dataset ``<prefix>_<name>`` holds one
float32 row of ``seq_length`` values: the log-probability under the reference model of each token of the document,
fitted into ``seq_length + 1`` positions as the pairwise dataset fits it, given the tokens before it (value ``j`` is
for token ``j + 1``: aligned with the labels). A DPO run with ``precompute_model_name: <name>`` then needs no
reference model in memory. ``tools/datasets/precompute_reference_logps.py`` runs this from a checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder, normalize_prefix
from megatron.data.packing import fit_document
from megatron.model.preference_loss import token_logps


@torch.no_grad()
def write_reference_logps(model: torch.nn.Module, prefix: str, name: str, seq_length: int, batch_size: int = 8,
                          device: str = "cpu") -> str:
    """Write ``<prefix>_<name>`` for ``model`` (in eval mode, fp32 log-softmax); returns the output prefix."""
    source = MMapIndexedDataset(normalize_prefix(prefix))
    out = f"{normalize_prefix(prefix)}_{name}"
    model.eval()
    with MMapIndexedDatasetBuilder(out, np.float32) as builder:
        for start in range(0, len(source), batch_size):
            rows = [fit_document(source[i], None, seq_length + 1)[0] for i in range(start, min(start + batch_size,
                                                                                             len(source)))]
            text = torch.as_tensor(np.stack(rows), device=device)
            logps = token_logps(model(text[:, :-1]), text[:, 1:], fp32=True)
            for row in logps.float().cpu().numpy():
                builder.add_document(row)
        builder.finalize()
    return out


__all__ = ["write_reference_logps"]
