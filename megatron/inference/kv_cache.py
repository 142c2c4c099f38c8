"""KV caches for decoding with our own ``GPTModel`` (``model(ids, attention_mask=..., kv_cache=cache)``).

Two kinds, one interface (``begin_step`` -> ``prepare`` -> ``attend`` per layer -> ``end_step``, driven by
``GPTModel.forward``):

* :class:`PlainKVCache` keeps every key/value (full-attention models). Buffers grow by doubling, so a step writes
  in place instead of re-concatenating the whole history.
* :class:`SepKVCache` (SepLLM / StreamingLLM-trained models) keeps, per layer and row, the initial tokens, the
  separators and the local window. SepCache's planner (:mod:`megatron.sepllm.cache`, the one the Hugging Face
  ``SepCache`` runs) decides which slots survive, so there is one eviction rule in the project. Two settings:

  - ``compressed`` (default): separators capped at ``sep_cache_size`` (the most recent ones), so the memory is flat
    over arbitrarily long generation. With ``exact_window`` (default) every decode query sees exactly
    initial + kept separators + the last ``w`` tokens (the trained decode rule of spec §1.3 with a cap), and the
    cache is trimmed every step; without it, SepCache's reference timing applies (the local region grows until the
    stored length reaches ``cache_size``, so a decode query sees at most ``cache_size - 1`` keys; cheaper, but a
    row's compression then depends on the longest row of its batch).
  - ``uncapped``: every separator is kept (the training rule exactly; memory grows with the separator frequency).

  A full-attention model with ``sliding_window_width`` W (Mistral) decodes with the same cache and no initial tokens
  and no separators: a rolling window of the last ``W + 1`` keys per layer (the query's own included), so each decode
  query sees exactly the keys it saw in training and memory stays flat (``compressed`` and ``uncapped`` are the same
  cache there; ``plain`` is refused, it would let queries see older keys).

Keys keep the rotary positions they were computed with (as in training; no positional re-encoding). The prompt
(the first, multi-token step) runs through the model's own SepLLM attention path with the training (prefill)
windows and left-padding-aware initial tokens; decode steps attend the cache. A cache serves one prompt batch:
call :meth:`reset` (or build a new one) for the next.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.config.generation import KV_CACHE_KINDS
from megatron.config.sepllm import SepLLMConfig
from megatron.config.sepllm_settings import SLIDING_WINDOW, attention_mode
from megatron.errors import UserInputError
from megatron.sepllm.cache.eviction import EvictionRule, check_sizes
from megatron.sepllm.cache.planner import SepCachePlanner
from megatron.sepllm.cache.slots import LayerSlots
from megatron.sepllm.cache.storage import store_step
from megatron.config.model import ModelConfig

#: SepLLM modes a cache can serve; the others (FixLLM, self-adjusting softmax) and BiPE decode with recompute.
CACHEABLE_SEPLLM_MODES = ("sepllm", "streamingllm", SLIDING_WINDOW)


class KVCacheError(UserInputError, ValueError):
    """A cache cannot serve this model / these settings (the message names the key and what to do)."""


@dataclass(frozen=True)
class KVCacheSettings:
    """Which cache and how big. ``None`` sizes come from the model's training config (see ``build_kv_cache``)."""

    kind: str = "auto"
    init_cache_size: Optional[int] = None
    sep_cache_size: int = 64
    local_size: Optional[int] = None
    cache_size: Optional[int] = None
    exact_window: bool = True


def _positions(valid: Tensor, seen: Tensor) -> Tensor:
    """Position of each new token: real tokens count on from ``seen`` (per row), padding gets 0 (HF convention)."""
    count = seen.unsqueeze(1) + valid.to(torch.long).cumsum(-1)
    return torch.where(valid, count - 1, torch.zeros_like(count))


def _sdpa(q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor], *, scale: float,
          alibi_slopes: Optional[Tensor], q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """Attention of ``q [B,Hq,q,D]`` over ``k/v [B,Hkv,K,D]``; ``allowed`` bool ``[B,1,q,K]`` (None = all);
    ALiBi adds ``-slope * (pos_q - pos_k)``."""
    gqa = k.shape[1] != q.shape[1]
    mask: Optional[Tensor] = allowed
    if alibi_slopes is not None:
        dist = (q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)).to(torch.float32).unsqueeze(1)   # [B,1,q,K]
        bias = -alibi_slopes.to(torch.float32).view(1, -1, 1, 1) * dist
        if allowed is not None:
            bias = bias.masked_fill(~allowed, float("-inf"))
        mask = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


