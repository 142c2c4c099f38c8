"""Training-free SepLLM on Hugging Face decoders through a mask (spec §3.1, §4.2): ``apply_sepllm(model, cfg)``.

How it attaches, per model and reversibly (no transformers class is patched):

* two attention functions are registered with transformers' ``AttentionInterface`` (``"sepllm_mask_sdpa"`` and
  ``"sepllm_mask_eager"``) and the model is switched to one of them with ``set_attn_implementation``. They are
  deliberately NOT registered as mask functions, so transformers builds no mask of its own for them;
* the model instance's ``forward`` is wrapped: before each call the wrapper appends the step's token ids to the
  history it tracks for the sequence (state lives on the handle, one sequence batch at a time), builds the SepLLM mask
  of every distinct (window, FixLLM interval) pattern from ``megatron.sepllm.attention.rules`` and hands the per-layer masks to
  the attention functions as the per-call kwarg ``sepllm_mask_plan``;
* prefill (query length > 1) uses the per-layer prefill windows over the prompt; a decode step (query length 1) uses
  the per-layer generate windows over the WHOLE history with the padding fix of spec §7 item 1:
  ``valid AND (separator OR initial OR in_window)``. Pad counts for ``BATCH_ADAPTIVE_INIT_POS`` come from the 2-D
  attention mask, never from ``PADDING_ID``.

All KV stay in the ordinary HF cache (the "Fundamental Design"): this path reproduces the sparsity pattern, it does
not save memory; SepCache (``megatron.sepllm.hf.cache``) is the memory-saving path.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch

from megatron.config.sepllm import SepLLMConfig
from megatron.errors import RunError
from megatron.sepllm.attention import rules
from megatron.sepllm.hf.config import (TrainingFreeSettings, load_trainingfree_config, resolve_for_model,
                                       sepllm_config_from_model)
from megatron.sepllm.hf.compat import CACHE_NAMES, output_cache
from megatron.sepllm.hf.retention import RetentionMeter, _Counts

ATTN_SDPA = "sepllm_mask_sdpa"
ATTN_EAGER = "sepllm_mask_eager"
PLAN_KWARG = "sepllm_mask_plan"
_HANDLE_ATTR = "_sepllm_mask_handle"


class SepLLMRuntimeError(RunError, RuntimeError):
    """The mask path was driven in a way it cannot serve (no token ids, a foreign cache, a 4-D mask, ...)."""


@dataclass
class MaskPlan:
    """Per-call masks: ``masks[layer]`` is ``[B, 1, Q, K]`` bool (True = attend). Built by the forward wrapper."""

    masks: list[torch.Tensor]

    def mask_for(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None:
            raise SepLLMRuntimeError(f"{type(module).__name__} has no layer_idx; the SepLLM mask path needs it")
        mask = self.masks[layer_idx]
        if mask.shape[-2] != query.shape[-2] or mask.shape[-1] != key.shape[-2]:
            raise SepLLMRuntimeError(
                f"layer {layer_idx}: SepLLM mask is {tuple(mask.shape[-2:])} (queries, keys) but attention sees "
                f"{query.shape[-2]} queries and {key.shape[-2]} keys; the cache does not hold the tracked history "
                "(only full, non-sliding caches are supported)")
        return mask


def _plan_from_kwargs(kwargs: dict) -> MaskPlan:
    plan = kwargs.pop(PLAN_KWARG, None)
    if plan is None:
        raise SepLLMRuntimeError("SepLLM mask attention was called without its per-call masks: call the model "
                                 "returned by apply_sepllm (its forward builds them), not an inner submodule")
    return plan


def sepllm_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                          scaling: Optional[float] = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA with the layer's SepLLM mask (transformers' own mask argument is None for this implementation)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mask = _plan_from_kwargs(kwargs).mask_for(module, query, key)
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  is_causal=False, **kwargs)


def sepllm_eager_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                           scaling: Optional[float] = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax attention with the layer's SepLLM mask; returns the attention weights too."""
    mask = _plan_from_kwargs(kwargs).mask_for(module, query, key)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def register_attention_functions() -> tuple[str, str]:
    """Register both functions with transformers' ``AttentionInterface`` (idempotent); returns their names."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_SDPA, sepllm_sdpa_attention)
    AttentionInterface.register(ATTN_EAGER, sepllm_eager_attention)
    return ATTN_SDPA, ATTN_EAGER


@dataclass
class _History:
    """Token ids and validity of the sequence batch currently in the cache."""

    ids: torch.Tensor           # [B, L]
    valid: torch.Tensor         # [B, L] bool
    pad_counts: Optional[torch.Tensor]   # [B] left pads of the prompt (BATCH_ADAPTIVE_INIT_POS), else None
    cache: Optional[weakref.ref] = None  # the cache object that holds this history's KV

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Follow a beam-search reordering of the cache rows."""
        idx = beam_idx.to(self.ids.device)
        self.ids, self.valid = self.ids.index_select(0, idx), self.valid.index_select(0, idx)
        if self.pad_counts is not None:
            self.pad_counts = self.pad_counts.index_select(0, idx)


