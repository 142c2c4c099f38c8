"""The one resolved view of a SepLLM config: a frozen :class:`SepLLMSettings` and the one resolver that builds it.

``resolve_sepllm`` (``config/_loading/sepllm_checks.py``) checks the user's keys against the model and fills the
derived fields of a ``SepLLMConfig``; :func:`settings_of` turns such a config (or one built directly with the derived
fields set, as tests and notebooks do) into the per-layer facts every consumer reads: the training backend,
``apply_sepllm``, SepCache defaults and the converters' ``sepllm`` block. The mode rule (:func:`mode_of`) and the
window rules live here only, so the consumers cannot drift apart. :func:`check_separator_ids` checks the ids against
the tokenizer's vocabulary once training has built it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, get_args

from megatron.config.errors import ConfigError, Where, unknown_source

SepLLMMode = Literal["full", "sepllm", "streamingllm", "fixllm", "sa", "sa_no_deno"]
MODES: tuple[str, ...] = get_args(SepLLMMode)
#: the mode of a full-attention model with ``sliding_window_width`` (a model key, never a SepLLM switch)
SLIDING_WINDOW = "sliding_window"
SepAttentionImpl = Literal["auto", "dense", "flex", "compact", "flex_compact", "triton"]
SEP_ATTENTION_IMPLS: tuple[str, ...] = get_args(SepAttentionImpl)
DENSE_ONLY_MODES = ("sa", "sa_no_deno")
NO_SEPARATORS = [-1]


class SepLLMSettingsError(ConfigError, ValueError):
    """A SepLLM setting is invalid; the message names the key, the value and what was expected."""


def is_real_id_list(ids: object) -> bool:
    """True for a non-empty id list other than the "no separators" marker ``[-1]``."""
    return isinstance(ids, (list, tuple)) and len(ids) > 0 and list(ids) != NO_SEPARATORS


def mode_of(sep: Any) -> str:
    """The attention mode the reference switches select (at most one is on once the config is checked)."""
    if sep.USE_ORIGINAL_FULL_ATTEN:
        return "full"
    if sep.streamingLLM:
        return "streamingllm"
    if sep.USE_FIXED_SEP_INTERVALs:
        return "fixllm"
    if sep.USE_SA_SOFTMAX:
        return "sa"
    if sep.USE_SA_SOFTMAX_NO_DENO:
        return "sa_no_deno"
    return "sepllm"


@dataclass(frozen=True)
class SepLLMSettings:
    """Everything an attention path needs, resolved for one model (one entry per layer in the window lists).

    ``prefill_windows`` are the tokens a training / prefill query may see locally (``EXCLUDE_DIAGONAL=False`` adds
    the diagonal, spec §1.3); ``generate_windows`` are the decode windows, which the reference never widens.
    """

    mode: str
    num_layers: int
    impl: str
    separator_ids: tuple[int, ...]
    num_initial: int
    prefill_windows: tuple[int, ...]
    generate_windows: tuple[int, ...]
    fixed_intervals: Optional[tuple[int, ...]]
    batch_adaptive_init_pos: bool
    print_kv_ratio: bool
    print_ratio_intervals: int
    # the reference's switches under plain names (the config keys keep the reference spellings)
    use_accelerator: bool = True          # USE_SEP_ATTN_KERNEL_ACCELERATOR: False forces the dense path under auto
    recompile_kernel: bool = False        # RECOMPILE_SEP_ATTN_KERNEL: compile the flex BlockMask builder too
    sparse_block_size: int = 128          # _DEFAULT_SPARSE_BLOCK_SIZE: FlexAttention block size
    sa_numerator_bias: float = 0.0        # SA_Numerator_Bias (self-adjusting softmax)
    sa_denominator_bias: float = 0.0      # SA_Denominator_Bias

    def layer_pattern(self, layer_idx: int, decode: bool) -> tuple[int, Optional[int]]:
        """``(window, fixed_interval)`` of one layer for a prefill (``decode=False``) or a decode step."""
        windows = self.generate_windows if decode else self.prefill_windows
        interval = None if self.fixed_intervals is None else self.fixed_intervals[layer_idx]
        return windows[layer_idx], interval


def check_layer_list(name: str, values: Any, num_layers: int, *, switch: Optional[str] = None,
                     layers_from: str = "num_layers", where: Where = unknown_source,
                     error: type[ConfigError] = SepLLMSettingsError) -> tuple[int, ...]:
    """One integer >= 1 per layer (per-layer windows, FixLLM intervals); raises ``error`` naming key and source."""
    if not isinstance(values, (list, tuple)) or not values:
        needs = f"{switch}=True ({where(switch)}) needs {name}" if switch else f"{name} ({where(name)}) must be"
        raise error(f"{needs}, a list of {num_layers} integers (one per layer); got {values!r}")
    if len(values) != num_layers:
        raise error(f"{name} ({where(name)}) has {len(values)} entries but {layers_from} is {num_layers}; give one "
                    f"value per layer")
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise error(f"{name} ({where(name)}) entries must be >= 1, got {v!r} (integers, one per layer)")
    return tuple(int(v) for v in values)


#: per phase: (per-layer switch, single-window key, per-layer list key), in the reference's spellings
WINDOW_KEYS = {
    "prefill": ("USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS", "prefill_local_window_size", "prefill_loc_win_size_list"),
    "generate": ("USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS", "generate_local_window_size",
                 "generate_win_loc_size_list"),
}


def window_values(sep: Any, phase: str, num_layers: int, *, layers_from: str = "num_layers",
                  where: Where = unknown_source, error: type[ConfigError] = SepLLMSettingsError) -> tuple[int, ...]:
    """The local windows of ``phase`` ("prefill" / "generate") per layer from the user's keys (the per-layer list
    when its switch is on, else the single window for every layer); the one check of those keys."""
    switch, scalar, lst = WINDOW_KEYS[phase]
    if getattr(sep, switch):
        return check_layer_list(lst, getattr(sep, lst), num_layers, switch=switch, layers_from=layers_from,
                                where=where, error=error)
    value = getattr(sep, scalar)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise error(f"{scalar}={value!r} ({where(scalar)}) must be >= 1 (it counts the query token itself)")
    return (int(value),) * num_layers


def fixed_intervals(sep: Any, num_layers: int, *, layers_from: str = "num_layers", where: Where = unknown_source,
                    error: type[ConfigError] = SepLLMSettingsError) -> tuple[int, ...]:
    """FixLLM's per-layer intervals (one value stands for every layer)."""
    values = sep.fixed_sep_intervals_list
    if isinstance(values, (list, tuple)) and len(values) == 1 and num_layers > 1:
        values = list(values) * num_layers
    return check_layer_list("fixed_sep_intervals_list", values, num_layers, switch="USE_FIXED_SEP_INTERVALs",
                            layers_from=layers_from, where=where, error=error)


