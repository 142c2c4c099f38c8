"""SepLLM attention config (spec §1.1, §1.2, §1.9, §1.10, §4.2). Reference key spellings are kept verbatim."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.config.sepllm_settings import SepAttentionImpl, SepLLMMode


@dataclass
class SepLLMConfig:
    separator_token_ids: Optional[list] = None
    PADDING_ID: int = 0
    prefill_k: int = 0                            # deprecated in the reference; must stay 0
    generate_k: int = 0                           # deprecated in the reference; must stay 0
    prefill_local_window_size: int = 256
    generate_local_window_size: int = 256
    USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS: bool = False
    USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS: bool = False
    prefill_loc_win_size_list: Optional[list] = None
    generate_win_loc_size_list: Optional[list] = None
    init_tok_max_idx: int = 2                     # a = init_tok_max_idx + 1 initial tokens; -1 = none
    USE_ORIGINAL_FULL_ATTEN: bool = False
    streamingLLM: bool = False
    USE_SEP_ATTN_KERNEL_ACCELERATOR: bool = True
    RECOMPILE_SEP_ATTN_KERNEL: bool = False
    BATCH_ADAPTIVE_INIT_POS: bool = False
    PRINT_KV_RATIO: bool = False
    print_ratio_intervals: int = 8000
    USE_BiPE: bool = False
    BiPE_seps: Optional[list] = None
    EXCLUDE_DIAGONAL: bool = True
    _DEFAULT_SPARSE_BLOCK_SIZE: int = 128
    # Self-adjusting softmax (spec §1.9)
    USE_SA_SOFTMAX: bool = False
    USE_SA_SOFTMAX_NO_DENO: bool = False
    SA_Numerator_Bias: float = 0.0
    SA_Denominator_Bias: float = 1.0e-10
    # Training-free keys (spec §4.2)
    Layer_num: Optional[int] = None
    USE_FIXED_SEP_INTERVALs: bool = False
    fixed_sep_intervals_list: Optional[list] = None
    # Ours: which execution path computes SepLLM attention: auto | dense | flex | compact | flex_compact | triton
    sep_attention_impl: SepAttentionImpl = "auto"
    # Derived by validation (never set in YAML): "full" | "sepllm" | "streamingllm" | "fixllm" | "sa" | "sa_no_deno"
    mode: SepLLMMode = "full"
    prefill_windows: Optional[list] = None        # per-layer prefill window (len num_layers)
    generate_windows: Optional[list] = None       # per-layer decode window (len num_layers)

    @property
    def num_initial(self) -> int:
        """``a``: number of kept initial tokens."""
        return self.init_tok_max_idx + 1