class SepLLMHandle:
    """What ``apply_sepllm`` returns: tracks the sequence, builds masks, keeps retention; ``remove()`` undoes it."""

    def __init__(self, model: Any, config: SepLLMConfig, settings: TrainingFreeSettings,
                 attn_impl: Optional[str] = None):
        self.model = model
        self.config = config
        self.settings = settings
        self.meter = RetentionMeter(settings.num_layers, settings.mode)
        self._history: Optional[_History] = None
        self._suspended = 0
        self._installed = False
        self._previous_impl: Optional[str] = None
        self._original_forward = None
        self.attn_name: Optional[str] = None
        if settings.mode != "full":
            self._install(attn_impl)

    # ----- attach / detach -----
    def _install(self, attn_impl: Optional[str]) -> None:
        register_attention_functions()
        previous = self.model.config._attn_implementation
        kind = attn_impl or ("eager" if previous == "eager" else "sdpa")
        if kind not in ("sdpa", "eager"):
            raise ValueError(f"attn_impl={attn_impl!r}: the SepLLM mask path runs on 'sdpa' or 'eager'")
        name = ATTN_SDPA if kind == "sdpa" else ATTN_EAGER
        self.model.set_attn_implementation(name)
        if self.model.config._attn_implementation != name:
            raise SepLLMRuntimeError(f"{type(self.model).__name__} did not accept attention implementation {name!r}; "
                                     "it must dispatch attention through transformers' AttentionInterface")
        self._previous_impl = previous
        self.attn_name = name
        original = self.model.forward
        self._original_forward = original
        signature = inspect.signature(original)
        var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._suspended:
                return original(*args, **kwargs)
            call = dict(signature.bind_partial(*args, **kwargs).arguments)
            if var_kw is not None:
                call.update(call.pop(var_kw, None) or {})
            past = next((call[n] for n in CACHE_NAMES if call.get(n) is not None), None)
            call[PLAN_KWARG] = self._step(call.get("input_ids"), call.get("attention_mask"), past)
            out = original(**call)
            self._bind_cache(output_cache(out))
            return out

        self.model.forward = forward
        setattr(self.model, _HANDLE_ATTR, self)
        self._installed = True

    def remove(self) -> None:
        """Restore the model's forward and attention implementation; the handle keeps its statistics."""
        if not self._installed:
            return
        if self.model.__dict__.get("forward") is not None:
            del self.model.forward
        self.model.set_attn_implementation(self._previous_impl)
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)
        self._installed = False
        self._history = None

    def __enter__(self) -> "SepLLMHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    @property
    def is_suspended(self) -> bool:
        """True inside :meth:`suspended` (the model runs its original forward)."""
        return self._suspended > 0

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Run the model with the original forward (used while another mechanism, e.g. SepCache, drives it)."""
        previous_impl = self.model.config._attn_implementation
        if self._installed and self._previous_impl is not None:
            self.model.set_attn_implementation(self._previous_impl)
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1
            if self._installed:
                self.model.set_attn_implementation(previous_impl)

    # ----- per-call mask construction -----
    def _step(self, input_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
              past_key_values: Any) -> MaskPlan:
        if input_ids is None:
            raise SepLLMRuntimeError("SepLLM needs input_ids: separators and initial tokens are defined on token ids "
                                     "(inputs_embeds alone cannot be served)")
        if input_ids.dim() != 2:
            raise SepLLMRuntimeError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise SepLLMRuntimeError("SepLLM builds its own attention masks; pass a 2-D [batch, seq] padding mask, "
                                     f"got a {attention_mask.dim()}-D mask")
        past_len = 0 if past_key_values is None else int(past_key_values.get_seq_length())
        bsz, q_len = input_ids.shape
        if past_len == 0:
            ids = input_ids
            prev_valid = torch.ones(bsz, 0, dtype=torch.bool, device=input_ids.device)
            pad_counts = None
        else:
            hist = self._continue(past_key_values, past_len, bsz)
            ids = torch.cat([hist.ids, input_ids], dim=1)
            prev_valid = hist.valid
            pad_counts = hist.pad_counts
        total = ids.shape[1]
        if attention_mask is None:
            valid = torch.cat([prev_valid, torch.ones(bsz, q_len, dtype=torch.bool, device=ids.device)], dim=1)
        else:
            if attention_mask.shape != (bsz, total):
                raise SepLLMRuntimeError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                                         f"{(bsz, total)} (batch, cached + new tokens)")
            valid = attention_mask.to(device=ids.device, dtype=torch.bool)
        if past_len == 0:
            self.meter.start_sequence()
            if self.settings.batch_adaptive_init_pos:
                pad_counts = rules.left_pad_counts(valid)
        self._history = _History(ids=ids, valid=valid, pad_counts=pad_counts)
        plan = self._build_plan(ids, valid, pad_counts, past_len)
        if (past_len == 0 and self.settings.print_kv_ratio
                and self.meter.sequences % self.settings.print_ratio_intervals == 0):
            print(self.meter.summary(), flush=True)      # PRINT_KV_RATIO: every N-th prefill, this one included
        return plan

    def _continue(self, cache: Any, past_len: int, bsz: int) -> _History:
        """The tracked history that ``cache`` (holding ``past_len`` tokens) continues; follows a crop of the cache
        (assisted decoding) and rejects any other cache."""
        hist = self._history
        if hist is None or hist.cache is None or hist.cache() is not cache:
            raise SepLLMRuntimeError(
                f"the cache holds {past_len} tokens but it is not the cache this SepLLM handle's last call returned; "
                "continue a sequence only with the cache its previous call returned (start a new one without)")
        if hist.ids.shape[0] != bsz or hist.ids.shape[1] < past_len:
            raise SepLLMRuntimeError(f"the cache holds {past_len} tokens for batch {bsz} but this SepLLM handle "
                                     f"tracked {tuple(hist.ids.shape)} (batch, tokens)")
        if hist.ids.shape[1] > past_len:                   # the cache was cropped: drop the discarded tokens
            hist.ids, hist.valid = hist.ids[:, :past_len], hist.valid[:, :past_len]
        return hist

    def _bind_cache(self, cache: Any) -> None:
        """Remember which cache holds the tracked history and follow its beam-search reorderings."""
        hist = self._history
        if hist is None or cache is None:
            return
        if hist.cache is not None and hist.cache() is cache:
            return
        hist.cache = weakref.ref(cache)
        if getattr(cache, "_sepllm_reorder_hooked", False) or not hasattr(cache, "reorder_cache"):
            return
        original = cache.reorder_cache
        handle = weakref.ref(self)
        cache_ref = weakref.ref(cache)

        def reorder_cache(beam_idx: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            result = original(beam_idx, *args, **kwargs)
            owner = handle()
            if owner is not None and owner._history is not None and owner._history.cache is not None \
                    and owner._history.cache() is cache_ref():
                owner._history.reorder(beam_idx)
            return result

        cache.reorder_cache = reorder_cache              # this cache object only; no class is patched
        cache._sepllm_reorder_hooked = True

    def global_keys(self, ids: torch.Tensor, pad_counts: Optional[torch.Tensor],
                    interval: Optional[int]) -> torch.Tensor:
        """``[B, L]`` keys visible from every later query (initial + separators, or FixLLM positions)."""
        return rules.global_key_bitmap(ids, self.settings.separator_ids, self.settings.num_initial, pad_counts,
                                       fixed_interval=interval)

    def _build_plan(self, ids: torch.Tensor, valid: torch.Tensor, pad_counts: Optional[torch.Tensor],
                    past_len: int) -> MaskPlan:
        total = ids.shape[1]
        q_len = total - past_len
        decode = q_len == 1
        q_pos = torch.arange(past_len, total, device=ids.device)
        k_pos = torch.arange(total, device=ids.device)
        globals_by_interval: dict[Optional[int], torch.Tensor] = {}
        patterns: dict[tuple[int, Optional[int]], tuple[torch.Tensor, tuple[int, int], Optional[tuple[int, int]]]] = {}
        masks: list[torch.Tensor] = []
        n = self.settings.num_layers
        last_row, amap = _Counts.zeros(n), (None if decode else _Counts.zeros(n))
        q_valid = valid[:, past_len:]
        for layer in range(n):
            window, interval = self.settings.layer_pattern(layer, decode)
            key = (min(window, total), interval)
            if key not in patterns:
                if interval not in globals_by_interval:
                    globals_by_interval[interval] = self.global_keys(ids, pad_counts, interval)
                allowed = rules.allowed_between(globals_by_interval[interval], q_pos, k_pos, window, key_valid=valid)
                patterns[key] = (allowed.unsqueeze(1),) + self._counts(allowed, valid, q_valid, decode)
            mask, (kv_kept, kv_total), map_counts = patterns[key]
            masks.append(mask)
            last_row.kept[layer], last_row.total[layer] = kv_kept, kv_total
            if amap is not None and map_counts is not None:
                amap.kept[layer], amap.total[layer] = map_counts
        self.meter.record_call(last_row, amap)
        return MaskPlan(masks)

    @staticmethod
    def _counts(allowed: torch.Tensor, valid: torch.Tensor, q_valid: torch.Tensor,
                decode: bool) -> tuple[tuple[int, int], Optional[tuple[int, int]]]:
        """(last-row kept, last-row total) and, for a prefill, (map kept, map total); padding excluded.

        ``allowed`` never admits a padding key for a valid query (only padding queries keep their diagonal), so
        summing the rows of valid queries counts real keys only.
        """
        rows = q_valid[:, -1]
        kv_kept = int(allowed[:, -1, :][rows].sum())
        kv_total = int(valid[rows].sum())
        if decode:
            return (kv_kept, kv_total), None
        past_len = valid.shape[1] - q_valid.shape[1]
        map_kept = int((allowed.sum(dim=-1) * q_valid).sum())
        causal_valid = torch.cumsum(valid.to(torch.long), dim=1)[:, past_len:]
        map_total = int((causal_valid * q_valid).sum())
        return (kv_kept, kv_total), (map_kept, map_total)

    def prefill_masks(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """Per-layer ``[B, 1, S, S]`` prefill masks this handle would use for ``input_ids`` (for inspection;
        touches neither the tracked sequence nor the statistics). Empty in full-attention mode."""
        if self.settings.mode == "full":
            return []
        valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                 else attention_mask.to(torch.bool))
        pad_counts = rules.left_pad_counts(valid) if self.settings.batch_adaptive_init_pos else None
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        out = []
        for layer in range(self.settings.num_layers):
            window, interval = self.settings.layer_pattern(layer, decode=False)
            g = self.global_keys(input_ids, pad_counts, interval)
            out.append(rules.allowed_between(g, pos, pos, window, key_valid=valid).unsqueeze(1))
        return out

    # ----- statistics -----
    def retention(self) -> dict:
        """Retention statistics accumulated over every call so far (see ``megatron.sepllm.hf.retention``)."""
        return self.meter.as_dict()

    def summary(self) -> str:
        """One-line summary of :meth:`retention`."""
        return self.meter.summary()

    def print_summary(self, file: Any = None) -> None:
        """Print :meth:`summary` (stdout by default)."""
        print(self.summary(), file=file or sys.stdout, flush=True)

    def reset_retention(self) -> None:
        """Start counting afresh (e.g. per task)."""
        self.meter.reset()


def applied_handle(model: Any) -> Optional[SepLLMHandle]:
    """The handle ``apply_sepllm`` installed on ``model`` (None if it has none or it was removed)."""
    return getattr(model, _HANDLE_ATTR, None)


def apply_sepllm(model: Any, sepllm_cfg: Union[SepLLMConfig, str, os.PathLike, None] = None,
                 overrides: Optional[dict] = None, attn_impl: Optional[str] = None) -> SepLLMHandle:
    """Make ``model`` (an HF decoder, e.g. Llama or GPT-NeoX) run training-free SepLLM attention.

    ``sepllm_cfg`` is a ``SepLLMConfig`` or a path to a training-free YAML (``overrides`` are applied on top of the
    file); None reads the settings the model was trained with from the ``sepllm`` block of its config (models
    exported by ``tools/ckpts/convert_neox_to_hf.py``), else from the SepLLM keys at the top level of its config
    (the SepLLM authors' ``sepllm_gpt_neox`` format; the block wins). ``attn_impl`` picks ``"sdpa"`` or
    ``"eager"`` (default: eager if the model uses eager, else sdpa).
    ``USE_ORIGINAL_FULL_ATTEN=True`` leaves the model untouched. Raises ``TrainingFreeConfigError`` on settings
    that do not fit the model.
    """
    if getattr(model, _HANDLE_ATTR, None) is not None:
        raise SepLLMRuntimeError("apply_sepllm was already applied to this model; call handle.remove() first")
    if sepllm_cfg is None:
        if overrides:
            raise ValueError("overrides apply to a YAML path; without one the model's 'sepllm' block is used as is")
        sepllm_cfg = sepllm_config_from_model(model)
    elif not isinstance(sepllm_cfg, SepLLMConfig):
        sepllm_cfg = load_trainingfree_config(sepllm_cfg, overrides)
    elif overrides:
        raise ValueError("overrides apply to a YAML path; edit the SepLLMConfig object directly instead")
    settings = resolve_for_model(sepllm_cfg, model.config)
    return SepLLMHandle(model, sepllm_cfg, settings, attn_impl=attn_impl)

