"""SepLLM mode selection, the reference's forced rewrites, and argument checks (spec §1.1, §1.2, §1.8-1.10, §4.2).

Differences from the reference checker, on purpose:
* ``USE_SEP_ATTN_KERNEL_ACCELERATOR`` only selects an execution path in this project (``sep_attention_impl`` does the
  choosing), so it combines with every mode; it is logged, never an error.
* A config with no SepLLM key at all is a plain GPT-NeoX model: mode "full" (logged once), instead of SepLLM with
  default knobs and no separators (which the reference would reject).
* ``PADDING_ID`` may be any id (the reference insists on 0 for GPT-NeoX; Llama 3 uses 128009).
* StreamingLLM accepts per-layer windows and BiPE (both are well defined with separators disabled).
Every forced change is logged on the "megatron.config" logger.
"""

from __future__ import annotations

import logging
from typing import Sequence

from megatron.config.errors import ConfigError, Where
from megatron.config.model import ModelConfig
from megatron.config.sepllm import SepLLMConfig
from megatron.config.sepllm_settings import (NO_SEPARATORS, SEP_ATTENTION_IMPLS, fixed_intervals,
                                             is_real_id_list, mode_of, sliding_window_conflict, window_values)

__all__ = ["DERIVED_FIELDS", "resolve_sepllm"]

logger = logging.getLogger("megatron.config")

DERIVED_FIELDS = ("mode", "prefill_windows", "generate_windows")

# Mode switches that cannot be combined (the kernel flag is deliberately absent: it only picks a path).
_SWITCHES = ("USE_ORIGINAL_FULL_ATTEN", "streamingLLM", "USE_FIXED_SEP_INTERVALs", "USE_SA_SOFTMAX",
             "USE_SA_SOFTMAX_NO_DENO")


def _force(sep: SepLLMConfig, name: str, value: object, reason: str, quiet: bool) -> None:
    old = getattr(sep, name)
    if old != value:
        setattr(sep, name, value)
        if not quiet:
            logger.info("SepLLM: %s forced from %r to %r (%s)", name, old, value, reason)


def _full_attention_rewrite(sep: SepLLMConfig, model: ModelConfig, quiet: bool) -> None:
    """The reference checker's reset of every SepLLM knob when USE_ORIGINAL_FULL_ATTEN is on."""
    why = "USE_ORIGINAL_FULL_ATTEN=True"
    _force(sep, "separator_token_ids", list(NO_SEPARATORS), why, quiet)
    _force(sep, "PADDING_ID", 0, why, quiet)
    _force(sep, "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS", False, why, quiet)
    _force(sep, "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS", False, why, quiet)
    _force(sep, "prefill_local_window_size", model.seq_length, why, quiet)
    _force(sep, "generate_local_window_size", model.seq_length, why, quiet)
    _force(sep, "init_tok_max_idx", -1, why, quiet)
    for flag in ("USE_SEP_ATTN_KERNEL_ACCELERATOR", "RECOMPILE_SEP_ATTN_KERNEL", "USE_BiPE",
                 "BATCH_ADAPTIVE_INIT_POS", "PRINT_KV_RATIO"):
        _force(sep, flag, False, why, quiet)
    _force(sep, "BiPE_seps", None, why, quiet)
    if model.attention_config is not None and any(t != "global" for t in model.attention_config):
        if not quiet:
            logger.info("SepLLM: attention_config forced to all 'global' (%s)", why)
        model.attention_config = ["global"] * len(model.attention_config)


def _check_exclusive(sep: SepLLMConfig, where: Where) -> None:
    on = [name for name in _SWITCHES if getattr(sep, name)]
    if len(on) > 1:
        a, b = on[0], on[1]
        raise ConfigError(f"{a}=True ({where(a)}) and {b}=True ({where(b)}) select different attention modes; "
                          f"set at most one of {', '.join(_SWITCHES)}")
    if (sep.USE_SA_SOFTMAX or sep.USE_SA_SOFTMAX_NO_DENO) and is_real_id_list(sep.separator_token_ids):
        key = "USE_SA_SOFTMAX" if sep.USE_SA_SOFTMAX else "USE_SA_SOFTMAX_NO_DENO"
        raise ConfigError(f"{key}=True ({where(key)}) runs self-adjusting softmax on the causal mask and cannot be "
                          f"combined with SepLLM separators: separator_token_ids={sep.separator_token_ids} "
                          f"({where('separator_token_ids')}); set separator_token_ids to [-1]")


