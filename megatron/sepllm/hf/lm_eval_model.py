"""lm_eval model type ``sepllm_hf``: HFLM with training-free SepLLM masks and/or SepCache generation (spec §4.2).

``model_args`` (all optional except ``pretrained``), on top of every HFLM argument:

* ``sepllm_config=<yaml>``: training-free SepLLM YAML (``llama3_*.yml`` keys) applied with
  :func:`megatron.sepllm.hf.trainingfree.apply_sepllm` to every forward (loglikelihood and generation);
* ``sepllm_overrides="KEY=VALUE;KEY=VALUE"``: YAML-valued overrides on top of that file (e.g. ``Layer_num=2``);
* ``sepllm_attn_impl=sdpa|eager``: attention function of the mask path;
* ``sepcache=True`` plus ``init_cache_size``, ``sep_cache_size``, ``local_size``, ``cache_size``,
  ``USE_MAX_SEP_CACHE``, ``SEP_ACCUMULATION``, ``APPLY_PE_SHIFT``, ``sepcache_prefill_attention`` (full|sepllm),
  ``sepcache_separator_ids="13;11;..."``: ``generate_until`` runs :func:`megatron.sepllm.generate` with a
  :class:`~megatron.sepllm.hf.cache.SepCache` (separators default to the SepLLM config's, else the model-type preset).

Retention statistics are printed after each request type and returned by :meth:`SepLLMHFLM.sepllm_retention`
(the CLI ``tools/sepllm/lm_eval_sepllm.py`` stores them as ``results["sepllm_retention"]``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Union

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from megatron.sepllm.hf.trainingfree import SepLLMHandle, apply_sepllm
from megatron.sepllm.hf.compat import cache_kwargs
from megatron.sepllm.hf.config import TrainingFreeConfigError, parse_override

_SEPCACHE_SIZES = ("init_cache_size", "sep_cache_size", "local_size", "cache_size")


def parse_overrides(value: Union[None, str, dict]) -> dict:
    """``"A=1;B=[2, 3]"`` (or a dict) -> ``{"A": 1, "B": [2, 3]}``. Semicolons because model_args split on commas."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    if not isinstance(value, str):
        raise TrainingFreeConfigError(f"sepllm_overrides={value!r}: expected 'KEY=VALUE;KEY=VALUE' or a dict")
    return dict(parse_override(part) for part in value.split(";") if part.strip())


