"""Per-micro-batch SepLLM plan: the rule evaluated once from token ids and shared by every layer.

``SepLLMBackend.prepare`` builds one ``SepPlan``; layers only look up their ``PatternPlan`` by index. Layers with the
same (window, FixLLM interval) share one pattern, so masks / BlockMasks / gather layouts are built once per distinct
pattern, never per layer. Nothing here is cached across micro-batches.

Documents (``reset_attention_mask``): ``document_ids`` become ``SepPlan.doc_start`` (the first position of each
token's document), which every path reads as a per-query lower bound on the key position (``rules.py``); patterns
whose window covers the sequence stay ``full`` but then need the document-causal mask. ``document_ids=None`` builds
exactly the plan without documents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from megatron.data.documents import document_starts
from megatron.sepllm.attention import rules


@dataclass
class PatternPlan:
    """One distinct attention pattern of this micro-batch.

    ``global_keys`` already excludes padding keys. ``full`` means the window covers the whole sequence, so the
    pattern is plain causal attention (H/HT layers) and runs on the causal fast path. ``artifact`` holds what the
    chosen execution path precomputed (dense mask, BlockMask or compact layout).
    """

    window: int
    interval: Optional[int]
    global_keys: torch.Tensor
    full: bool
    artifact: Any = None


@dataclass
class SepPlan:
    """State handed to every layer for one micro-batch (opaque to the model)."""

    batch: int
    seq_len: int
    impl: str
    mode: str
    key_valid: Optional[torch.Tensor]          # [B, S] bool, None = no padding
    position_ids: torch.Tensor                 # [B, S] positions used for ALiBi
    layer_patterns: list[PatternPlan]
    extras: dict = field(default_factory=dict)  # shared per-plan artifacts (e.g. padded causal mask)
    doc_start: Optional[torch.Tensor] = None    # [B, S] long first position of each token's document; None = one

    def pattern(self, layer_idx: int) -> PatternPlan:
        if not 0 <= layer_idx < len(self.layer_patterns):
            raise IndexError(f"layer_idx {layer_idx} outside the {len(self.layer_patterns)} layers of this SepLLM plan")
        return self.layer_patterns[layer_idx]

    def distinct_patterns(self) -> list[PatternPlan]:
        seen: dict[int, PatternPlan] = {}
        for p in self.layer_patterns:
            seen.setdefault(id(p), p)
        return list(seen.values())


def global_keys_for(input_ids: torch.Tensor, separator_ids: Optional[Sequence[int]], num_initial: int,
                    pad_counts: Optional[torch.Tensor], interval: Optional[int],
                    key_valid: Optional[torch.Tensor], doc_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, S]`` global-key bitmap (initial | separators | FixLLM positions) with padding keys removed."""
    g = rules.global_key_bitmap(input_ids, list(separator_ids) if separator_ids else list(rules.NO_SEPARATORS),
                                num_initial, pad_counts=pad_counts, fixed_interval=interval, doc_start=doc_start)
    if key_valid is not None:
        g = g & key_valid
    return g.contiguous()


def build_plan(input_ids: torch.Tensor, position_ids: Optional[torch.Tensor], attention_mask_2d: Optional[torch.Tensor],
               *, impl: str, mode: str, layer_windows: Sequence[int], layer_intervals: Sequence[Optional[int]],
               separator_ids: Optional[Sequence[int]], num_initial: int, batch_adaptive_init: bool,
               document_ids: Optional[torch.Tensor] = None) -> SepPlan:
    """Evaluate the rule once for the micro-batch; layers with equal (window, interval) share a ``PatternPlan``.
    ``document_ids [B, S]`` (``reset_attention_mask``) keep each document's attention inside it."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    batch, seq_len = input_ids.shape
    doc_start = None
    if document_ids is not None:
        if tuple(document_ids.shape) != (batch, seq_len):
            raise ValueError(f"document_ids must be [B, S] = {(batch, seq_len)}, got {tuple(document_ids.shape)}")
        doc_start = document_starts(document_ids.to(input_ids.device)).contiguous()
    key_valid = None
    if attention_mask_2d is not None:
        if tuple(attention_mask_2d.shape) != (batch, seq_len):
            raise ValueError(f"attention_mask_2d must be [B, S] = {(batch, seq_len)}, got {tuple(attention_mask_2d.shape)}")
        key_valid = attention_mask_2d.to(device=input_ids.device, dtype=torch.bool)
        if bool(key_valid.all()):
            key_valid = None
    pad_counts = None
    if batch_adaptive_init and attention_mask_2d is not None:
        pad_counts = rules.left_pad_counts(attention_mask_2d.to(input_ids.device))
    if position_ids is None:
        position_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0).expand(batch, seq_len)
    patterns: dict[tuple, PatternPlan] = {}
    layer_patterns = []
    for window, interval in zip(layer_windows, layer_intervals):
        full = mode in ("full", "sa", "sa_no_deno") or window >= seq_len
        key = ("full",) if full else (int(window), interval)
        if key not in patterns:
            if full:
                g = torch.zeros(batch, seq_len, dtype=torch.bool, device=input_ids.device)
                patterns[key] = PatternPlan(window=max(int(window), seq_len), interval=None, global_keys=g, full=True)
            else:
                g = global_keys_for(input_ids, separator_ids, num_initial, pad_counts, interval, key_valid, doc_start)
                patterns[key] = PatternPlan(window=int(window), interval=interval, global_keys=g, full=False)
        layer_patterns.append(patterns[key])
    return SepPlan(batch=batch, seq_len=seq_len, impl=impl, mode=mode, key_valid=key_valid,
                   position_ids=position_ids, layer_patterns=layer_patterns, doc_start=doc_start)