def _windows(sep: Any, phase: str, num_layers: int, error: type[ConfigError]) -> tuple[int, ...]:
    derived = sep.prefill_windows if phase == "prefill" else sep.generate_windows
    if derived is not None:     # filled by the config loader
        return check_layer_list(f"{phase}_windows", derived, num_layers, error=error)
    return window_values(sep, phase, num_layers, error=error)


def sliding_window_conflict(mode: str, width: int) -> Optional[str]:
    """Why ``sliding_window_width`` cannot go with SepLLM ``mode`` (None when it can: only full attention)."""
    if mode == "full":
        return None
    return (f"sliding_window_width={width} (Mistral: no initial tokens, no separators) cannot be combined with "
            f"SepLLM mode {mode!r}, which has its own keep rule; drop sliding_window_width or the SepLLM switches")


def attention_mode(sliding_window_width: Optional[int], sep: Any) -> str:
    """The attention a model computes: ``sliding_window`` for a full-attention model with ``sliding_window_width``,
    else the SepLLM mode (``full`` without a SepLLM config)."""
    mode = "full" if sep is None else (sep.mode if sep.mode is not None else mode_of(sep))
    return SLIDING_WINDOW if sliding_window_width is not None and mode == "full" else mode


def settings_of(sep: Any, num_layers: int, *, error: type[ConfigError] = SepLLMSettingsError,
                sliding_window_width: Optional[int] = None) -> SepLLMSettings:
    """Resolve a ``SepLLMConfig`` for a model of ``num_layers`` layers; raises ``error`` naming the key and value.

    The derived fields (``mode``, ``prefill_windows``, ``generate_windows``) win when set; otherwise they are derived
    from the reference keys by the same rules as the config system. ``sep`` is not modified.

    ``sliding_window_width`` (the model key ``W``, GPT-NeoX / flash-attn ``window_size=(W, -1)``: query ``i`` sees keys
    ``i - W .. i``) turns a full-attention config into mode ``sliding_window``: no initial tokens, no separators and
    a local window of ``W + 1`` tokens (windows here count the query itself) in every layer and phase.
    """
    mode = sep.mode if sep.mode is not None else mode_of(sep)
    if mode not in MODES:
        raise error(f"SepLLM 'mode' = {mode!r}: expected one of {', '.join(MODES)}")
    if sep.sep_attention_impl not in SEP_ATTENTION_IMPLS:
        raise error(f"'sep_attention_impl' = {sep.sep_attention_impl!r}: expected one of "
                    f"{', '.join(SEP_ATTENTION_IMPLS)}")
    if sliding_window_width is not None:
        return _sliding_window_settings(sep, mode, num_layers, sliding_window_width, error)
    if sep.init_tok_max_idx < -1:
        raise error(f"'init_tok_max_idx' = {sep.init_tok_max_idx}: expected >= -1")
    if sep.prefill_k != 0 or sep.generate_k != 0:
        raise error("'prefill_k' / 'generate_k' are deprecated in SepLLM and must stay 0")
    if sep.print_ratio_intervals < 1:
        raise error(f"'print_ratio_intervals' = {sep.print_ratio_intervals}: expected >= 1")
    if mode in DENSE_ONLY_MODES and sep.sep_attention_impl in ("flex", "compact", "flex_compact", "triton"):
        raise error(f"'sep_attention_impl' = {sep.sep_attention_impl!r} with self-adjusting softmax (mode {mode!r}): "
                    "SA softmax runs on the dense path only; use 'dense' or 'auto'")
    if mode == "streamingllm" and sep.init_tok_max_idx < 0:
        raise error("'init_tok_max_idx' must be >= 0 with streamingLLM=True (attention sinks)")
    separator_ids: tuple[int, ...] = ()
    if mode == "sepllm":
        if not is_real_id_list(sep.separator_token_ids):
            raise error(f"'separator_token_ids' = {sep.separator_token_ids!r}: SepLLM mode needs a non-empty list of "
                        "real token ids (use streamingLLM=True for no separators)")
        separator_ids = tuple(dict.fromkeys(int(s) for s in sep.separator_token_ids))
    fixed = fixed_intervals(sep, num_layers, error=error) if mode == "fixllm" else None
    prefill = _windows(sep, "prefill", num_layers, error)
    generate = _windows(sep, "generate", num_layers, error)
    if not sep.EXCLUDE_DIAGONAL:
        prefill = tuple(w + 1 for w in prefill)
    sparse = mode != "full"
    return SepLLMSettings(
        mode=mode, num_layers=num_layers, impl=sep.sep_attention_impl, separator_ids=separator_ids,
        num_initial=max(int(sep.init_tok_max_idx) + 1, 0) if sparse else 0,
        prefill_windows=prefill, generate_windows=generate, fixed_intervals=fixed,
        batch_adaptive_init_pos=bool(sep.BATCH_ADAPTIVE_INIT_POS) and sparse,
        print_kv_ratio=bool(sep.PRINT_KV_RATIO) and sparse, print_ratio_intervals=int(sep.print_ratio_intervals),
        use_accelerator=bool(sep.USE_SEP_ATTN_KERNEL_ACCELERATOR), recompile_kernel=bool(sep.RECOMPILE_SEP_ATTN_KERNEL),
        sparse_block_size=int(sep._DEFAULT_SPARSE_BLOCK_SIZE), sa_numerator_bias=float(sep.SA_Numerator_Bias),
        sa_denominator_bias=float(sep.SA_Denominator_Bias))