def parse_id_list(value: Union[None, int, str, list, tuple], name: str) -> Optional[list[int]]:
    """``"13;11;30"`` / ``[13, 11]`` / ``13`` -> list of ints; None stays None."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected token ids")
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        try:
            return [int(v) for v in value.replace(",", ";").split(";") if v.strip()]
        except ValueError:
            raise ValueError(f"{name}={value!r}: expected integers separated by ';'") from None
    return [int(v) for v in value]


class _SepCacheStats:
    """SepCache retention (time-averaged kept / seen tokens, spec §3.4) summed over every generate call."""

    def __init__(self) -> None:
        self.kept = 0
        self.seen = 0
        self.calls = 0
        self.per_layer_kept: list[int] = []
        self.per_layer_seen: list[int] = []

    def add(self, cache: Any) -> None:
        kept = [int(layer.kept_total) for layer in cache.layers]
        seen = [int(layer.seen_total) for layer in cache.layers]
        if not self.per_layer_kept:
            self.per_layer_kept, self.per_layer_seen = [0] * len(kept), [0] * len(seen)
        for i, (k, s) in enumerate(zip(kept, seen)):
            self.per_layer_kept[i] += k
            self.per_layer_seen[i] += s
        self.kept += sum(kept)
        self.seen += sum(seen)
        self.calls += 1

    def as_dict(self) -> dict:
        return {"time_averaged_kept_over_seen": self.kept / self.seen if self.seen else None,
                "kept": self.kept, "seen": self.seen, "generate_calls": self.calls,
                "per_layer_ratio": [k / s if s else None for k, s in zip(self.per_layer_kept, self.per_layer_seen)]}

    def summary(self) -> str:
        ratio = f"{self.kept / self.seen:.4f}" if self.seen else "n/a"
        return (f"SepCache time-averaged KV retention {ratio} ({self.kept}/{self.seen} token-steps) over "
                f"{self.calls} generate calls")


@register_model("sepllm_hf")
class SepLLMHFLM(HFLM):
    """HFLM whose model runs training-free SepLLM attention and/or generates with SepCache."""

    def __init__(self, pretrained: Any, sepllm_config: Optional[str] = None,
                 sepllm_overrides: Union[None, str, dict] = None, sepllm_attn_impl: Optional[str] = None,
                 sepcache: bool = False, init_cache_size: Any = 4, sep_cache_size: Any = 128, local_size: Any = 256,
                 cache_size: Any = 512, USE_MAX_SEP_CACHE: bool = False, SEP_ACCUMULATION: bool = True,
                 APPLY_PE_SHIFT: bool = False, sepcache_prefill_attention: str = "full",
                 sepcache_separator_ids: Union[None, str, list] = None, sepcache_padding_id: Optional[int] = None,
                 **kwargs: Any) -> None:
        if not sepllm_config and not sepcache:
            raise ValueError("sepllm_hf needs sepllm_config=<yaml> and/or sepcache=True (use model 'hf' otherwise)")
        if sepllm_overrides and not sepllm_config:
            raise ValueError("sepllm_overrides given without sepllm_config")
        super().__init__(pretrained=pretrained, **kwargs)
        self.sepllm_handle: Optional[SepLLMHandle] = None
        if sepllm_config:
            self.sepllm_handle = apply_sepllm(self.model, str(sepllm_config), overrides=parse_overrides(sepllm_overrides),
                                              attn_impl=sepllm_attn_impl)
        self.sepcache = bool(sepcache)
        self._sepcache_stats = _SepCacheStats()
        if self.sepcache:
            self._sepcache_kwargs = self._sepcache_settings(
                dict(init_cache_size=init_cache_size, sep_cache_size=sep_cache_size, local_size=local_size,
                     cache_size=cache_size), USE_MAX_SEP_CACHE, SEP_ACCUMULATION, APPLY_PE_SHIFT,
                sepcache_prefill_attention, sepcache_separator_ids, sepcache_padding_id)
            self._build_cache()     # fail now, not after the loglikelihood part of a run, on bad sizes

    def _sepcache_settings(self, sizes: dict, use_max: bool, accumulation: bool, pe_shift: bool, prefill: str,
                           separator_ids: Any, padding_id: Optional[int]) -> dict:
        for name, value in sizes.items():
            if isinstance(value, str):
                sizes[name] = parse_id_list(value, name)      # "4;4;8" -> per-layer list
        seps = parse_id_list(separator_ids, "sepcache_separator_ids")
        if seps is None and self.sepllm_handle is not None and self.sepllm_handle.settings.separator_ids:
            seps = list(self.sepllm_handle.settings.separator_ids)
        vocab = int(self.model.config.get_text_config().vocab_size)
        for s in seps or []:
            if not 0 <= s < vocab:
                raise ValueError(f"sepcache_separator_ids contains {s}, outside the model's vocabulary [0, {vocab})")
        pad = padding_id if padding_id is not None else self.tokenizer.pad_token_id
        return dict(sizes, USE_MAX_SEP_CACHE=bool(use_max), SEP_ACCUMULATION=bool(accumulation),
                    APPLY_PE_SHIFT=bool(pe_shift), prefill_attention=prefill, separator_token_ids=seps,
                    PADDING_ID=pad)

    def _build_cache(self) -> Any:
        from megatron.sepllm.hf.cache import SepCache

        return SepCache(model=self.model, **self._sepcache_kwargs)

    def _model_generate(self, context: Any, max_length: int, stop: list[str], **generation_kwargs: Any) -> Any:
        if not self.sepcache:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        from megatron.sepllm.hf.generation import generate

        cache = self._build_cache()
        ctx = self.sepllm_handle.suspended() if self.sepllm_handle is not None else contextlib.nullcontext()
        with ctx:
            out = super()._model_generate(context, max_length, stop, custom_generate=generate,
                                          **cache_kwargs(self.model, cache), **generation_kwargs)
        self._sepcache_stats.add(cache)
        return out

    # ----- reporting -----
    def sepllm_retention(self) -> dict:
        """All retention statistics of the run so far, under distinct names (spec §7 item 13)."""
        return {"mask_path": None if self.sepllm_handle is None else self.sepllm_handle.retention(),
                "sepcache": self._sepcache_stats.as_dict() if self.sepcache else None}

    def sepllm_summary(self) -> str:
        """One line per active mechanism."""
        lines = []
        if self.sepllm_handle is not None:
            lines.append(self.sepllm_handle.summary())
        if self.sepcache:
            lines.append(self._sepcache_stats.summary())
        return "\n".join(lines)

    def _report(self, result: Any) -> Any:
        print(self.sepllm_summary(), flush=True)
        return result

    def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
        return self._report(super().loglikelihood(requests, disable_tqdm=disable_tqdm))

    def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
        return self._report(super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm))

    def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
        return self._report(super().generate_until(requests, disable_tqdm=disable_tqdm))
