"""SepCache: a Hugging Face ``Cache`` that keeps, per layer and per batch row, the initial tokens, a bounded set of
separator tokens and a local window (spec §3.4, with the fixes of §7 items 2-7).

Design (what differs from the reference SepCache, and why):

* **Token ids reach the cache before the forward.** In transformers 5.x the attention module calls
  ``cache.update(k, v, layer_idx)`` with no ids, so the caller (``megatron.sepllm.hf.generation``) first calls
  :meth:`SepCache.set_step_tokens` with the step's ids and 2-D attention mask. That call *plans* the step for every
  layer (which slots will be kept, the attention mask the step needs, position ids); ``update`` then applies the plan.
* **Ragged rows with a validity mask.** Each layer stores ``keys/values [B, H, L, D]`` plus ``ids [B, L]`` and a slot
  ``kind [B, L]`` (0 = invalid, 1 = initial, 2 = separator, 3 = local). Rows keep their own slot sets; after a
  compression each row is packed to the right and left-filled with invalid slots up to the batch maximum, so no real
  token is dropped for batch alignment and no pad is ever attended (pads are invalid from the start, taken from the
  attention mask, never from a pad id).
* **Initial tokens** are each row's first ``init_cache_size`` *valid* tokens (left padding aware, spec §1.4 done with
  the mask instead of the pad id).
* **Bound (the reference's).** A decode step (one query) compresses inside ``update``, before attention, when the
  stored length after appending its token reaches ``cache_size`` (or, with ``exact_window=True``, when a row holds
  more than ``local_size`` local tokens), leaving ``a + |seps| + w <= a + s + w < cache_size``: a decode query attends
  at most ``cache_size - 1`` keys and the stored length between decode steps stays below ``cache_size``.
  ``eviction_timing="after_step"`` reproduces the streaming manager instead (spec §3.2, §7 item 6): the cache is
  compressed when it exceeds ``cache_size``, at the start of the next step, so a decode query sees at most
  ``cache_size + 1`` keys (the reference streaming-perplexity numbers were measured that way).
  A multi-token step (prompt, chunk) is never compressed, as in the reference: it attends the stored cache plus its
  own tokens and stores them all; the next decode step compresses. ``set_step_tokens(..., followed_by_decode=True)``
  (``generate``) stores right away what that decode step would keep — identical results, less memory.
  ``prefill_attention="stream"`` instead evicts inside a multi-token step on the token-by-token schedule.
* **Decode semantics.** ``exact_window=False`` (default, the reference SepCache): between compressions the local
  region grows from ``w`` to the budget, so a query sees the kept initial tokens and separators plus *at least* the
  last ``w`` tokens. ``exact_window=True``: the cache is trimmed every step, so a decode query sees exactly
  initial + kept separators + the last ``w`` tokens (the trained SepLLM decode rule of spec §1.3 /
  ``rules.decode_keep_mask``, with at most ``s`` separators).
* **Positional re-encoding** (``APPLY_PE_SHIFT``): keys are stored without rotary embedding and rotated again every
  step with their index among the row's valid slots; the query gets the index of the current token. The rotary tables
  come from the model's own rotary module (``bind_model``), so theta, scaling and partial rotary are the model's
  (or, with ``APPLY_PES_INSIDE`` and explicit ``base``/``pe_dim``, plain RoPE tables from those). Kept on purpose
  where the reference differs: the reference writes the rotated keys back and rotates them again every step, so from
  the second step on its keys carry "original position + slot" instead of "slot"; here the stored keys stay
  un-rotated and each step rotates a copy, matching an independent computation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from megatron.sepllm.attention import rules
from megatron.sepllm.hf.compat import cache_kwarg
from megatron.sepllm.hf.pos_shift import (RopeFn, apply_rotary, cache_positions, find_rotary_module, rope_fn_from_model,
                                      unapply_rotary)
from megatron.sepllm.hf.reference_args import RopeParams, check_layout, check_reference_state
from megatron.sepllm.attention.separator_presets import resolve_separators

IntOrList = Union[int, Sequence[int]]

INVALID, INITIAL, SEPARATOR, LOCAL = 0, 1, 2, 3


@dataclass(frozen=True)
class LayerBudget:
    """The sizes of one layer that a step can change, and its compression count. The reference's no-max-sep mode
    grows the separator and cache budgets together by the excess; planners return a new budget (never write one)."""

    sep_cache_size: int
    cache_size: int
    num_compressions: int = 0

    def after_compression(self, separators_kept: int, capped: bool) -> "LayerBudget":
        """The budget after one compression that kept ``separators_kept`` separators in some row."""
        grow = 0 if capped else max(0, separators_kept - self.sep_cache_size)
        return LayerBudget(self.sep_cache_size + grow, self.cache_size + grow, self.num_compressions + 1)


@dataclass
class _StepPlan:
    """What one layer does in the current step (computed by ``set_step_tokens``, applied by ``update``)."""

    ids_app: torch.Tensor           # [B, L_old + q] ids after appending
    kind_app: torch.Tensor          # [B, L_old + q]
    pre_gather_idx: Optional[torch.Tensor]   # eviction_timing="after_step": compression of the stored slots
    gather_idx: Optional[torch.Tensor]   # [B, L_new] indices into the appended storage (None: no compression)
    kind_new: torch.Tensor          # [B, L_new] kinds after compression (== kind_app when no compression)
    ids_new: torch.Tensor
    pos_new: torch.Tensor           # [B, L_new] token index of each slot in its row (-1 = invalid)
    attend_compressed: bool         # decode: attend the compressed storage; multi-token: attend the appended one
    attn_mask: Optional[torch.Tensor]    # bool [B, 1, q, K] for the keys attended (None: all visible, no mask)
    step_positions: torch.Tensor    # [B, q] absolute positions the model rotates new keys/queries with
    q_len: int
    # prefill_attention="stream" with APPLY_PE_SHIFT: (q_start, q_end, key_positions [B, K], query_positions [B, n])
    segments: Optional[list] = None
    # a multi-token step stored what the next decode step's compression keeps (retention counts the appended slots,
    # which is what the reference holds after such a step)
    early_compression: bool = False
    kept_count: Optional[int] = None    # valid slots kept after the step (filled by the first layer's update)
    # decode fast path (batch 1, canonical layout): the new storage is old[a:b] for each (a, b), then the new token
    keep_slices: Optional[list] = None
    budget: Optional[LayerBudget] = None    # the layer's budget after this step (None: unchanged)


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


class SepCacheLayer(CacheLayerMixin):
    """One layer of :class:`SepCache`. Sizes are this layer's ``a, s, w, c``; the ids/kinds travel with the KV."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, init_cache_size: int, sep_cache_size: int, local_size: int, cache_size: int,
                 prefill_local_size: Optional[int] = None):
        super().__init__()
        self.init_cache_size, self.local_size = int(init_cache_size), int(local_size)
        # the window of a multi-token step under prefill_attention="sepllm" (a model's prefill window)
        self.prefill_local_size = self.local_size if prefill_local_size is None else int(prefill_local_size)
        self.budget = LayerBudget(int(sep_cache_size), int(cache_size))
        # layers created with equal sizes evolve identically (same ids, same rule): they share one step plan
        self.size_key = (self.init_cache_size, self.sep_cache_size, self.local_size, self.cache_size,
                         self.prefill_local_size)
        self.ids: Optional[torch.Tensor] = None
        self.kind: Optional[torch.Tensor] = None
        self.pos: Optional[torch.Tensor] = None
        self.plan: Optional[_StepPlan] = None
        self.kept_total = 0      # sum over updates of valid kept tokens (all rows)
        self.seen_total = 0      # sum over updates of valid seen tokens (all rows)
        self.last_kept = 0
        # batch-1 decode fast path: (n_initial, n_separator, n_local) when the stored kinds are exactly
        # INITIAL * n_initial ++ SEPARATOR * n_separator ++ LOCAL * n_local (no invalid slot); None = unknown
        self.layout: Optional[tuple[int, int, int]] = None

    @property
    def sep_cache_size(self) -> int:
        return self.budget.sep_cache_size

    @property
    def cache_size(self) -> int:
        return self.budget.cache_size

    @property
    def num_compressions(self) -> int:
        return self.budget.num_compressions

    # ----- CacheLayerMixin interface -----
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_zeros((b, h, 0, d))
        self.values = value_states.new_zeros((b, value_states.shape[1], 0, value_states.shape[-1]))
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return 0 if self.kind is None else int(self.kind.shape[-1])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def valid(self) -> torch.Tensor:
        """``[B, L]`` bool: which stored slots hold a real token."""
        return self.kind != INVALID

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("SepCacheLayer.update is driven by SepCache.update (it needs the step plan)")

    def reset(self) -> None:
        self.keys = self.values = self.ids = self.kind = self.pos = None
        self.plan = None
        self.layout = None
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
            mask over the step, spec §1.3, with window ``prefill_local_size``), or ``"stream"`` (each query sees exactly what token-by-token feeding
            would show it: chunked streaming equals token-by-token streaming). Masked modes build a bool
            ``[B, q, cached + q]`` mask, so feed very long inputs in chunks.
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

    Use it through :func:`megatron.sepllm.hf.generation.generate` or :func:`megatron.sepllm.hf.generation.sepllm_forward`,
    which call :meth:`set_step_tokens` before each forward and route attention through the per-layer masks.
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
        if eviction_timing not in ("in_update", "after_step"):
            raise ValueError(f"eviction_timing must be 'in_update' or 'after_step', got {eviction_timing!r}")
        if prefill_attention not in ("full", "sepllm", "stream"):
            raise ValueError(f"prefill_attention must be 'full', 'sepllm' or 'stream', got {prefill_attention!r}")
        prefill_windows = (per_layer["local_size"] if prefill_local_size is None
                           else _per_layer("prefill_local_size", prefill_local_size, layer_num))
        layers = []
        for i in range(layer_num):
            a, s, w, c = (per_layer[k][i] for k in ("init_cache_size", "sep_cache_size", "local_size", "cache_size"))
            # the streaming manager's StreamingLLM (after_step, no separators) keeps exactly a + w = c
            _check_sizes(i, a, s, w, c, allow_equal=eviction_timing == "after_step" and s == 0)
            if prefill_windows[i] < 1:
                raise ValueError(f"layer {i}: prefill_local_size must be >= 1, got {prefill_windows[i]}")
            layers.append(SepCacheLayer(a, s, w, c, prefill_local_size=prefill_windows[i]))
        super().__init__(layers=layers)
        self.separator_token_ids, self.PADDING_ID = resolve_separators(separator_token_ids, PADDING_ID, model_type,
                                                                       tokenizer)
        self._separator_set = frozenset(int(t) for t in self.separator_token_ids)
        self._kinds: dict = {}      # canonical layout -> kinds tensor (decode fast path)
        self.SEP_ACCUMULATION = bool(SEP_ACCUMULATION)
        self.USE_MAX_SEP_CACHE = bool(USE_MAX_SEP_CACHE)
        self.APPLY_PE_SHIFT = bool(APPLY_PE_SHIFT)
        self.exact_window = bool(exact_window)
        self.prefill_attention = prefill_attention
        self.eviction_timing = eviction_timing
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
        self.valid_seen: Optional[torch.Tensor] = None   # [B] number of real tokens seen per row
        self.tokens_seen = 0                             # number of token slots fed per row (padding included)
        self.seen_sum = 0                                # valid_seen.sum() as an int (set once per step)
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

    @property
    def batch_size(self) -> int:
        return -1 if self.valid_seen is None else int(self.valid_seen.shape[0])

    # ----- step planning -----
    def set_step_tokens(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                        followed_by_decode: bool = False) -> torch.Tensor:
        """Declare the ids ``[B, q]`` (and their 0/1 padding mask ``[B, q]``) of the next forward; returns the
        ``position_ids [B, q]`` to pass to the model (each row counts only its real tokens, like HF generate).

        ``followed_by_decode``: the caller promises that the next step (if any) feeds one token (``generate`` after
        the prompt). A multi-token step is never compressed (reference), but with this promise it may store right
        away what the next decode step's compression would keep — identical results, less memory in between."""
        if input_ids.dim() != 2:
            raise ValueError(f"set_step_tokens expects input_ids [B, q], got shape {tuple(input_ids.shape)}")
        bsz, q = input_ids.shape
        device = input_ids.device
        new_valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                     else attention_mask.to(device=device, dtype=torch.bool))
        if new_valid.shape != input_ids.shape:
            raise ValueError(f"attention_mask for the step must be [B, q] = {tuple(input_ids.shape)}, got "
                             f"{tuple(new_valid.shape)} (pass only the new tokens' mask)")
        if self.valid_seen is None:
            self.valid_seen = torch.zeros(bsz, dtype=torch.long, device=device)
        elif self.valid_seen.shape[0] != bsz:
            raise ValueError(f"batch size changed from {self.valid_seen.shape[0]} to {bsz}; start a new SepCache")
        if any(layer.plan is not None for layer in self.layers):
            raise RuntimeError("set_step_tokens called twice without a forward pass in between")
        if q == 1 and bsz == 1 and self._plan_decode_fast(input_ids, new_valid, attention_mask is not None):
            return self._fast_positions
        # Padding may only lead a row: a pad after a real token would break the left-packed layout.
        seen_before = self.valid_seen.unsqueeze(1) > 0
        after_real = torch.cumsum(new_valid.to(torch.long), dim=-1) > 0
        after_real = torch.cat([torch.zeros_like(after_real[:, :1]), after_real[:, :-1]], dim=-1) | seen_before
        if bool((after_real & ~new_valid).any()):
            raise ValueError("attention_mask has a 0 after a real token in some row: SepCache supports left padding "
                             "only (pad the prompt on the left)")
        count = self.valid_seen.unsqueeze(1) + torch.cumsum(new_valid.to(torch.long), dim=-1)   # [B, q]
        positions = torch.where(new_valid, count - 1, torch.ones_like(count))                 # HF convention
        token_index = torch.where(new_valid, count - 1, torch.full_like(count, -1))
        planned: dict = {}   # layers with equal sizes hold equal token sets: plan once, share the plan
        for layer in self.layers:
            key = layer.size_key
            if key in planned:
                first = planned[key]
                layer.plan, layer.budget, layer.layout = first.plan, first.budget, None
                continue
            kind_new_tok = torch.where(new_valid, torch.where(count <= layer.init_cache_size,
                                                              torch.full_like(count, INITIAL),
                                                              torch.full_like(count, LOCAL)),
                                       torch.zeros_like(count)).to(torch.int8)
            if q > 1 and self.prefill_attention == "stream":
                layer.plan = self._plan_stream(layer, input_ids, kind_new_tok, positions, token_index)
            else:
                layer.plan = self._plan_layer(layer, input_ids, kind_new_tok, positions, token_index,
                                              followed_by_decode=followed_by_decode and q > 1)
            layer.budget, layer.layout = layer.plan.budget, None
            planned[key] = layer
        self.valid_seen = count[:, -1].clone()
        self.seen_sum = int(self.valid_seen.sum())
        self.tokens_seen += q
        return positions

    def _plan_decode_fast(self, input_ids: torch.Tensor, new_valid: torch.Tensor, masked: bool) -> bool:
        """Plan a batch-1 one-token step without the general planner, when the outcome is cheap to state: the
        stored kinds are INITIAL* SEPARATOR* LOCAL* (all valid) and the step either only appends, or (exact
        window, accumulated separators) drops the oldest local token — keeping it as a separator if it is one —
        and the oldest separators over the cap. Same kept slots, order and counters as ``_compress_indices``
        (tests compare both paths); returns False (nothing changed) whenever another case applies."""
        if self.eviction_timing != "in_update" or self.layers[0].ids is None:
            return False
        if masked and not bool(new_valid.all()):
            return False
        seen = int(self.valid_seen[0])
        for layer in self.layers:      # check every layer first: all or none take the fast path
            if layer.layout is None:
                layer.layout = _canonical_layout(layer.kind)
            if layer.layout is None:
                return False
        positions = self.valid_seen.view(1, 1).clone()
        new_initial = seen + 1 <= self.layers[0].init_cache_size
        dev = input_ids.device
        planned: dict = {}
        plans = []
        for layer in self.layers:
            key = (layer.size_key, layer.layout)
            if key in planned:
                plans.append((layer, planned[key]))
                continue
            n_init, n_sep, n_local = layer.layout
            length = n_init + n_sep + n_local
            is_initial = seen + 1 <= layer.init_cache_size
            if is_initial != new_initial or (is_initial and n_sep + n_local):
                return False
            new_layout = (n_init + 1, n_sep, n_local) if is_initial else (n_init, n_sep, n_local + 1)
            slices = [(0, length)]
            budget = layer.budget
            if self.exact_window:
                if new_layout[2] > layer.local_size:
                    if new_layout[2] != layer.local_size + 1 or not self.SEP_ACCUMULATION:
                        return False
                    leaving = n_init + n_sep
                    is_sep = int(layer.ids[0, leaving]) in self._separator_set
                    n_cand = n_sep + (1 if is_sep else 0)
                    drop = max(0, n_cand - budget.sep_cache_size) if self.USE_MAX_SEP_CACHE else 0
                    budget = budget.after_compression(n_cand, capped=self.USE_MAX_SEP_CACHE)
                    keep_sep_end = leaving + 1 if is_sep else leaving     # separators are n_init..keep_sep_end
                    slices = [(0, n_init), (n_init + drop, keep_sep_end), (leaving + 1, length)]
                    slices = [(a, b) for a, b in slices if b > a]
                    new_layout = (n_init, n_cand - drop, layer.local_size)
            elif length + 1 >= layer.cache_size:
                return False
            planned[key] = (slices, new_layout, budget)
            plans.append((layer, planned[key]))
        built: dict = {}     # one plan per group of layers holding equal slots
        for layer, group in plans:
            slices, new_layout, budget = group
            plan = built.get(id(group))
            if plan is None:
                ids_new = _cat_slices(layer.ids, slices, input_ids)
                kind_new = self._kind_table(new_layout, dev)
                plan = built[id(group)] = _StepPlan(
                    ids_app=ids_new, kind_app=kind_new, pre_gather_idx=None, gather_idx=None, kind_new=kind_new,
                    ids_new=ids_new, pos_new=_cat_slices(layer.pos, slices, positions), attend_compressed=True,
                    attn_mask=None, step_positions=positions, q_len=1, kept_count=sum(new_layout),
                    keep_slices=slices, budget=budget)
            layer.plan, layer.layout, layer.budget = plan, new_layout, budget
        self.valid_seen = self.valid_seen + 1
        self.seen_sum = seen + 1
        self.tokens_seen += 1
        self._fast_positions = positions
        return True

    def _kind_table(self, layout: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """``[1, L]`` kinds of a canonical layout, built once per layout (never written in place)."""
        kind = self._kinds.get(layout)
        if kind is None or kind.device != device:
            n_init, n_sep, n_local = layout
            kind = torch.tensor([[INITIAL] * n_init + [SEPARATOR] * n_sep + [LOCAL] * n_local], dtype=torch.int8,
                                device=device)
            self._kinds[layout] = kind
        return kind

    def _needs_compression(self, layer: SepCacheLayer, budget: LayerBudget, kind: torch.Tensor,
                           extra: int = 0) -> bool:
        """Would the stored slots ``kind`` (plus ``extra`` tokens still to come) be compressed under ``budget``?

        ``in_update`` (the reference SepCache): when the stored length reaches ``cache_size``, so a decode query sees
        at most ``cache_size - 1`` keys. ``after_step`` (the streaming manager): when it exceeds ``cache_size``."""
        if self.exact_window:
            return bool(((kind == LOCAL).sum(-1) + extra > layer.local_size).any())
        if self.eviction_timing == "after_step":
            return kind.shape[-1] + extra > budget.cache_size
        return kind.shape[-1] + extra >= budget.cache_size

    def _compress_meta(self, layer: SepCacheLayer, budget: LayerBudget, ids: torch.Tensor, kind: torch.Tensor,
                       pos: torch.Tensor, window: Optional[int] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LayerBudget]:
        idx, kind_new, budget = self._compress_indices(layer, budget, ids, kind, window)
        pos_new = torch.where(kind_new != INVALID, pos.gather(1, idx), torch.full_like(idx, -1))
        return idx, kind_new, ids.gather(1, idx), pos_new, budget

    def _plan_layer(self, layer: SepCacheLayer, ids: torch.Tensor, kind_tok: torch.Tensor, positions: torch.Tensor,
                    token_index: torch.Tensor, followed_by_decode: bool = False) -> _StepPlan:
        bsz, q = ids.shape
        pre_idx = None
        budget = layer.budget
        if layer.ids is None:
            ids_app, kind_app, pos_app = ids, kind_tok, token_index
        else:
            ids_old, kind_old, pos_old = layer.ids, layer.kind, layer.pos
            if self.eviction_timing == "after_step" and self._needs_compression(layer, budget, kind_old):
                # streaming-manager timing: the previous step's overflow is evicted now, before the new token
                pre_idx, kind_old, ids_old, pos_old, budget = self._compress_meta(layer, budget, ids_old, kind_old,
                                                                                  pos_old)
            ids_app, kind_app = torch.cat([ids_old, ids], dim=-1), torch.cat([kind_old, kind_tok], dim=-1)
            pos_app = torch.cat([pos_old, token_index], dim=-1)
        l_app = ids_app.shape[-1]
        gather_idx = None
        kind_new, ids_new, pos_new = kind_app, ids_app, pos_app
        early = False
        if self.eviction_timing == "in_update":
            if q == 1:
                if self._needs_compression(layer, budget, kind_app):
                    gather_idx, kind_new, ids_new, pos_new, budget = self._compress_meta(layer, budget, ids_app,
                                                                                         kind_app, pos_app)
            elif followed_by_decode and self._needs_compression(layer, budget, kind_app, extra=1):
                # The reference never compresses a multi-token step; the decode step after it compresses
                # ``stored + token``. Keeping the window one short now stores exactly what that compression keeps
                # (same leaving tokens, same separators, same budget growth); the decode step then appends its token
                # without compressing. Same kept sets and logits at every step, less memory from here on.
                gather_idx, kind_new, ids_new, pos_new, budget = self._compress_meta(
                    layer, budget, ids_app, kind_app, pos_app, window=layer.local_size - 1)
                early = True
        attend_compressed = q == 1
        if attend_compressed:
            valid_k = kind_new != INVALID
            attn_mask = None if bool(valid_k.all()) else valid_k[:, None, None, :]
        else:
            valid_k = kind_app != INVALID
            l_old = l_app - q
            if self.prefill_attention == "sepllm":
                global_keys = (kind_app == INITIAL) | (kind_app == SEPARATOR) | rules.separator_bitmap(
                    ids_app, self.separator_token_ids)
                allowed = rules.allowed_mask(global_keys, layer.prefill_local_size, q_offset=l_old, q_len=q,
                                             key_valid=valid_k)
            elif l_old == 0 and bool(valid_k.all()):
                allowed = None       # a plain causal prompt: SDPA's is_causal path, no [B, q, q] mask
            else:
                causal = rules.causal_band(q, l_app, device=ids.device, q_offset=l_old)
                allowed = causal.unsqueeze(0) & valid_k.unsqueeze(1)
            if allowed is None:
                attn_mask = None
            else:
                # a fully padded query row would have no key: let it see itself (its output is never used)
                diag = torch.zeros_like(allowed)
                ar = torch.arange(q, device=ids.device)
                diag[:, ar, l_old + ar] = True
                allowed = allowed | (diag & ~allowed.any(-1, keepdim=True))
                attn_mask = allowed.unsqueeze(1)
        return _StepPlan(ids_app=ids_app, kind_app=kind_app, pre_gather_idx=pre_idx, gather_idx=gather_idx,
                         kind_new=kind_new, ids_new=ids_new, pos_new=pos_new, attend_compressed=attend_compressed,
                         attn_mask=attn_mask, step_positions=positions, q_len=q, early_compression=early,
                         budget=budget)

    def _plan_stream(self, layer: SepCacheLayer, ids: torch.Tensor, kind_tok: torch.Tensor, positions: torch.Tensor,
                     token_index: torch.Tensor) -> _StepPlan:
        """Multi-token step where query ``i`` sees exactly the keys it would see if the tokens were fed one at a time
        (same compression schedule, same timing): chunked streaming == token-by-token streaming, with one forward.

        The cache state is followed as slot references into the appended storage ``old ++ new``; between two
        compressions the visible set only grows, so rows are filled a segment at a time.
        """
        bsz, q = ids.shape
        dev = ids.device
        budget = layer.budget
        if layer.ids is None:
            ref = torch.zeros(bsz, 0, dtype=torch.long, device=dev)
            kind = torch.zeros(bsz, 0, dtype=torch.int8, device=dev)
            cur_ids = ids[:, :0]
            pos_app, l_old = token_index, 0
        else:
            l_old = layer.ids.shape[-1]
            ref = torch.arange(l_old, device=dev).unsqueeze(0).expand(bsz, -1)
            kind, cur_ids = layer.kind, layer.ids
            pos_app = torch.cat([layer.pos, token_index], dim=-1)
        ids_app = torch.cat([cur_ids, ids], dim=-1) if l_old else ids
        l_app = l_old + q
        allowed = torch.zeros(bsz, q, l_app, dtype=torch.bool, device=dev)
        tri = torch.ones(q, q, dtype=torch.bool, device=dev).tril()
        new_valid = kind_tok != INVALID
        after = self.eviction_timing == "after_step"

        segments: Optional[list] = [] if self.APPLY_PE_SHIFT else None

        def compress(ref, kind, cur_ids, budget):
            idx, kind_c, budget = self._compress_indices(layer, budget, cur_ids, kind)
            return ref.gather(1, idx), kind_c, cur_ids.gather(1, idx), budget

        def record(start: int, n: int, ref: torch.Tensor, kind: torch.Tensor) -> None:
            # positions are indices among the visible cache state; constant while the state only grows
            key_pos = torch.zeros(bsz, l_app, dtype=torch.long, device=dev)
            key_pos.scatter_(1, ref, cache_positions(kind != INVALID))
            segments.append((start, start + n, key_pos, key_pos[:, l_old + start:l_old + start + n]))

        i = 0
        while i < q:
            if after and self._needs_compression(layer, budget, kind):
                ref, kind, cur_ids, budget = compress(ref, kind, cur_ids, budget)
            if self.exact_window:
                n = 1
            elif after:
                n = max(1, budget.cache_size + 1 - kind.shape[-1])
            else:   # in_update: tokens up to a stored length of cache_size - 1 need no compression
                n = budget.cache_size - 1 - kind.shape[-1]
            n = min(n, q - i)
            if n <= 0:     # in_update: this token's append triggers compression before its own attention
                n = 1
            visible = torch.zeros(bsz, l_app, dtype=torch.bool, device=dev)
            visible.scatter_(1, ref, kind != INVALID)
            rows = allowed[:, i:i + n]
            rows |= visible.unsqueeze(1)
            rows[:, :, l_old + i:l_old + i + n] |= tri[:n, :n].unsqueeze(0) & new_valid[:, None, i:i + n]
            ref = torch.cat([ref, torch.arange(l_old + i, l_old + i + n, device=dev).unsqueeze(0).expand(bsz, -1)], -1)
            kind = torch.cat([kind, kind_tok[:, i:i + n]], dim=-1)
            cur_ids = torch.cat([cur_ids, ids[:, i:i + n]], dim=-1)
            if not after and self._needs_compression(layer, budget, kind):
                if n != 1:
                    raise AssertionError("segment overran the compression point")
                ref, kind, cur_ids, budget = compress(ref, kind, cur_ids, budget)
                visible = torch.zeros(bsz, l_app, dtype=torch.bool, device=dev)
                visible.scatter_(1, ref, kind != INVALID)
                allowed[:, i] = visible
            if segments is not None:
                record(i, n, ref, kind)
            i += n
        diag = torch.zeros_like(allowed)
        ar = torch.arange(q, device=dev)
        diag[:, ar, l_old + ar] = True
        allowed = allowed | (diag & ~allowed.any(-1, keepdim=True))
        pos_new = torch.where(kind != INVALID, pos_app.gather(1, ref), torch.full_like(ref, -1))
        return _StepPlan(ids_app=ids_app, kind_app=torch.cat([layer.kind, kind_tok], -1) if l_old else kind_tok,
                         pre_gather_idx=None, gather_idx=ref, kind_new=kind, ids_new=cur_ids, pos_new=pos_new,
                         attend_compressed=False, attn_mask=allowed.unsqueeze(1), step_positions=positions, q_len=q,
                         segments=segments, budget=budget)

    def _compress_indices(self, layer: SepCacheLayer, budget: LayerBudget, ids: torch.Tensor, kind: torch.Tensor,
                          window: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, LayerBudget]:
        """Per-row keep decision (initial -> separators -> last ``w`` local), packed right, left-filled invalid;
        returns the gather index, the new kinds and the budget after this compression (pure: nothing is written)."""
        w = layer.local_size if window is None else window
        s = budget.sep_cache_size
        is_local = kind == LOCAL
        local_rank = is_local.flip(-1).to(torch.long).cumsum(-1).flip(-1)      # 1 = most recent local slot
        in_window = is_local & (local_rank <= w)
        leaving = is_local & ~in_window
        new_seps = leaving & rules.separator_bitmap(ids, self.separator_token_ids)
        candidates = new_seps | (kind == SEPARATOR) if self.SEP_ACCUMULATION else new_seps
        if self.USE_MAX_SEP_CACHE:
            sep_rank = candidates.flip(-1).to(torch.long).cumsum(-1).flip(-1)   # keep the most recent s
            keep_sep = candidates & (sep_rank <= s)
            budget = budget.after_compression(s, capped=True)
        else:   # reference behaviour: the separator budget and the cache budget grow by the excess
            keep_sep = candidates
            budget = budget.after_compression(int(candidates.sum(-1).max()), capped=False)
        keep = (kind == INITIAL) | keep_sep | in_window
        new_kind = torch.where(kind == INITIAL, kind, torch.where(
            keep_sep, torch.full_like(kind, SEPARATOR), torch.where(in_window, kind, torch.zeros_like(kind))))
        n_keep = keep.sum(-1)
        l_new = int(n_keep.max())
        dest = (l_new - n_keep).unsqueeze(1) + keep.to(torch.long).cumsum(-1) - 1
        rows, cols = keep.nonzero(as_tuple=True)
        idx = torch.zeros(kind.shape[0], l_new, dtype=torch.long, device=kind.device)
        idx[rows, dest[rows, cols]] = cols
        slot = torch.arange(l_new, device=kind.device).unsqueeze(0)
        valid_new = slot >= (l_new - n_keep).unsqueeze(1)
        kind_out = torch.where(valid_new, new_kind.gather(1, idx), torch.zeros_like(idx, dtype=kind.dtype))
        return idx, kind_out, budget

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
        if plan.keep_slices is not None:     # decode fast path: one copy, straight into the new storage
            layer.keys = _cat_slices(layer.keys, plan.keep_slices, key_states, dim=-2)
            layer.values = _cat_slices(layer.values, plan.keep_slices, value_states, dim=-2)
            keys_app, values_app = layer.keys, layer.values
        elif plan.pre_gather_idx is not None:
            layer.keys, layer.values = _gather_slots(layer.keys, plan.pre_gather_idx), _gather_slots(
                layer.values, plan.pre_gather_idx)
        if plan.keep_slices is None:
            keys_app = torch.cat([layer.keys, key_states], dim=-2)
            values_app = torch.cat([layer.values, value_states], dim=-2)
            if plan.gather_idx is not None:
                layer.keys, layer.values = _gather_slots(keys_app, plan.gather_idx), _gather_slots(values_app,
                                                                                                  plan.gather_idx)
            else:
                layer.keys, layer.values = keys_app, values_app
        layer.ids, layer.kind, layer.pos = plan.ids_new, plan.kind_new, plan.pos_new
        if plan.attend_compressed:
            k_att, v_att, kind_att = layer.keys, layer.values, plan.kind_new
        else:
            k_att, v_att, kind_att = keys_app, values_app, plan.kind_app
        if plan.kept_count is None:      # one count per plan (layers with equal sizes share it)
            plan.kept_count = int(((plan.kind_app if plan.early_compression else plan.kind_new) != INVALID).sum())
        layer.last_kept = plan.kept_count
        layer.kept_total += layer.last_kept
        layer.seen_total += self.seen_sum
        if self.APPLY_PE_SHIFT and plan.segments is None:
            valid_att = kind_att != INVALID
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
        plan = self.layers[layer_idx].plan
        if plan is None:
            raise RuntimeError(f"no step planned for layer {layer_idx}")
        return plan.attn_mask

    def finish_step(self) -> None:
        """Drop the per-step plans (called after the forward); print the KV ratio when asked to."""
        for layer in self.layers:
            layer.plan = None
        self.steps += 1
        if self.PRINT_KV_RATIO_INSIDE and self.steps % self.print_KV_inside_per_steps == 0:
            r = self.retention()
            print(f"SepCache step {self.steps}: KV kept/seen (time-averaged) = "
                  f"{r['time_averaged_kept_over_seen']:.4f}, current = {r['current_kept_over_seen']:.4f}", flush=True)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    def retention(self) -> dict:
        """KV retention of spec §3.4, summed over layers and rows.

        ``time_averaged_kept_over_seen``: sum over every update of (real tokens kept after the update) divided by the
        sum of (real tokens seen so far) — the reference SepCache statistic. ``current_kept_over_seen``: the same for
        the latest update only. Padding is never counted (neither kept nor seen).
        """
        kept = sum(layer.kept_total for layer in self.layers)
        seen = sum(layer.seen_total for layer in self.layers)
        last_kept = sum(layer.last_kept for layer in self.layers)
        last_seen = len(self.layers) * (0 if self.valid_seen is None else int(self.valid_seen.sum()))
        return {
            "time_averaged_kept_over_seen": kept / seen if seen else 0.0,
            "current_kept_over_seen": last_kept / last_seen if last_seen else 0.0,
            "kept_tokens_per_layer": [layer.last_kept for layer in self.layers],
            "seen_tokens_per_row": [] if self.valid_seen is None else self.valid_seen.tolist(),
            "compressions_per_layer": [layer.num_compressions for layer in self.layers],
        }

    def kv_bytes(self) -> int:
        """Bytes held by the cached keys/values (the memory that SepLLM bounds)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values)
                   if t is not None)

    def layer_contents(self, layer_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids, kind, token_index)`` of one layer, each ``[B, L]``: kind 0 invalid, 1 initial, 2 separator,
        3 local; ``token_index`` is the slot's index among its row's real tokens (-1 for invalid slots)."""
        layer = self.layers[layer_idx]
        return layer.ids, layer.kind, layer.pos


def _gather_slots(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [B, H, L, D]`` gathered along L with per-row indices ``idx [B, L']``."""
    if idx.shape[0] == 1:   # batch 1: a plain index_select is cheaper than gather
        return x.index_select(2, idx[0])
    return x.gather(2, idx[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))


def _canonical_layout(kind: torch.Tensor) -> Optional[tuple[int, int, int]]:
    """``(n_initial, n_separator, n_local)`` if batch-1 ``kind [1, L]`` is INITIAL* SEPARATOR* LOCAL*, else None."""
    if kind.shape[0] != 1:
        return None
    values = kind[0].tolist()
    if any(b < a for a, b in zip(values, values[1:])) or (values and values[0] == INVALID):
        return None
    return values.count(INITIAL), values.count(SEPARATOR), values.count(LOCAL)


def _cat_slices(x: torch.Tensor, slices: list, tail: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x``'s slices ``[a, b)`` along ``dim`` followed by ``tail`` (one copy)."""
    if dim == -1:
        parts = [x[..., a:b] for a, b in slices]
    else:
        parts = [x[:, :, a:b] for a, b in slices]
    return torch.cat(parts + [tail], dim=dim)


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


def _check_sizes(layer: int, a: int, s: int, w: int, c: int, allow_equal: bool = False) -> None:
    if a < 0 or s < 0 or w < 1:
        raise ValueError(f"layer {layer}: need init_cache_size >= 0, sep_cache_size >= 0, local_size >= 1; "
                         f"got a={a}, s={s}, w={w}")
    if a + s + w > c or (a + s + w == c and not allow_equal):
        raise ValueError(f"layer {layer}: cache_size={c} must be > init_cache_size + sep_cache_size + local_size = "
                         f"{a}+{s}+{w}={a + s + w} (the reference requires a + s + w < c: the cache compresses when "
                         f"it reaches c and keeps at most a + s + w)")
