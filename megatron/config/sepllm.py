"""SepLLM attention config (spec §1.1, §1.2, §1.9, §1.10, §4.2). Reference key spellings are kept verbatim; each
field's help text sits in its metadata (``docs/config_reference.md`` is generated from it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.config.components import opt
from megatron.config.sepllm_settings import SepAttentionImpl, SepLLMMode


@dataclass
class SepLLMConfig:
    separator_token_ids: Optional[list] = opt(None, "Token ids treated as separators (kept as global keys). [-1] = "
                                                    "none. Must be a real list in SepLLM mode. Pythia: [15, 13, 32, 2, "
                                                    "28, 27, 209, 186, 187]. Checked against the tokenizer's "
                                                    "vocabulary at start-up (check_separator_ids).")
    PADDING_ID: int = opt(0, "Token id counted as left padding by BATCH_ADAPTIVE_INIT_POS (any id; Llama 3 uses "
                             "128009).")
    prefill_k: int = opt(0, "Deprecated in SepLLM; must be 0.")
    generate_k: int = opt(0, "Deprecated in SepLLM; must be 0.")
    prefill_local_window_size: int = opt(256, "Local window w for training/prefill (counts the query token), >= 1.")
    generate_local_window_size: int = opt(256, "Local window for single-token decode steps, >= 1.")
    USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS: bool = opt(False, "Use prefill_loc_win_size_list (one window per layer).")
    USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS: bool = opt(False, "Use generate_win_loc_size_list (one window per layer).")
    prefill_loc_win_size_list: Optional[list] = opt(None, "Per-layer training/prefill windows (length = num_layers); a "
                                                          "window >= seq_length makes that layer full causal "
                                                          "attention.")
    generate_win_loc_size_list: Optional[list] = opt(None, "Per-layer decode windows (length = num_layers).")
    init_tok_max_idx: int = opt(2, "Largest index of kept initial tokens: a = init_tok_max_idx + 1 (default 3); -1 = "
                                   "none.")
    USE_ORIGINAL_FULL_ATTEN: bool = opt(False, "Plain causal attention; resets every SepLLM knob (each change logged).")
    streamingLLM: bool = opt(False, "StreamingLLM: initial tokens + local window only (separators forced to [-1]).")
    USE_SEP_ATTN_KERNEL_ACCELERATOR: bool = opt(True, "Reference switch for the FlexAttention path. Here it only "
                                                      "selects the fastest execution path, which sep_attention_impl "
                                                      "decides; combines with every mode.")
    RECOMPILE_SEP_ATTN_KERNEL: bool = opt(False, "Compile the block-mask construction; needs "
                                                 "USE_SEP_ATTN_KERNEL_ACCELERATOR.")
    BATCH_ADAPTIVE_INIT_POS: bool = opt(False, "Shift each row's initial tokens past its left padding (evaluation with "
                                               "left padding).")
    PRINT_KV_RATIO: bool = opt(False, "Log retention statistics (kept / causal attention entries).")
    print_ratio_intervals: int = opt(8000, "Log the retention ratio every N forward calls.")
    USE_BiPE: bool = opt(False, "Bilevel positional encoding (needs BiPE_seps and pos_emb rotary or alibi).")
    BiPE_seps: Optional[list] = opt(None, "Separator ids that cut BiPE segments.")
    EXCLUDE_DIAGONAL: bool = opt(True, "Reference semantics flag; True = the window counts the query token itself.")
    _DEFAULT_SPARSE_BLOCK_SIZE: int = opt(128, "FlexAttention block size for queries and keys.")
    # Self-adjusting softmax (spec §1.9)
    USE_SA_SOFTMAX: bool = opt(False, "Self-adjusting softmax (dense path, causal mask; no separators).")
    USE_SA_SOFTMAX_NO_DENO: bool = opt(False, "Self-adjusting softmax without denominator (dense path, causal mask).")
    SA_Numerator_Bias: float = opt(0.0, "SA numerator bias epsilon_n.")
    SA_Denominator_Bias: float = opt(1.0e-10, "SA denominator bias epsilon_d.")
    # Training-free keys (spec §4.2)
    Layer_num: Optional[int] = opt(None, "Training-free configs: layer count of the Hugging Face model. Never sets "
                                         "num_layers; cross-checked against it when num_layers is given; sizes the "
                                         "per-layer lists otherwise.")
    USE_FIXED_SEP_INTERVALs: bool = opt(False, "FixLLM: keep every interval-th position instead of separators.")
    fixed_sep_intervals_list: Optional[list] = opt(None, "FixLLM per-layer intervals (length = num_layers, each >= 1).")
    # Ours
    sep_attention_impl: SepAttentionImpl = opt("auto", "SepLLM execution path: auto | dense | flex | compact | "
                                                       "flex_compact | triton (all give the same result; auto picks "
                                                       "the fastest available). Command line: --sep_attention_impl "
                                                       "compact.")
    # Derived by validation (never set in YAML)
    mode: SepLLMMode = opt("full", "Derived: full | sepllm | streamingllm | fixllm | sa | sa_no_deno.", derived=True)
    prefill_windows: Optional[list] = opt(None, "Derived: the per-layer training/prefill window (length num_layers); "
                                                "[seq_length]*L in full mode.", derived=True)
    generate_windows: Optional[list] = opt(None, "Derived: the per-layer decode window.", derived=True)

    @property
    def num_initial(self) -> int:
        """``a``: number of kept initial tokens."""
        return self.init_tok_max_idx + 1