class PlainKVCache:
    """Every key/value of every row, left padding kept as invalid slots (full-attention models)."""

    def __init__(self, num_layers: int, capacity: int = 64) -> None:
        self.num_layers = int(num_layers)
        self.initial_capacity = max(int(capacity), 1)
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new prompt batch)."""
        self.keys: list[Optional[Tensor]] = [None] * self.num_layers
        self.values: list[Optional[Tensor]] = [None] * self.num_layers
        self.length = 0
        self.valid: Optional[Tensor] = None     # [B, cap] bool
        self.pos: Optional[Tensor] = None       # [B, cap] long
        self.seen: Optional[Tensor] = None      # [B] real tokens so far
        self.padded = False                      # some stored slot is padding (then decode steps need a mask)
        self._step: Optional[tuple[int, int, Tensor]] = None   # (old length, q, positions)

    # ------------------------------------------------------------------ step protocol (called by GPTModel)
    def begin_step(self, input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
        """Declare the step's ids ``[B, q]`` (and 0/1 padding mask); returns their position ids ``[B, q]``."""
        bsz, q = input_ids.shape
        valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                 else attention_mask.to(torch.bool))
        if self.seen is None:
            self.seen = torch.zeros(bsz, dtype=torch.long, device=input_ids.device)
            cap = max(self.initial_capacity, q)
            self.valid = torch.zeros(bsz, cap, dtype=torch.bool, device=input_ids.device)
            self.pos = torch.zeros(bsz, cap, dtype=torch.long, device=input_ids.device)
        elif self.seen.shape[0] != bsz:
            raise KVCacheError(f"batch size changed from {self.seen.shape[0]} to {bsz}; reset the cache first")
        if attention_mask is not None and not self.padded:
            self.padded = not bool(valid.all())
        positions = _positions(valid, self.seen)
        self._grow(self.length + q)
        self.valid[:, self.length:self.length + q] = valid
        self.pos[:, self.length:self.length + q] = positions
        self.seen = self.seen + valid.sum(-1)
        self._step = (self.length, q, positions)
        return positions

    def prepare(self, backend: Any, input_ids: Tensor, positions: Tensor, attention_mask: Optional[Tensor]) -> Any:
        """The prompt step (empty cache) runs the model's own attention backend: returns its per-batch state."""
        old, _, _ = self._step
        return backend.prepare(input_ids, positions, attention_mask) if old == 0 else None

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, backend: Any, state: Any, *, scale: float,
               alibi_slopes: Optional[Tensor] = None) -> Tensor:
        """Store the step's keys/values for ``layer_idx`` and return the attention output ``[B, Hq, q, D]``."""
        old, n, positions = self._step
        end = old + n
        if self.keys[layer_idx] is None:
            cap = self.valid.shape[1]
            self.keys[layer_idx] = k.new_zeros(k.shape[0], k.shape[1], cap, k.shape[3])
            self.values[layer_idx] = v.new_zeros(v.shape[0], v.shape[1], cap, v.shape[3])
        elif self.keys[layer_idx].shape[2] < self.valid.shape[1]:
            self.keys[layer_idx] = _grow_buffer(self.keys[layer_idx], self.valid.shape[1], old)
            self.values[layer_idx] = _grow_buffer(self.values[layer_idx], self.valid.shape[1], old)
        self.keys[layer_idx][:, :, old:end] = k
        self.values[layer_idx][:, :, old:end] = v
        if old == 0:
            return backend(q, k, v, layer_idx, state, scale=scale, dropout_p=0.0, alibi_slopes=alibi_slopes)
        allowed: Optional[Tensor] = None
        if n > 1 or self.padded:
            valid = self.valid[:, :end]
            causal = torch.ones(n, end, dtype=torch.bool, device=q.device).tril(diagonal=old)
            allowed = (causal.unsqueeze(0) & valid.unsqueeze(1)).unsqueeze(1)
        return _sdpa(q, self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end], allowed, scale=scale,
                     alibi_slopes=alibi_slopes, q_pos=positions, k_pos=self.pos[:, :end])

    def end_step(self) -> None:
        old, n, _ = self._step
        self.length = old + n
        self._step = None

    # ------------------------------------------------------------------ introspection
    def kv_bytes(self) -> int:
        """Bytes of the keys/values held for the tokens seen (the growing part of decode memory)."""
        return sum(t[:, :, :self.length].numel() * t.element_size() for t in self.keys + self.values
                   if t is not None)

    def _grow(self, need: int) -> None:
        cap = self.valid.shape[1]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap)
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.valid.shape[0], new_cap - cap)], dim=1)
        self.pos = torch.cat([self.pos, self.pos.new_zeros(self.pos.shape[0], new_cap - cap)], dim=1)


def _grow_buffer(buf: Tensor, cap: int, used: int) -> Tensor:
    out = buf.new_zeros(buf.shape[0], buf.shape[1], cap, buf.shape[3])
    out[:, :, :used] = buf[:, :, :used]
    return out


