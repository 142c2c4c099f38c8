"""Model architecture config (GPT-NeoX / Pythia / Llama-style). Field names are GPT-NeoX keys with ``-`` -> ``_``;
each field's help text sits in its metadata (``docs/config_reference.md`` is generated from it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.config.components import opt
from megatron.config import derived
from megatron.config.derived import Activation, AttentionType, GeluApproximation, Norm, PosEmb, Precision


@dataclass
class ModelConfig:
    num_layers: int = opt(2, "Transformer layers. Also the length every SepLLM per-layer list must have.")
    hidden_size: int = opt(128, "Model width; must be divisible by num_attention_heads.")
    num_attention_heads: int = opt(4, "Query heads (head dim = hidden_size / heads).")
    num_kv_heads: Optional[int] = opt(None, "Key/value heads for grouped-query attention; must divide "
                                            "num_attention_heads (None = MHA).")
    attention_type: Optional[AttentionType] = opt(None, "Spelling of the Llemma GPT-NeoX release, checked against "
                                                        "num_kv_heads: multihead (KV heads = query heads), "
                                                        "groupedquery (num_kv_heads required), multiquery (one KV "
                                                        "head; sets num_kv_heads 1). None = decided by num_kv_heads "
                                                        "alone.")
    intermediate_size: Optional[int] = opt(None, "GPT-NeoX base MLP width (None = expansion_factor x hidden, else 4 x "
                                                 "hidden). Gated activations keep the plain MLP's parameters: the "
                                                 "first projection gets int(2/3 x base) features (value + gate "
                                                 "halves), the second projection half of that; then both are rounded "
                                                 "up to mlp_multiple_of (Llama-7B: 32768 with multiple 256 -> 11008). "
                                                 "megatron.config.derived.mlp_widths.")
    expansion_factor: Optional[float] = opt(None, "Base MLP width as a multiple of hidden_size (exclusive with "
                                                  "intermediate_size).")
    mlp_multiple_of: int = opt(1, "Round the MLP widths up to a multiple of this (the first projection to twice it), "
                                  "as GPT-NeoX's ParallelMLP does. Default 1.")
    seq_length: int = opt(2048, "Training sequence length (tokens per sample).")
    max_position_embeddings: Optional[int] = opt(None, "Size of the learned position table / longest position; None -> "
                                                       "seq_length.", derived=True)
    pos_emb: PosEmb = opt("learned", "Positions: learned | rotary | alibi | sinusoidal (GPT-NeoX's fixed [sin, cos] "
                                     "table added to the embeddings, base 10000) | none. GPT-NeoX's rpe (T5 relative "
                                     "buckets) is not built.")
    opt_pos_emb_offset: int = opt(0, "OPT-style offset added to the positions before reading the learned (or "
                                     "sinusoidal) table (OPT uses 2; the table then needs max_position_embeddings >= "
                                     "seq_length + offset).")
    rotary_pct: float = opt(1.0, "Fraction of each head rotated by RoPE (Pythia 0.25).")
    rotary_emb_base: int = opt(10000, "RoPE base (theta).")
    rotary_save_freqs_buffer: bool = opt(False, "Store RoPE's inv_freq buffer in checkpoints (GPT-NeoX); it is "
                                                "recomputed either way.")
    sliding_window_width: Optional[int] = opt(None, "Sliding-window attention (GPT-NeoX / flash-attn window_size=(W, "
                                                    "-1), Mistral): query i attends keys i-W .. i, i.e. W+1 tokens "
                                                    "counting itself (Hugging Face Mistral's sliding_window = W+1). "
                                                    "Applied on every attention path and in the KV cache (a rolling "
                                                    "W+1 window). Needs full attention (no SepLLM mode). None = off.")
    use_qk_layernorm: bool = opt(False, "Normalise queries and keys with the model's norm before RoPE (GPT-NeoX: one "
                                        "norm shared by q and k over [heads, head_dim]; layernorm normalises over "
                                        "both, rmsnorm / scalenorm over head_dim).")
    norm: Norm = opt("layernorm", "layernorm | rmsnorm | scalenorm | non_parametric_layernorm (LayerNorm without "
                                  "weight or bias).")
    layernorm_epsilon: float = opt(1.0e-5, "LayerNorm epsilon.")
    rms_norm_epsilon: float = opt(1.0e-8, "RMSNorm epsilon.")
    scalenorm_epsilon: float = opt(1.0e-8, "ScaleNorm epsilon.")
    gpt_j_residual: bool = opt(False, "Parallel residual x + attn(ln1(x)) + mlp(ln2(x)) (GPT-J / Pythia).")
    gpt_j_tied: bool = opt(False, "Parallel residual with one shared norm for attention and MLP.")
    activation: Activation = opt("gelu", "MLP activation (GPT-NeoX's list). Plain: gelu | relu | silu | swish (= silu) "
                                         "| mish | softsign. Gated (value x act(gate)): geglu | reglu | swiglu | glu "
                                         "(sigmoid gate) | bilinear (identity gate).")
    no_weight_tying: bool = opt(False, "True = separate input embedding and output layer (Pythia).")
    use_bias_in_attn_linear: bool = opt(True, "Biases in the QKV and output projections.")
    use_bias_in_mlp: bool = opt(True, "Biases in the MLP projections.")
    use_bias_in_norms: bool = opt(True, "Bias (beta) in LayerNorm (and the query/key LayerNorm), GPT-NeoX's documented "
                                        "meaning. GPT-NeoX's own model code ignores the key (its LayerNorm always has "
                                        "a bias), so a GPT-NeoX layernorm config with false builds no bias here and "
                                        "one there (logged at load). No effect on rmsnorm / scalenorm, which have no "
                                        "bias in either.")
    hidden_dropout: float = opt(0.0, "Dropout after attention and MLP outputs.")
    attention_dropout: float = opt(0.0, "Dropout on attention probabilities.")
    init_method: str = opt("normal", "Weight init: normal | scaled_normal | small_init | wang_init | xavier_* | "
                                     "orthogonal ...")
    output_layer_init_method: str = opt("scaled_normal", "Init of the layers writing into the residual stream (e.g. "
                                                         "wang_init).")
    init_method_std: float = opt(0.02, "Standard deviation of the normal inits.")
    make_vocab_size_divisible_by: int = opt(128, "The tokenizer's vocab is padded up to a multiple of this x "
                                                 "model_parallel_size (see megatron.config.derived.padded_vocab_size).")
    padded_vocab_size: Optional[int] = opt(None, "Embedding rows; None = derived from the tokenizer at "
                                                 "start-up.", derived=True)
    checkpoint_activations: bool = opt(False, "Recompute layer activations in backward to save memory.")
    checkpoint_num_layers: int = opt(1, "Layers per activation-checkpoint chunk.")
    activation_checkpoint_mode: str = opt("full", "torchtitan's activation_checkpoint.mode, with "
                                                  "checkpoint_activations: full (every layer recomputed, in chunks "
                                                  "of checkpoint_num_layers) | selective (see selective_ac_option). "
                                                  "The pipeline engine checkpoints fully (one warning).")
    selective_ac_option: str = opt("op", "torchtitan's selective_ac_option (a string): op = keep the outputs of "
                                         "matmuls and attention, recompute the rest (norms, activations, "
                                         "rotary, dropout) of every layer; N (e.g. \"2\") = fully recompute "
                                         "every N-th layer, keep all activations of the others.")
    attention_config: Optional[list] = opt(None, "GPT-NeoX [[[\"global\"], 12]] (patterns x counts), expanded to one "
                                                 "type per layer. global/flash = dense causal attention (SepLLM "
                                                 "sparsity comes from the SepLLM keys).", derived=True)
    mlp_widths: Optional[list] = opt(None, "[output features of the MLP's first projection, input features of its "
                                           "second] from intermediate_size / expansion_factor / mlp_multiple_of and "
                                           "the activation (megatron.config.derived.mlp_widths); what the model "
                                           "builds.", derived=True)
    gelu_approximate: Optional[GeluApproximation] = opt(None, "How activation gelu is computed, in torch's spelling: "
                                                              "tanh with bias_gelu_fusion (GPT-NeoX's fused kernel), "
                                                              "else none (exact erf).", derived=True)
    output_layer_parallelism: str = opt("column", "GPT-NeoX output-layer split (column); accepted for compatibility.")
    # Fusion / kernel keys accepted from GPT-NeoX configs. rope/layernorm/rmsnorm select the compiled kernels of
    # csrc/ when available (megatron.kernels.plan); the rest are hints. Unavailable: one warning, PyTorch path.
    scaled_masked_softmax_fusion: bool = opt(False, "Kernel hint (fused masked softmax); falls back to PyTorch, "
                                                    "results unchanged.")
    scaled_upper_triang_masked_softmax_fusion: bool = opt(False, "Kernel hint (fused causal softmax); falls back to "
                                                                 "PyTorch.")
    bias_gelu_fusion: bool = opt(False, "GPT-NeoX's fused bias+GeLU: the tanh approximation of GeLU (as upstream's "
                                        "kernel computes it), run in PyTorch; off = exact erf GeLU.")
    fp16_lm_cross_entropy: bool = opt(False, "GPT-NeoX: compute the language-model cross-entropy in the logits' dtype "
                                             "(fp16 / bf16) instead of fp32 (every trainer path: plain, tensor- and "
                                             "pipeline-parallel).")
    fused_cross_entropy: bool = opt(False, "Training loss without the [batch, seq, vocab] logits: the output layer "
                                           "and cross-entropy run fused, fused_cross_entropy_chunk tokens at a time, "
                                           "gradients formed in the same pass (megatron/model/fused_loss.py; exact "
                                           "to fp32 rounding, softmax always in fp32, so fp16_lm_cross_entropy has "
                                           "no effect). Plain and tensor-parallel engines; the pipeline engine keeps "
                                           "the plain loss (one warning).")
    fused_cross_entropy_chunk: int = opt(1024, "Tokens per chunk of fused_cross_entropy (memory of one chunk: "
                                               "chunk x vocab x 4 bytes).")
    onnx_safe: bool = opt(False, "GPT-NeoX's ONNX-exportable GeLU for activation gelu: x / 2 x (1 + erf(x / 1.41421)) "
                                 "(its rounded sqrt(2)); cannot be combined with bias_gelu_fusion. HF exports map it "
                                 "to exact GeLU (relative difference below 3e-6).")
    rope_fusion: bool = opt(False, "Fused rotary kernel for q and k (csrc/, docs/kernels.md) with pos_emb rotary; "
                                   "forced off with USE_BiPE. Without a GPU or the built extension: one warning, "
                                   "PyTorch path.")
    layernorm_fusion: bool = opt(False, "Fused LayerNorm kernel, with the residual add folded in where the block "
                                        "allows (docs/kernels.md), with norm layernorm. Unavailable: one warning, "
                                        "PyTorch path.")
    rmsnorm_fusion: bool = opt(False, "Fused RMSNorm kernel, with the residual add folded in where the block allows "
                                      "(docs/kernels.md), with norm rmsnorm. Unavailable: one warning, PyTorch path.")
    partition_activations: bool = opt(False, "Accepted GPT-NeoX activation-checkpointing hint (only meaningful with "
                                             "tensor parallel).")
    synchronize_each_layer: bool = opt(False, "Accepted GPT-NeoX hint (CUDA synchronize per layer for debugging).")
    precision: Precision = opt("fp32", "Copy of training.precision, so model code need not look elsewhere (derived, do "
                                       "not set).", derived=True)


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """Fill, in place, the values the model reads but nobody sets: one attention type per layer, the MLP widths and
    the GeLU form. Config validation calls it, and so does every model build (``megatron.model.context``) for
    configs made in code, so the model's modules read these fields instead of re-deriving them; it recomputes from
    the user's keys each time, so a config edited after loading stays consistent. Raises ``ConfigError``."""
    cfg.attention_config = derived.expand_attention_config(cfg.attention_config, cfg.num_layers)
    cfg.mlp_widths = list(derived.mlp_widths(cfg.hidden_size, cfg.activation, cfg.intermediate_size,
                                             cfg.expansion_factor, cfg.mlp_multiple_of))
    cfg.gelu_approximate = derived.gelu_approximation(cfg.activation, cfg.bias_gelu_fusion)
    return cfg