def resolve_sepllm(sep: SepLLMConfig, model: ModelConfig, *, has_sepllm_keys: bool, num_layers_explicit: bool,
                   where: Where) -> None:
    """Check ``sep`` against ``model``, apply the forced rewrites and fill mode/prefill_windows/generate_windows."""
    if sep.Layer_num is not None and sep.Layer_num < 1:
        raise ConfigError(f"Layer_num ({where('Layer_num')}) must be >= 1, got {sep.Layer_num}")
    if sep.Layer_num is not None and num_layers_explicit and sep.Layer_num != model.num_layers:
        raise ConfigError(f"Layer_num={sep.Layer_num} ({where('Layer_num')}) does not match num_layers="
                          f"{model.num_layers} ({where('num_layers')}); they must describe the same model")
    if num_layers_explicit or sep.Layer_num is None:
        num_layers, layers_from = model.num_layers, "num_layers"
    else:
        num_layers, layers_from = sep.Layer_num, "Layer_num"

    if not has_sepllm_keys:
        logger.info("No SepLLM key in the config: plain causal attention (SepLLM mode 'full')")
        sep.USE_ORIGINAL_FULL_ATTEN = True
    _check_exclusive(sep, where)
    if sep.USE_ORIGINAL_FULL_ATTEN:
        _full_attention_rewrite(sep, model, quiet=not has_sepllm_keys)
    mode = mode_of(sep)
    if model.sliding_window_width is not None:
        conflict = sliding_window_conflict(mode, model.sliding_window_width)
        if conflict is not None:
            raise ConfigError(f"{where('sliding_window_width')}: {conflict}")

    for key in ("prefill_k", "generate_k"):
        if getattr(sep, key) != 0:
            raise ConfigError(f"{key}={getattr(sep, key)} ({where(key)}): deprecated in SepLLM and must stay 0")
    if sep.init_tok_max_idx < -1:
        raise ConfigError(f"init_tok_max_idx={sep.init_tok_max_idx} ({where('init_tok_max_idx')}) must be >= -1 "
                          f"(-1 keeps no initial tokens)")
    if sep.sep_attention_impl not in SEP_ATTENTION_IMPLS:
        raise ConfigError(f"sep_attention_impl={sep.sep_attention_impl!r} ({where('sep_attention_impl')}): expected "
                          f"one of {', '.join(SEP_ATTENTION_IMPLS)}")
    if sep.print_ratio_intervals < 1:
        raise ConfigError(f"print_ratio_intervals ({where('print_ratio_intervals')}) must be >= 1")
    if sep._DEFAULT_SPARSE_BLOCK_SIZE < 1:
        raise ConfigError(f"_DEFAULT_SPARSE_BLOCK_SIZE ({where('_DEFAULT_SPARSE_BLOCK_SIZE')}) must be >= 1")
    if sep.RECOMPILE_SEP_ATTN_KERNEL and not sep.USE_SEP_ATTN_KERNEL_ACCELERATOR:
        raise ConfigError(f"RECOMPILE_SEP_ATTN_KERNEL=True ({where('RECOMPILE_SEP_ATTN_KERNEL')}) needs "
                          f"USE_SEP_ATTN_KERNEL_ACCELERATOR=True ({where('USE_SEP_ATTN_KERNEL_ACCELERATOR')})")
    if sep.USE_SEP_ATTN_KERNEL_ACCELERATOR:
        logger.info("SepLLM: USE_SEP_ATTN_KERNEL_ACCELERATOR=True only selects the fastest execution path; "
                    "sep_attention_impl=%r decides it and results do not change", sep.sep_attention_impl)

    if mode == "streamingllm":
        _force(sep, "separator_token_ids", list(NO_SEPARATORS), "streamingLLM=True keeps no separators", False)
        if sep.init_tok_max_idx < 0:
            raise ConfigError(f"streamingLLM=True ({where('streamingLLM')}) needs initial (sink) tokens: "
                              f"init_tok_max_idx must be >= 0, got {sep.init_tok_max_idx}")
    if mode == "sepllm":
        ids = sep.separator_token_ids
        if not is_real_id_list(ids):
            raise ConfigError(f"SepLLM attention needs separator_token_ids ({where('separator_token_ids')}), a "
                              f"non-empty list of token ids other than [-1], got {ids!r}; or select another mode "
                              f"(USE_ORIGINAL_FULL_ATTEN, streamingLLM, USE_FIXED_SEP_INTERVALs)")
    if mode == "fixllm":
        fixed_intervals(sep, num_layers, layers_from=layers_from, where=where, error=ConfigError)

    if sep.USE_BiPE:
        if not is_real_id_list(sep.BiPE_seps):
            raise ConfigError(f"USE_BiPE=True ({where('USE_BiPE')}) needs BiPE_seps, a non-empty list of separator "
                              f"token ids, got {sep.BiPE_seps!r} ({where('BiPE_seps')})")
        if model.pos_emb not in ("rotary", "alibi"):
            raise ConfigError(f"USE_BiPE=True ({where('USE_BiPE')}) needs pos_emb rotary or alibi, got "
                              f"pos_emb={model.pos_emb!r} ({where('pos_emb')})")
        if model.rope_fusion:
            model.rope_fusion = False
            logger.info("SepLLM: rope_fusion forced to False (USE_BiPE gathers rotary angles per token)")

    if mode == "full":
        windows = [model.seq_length] * num_layers
        sep.prefill_windows, sep.generate_windows = list(windows), list(windows)
    else:
        sep.prefill_windows, sep.generate_windows = (
            list(window_values(sep, phase, num_layers, layers_from=layers_from, where=where, error=ConfigError))
            for phase in ("prefill", "generate"))
        if sep.prefill_windows != sep.generate_windows:
            logger.warning("SepLLM: decode windows %s differ from prefill/training windows %s",
                           _short(sep.generate_windows), _short(sep.prefill_windows))
    sep.mode = mode


def _short(values: Sequence[int]) -> str:
    return str(list(values)) if len(values) <= 6 else f"[{values[0]}, {values[1]}, ..., {values[-1]}]"