class SepKVCache:
    """SepLLM-compressed cache for ``GPTModel`` (see the module docstring); sizes are per layer."""

    def __init__(self, model_cfg: ModelConfig, sepllm_cfg: Optional[SepLLMConfig], settings: KVCacheSettings,
                 retention: Any = None) -> None:
        """``retention``: a ``RetentionStats`` the prompt forwards add their counts to (e.g. the model's own, so an
        evaluation counts generation prompts with its scoring forwards); by default the prefill backend keeps its
        own."""
        from megatron.config.sepllm_settings import settings_of
        from megatron.sepllm.attention.backend import SepLLMBackend

        num_layers = int(model_cfg.num_layers)
        sepllm_cfg = sepllm_cfg if sepllm_cfg is not None else SepLLMConfig()
        # the one SepLLM resolver (mode, windows, ids); a sliding-window model resolves to no initial tokens, no
        # separators and a W + 1 window
        resolved = settings_of(sepllm_cfg, num_layers, sliding_window_width=model_cfg.sliding_window_width)
        if resolved.mode == SLIDING_WINDOW and not settings.exact_window:
            raise KVCacheError(f"sep_cache_exact_window = False on a model with sliding_window_width = "
                               f"{model_cfg.sliding_window_width}: decode queries would see more than the last "
                               f"{model_cfg.sliding_window_width + 1} keys it was trained on; keep it True")
        uncapped = settings.kind == "uncapped"
        a = resolved.num_initial if settings.init_cache_size is None else int(settings.init_cache_size)
        if settings.local_size is not None:
            windows = [int(settings.local_size)] * num_layers
        else:
            # a decode query sees the last w keys, itself included, whatever EXCLUDE_DIAGONAL says (spec §1.3: the
            # reference's decode rule never reads the flag; apply_sepllm on HF models decodes the same way)
            windows = list(resolved.generate_windows)
        seps = list(resolved.separator_ids)
        s = 0 if (uncapped or not seps) else int(settings.sep_cache_size)
        if settings.cache_size is not None:
            sizes = [int(settings.cache_size)] * num_layers
        else:
            sizes = [a + s + 2 * w for w in windows]
        for layer, (w, c) in enumerate(zip(windows, sizes)):
            if a + s + w >= c:
                raise KVCacheError(f"cache_size = {c} is smaller than or equal to init_cache_size + sep_cache_size "
                                   f"+ local window = {a} + {s} + {w} = {a + s + w} (layer {layer}); it must be larger "
                                   f"(SepCache compresses when it reaches cache_size): raise cache_size")
            check_sizes(layer, a, s, w, c)
        self.settings = settings
        self.sizes = {"init_cache_size": a, "sep_cache_size": s, "local_size": windows, "cache_size": sizes}
        self.rule = EvictionRule(tuple(int(t) for t in seps or [-1]), accumulate=True, cap_separators=not uncapped,
                                 exact_window=uncapped or settings.exact_window)
        # the prompt runs the model's SepLLM attention with left-padding-aware initial tokens (spec §1.4)
        self.prefill_backend = SepLLMBackend(dataclasses.replace(sepllm_cfg, BATCH_ADAPTIVE_INIT_POS=True),
                                             model_cfg)
        if retention is not None:
            self.prefill_backend.retention = retention
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new prompt batch)."""
        self.planner = SepCachePlanner([LayerSlots(self.sizes["init_cache_size"], self.sizes["sep_cache_size"], w, c)
                                        for w, c in zip(self.sizes["local_size"], self.sizes["cache_size"])],
                                       self.rule)
        self.keys: list[Optional[Tensor]] = [None] * len(self.planner.layers)
        self.values: list[Optional[Tensor]] = [None] * len(self.planner.layers)
        self._prefill = True
        self._positions: Optional[Tensor] = None

    # ------------------------------------------------------------------ step protocol (called by GPTModel)
    def begin_step(self, input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
        self._prefill = self.planner.layers[0].ids is None
        if not self._prefill and input_ids.shape[1] != 1:
            raise KVCacheError("SepKVCache decodes one token per step after the prompt; got "
                               f"{input_ids.shape[1]} tokens (reset the cache for a new prompt)")
        # the prompt is always followed by one-token steps: it may store what the first decode step keeps
        positions = self.planner.plan_step(input_ids, attention_mask, followed_by_decode=self._prefill)
        if attention_mask is not None:      # padding gets position 0, as without a cache
            positions = torch.where(attention_mask.to(torch.bool), positions, torch.zeros_like(positions))
        self._positions = positions
        return positions

    def prepare(self, backend: Any, input_ids: Tensor, positions: Tensor, attention_mask: Optional[Tensor]) -> Any:
        if not self._prefill:
            return None
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return self.prefill_backend.prepare(input_ids, positions, mask)

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, backend: Any, state: Any, *, scale: float,
               alibi_slopes: Optional[Tensor] = None) -> Tensor:
        plan = self.planner.layers[layer_idx].plan
        self.keys[layer_idx], self.values[layer_idx], k_att, v_att = store_step(
            self.keys[layer_idx], self.values[layer_idx], k, v, plan)
        self.planner.commit(layer_idx)
        if self._prefill:
            return self.prefill_backend(q, k, v, layer_idx, state, scale=scale, dropout_p=0.0,
                                        alibi_slopes=alibi_slopes)
        allowed = self.planner.step_attention_mask(layer_idx)
        k_pos = self.planner.layers[layer_idx].pos.clamp(min=0) if alibi_slopes is not None else self._positions
        return _sdpa(q, k_att, v_att, allowed, scale=scale, alibi_slopes=alibi_slopes, q_pos=self._positions,
                     k_pos=k_pos)

    def end_step(self) -> None:
        self.planner.finish_step()
        self._prefill = False

    # ------------------------------------------------------------------ introspection
    def kv_bytes(self) -> int:
        """Bytes of the keys/values held between steps (what SepLLM bounds)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def retention(self) -> dict:
        """SepCache's retention statistics (kept / seen KV)."""
        return self.planner.retention()

    def layer_contents(self, layer_idx: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """``(ids, kind, token_index)`` of one layer (see ``SepCachePlanner.layer_contents``)."""
        return self.planner.layer_contents(layer_idx)


def model_attention_mode(model: Any) -> str:
    """The attention ``model`` computes: its SepLLM mode, ``sliding_window`` or ``full``."""
    return attention_mode(getattr(getattr(model, "cfg", None), "sliding_window_width", None),
                          getattr(model, "sepllm_cfg", None))


def resolve_kind(model: Any, kind: str) -> str:
    """``auto`` -> ``compressed`` for SepLLM/StreamingLLM-trained and sliding-window models, ``plain`` for full
    attention."""
    if kind not in KV_CACHE_KINDS:
        raise KVCacheError(f"kv_cache = {kind!r}: expected one of {', '.join(KV_CACHE_KINDS)}")
    mode = model_attention_mode(model)
    if kind == "auto":
        return "plain" if mode == "full" else "compressed"
    if kind == "plain" and mode == SLIDING_WINDOW:
        width = model.cfg.sliding_window_width
        raise KVCacheError(f"kv_cache = 'plain' on a model with sliding_window_width = {width}: a plain cache would "
                           f"let decode queries see keys older than the last {width + 1}; use 'auto' (a rolling "
                           f"window cache)")
    if kind == "plain" and mode != "full":
        raise KVCacheError(f"kv_cache = 'plain' on a model trained with SepLLM mode {mode!r}: a plain cache would "
                           f"let decode queries see keys the model never attended in training; use 'compressed' or "
                           f"'uncapped'")
    if kind in ("compressed", "uncapped") and mode == "full":
        raise KVCacheError(f"kv_cache = {kind!r} needs a SepLLM- or StreamingLLM-trained model; this model uses full "
                           f"attention (use 'plain' or 'auto')")
    return kind


def build_kv_cache(model: Any, settings: KVCacheSettings = KVCacheSettings(), capacity: int = 64,
                   retention: Any = None) -> "PlainKVCache | SepKVCache":
    """The cache ``model`` decodes with. Raises :class:`KVCacheError` for models no cache can serve (BiPE, FixLLM,
    self-adjusting softmax: decode those with ``recompute``). ``retention``: see :class:`SepKVCache` (unused by the
    plain cache: full attention keeps everything)."""
    if getattr(getattr(model, "context", None), "use_bipe", False):
        raise KVCacheError("USE_BiPE models derive positions from the whole token sequence: decode them with "
                           "recompute: true (no KV cache)")
    mode = model_attention_mode(model)
    if mode != "full" and mode not in CACHEABLE_SEPLLM_MODES:
        raise KVCacheError(f"SepLLM mode {mode!r} has no KV cache: decode it with recompute: true")
    kind = resolve_kind(model, settings.kind)
    if kind == "plain":
        return PlainKVCache(len(model.layers), capacity)
    return SepKVCache(model.cfg, model.sepllm_cfg, dataclasses.replace(settings, kind=kind), retention=retention)


__all__ = ["CACHEABLE_SEPLLM_MODES", "KV_CACHE_KINDS", "KVCacheError", "KVCacheSettings", "PlainKVCache",
           "SepKVCache", "build_kv_cache", "model_attention_mode", "resolve_kind"]
