"""Configuration of SepLLM-NeoX models exported for Hugging Face transformers (``model_type: sepllm_neox``).

Written by SepLLM-NeoX's exporter (``tools/ckpts/convert_neox_to_hf.py --architecture sepllm_neox``) next to
``modeling_sepllm_neox.py``. The fields are the framework's model keys (``pos_emb``, ``norm``, ``activation``, ...)
and the SepLLM settings in resolved form: one window per layer, the number of initial tokens, the separator ids.
Self-contained: imports only transformers.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from transformers import PretrainedConfig

POS_EMBS = ("rotary", "alibi", "learned", "sinusoidal", "none")
NORMS = ("layernorm", "rmsnorm", "scalenorm", "non_parametric_layernorm")
GATED_ACTIVATIONS = ("geglu", "reglu", "swiglu", "glu", "bilinear")
ACTIVATIONS = ("gelu", "relu", "silu", "swish", "mish", "softsign") + GATED_ACTIVATIONS
SEPLLM_MODES = ("full", "sepllm", "streamingllm", "fixllm", "sa", "sa_no_deno", "sliding_window")


class SepLLMNeoXConfig(PretrainedConfig):
    """Architecture and attention rule of one SepLLM-NeoX model.

    Attention (``sepllm_mode``): ``full`` (causal), ``sepllm`` (initial tokens + separators + a local window),
    ``streamingllm`` (initial tokens + window), ``fixllm`` (initial tokens + every ``fixed_intervals[l]``-th position
    + window), ``sliding_window`` (the window alone: Mistral's sliding-window attention), ``sa`` / ``sa_no_deno``
    (causal with the self-adjusting softmax). ``prefill_windows[l]`` is layer ``l``'s window for a forward over a
    sequence (training and prompts), ``generate_windows[l]`` the window of a one-token decode step; both count the
    query itself.
    ``use_bipe``: BiPE positions from ``bipe_separator_ids`` (intra-segment ids into the learned table, inter-segment
    ids into rotary / ALiBi).
    """

    model_type = "sepllm_neox"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(self, vocab_size: int = 50304, hidden_size: int = 768, num_hidden_layers: int = 12,
                 num_attention_heads: int = 12, num_key_value_heads: Optional[int] = None,
                 intermediate_size: int = 3072, activation: str = "gelu", gelu_approximate: str = "none",
                 pos_emb: str = "rotary", rotary_pct: float = 1.0, rotary_emb_base: float = 10000.0,
                 max_position_embeddings: int = 2048, position_offset: int = 0, norm: str = "layernorm",
                 norm_epsilon: float = 1e-5,
                 use_bias_in_norms: bool = True, use_qk_layernorm: bool = False,
                 use_bias_in_attn_linear: bool = True, use_bias_in_mlp: bool = True, gpt_j_residual: bool = False,
                 gpt_j_tied: bool = False, hidden_dropout: float = 0.0, attention_dropout: float = 0.0,
                 initializer_range: float = 0.02, sepllm_mode: str = "full",
                 separator_ids: Optional[Sequence[int]] = None,
                 num_initial_tokens: int = 0, prefill_windows: Optional[Sequence[int]] = None,
                 generate_windows: Optional[Sequence[int]] = None, fixed_intervals: Optional[Sequence[int]] = None,
                 batch_adaptive_init_pos: bool = False, sa_numerator_bias: float = 0.0,
                 sa_denominator_bias: float = 1e-10, use_bipe: bool = False,
                 bipe_separator_ids: Optional[Sequence[int]] = None, tie_word_embeddings: bool = True,
                 use_cache: bool = True, **kwargs: Any) -> None:
        self.vocab_size = int(vocab_size)
        self.hidden_size = int(hidden_size)
        self.num_hidden_layers = int(num_hidden_layers)
        self.num_attention_heads = int(num_attention_heads)
        self.num_key_value_heads = int(num_key_value_heads or num_attention_heads)
        self.intermediate_size = int(intermediate_size)
        self.activation = activation
        self.gelu_approximate = gelu_approximate
        self.pos_emb = pos_emb
        self.rotary_pct = float(rotary_pct)
        self.rotary_emb_base = float(rotary_emb_base)
        self.max_position_embeddings = int(max_position_embeddings)
        self.position_offset = int(position_offset)
        self.norm = norm
        self.norm_epsilon = float(norm_epsilon)
        self.use_bias_in_norms = bool(use_bias_in_norms)
        self.use_qk_layernorm = bool(use_qk_layernorm)
        self.use_bias_in_attn_linear = bool(use_bias_in_attn_linear)
        self.use_bias_in_mlp = bool(use_bias_in_mlp)
        self.gpt_j_residual = bool(gpt_j_residual)
        self.gpt_j_tied = bool(gpt_j_tied)
        self.hidden_dropout = float(hidden_dropout)
        self.attention_dropout = float(attention_dropout)
        self.initializer_range = float(initializer_range)
        self.sepllm_mode = sepllm_mode
        self.separator_ids = [int(s) for s in separator_ids or ()]
        self.num_initial_tokens = int(num_initial_tokens)
        everything = [self.max_position_embeddings] * self.num_hidden_layers
        self.prefill_windows = [int(w) for w in prefill_windows] if prefill_windows else everything
        self.generate_windows = [int(w) for w in generate_windows] if generate_windows else list(self.prefill_windows)
        self.fixed_intervals = None if fixed_intervals is None else [int(i) for i in fixed_intervals]
        self.batch_adaptive_init_pos = bool(batch_adaptive_init_pos)
        self.sa_numerator_bias = float(sa_numerator_bias)
        self.sa_denominator_bias = float(sa_denominator_bias)
        self.use_bipe = bool(use_bipe)
        self.bipe_separator_ids = [int(s) for s in bipe_separator_ids or ()]
        self.use_cache = bool(use_cache)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._check()

    def _check(self) -> None:
        """One ``ValueError`` line naming the field, its value and what was expected."""
        choices = {"pos_emb": POS_EMBS, "norm": NORMS, "activation": ACTIVATIONS, "sepllm_mode": SEPLLM_MODES,
                   "gelu_approximate": ("none", "tanh", "onnx")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"SepLLMNeoXConfig.{name} = {getattr(self, name)!r}: expected one of {allowed}")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"SepLLMNeoXConfig: hidden_size {self.hidden_size}, num_attention_heads "
                             f"{self.num_attention_heads} and num_key_value_heads {self.num_key_value_heads} must "
                             f"divide evenly")
        per_layer = {"prefill_windows": self.prefill_windows, "generate_windows": self.generate_windows}
        if self.sepllm_mode == "fixllm":
            per_layer["fixed_intervals"] = self.fixed_intervals or []
        for name, values in per_layer.items():
            if len(values) != self.num_hidden_layers or min(values) < 1:
                raise ValueError(f"SepLLMNeoXConfig.{name} = {values}: expected {self.num_hidden_layers} integers "
                                 f">= 1 (one per layer)")
        if self.sepllm_mode == "sepllm" and not self.separator_ids:
            raise ValueError("SepLLMNeoXConfig.separator_ids is empty: sepllm_mode 'sepllm' needs separators")
        if self.use_bipe and not self.bipe_separator_ids:
            raise ValueError("SepLLMNeoXConfig.bipe_separator_ids is empty: use_bipe needs separator ids")
        if self.use_bipe and self.pos_emb == "learned":
            raise ValueError("SepLLMNeoXConfig: use_bipe with pos_emb 'learned' (BiPE owns the learned table)")
        if self.rotary_pct <= 0 and self.pos_emb == "rotary":
            raise ValueError(f"SepLLMNeoXConfig.rotary_pct = {self.rotary_pct}: expected > 0 with rotary positions")


__all__ = ["SepLLMNeoXConfig"]