def _sliding_window_settings(sep: Any, mode: str, num_layers: int, width: Any,
                             error: type[ConfigError]) -> SepLLMSettings:
    """Mode ``sliding_window``: the SepLLM machinery with no global keys and a ``width + 1`` window (see
    :func:`settings_of`). The execution path is ``sep_attention_impl`` (``auto`` picks from the measured table)."""
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise error(f"sliding_window_width={width!r}: expected an integer >= 1 (query i sees keys i - W .. i)")
    conflict = sliding_window_conflict(mode, width)
    if conflict is not None:
        raise error(conflict)
    windows = (width + 1,) * num_layers
    return SepLLMSettings(
        mode=SLIDING_WINDOW, num_layers=num_layers, impl=sep.sep_attention_impl, separator_ids=(), num_initial=0,
        prefill_windows=windows, generate_windows=windows, fixed_intervals=None, batch_adaptive_init_pos=False,
        print_kv_ratio=False, print_ratio_intervals=int(sep.print_ratio_intervals), use_accelerator=True,
        recompile_kernel=bool(sep.RECOMPILE_SEP_ATTN_KERNEL), sparse_block_size=int(sep._DEFAULT_SPARSE_BLOCK_SIZE))


def check_separator_ids(sepllm_cfg: Any, vocab_size: int) -> None:
    """Raise ConfigError when a separator (or BiPE separator) id of a ``SepLLMConfig`` is not a token of a
    ``vocab_size`` vocabulary.

    Called by training once the tokenizer is built; ``-1`` (the "no separators" marker) is always allowed.
    """
    lists = [("separator_token_ids", sepllm_cfg.separator_token_ids)]
    if sepllm_cfg.USE_BiPE:
        lists.append(("BiPE_seps", sepllm_cfg.BiPE_seps))
    for key, ids in lists:
        for token_id in ids or []:
            if token_id == -1:
                continue
            if not 0 <= token_id < vocab_size:
                raise ConfigError(f"{key} contains id {token_id}, outside the tokenizer's vocabulary of {vocab_size} "
                                  f"tokens (valid ids are 0..{vocab_size - 1}, or [-1] for none)")
