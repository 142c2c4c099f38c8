"""Retention statistics of SepLLM attention (spec §1.7, §7 item 13), accumulated over the whole run.

Two ratios, each under its own name, per layer and in total:

* ``kv_retention``: keys attended by the LAST query row / valid keys up to it (the KV a decoder would need to
  predict the next token);
* ``attn_map_retention``: attended entries of the whole map / causal entries (the attention compute kept).

Counts come from the ``[B, S]`` bitmaps in closed form (``rules.row_kept_counts``), never from an S x S mask; padding
keys and padded query rows are excluded. Totals are sums of counts over every forward call (not overwritten).
With documents (``reset_attention_mask``) a query's kept and total keys are counted inside its own document, so the
ratios compare SepLLM against full attention with the same document masks.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.sepllm.attention import rules


def pattern_counts(global_keys: torch.Tensor, window: int, key_valid: Optional[torch.Tensor],
                   doc_start: Optional[torch.Tensor] = None) -> tuple[int, int, int, int]:
    """``(kv_kept, kv_total, map_kept, map_total)`` of one pattern on one micro-batch."""
    kept, total = rules.row_kept_counts(global_keys, window, key_valid, doc_start)
    if key_valid is not None:
        rows = key_valid.to(torch.bool)
        kept, total = kept * rows, total * rows
    return int(kept[:, -1].sum()), int(total[:, -1].sum()), int(kept.sum()), int(total.sum())


class RetentionStats:
    """Running kept/total counters per layer; ``as_dict`` gives the ratios for logging and TensorBoard."""

    def __init__(self, num_layers: int):
        self.num_layers = int(num_layers)
        self.forward_calls = 0
        self._kv = [[0, 0] for _ in range(self.num_layers)]
        self._map = [[0, 0] for _ in range(self.num_layers)]

    def update(self, layer_idx: int, kv_kept: int, kv_total: int, map_kept: int, map_total: int) -> None:
        """Add one micro-batch's counts for one layer."""
        self._kv[layer_idx][0] += kv_kept
        self._kv[layer_idx][1] += kv_total
        self._map[layer_idx][0] += map_kept
        self._map[layer_idx][1] += map_total

    def count_forward(self) -> None:
        self.forward_calls += 1

    @staticmethod
    def _ratio(kept: int, total: int) -> float:
        return float(kept) / float(total) if total else 1.0

    def counts(self) -> dict:
        """The raw counters as plain data, e.g. to sum them over data-parallel ranks with :meth:`add_counts`."""
        return {"kv": [list(c) for c in self._kv], "attn_map": [list(c) for c in self._map],
                "forward_calls": self.forward_calls}

    def add_counts(self, counts: dict) -> None:
        """Add another tracker's :meth:`counts` (same number of layers) to this one."""
        if len(counts["kv"]) != self.num_layers:
            raise ValueError(f"retention counts of {len(counts['kv'])} layers cannot be added to {self.num_layers}")
        for mine, theirs in ((self._kv, counts["kv"]), (self._map, counts["attn_map"])):
            for layer, (kept, total) in enumerate(theirs):
                mine[layer][0] += int(kept)
                mine[layer][1] += int(total)
        self.forward_calls += int(counts["forward_calls"])

    def as_dict(self) -> dict[str, float]:
        """``kv_retention/layer_XX``, ``kv_retention/total``, ``attn_map_retention/...`` and ``forward_calls``."""
        out: dict[str, float] = {}
        for name, counts in (("kv_retention", self._kv), ("attn_map_retention", self._map)):
            for i, (k, t) in enumerate(counts):
                out[f"{name}/layer_{i:02d}"] = self._ratio(k, t)
            out[f"{name}/total"] = self._ratio(sum(c[0] for c in counts), sum(c[1] for c in counts))
        out["forward_calls"] = float(self.forward_calls)
        return out

    def format_line(self) -> str:
        """One log line with the running totals and the per-layer KV retention."""
        d = self.as_dict()
        per_layer = " ".join(f"{d[f'kv_retention/layer_{i:02d}']:.3f}" for i in range(self.num_layers))
        return (f"SepLLM retention after {self.forward_calls} forward calls: "
                f"kv_retention/total={d['kv_retention/total']:.4f} "
                f"attn_map_retention/total={d['attn_map_retention/total']:.4f} | kv per layer: {per_layer}")


def should_report(forward_calls: int, interval: int) -> bool:
    """True every ``interval`` forward calls (the trainer prints ``format_line`` when PRINT_KV_RATIO is set)."""
    return interval > 0 and forward_calls > 0 and forward_calls % interval == 0
