"""Model architecture config (GPT-NeoX / Pythia / Llama-style). Field names are GPT-NeoX keys with ``-`` -> ``_``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron.config.derived import Activation, AttentionType, Norm, PosEmb, Precision


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_kv_heads: Optional[int] = None          # grouped-query attention; None = num_attention_heads
    attention_type: Optional[AttentionType] = None  # Llemma-release spelling: multihead | groupedquery | multiquery
    intermediate_size: Optional[int] = None     # GPT-NeoX base MLP width (gated: 2/3 of it, split); derived.mlp_widths
    expansion_factor: Optional[float] = None    # base MLP width = expansion_factor * hidden (exclusive with the above)
    mlp_multiple_of: int = 1                    # round the MLP widths up to this multiple (GPT-NeoX ParallelMLP)
    seq_length: int = 2048
    max_position_embeddings: Optional[int] = None  # None = seq_length
    pos_emb: PosEmb = "learned"
    opt_pos_emb_offset: int = 0                 # OPT: the learned table is read at position + offset
    rotary_pct: float = 1.0
    rotary_emb_base: int = 10000
    rotary_save_freqs_buffer: bool = False      # keep RoPE's inv_freq in the state dict (GPT-NeoX persistent buffer)
    sliding_window_width: Optional[int] = None  # query i attends keys i-W..i (flash-attn window_size=(W, -1))
    use_qk_layernorm: bool = False              # normalise queries and keys with the model's norm before RoPE
    norm: Norm = "layernorm"
    layernorm_epsilon: float = 1.0e-5
    rms_norm_epsilon: float = 1.0e-8
    scalenorm_epsilon: float = 1.0e-8
    gpt_j_residual: bool = False                 # parallel residual x + attn(ln1 x) + mlp(ln2 x)
    gpt_j_tied: bool = False                     # parallel residual with one shared norm
    activation: Activation = "gelu"
    no_weight_tying: bool = False                # True = untied input/output embeddings (Pythia)
    use_bias_in_attn_linear: bool = True
    use_bias_in_mlp: bool = True
    use_bias_in_norms: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method: str = "normal"                  # normal | scaled_normal | small_init | wang_init | xavier_* ...
    output_layer_init_method: str = "scaled_normal"
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    padded_vocab_size: Optional[int] = None      # derived from the tokenizer (x tensor-parallel size) if None
    checkpoint_activations: bool = False
    checkpoint_num_layers: int = 1
    attention_config: Optional[list] = None      # GPT-NeoX [[["global"], n]] expanded to one entry per layer
    output_layer_parallelism: str = "column"
    # Fusion / kernel keys accepted from GPT-NeoX configs. rope/layernorm/rmsnorm select the compiled kernels of
    # csrc/ when available (megatron.kernels.plan); the rest are hints. Unavailable: one warning, PyTorch path.
    scaled_masked_softmax_fusion: bool = False
    scaled_upper_triang_masked_softmax_fusion: bool = False
    bias_gelu_fusion: bool = False
    fp16_lm_cross_entropy: bool = False          # GPT-NeoX: loss computed in the logits' dtype (not upcast to fp32)
    onnx_safe: bool = False                      # GPT-NeoX: gelu as x/2 (1 + erf(x / 1.41421)), the ONNX-exportable form
    rope_fusion: bool = False
    layernorm_fusion: bool = False
    rmsnorm_fusion: bool = False
    partition_activations: bool = False
    synchronize_each_layer: bool = False
    precision: Precision = "fp32"                # derived from the fp16 / bf16 DeepSpeed blocks
