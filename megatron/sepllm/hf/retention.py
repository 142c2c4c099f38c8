"""Retention statistics of the training-free mask path, under distinct names (spec §1.7, §7 item 13).

* ``final_step_kv``: keys attended by the LAST query row of the LAST forward of each sequence (prefill only, or the
  final decode step), divided by the valid keys it could attend. Accumulated once per sequence, like the reference's
  overwrite-then-add-at-next-prefill logic, but over the whole run rather than a print interval.
* ``prefill_attention_map``: allowed (query, key) pairs of prefill forwards divided by the causal pairs, both over
  valid (non-padding) queries and keys.

Padding is never counted (the reference counts pads as tokens; spec §7 item 13 asks for exact numbers).
Every count is kept per layer; totals sum over layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

_EPS = 1e-6


@dataclass
class _Counts:
    kept: list[int]
    total: list[int]

    @classmethod
    def zeros(cls, num_layers: int) -> "_Counts":
        return cls([0] * num_layers, [0] * num_layers)

    def add(self, other: "_Counts") -> None:
        for i in range(len(self.kept)):
            self.kept[i] += other.kept[i]
            self.total[i] += other.total[i]

    def as_dict(self) -> dict:
        kept, total = sum(self.kept), sum(self.total)
        return {"kept": kept, "total": total, "ratio": kept / total if total else None,
                "per_layer_ratio": [k / t if t else None for k, t in zip(self.kept, self.total)]}


@dataclass
class RetentionMeter:
    """Accumulates both statistics for one handle; ``record_*`` are called by the forward wrapper."""

    num_layers: int
    mode: str
    forward_calls: int = 0
    sequences: int = 0
    final_step_kv: _Counts = field(init=False)
    prefill_attention_map: _Counts = field(init=False)
    _pending_kv: Optional[_Counts] = field(default=None, init=False)
    _last_map: Optional[_Counts] = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything measured so far."""
        self.forward_calls = 0
        self.sequences = 0
        self.final_step_kv = _Counts.zeros(self.num_layers)
        self.prefill_attention_map = _Counts.zeros(self.num_layers)
        self._pending_kv = None
        self._last_map = None

    def start_sequence(self) -> None:
        """A new prefill begins: the previous sequence's final step is now known and is folded in."""
        if self._pending_kv is not None:
            self.final_step_kv.add(self._pending_kv)
        self._pending_kv = None
        self.sequences += 1

    def record_call(self, last_row: _Counts, attention_map: Optional[_Counts]) -> None:
        """One forward: ``last_row`` overwrites the pending final-step value; a prefill map is accumulated."""
        self.forward_calls += 1
        self._pending_kv = last_row
        if attention_map is not None:
            self.prefill_attention_map.add(attention_map)
            self._last_map = attention_map

    def as_dict(self) -> dict:
        """Totals over the run so far, the current (unfinished) sequence's final step included."""
        kv = _Counts(list(self.final_step_kv.kept), list(self.final_step_kv.total))
        if self._pending_kv is not None:
            kv.add(self._pending_kv)
        return {
            "mode": self.mode,
            "forward_calls": self.forward_calls,
            "sequences": self.sequences,
            "final_step_kv_retention": kv.as_dict(),
            "prefill_attention_map_retention": self.prefill_attention_map.as_dict(),
            "last_batch": {
                "final_step_kv_retention": None if self._pending_kv is None else self._pending_kv.as_dict()["ratio"],
                "prefill_attention_map_retention": None if self._last_map is None else self._last_map.as_dict()["ratio"],
            },
        }

    def summary(self) -> str:
        """One line for logs: both ratios with their raw counts."""
        d = self.as_dict()
        kv, amap = d["final_step_kv_retention"], d["prefill_attention_map_retention"]

        def fmt(c: dict) -> str:
            if not c["total"]:
                return "n/a (0/0)"
            ratio = (c["kept"] + _EPS) / (c["total"] + _EPS)
            return f"{ratio:.4f} ({c['kept']}/{c['total']})"

        return (f"SepLLM[{self.mode}] final-step KV retention {fmt(kv)} | prefill attention-map retention "
                f"{fmt(amap)} | {d['sequences']} sequences, {d['forward_calls']} forwards, {self.num_layers} layers")
