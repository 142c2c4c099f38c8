"""Streaming KV manager (spec §3.2): one eviction decision for all layers, applied after each forward.

This is the reference's evaluation-time manager (``SepLLM_KVCache_Manager``), kept for parity with the published
streaming numbers: the driver feeds a token, the model appends its KV, the driver records the id
(:meth:`StreamingKVManager.update_past_tok_ids`) and then calls :meth:`evict_except_for_sep` (SepLLM) or
:meth:`evict_nonlocal_and_noninitial` (StreamingLLM). Because eviction follows the forward, the next query sees at most
``cache_size + 1`` keys. Batches keep the reference's alignment (every row truncated to the batch's minimum number of
new separators, keeping each row's oldest ones); :class:`~megatron.sepllm.hf.cache.SepCache` is the per-row exact cache.

The manager works on token ids alone (``kv=None``) or on a transformers ``Cache`` (e.g. ``DynamicCache``) whose
layers hold ``keys/values [B, H, L, D]``; it cuts every layer with the same indices.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from megatron.sepllm.attention import rules
from megatron.sepllm.attention.separator_presets import resolve_separators


def check_streaming_args(init_cache_size: int, sep_cache_size: int, local_size: int, cache_size: int,
                         mode: str) -> None:
    """Argument rules of the reference (``check_args``), raising ``ValueError`` naming the offending values."""
    a, s, w, c = init_cache_size, sep_cache_size, local_size, cache_size
    if mode not in ("sepllm", "streamingllm"):
        raise ValueError(f"streaming mode must be 'sepllm' or 'streamingllm', got {mode!r}")
    if c <= 0 or a < 0 or w <= 0 or c < a + w:
        raise ValueError(f"need cache_size > 0, init_cache_size >= 0, local_size > 0, cache_size >= init + local; "
                         f"got a={a}, w={w}, c={c}")
    if mode == "streamingllm" and w != c - a:
        raise ValueError(f"StreamingLLM needs local_size == cache_size - init_cache_size; got w={w}, c-a={c - a}")
    if mode == "sepllm" and (s <= 0 or a + s + w >= c):
        raise ValueError(f"SepLLM needs sep_cache_size > 0 and init+sep+local < cache_size; got a={a}, s={s}, "
                         f"w={w}, c={c}")


class StreamingKVManager:
    """Global-across-layers SepLLM / StreamingLLM eviction (spec §3.2, Appendix A.5)."""

    def __init__(self, init_cache_size: int = 4, sep_cache_size: int = 32, local_size: int = 224,
                 cache_size: int = 324, separator_token_ids: Optional[Sequence[int]] = None,
                 model_type: Optional[str] = None, mode: str = "sepllm"):
        check_streaming_args(init_cache_size, sep_cache_size, local_size, cache_size, mode)
        self.init_cache_size, self.sep_cache_size = init_cache_size, sep_cache_size
        self.local_size, self.cache_size = local_size, cache_size
        self.mode = mode
        if mode == "streamingllm" and separator_token_ids is None and model_type is None:
            separator_token_ids = list(rules.NO_SEPARATORS)
        self.separator_token_ids, _ = resolve_separators(separator_token_ids, None, model_type)
        self.past_tok_ids: Optional[torch.Tensor] = None     # [B, L], aligned with the cached KV
        self.sep_exrange = 0                                 # exclusive end of the separator region (0 = never)
        self.max_sep_exidx = init_cache_size + sep_cache_size

    def update_past_tok_ids(self, ids: torch.Tensor) -> None:
        """Append the ids ``[B, q]`` whose KV the model just added."""
        ids = ids.reshape(ids.shape[0], -1)
        self.past_tok_ids = ids.clone() if self.past_tok_ids is None else torch.cat([self.past_tok_ids, ids], -1)

    def __len__(self) -> int:
        return 0 if self.past_tok_ids is None else int(self.past_tok_ids.shape[1])

    # ----- SepLLM -----
    def evict_except_for_sep(self, kv: Any = None, SEP_ACCUMULATION: bool = True,
                             USE_MAX_SEP_CACHE: bool = True) -> Any:
        """If the cache is longer than ``cache_size``, keep initial ++ separators ++ local (steps 1-7 of §3.2)."""
        length = len(self)
        a, w = self.init_cache_size, self.local_size
        if length <= self.cache_size:
            return kv
        if self.sep_exrange <= 0:
            self.sep_exrange = a
        if not length - w > self.sep_exrange:
            raise RuntimeError(f"streaming manager: cache length {length} - local {w} must exceed the separator "
                               f"region end {self.sep_exrange}")
        first = self.sep_exrange == a
        ids = self.past_tok_ids
        old = list(range(a, self.sep_exrange)) if (SEP_ACCUMULATION and not first) else []
        window = ids[:, self.sep_exrange:length - w]
        is_sep = rules.separator_bitmap(window, self.separator_token_ids)
        n_new = int(is_sep.sum(-1).min())            # batch alignment: truncate to the minimum, keep the oldest
        new_rows = [torch.nonzero(row).flatten()[:n_new] + self.sep_exrange for row in is_sep]
        sep_rows = [torch.cat([torch.tensor(old, dtype=torch.long, device=ids.device), r]) for r in new_rows]
        n_sep = int(sep_rows[0].numel())
        if USE_MAX_SEP_CACHE:
            if n_sep > self.sep_cache_size:
                sep_rows = [r[-self.sep_cache_size:] for r in sep_rows]
                n_sep = self.sep_cache_size
        elif a + n_sep > self.max_sep_exidx:
            grow = a + n_sep - self.max_sep_exidx
            self.max_sep_exidx += grow
            self.sep_cache_size += grow
            self.cache_size += grow
        self.sep_exrange = a + n_sep
        local = torch.arange(length - w, length, device=ids.device)
        init = torch.arange(a, device=ids.device)
        keep = torch.stack([torch.cat([init, r, local]) for r in sep_rows])      # [B, L_new]
        return self._apply(kv, keep)

    # ----- StreamingLLM -----
    def evict_nonlocal_and_noninitial(self, kv: Any = None) -> Any:
        """If longer than ``cache_size``, keep the first ``a`` and the last ``w`` (= ``c - a``) entries."""
        length = len(self)
        if self.local_size != self.cache_size - self.init_cache_size:
            raise ValueError("StreamingLLM eviction needs local_size == cache_size - init_cache_size")
        if length <= self.cache_size:
            return kv
        dev = self.past_tok_ids.device
        keep = torch.cat([torch.arange(self.init_cache_size, device=dev),
                          torch.arange(length - self.local_size, length, device=dev)])
        return self._apply(kv, keep.unsqueeze(0).expand(self.past_tok_ids.shape[0], -1))

    def __call__(self, kv: Any = None, SEP_ACCUMULATION: bool = True, USE_MAX_SEP_CACHE: bool = True) -> Any:
        if self.mode == "streamingllm":
            return self.evict_nonlocal_and_noninitial(kv)
        return self.evict_except_for_sep(kv, SEP_ACCUMULATION=SEP_ACCUMULATION, USE_MAX_SEP_CACHE=USE_MAX_SEP_CACHE)

    def _apply(self, kv: Any, keep: torch.Tensor) -> Any:
        keep = keep.to(self.past_tok_ids.device)
        self.past_tok_ids = self.past_tok_ids.gather(1, keep)
        if kv is None:
            return None
        for layer in kv.layers:
            idx = keep.to(layer.keys.device)
            if idx.shape[0] == 1 or bool((idx == idx[:1]).all()):
                layer.keys, layer.values = layer.keys.index_select(2, idx[0]), layer.values.index_select(2, idx[0])
            else:
                g = idx[:, None, :, None]
                layer.keys = layer.keys.gather(2, g.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1]))
                layer.values = layer.values.gather(2, g.expand(-1, layer.values.shape[1], -1,
                                                               layer.values.shape[-1]))
        return kv
