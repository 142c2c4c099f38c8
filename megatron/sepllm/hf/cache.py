"""SepCache: a Hugging Face ``Cache`` that keeps, per layer and per batch row, the initial tokens, a bounded set of
separator tokens and a local window (spec §3.4, with the fixes of §7 items 2-7).

Which slots each layer keeps, when it compresses and how its budget grows is decided by the torch-only planner
(:mod:`megatron.sepllm.cache`; our own ``generate.py`` cache uses the same one). This module is the adapter:

* **Token ids reach the cache before the forward.** In transformers 5.x the attention module calls
  ``cache.update(k, v, layer_idx)`` with no ids, so the caller (``megatron.sepllm.hf.generation``) first calls
  :meth:`SepCache.set_step_tokens` with the step's ids and 2-D attention mask. That call *plans* the step for every
  layer (which slots will be kept, the attention mask the step needs, position ids); ``update`` then applies the plan
  to the layer's keys/values. Each layer stores ``keys/values [B, H, L, D]`` next to the planner's ``ids``, ``kind``
  and token index ``[B, L]``.
* **HF API compatibility**: the reference's constructor arguments and attribute names, ``CacheLayerMixin`` layers,
  retention statistics, ``kv_bytes``.
* **Positional re-encoding** (``APPLY_PE_SHIFT``): keys are stored without rotary embedding and rotated again every
  step with their index among the row's valid slots; the query gets the index of the current token. The rotary tables
  come from the model's own rotary module (``bind_model``), so theta, scaling and partial rotary are the model's
  (or, with ``APPLY_PES_INSIDE`` and explicit ``base``/``pe_dim``, plain RoPE tables from those). Kept on purpose
  where the reference differs: the reference writes the rotated keys back and rotates them again every step, so from
  the second step on its keys carry "original position + slot" instead of "slot"; here the stored keys stay
  un-rotated and each step rotates a copy, matching an independent computation.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any, Optional, Sequence, Union

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from megatron.sepllm.attention.separator_presets import resolve_separators
from megatron.sepllm.cache.eviction import EVICTION_TIMINGS, INVALID, EvictionRule, check_sizes
from megatron.sepllm.cache.planner import PREFILL_ATTENTION, SepCachePlanner
from megatron.sepllm.cache.slots import LayerSlots, cache_positions
from megatron.sepllm.cache.storage import store_step
from megatron.sepllm.hf.compat import cache_kwarg
from megatron.sepllm.hf.pos_shift import RopeFn, apply_rotary, find_rotary_module, rope_fn_from_model, unapply_rotary
from megatron.sepllm.hf.reference_args import RopeParams, check_layout, check_reference_state

IntOrList = Union[int, Sequence[int]]

class _RopeTables:
    """cos/sin for the positional re-encoding, computed once instead of per layer and step: a table of cache
    positions ``0..n-1`` (grown by doubling; cache positions never exceed the stored length) and the current step's
    absolute positions (shared by every layer of the step). Only for rotary tables that do not depend on the longest
    position seen (``static``); dynamic ones (dynamic NTK, longrope) are asked every time."""

    def __init__(self, fn: RopeFn, static: bool):
        self.fn, self.static = fn, static
        self.cos: Optional[torch.Tensor] = None
        self.sin: Optional[torch.Tensor] = None
        self.step_positions: Optional[torch.Tensor] = None
        self.step_cs: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def step(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[B, q, r]`` of the step's absolute positions (one computation per step)."""
        if self.step_positions is not positions or self.step_cs is None or self.step_cs[0].dtype != x.dtype:
            self.step_positions, self.step_cs = positions, self.fn(x, positions)
        return self.step_cs

    def table(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[n', r]`` (``n' >= n``) of cache positions ``0..n'-1``."""
        if self.cos is None or self.cos.shape[0] < n or self.cos.dtype != x.dtype or self.cos.device != x.device:
            size = max(n, 64, 2 * (0 if self.cos is None else self.cos.shape[0]))
            cos, sin = self.fn(x, torch.arange(size, device=x.device).unsqueeze(0))
            self.cos, self.sin = cos[0], sin[0]
        return self.cos, self.sin

    def at(self, x: torch.Tensor, positions: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[B, L, r]`` of cache ``positions [B, L]`` (all ``< bound``)."""
        if not self.static:
            return self.fn(x, positions)
        cos, sin = self.table(x, bound)
        return cos[positions], sin[positions]

    def span(self, x: torch.Tensor, start: int, stop: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[B, stop - start, r]`` of the contiguous cache positions ``start..stop-1`` (every row)."""
        if not self.static:
            pos = torch.arange(start, stop, device=x.device).unsqueeze(0).expand(batch, -1)
            return self.fn(x, pos)
        cos, sin = self.table(x, stop)
        return cos[start:stop].unsqueeze(0).expand(batch, -1, -1), sin[start:stop].unsqueeze(0).expand(batch, -1, -1)


def _planner_attribute(path: str) -> property:
    """A read-only :class:`SepCache` attribute that reads ``cache.planner.<path>``."""
    get = operator.attrgetter(path)
    return property(lambda cache: get(cache.planner))


class SepCacheLayer(LayerSlots, CacheLayerMixin):
    """One layer of :class:`SepCache`: the planner's slot bookkeeping (sizes ``a, s, w, c``, ids/kinds/positions,
    budget, counters) plus the keys/values HF reads."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, init_cache_size: int, sep_cache_size: int, local_size: int, cache_size: int,
                 prefill_local_size: Optional[int] = None):
        CacheLayerMixin.__init__(self)
        LayerSlots.__init__(self, init_cache_size, sep_cache_size, local_size, cache_size, prefill_local_size)

    # ----- CacheLayerMixin interface -----
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_zeros((b, h, 0, d))
        self.values = value_states.new_zeros((b, value_states.shape[1], 0, value_states.shape[-1]))
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.stored_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("SepCacheLayer.update is driven by SepCache.update (it needs the step plan)")

    def reset(self) -> None:
        self.keys = self.values = None
        self.clear_slots()
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("SepCache does not support beam search (rows hold different token sets)")


class SepCache(Cache):
    """SepLLM KV cache for any HF decoder whose attention goes through ``AttentionInterface`` (Llama, GPT-NeoX, ...).

    Args:
        init_cache_size, sep_cache_size, local_size, cache_size: ``a, s, w, c`` — ints or per-layer lists of length
            ``layer_num``; ``a + s + w < c`` per layer (the cache compresses when its stored length reaches ``c``).
        SEP_ACCUMULATION: keep the separators of earlier compressions (else only those leaving the window now).
        USE_MAX_SEP_CACHE: cap the separators at ``s`` keeping the most recent; without it the budget (``s`` and
            ``c`` of that layer) grows by the overflow, like the reference.
        separator_token_ids / PADDING_ID: explicit, else from ``model_type`` (llama, gpt_neox/pythia, falcon presets
            of spec §2), else derived from ``tokenizer``. ``[-1]`` = no separators (a StreamingLLM cache).
            ``PADDING_ID`` is only the filler id for finished rows in ``generate``: padding itself is always read
            from the attention mask, never from token ids.
        layer_num / model: the layer count (and, with ``model``, its model_type and rotary settings).
        APPLY_PE_SHIFT: re-encode kept keys with their index in the cache (spec §3.3) using the model's rotary module.
        exact_window: trim the local region to ``w`` every step (exact trained decode rule) instead of letting it
            grow until the cache exceeds ``c`` (reference SepCache, cheaper).
        prefill_attention: multi-token steps attend ``"full"`` causal (reference SepCache), ``"sepllm"`` (the SepLLM
            mask over the step, spec §1.3, with window ``prefill_local_size``), or ``"stream"`` (each query sees
            exactly what token-by-token feeding would show it: chunked streaming equals token-by-token streaming).
            Masked modes build a bool ``[B, q, cached + q]`` mask, so feed very long inputs in chunks.
        eviction_timing: ``"in_update"`` (the reference SepCache: a decode query sees ``<= c - 1`` keys) or
            ``"after_step"`` (the streaming manager's timing, ``<= c + 1``).
        prefill_local_size: the window of multi-token steps under ``prefill_attention="sepllm"`` (int or per-layer
            list; default ``local_size``): a model trained with different prefill and decode windows uses both.
        SEP_PADDING_IN_BATCH, PRINT_KV_RATIO_INSIDE, print_KV_inside_per_steps, APPLY_PES_INSIDE, base, pe_dim,
            pe_scaling_factor, max_position_embeddings, partial_rotation_size, _rope_unsqueeze_dim, _rope_seq_dim,
            k_seq_dim, v_seq_dim and the empty state arguments (past_tok_ids, key_cache, value_cache, _seen_tokens,
            _kept_kv_ratio, _shifted_position_ids): the reference's options, see
            :mod:`megatron.sepllm.hf.reference_args` (``SEP_PADDING_IN_BATCH`` has no effect: rows are never aligned;
            ``PRINT_KV_RATIO_INSIDE`` prints the retention every ``print_KV_inside_per_steps`` forwards).

    Use it through :func:`megatron.sepllm.hf.generation.generate` or
    :func:`megatron.sepllm.hf.generation.sepllm_forward`, which call :meth:`set_step_tokens` before each forward and
    route attention through the per-layer masks.
    """

    def __init__(self, init_cache_size: IntOrList = 4, sep_cache_size: IntOrList = 64, local_size: IntOrList = 256,
                 cache_size: IntOrList = 512, SEP_ACCUMULATION: bool = True, USE_MAX_SEP_CACHE: bool = False,
                 separator_token_ids: Optional[Sequence[int]] = None, PADDING_ID: Optional[int] = None,
                 model_type: Optional[str] = None, tokenizer: Any = None, layer_num: Optional[int] = None,
                 APPLY_PE_SHIFT: bool = False, exact_window: bool = False, prefill_attention: str = "full",
                 eviction_timing: str = "in_update", model: Any = None, SEP_PADDING_IN_BATCH: bool = False,
                 PRINT_KV_RATIO_INSIDE: bool = False, print_KV_inside_per_steps: int = 1000,
                 APPLY_PES_INSIDE: bool = True, base: Optional[float] = None, pe_dim: Optional[int] = None,
                 pe_scaling_factor: Optional[float] = None, max_position_embeddings: Optional[int] = None,
                 partial_rotation_size: Optional[int] = None, _rope_unsqueeze_dim: int = 1, _rope_seq_dim: int = 1,
                 k_seq_dim: int = 2, v_seq_dim: int = 2, prefill_local_size: Optional[IntOrList] = None,
                 **unsupported: Any):
        check_reference_state(unsupported)
        if unsupported:
            raise TypeError(f"SepCache got unsupported arguments {sorted(unsupported)}")
        check_layout(_rope_unsqueeze_dim=_rope_unsqueeze_dim, _rope_seq_dim=_rope_seq_dim, k_seq_dim=k_seq_dim,
                     v_seq_dim=v_seq_dim)
        if SEP_PADDING_IN_BATCH:
            warnings.warn("SepCache: SEP_PADDING_IN_BATCH has no effect here: every row keeps its own separators "
                          "(ragged rows with a validity mask), so rows are neither padded with filler tokens nor "
                          "truncated to the batch minimum", UserWarning, stacklevel=2)
        if int(print_KV_inside_per_steps) < 1:
            raise ValueError(f"print_KV_inside_per_steps must be >= 1, got {print_KV_inside_per_steps}")
        if model is not None:
            layer_num = layer_num if layer_num is not None else _num_layers(model)
            model_type = model_type if model_type is not None else getattr(model.config, "model_type", None)
        sizes = {"init_cache_size": init_cache_size, "sep_cache_size": sep_cache_size,
                 "local_size": local_size, "cache_size": cache_size}
        if layer_num is None:
            lens = {len(v) for v in sizes.values() if not isinstance(v, int)}
            if len(lens) > 1:
                raise ValueError(f"per-layer size lists have different lengths: {sizes}")
            layer_num = lens.pop() if lens else None
        if layer_num is None:
            raise ValueError("SepCache needs layer_num (or a model, or per-layer size lists)")
        per_layer = {k: _per_layer(k, v, layer_num) for k, v in sizes.items()}
        if eviction_timing not in EVICTION_TIMINGS:
            raise ValueError(f"eviction_timing must be 'in_update' or 'after_step', got {eviction_timing!r}")
        if prefill_attention not in PREFILL_ATTENTION:
            raise ValueError(f"prefill_attention must be 'full', 'sepllm' or 'stream', got {prefill_attention!r}")
        prefill_windows = (per_layer["local_size"] if prefill_local_size is None
                           else _per_layer("prefill_local_size", prefill_local_size, layer_num))
        layers = []
        for i in range(layer_num):
            a, s, w, c = (per_layer[k][i] for k in ("init_cache_size", "sep_cache_size", "local_size", "cache_size"))
            # the streaming manager's StreamingLLM (after_step, no separators) keeps exactly a + w = c
            check_sizes(i, a, s, w, c, allow_equal=eviction_timing == "after_step" and s == 0)
            if prefill_windows[i] < 1:
                raise ValueError(f"layer {i}: prefill_local_size must be >= 1, got {prefill_windows[i]}")
            layers.append(SepCacheLayer(a, s, w, c, prefill_local_size=prefill_windows[i]))
        super().__init__(layers=layers)
        separators, self.PADDING_ID = resolve_separators(separator_token_ids, PADDING_ID, model_type, tokenizer)
        self.APPLY_PE_SHIFT = bool(APPLY_PE_SHIFT)
        rule = EvictionRule(tuple(separators), accumulate=bool(SEP_ACCUMULATION),
                            cap_separators=bool(USE_MAX_SEP_CACHE), exact_window=bool(exact_window),
                            eviction_timing=eviction_timing)
        # the streamed prefill records key positions per segment when keys are re-encoded
        self.planner = SepCachePlanner(layers, rule, prefill_attention, segment_positions=self.APPLY_PE_SHIFT)
        self.SEP_PADDING_IN_BATCH = bool(SEP_PADDING_IN_BATCH)
        self.PRINT_KV_RATIO_INSIDE = bool(PRINT_KV_RATIO_INSIDE)
        self.print_KV_inside_per_steps = int(print_KV_inside_per_steps)
        self.APPLY_PES_INSIDE = bool(APPLY_PES_INSIDE)
        self.rope_params = RopeParams.from_args(base=base, pe_dim=pe_dim, pe_scaling_factor=pe_scaling_factor,
                                                max_position_embeddings=max_position_embeddings,
                                                partial_rotation_size=partial_rotation_size)
        self.rope_fn: Optional[RopeFn] = None
        self._rope: Optional[_RopeTables] = None
        if self.APPLY_PE_SHIFT and self.APPLY_PES_INSIDE and self.rope_params.explicit:
            self.rope_fn = self.rope_params.rope_fn()     # the reference's own tables, from the given parameters
            self._rope = _RopeTables(self.rope_fn, static=True)
        self.forward_cache_kwarg: Optional[str] = None   # the model forward's cache argument name (bind_model)
        self.steps = 0                                   # forwards fed (for PRINT_KV_RATIO_INSIDE)
        if model is not None:
            self.bind_model(model)

    # ----- configuration helpers -----
    def bind_model(self, model: Any) -> "SepCache":
        """Read the model's rotary settings (needed for ``APPLY_PE_SHIFT``) and check the layer count."""
        n = _num_layers(model)
        if n != len(self.layers):
            raise ValueError(f"SepCache has {len(self.layers)} layers but the model has {n}")
        self.forward_cache_kwarg = cache_kwarg(model)     # read once: inspecting the signature every step is slow
        if self.APPLY_PE_SHIFT and self.rope_fn is None:
            self.rope_fn = rope_fn_from_model(model)
            self.rope_params.check_against(self.rope_fn, model)
            rope_type = str(getattr(find_rotary_module(model), "rope_type", "default"))
            self._rope = _RopeTables(self.rope_fn, static=not ("dynamic" in rope_type or "longrope" in rope_type))
        return self

    # ----- the planner's settings, read-only under the reference's names (the planner holds the one copy) -----
    SEP_ACCUMULATION = _planner_attribute("rule.accumulate")
    USE_MAX_SEP_CACHE = _planner_attribute("rule.cap_separators")
    exact_window = _planner_attribute("rule.exact_window")
    eviction_timing = _planner_attribute("rule.eviction_timing")
    prefill_attention = _planner_attribute("prefill_attention")
    batch_size = _planner_attribute("batch_size")

    @property
    def separator_token_ids(self) -> list[int]:
        return list(self.planner.rule.separator_token_ids)

    # ----- one step: plan (before the forward), update per layer, finish (after it) -----
    def set_step_tokens(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                        followed_by_decode: bool = False) -> torch.Tensor:
        """Declare the ids ``[B, q]`` (and their 0/1 padding mask ``[B, q]``) of the next forward; returns the
        ``position_ids [B, q]`` to pass to the model (each row counts only its real tokens, like HF generate).

        ``followed_by_decode``: the caller promises that the next step (if any) feeds one token (``generate`` after
        the prompt); see :meth:`megatron.sepllm.cache.planner.SepCachePlanner.plan_step`."""
        return self.planner.plan_step(input_ids, attention_mask, followed_by_decode=followed_by_decode)

    # ----- the Cache API -----
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the step's KV, compress per the plan, return the keys/values this step attends."""
        layer = self.layers[layer_idx]
        plan = layer.plan
        if plan is None:
            raise RuntimeError("SepCache.update called without set_step_tokens(ids, attention_mask) for this step; "
                               "use megatron.sepllm.generate / sepllm_forward, which do it for you")
        if key_states.shape[-2] != plan.q_len:
            raise ValueError(f"layer {layer_idx}: got {key_states.shape[-2]} new keys but set_step_tokens declared "
                             f"{plan.q_len} tokens")
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        if self.APPLY_PE_SHIFT:
            if self.rope_fn is None:
                raise RuntimeError("APPLY_PE_SHIFT=True needs the model's rotary settings: "
                                   "call cache.bind_model(model)")
            cos, sin = self._rope.step(key_states, plan.step_positions)
            key_states = unapply_rotary(key_states, cos, sin)     # stored without positional encoding
        layer.keys, layer.values, k_att, v_att = store_step(layer.keys, layer.values, key_states, value_states, plan)
        self.planner.commit(layer_idx)
        if self.APPLY_PE_SHIFT and plan.segments is None:
            valid_att = plan.attended_kind != INVALID
            n_att, q = k_att.shape[-2], plan.q_len
            if bool(valid_att.all()):     # every slot valid: positions 0..n-1, a slice of the table
                cos, sin = self._rope.span(k_att, 0, n_att, k_att.shape[0])
                dst = self._rope.span(k_att, n_att - q, n_att, k_att.shape[0])
            else:
                pos = cache_positions(valid_att)
                cos, sin = self._rope.at(k_att, pos, n_att)
                dst = self._rope.at(k_att, pos[:, -q:], n_att)
            k_att = apply_rotary(k_att, cos, sin)
            layer.query_shift = (self._rope.step(k_att, plan.step_positions), dst)
        return k_att, v_att

    def shift_query(self, layer_idx: int, query_states: torch.Tensor) -> torch.Tensor:
        """Re-rotate the step's queries from their absolute positions to their index in the cache (PE shift)."""
        (cos_s, sin_s), (cos_d, sin_d) = self.layers[layer_idx].query_shift
        return apply_rotary(unapply_rotary(query_states, cos_s, sin_s), cos_d, sin_d)

    def reposition(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [B, H, n, D]`` encoded at positions ``src [B, n]`` to positions ``dst [B, n]``."""
        cos_s, sin_s = self.rope_fn(x, src)
        cos_d, sin_d = self.rope_fn(x, dst)
        return apply_rotary(unapply_rotary(x, cos_s, sin_s), cos_d, sin_d)

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Remove the model's rotary embedding applied at ``positions [B, n]`` from ``x [B, H, n, D]``."""
        cos, sin = self.rope_fn(x, positions)
        return unapply_rotary(x, cos, sin)

    def rope_table(self, x: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` each ``[length, rotary_dim]`` for cache positions ``0..length-1`` (index with ``[B, L]``
        position tensors to get ``[B, L, rotary_dim]``)."""
        cos, sin = self.rope_fn(x, torch.arange(length, device=x.device).unsqueeze(0))
        return cos[0], sin[0]

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Apply the model's rotary embedding at ``positions [B, L]`` to un-rotated ``x [B, H, L, D]``."""
        cos, sin = self.rope_fn(x, positions)
        return apply_rotary(x, cos, sin)

    def step_attention_mask(self, layer_idx: int) -> Optional[torch.Tensor]:
        """Bool ``[B, 1, q, K]`` mask for the keys ``update`` returned this step (None = attend all)."""
        return self.planner.step_attention_mask(layer_idx)

    def finish_step(self) -> None:
        """Drop the per-step plans (called after the forward); print the KV ratio when asked to."""
        self.planner.finish_step()
        self.steps += 1
        if self.PRINT_KV_RATIO_INSIDE and self.steps % self.print_KV_inside_per_steps == 0:
            r = self.retention()
            print(f"SepCache step {self.steps}: KV kept/seen (time-averaged) = "
                  f"{r['time_averaged_kept_over_seen']:.4f}, current = {r['current_kept_over_seen']:.4f}", flush=True)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    def retention(self) -> dict:
        """KV retention of spec §3.4 (see :meth:`megatron.sepllm.cache.planner.SepCachePlanner.retention`)."""
        return self.planner.retention()

    def kv_bytes(self) -> int:
        """Bytes held by the cached keys/values (the memory that SepLLM bounds)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values)
                   if t is not None)

    def layer_contents(self, layer_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids, kind, token_index)`` of one layer, each ``[B, L]``: kind 0 invalid, 1 initial, 2 separator,
        3 local; ``token_index`` is the slot's index among its row's real tokens (-1 for invalid slots)."""
        return self.planner.layer_contents(layer_idx)


def _num_layers(model: Any) -> int:
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(cfg.num_hidden_layers)


def _per_layer(name: str, value: IntOrList, layer_num: int) -> list[int]:
    if isinstance(value, int):
        return [value] * layer_num
    values = [int(v) for v in value]
    if len(values) != layer_num:
        raise ValueError(f"{name} has {len(values)} entries but the model has {layer_num} layers")
    return values

