"""Help texts of the ModelConfig and SepLLMConfig fields (those dataclasses are shared contracts kept free of metadata).

The reference generator (``python -m megatron.config.docs``) reads these; the docs test fails when a field has none.
"""

from __future__ import annotations

MODEL_HELP: dict[str, str] = {
    "num_layers": "Transformer layers. Also the length every SepLLM per-layer list must have.",
    "hidden_size": "Model width; must be divisible by num_attention_heads.",
    "num_attention_heads": "Query heads (head dim = hidden_size / heads).",
    "attention_type": "Spelling of the Llemma GPT-NeoX release, checked against num_kv_heads: multihead (KV heads = "
                      "query heads), groupedquery (num_kv_heads required), multiquery (one KV head; sets "
                      "num_kv_heads 1). None = decided by num_kv_heads alone.",
    "num_kv_heads": "Key/value heads for grouped-query attention; must divide num_attention_heads (None = MHA).",
    "intermediate_size": "GPT-NeoX base MLP width (None = expansion_factor x hidden, else 4 x hidden). Gated "
                         "activations keep the plain MLP's parameters: the first projection gets int(2/3 x base) "
                         "features (value + gate halves), the second projection half of that; then both are rounded "
                         "up to mlp_multiple_of (Llama-7B: 32768 with multiple 256 -> 11008). "
                         "megatron.config.derived.mlp_widths.",
    "expansion_factor": "Base MLP width as a multiple of hidden_size (exclusive with intermediate_size).",
    "mlp_multiple_of": "Round the MLP widths up to a multiple of this (the first projection to twice it), as GPT-NeoX's "
                       "ParallelMLP does. Default 1.",
    "rotary_save_freqs_buffer": "Store RoPE's inv_freq buffer in checkpoints (GPT-NeoX); it is recomputed either way.",
    "sliding_window_width": "Sliding-window attention (GPT-NeoX / flash-attn window_size=(W, -1), Mistral): query i "
                            "attends keys i-W .. i, i.e. W+1 tokens counting itself (Hugging Face Mistral's "
                            "sliding_window = W+1). Applied on every attention path and in the KV cache (a rolling "
                            "W+1 window). Needs full attention (no SepLLM mode). None = off.",
    "use_qk_layernorm": "Normalise queries and keys with the model's norm before RoPE (GPT-NeoX: one norm shared by "
                        "q and k over [heads, head_dim]; layernorm normalises over both, rmsnorm / scalenorm over "
                        "head_dim).",
    "seq_length": "Training sequence length (tokens per sample).",
    "max_position_embeddings": "Size of the learned position table / longest position; None -> seq_length.",
    "pos_emb": "Positions: learned | rotary | alibi | sinusoidal (GPT-NeoX's fixed [sin, cos] table added to the "
               "embeddings, base 10000) | none. GPT-NeoX's rpe (T5 relative buckets) is not built.",
    "opt_pos_emb_offset": "OPT-style offset added to the positions before reading the learned (or sinusoidal) table "
                          "(OPT uses 2; the table then needs max_position_embeddings >= seq_length + offset).",
    "rotary_pct": "Fraction of each head rotated by RoPE (Pythia 0.25).",
    "rotary_emb_base": "RoPE base (theta).",
    "norm": "layernorm | rmsnorm | scalenorm | non_parametric_layernorm (LayerNorm without weight or bias).",
    "layernorm_epsilon": "LayerNorm epsilon.",
    "rms_norm_epsilon": "RMSNorm epsilon.",
    "scalenorm_epsilon": "ScaleNorm epsilon.",
    "gpt_j_residual": "Parallel residual x + attn(ln1(x)) + mlp(ln2(x)) (GPT-J / Pythia).",
    "gpt_j_tied": "Parallel residual with one shared norm for attention and MLP.",
    "activation": "MLP activation (GPT-NeoX's list). Plain: gelu | relu | silu | swish (= silu) | mish | softsign. "
                  "Gated (value x act(gate)): geglu | reglu | swiglu | glu (sigmoid gate) | bilinear (identity "
                  "gate).",
    "no_weight_tying": "True = separate input embedding and output layer (Pythia).",
    "use_bias_in_attn_linear": "Biases in the QKV and output projections.",
    "use_bias_in_mlp": "Biases in the MLP projections.",
    "use_bias_in_norms": "Bias (beta) in LayerNorm (and the query/key LayerNorm), GPT-NeoX's documented meaning. "
                         "GPT-NeoX's own model code ignores the key (its LayerNorm always has a bias), so a GPT-NeoX "
                         "layernorm config with false builds no bias here and one there (logged at load). No effect "
                         "on rmsnorm / scalenorm, which have no bias in either.",
    "hidden_dropout": "Dropout after attention and MLP outputs.",
    "attention_dropout": "Dropout on attention probabilities.",
    "init_method": "Weight init: normal | scaled_normal | small_init | wang_init | xavier_* | orthogonal ...",
    "output_layer_init_method": "Init of the layers writing into the residual stream (e.g. wang_init).",
    "init_method_std": "Standard deviation of the normal inits.",
    "make_vocab_size_divisible_by": "The tokenizer's vocab is padded up to a multiple of this x model_parallel_size "
                                    "(see megatron.config.derived.padded_vocab_size).",
    "padded_vocab_size": "Embedding rows; None = derived from the tokenizer at start-up.",
    "checkpoint_activations": "Recompute layer activations in backward to save memory.",
    "checkpoint_num_layers": "Layers per activation-checkpoint chunk.",
    "attention_config": "GPT-NeoX [[[\"global\"], 12]] (patterns x counts), expanded to one type per layer. "
                        "global/flash = dense causal attention (SepLLM sparsity comes from the SepLLM keys).",
    "output_layer_parallelism": "GPT-NeoX output-layer split (column); accepted for compatibility.",
    "scaled_masked_softmax_fusion": "Kernel hint (fused masked softmax); falls back to PyTorch, results unchanged.",
    "scaled_upper_triang_masked_softmax_fusion": "Kernel hint (fused causal softmax); falls back to PyTorch.",
    "bias_gelu_fusion": "GPT-NeoX's fused bias+GeLU: the tanh approximation of GeLU (as upstream's kernel computes it), "
                        "run in PyTorch; off = exact erf GeLU.",
    "fp16_lm_cross_entropy": "GPT-NeoX: compute the language-model cross-entropy in the logits' dtype (fp16 / bf16) "
                             "instead of fp32 (every trainer path: plain, tensor- and pipeline-parallel).",
    "onnx_safe": "GPT-NeoX's ONNX-exportable GeLU for activation gelu: x / 2 x (1 + erf(x / 1.41421)) (its rounded "
                 "sqrt(2)); cannot be combined with bias_gelu_fusion. HF exports map it to exact GeLU (relative "
                 "difference below 3e-6).",
    "rope_fusion": "Fused rotary kernel for q and k (csrc/, docs/kernels.md) with pos_emb rotary; forced off with "
                   "USE_BiPE. Without a GPU or the built extension: one warning, PyTorch path.",
    "layernorm_fusion": "Fused LayerNorm kernel, with the residual add folded in where the block allows "
                        "(docs/kernels.md), with norm layernorm. Unavailable: one warning, PyTorch path.",
    "rmsnorm_fusion": "Fused RMSNorm kernel, with the residual add folded in where the block allows "
                      "(docs/kernels.md), with norm rmsnorm. Unavailable: one warning, PyTorch path.",
    "partition_activations": "Accepted GPT-NeoX activation-checkpointing hint (only meaningful with tensor parallel).",
    "synchronize_each_layer": "Accepted GPT-NeoX hint (CUDA synchronize per layer for debugging).",
    "precision": "Copy of training.precision, so model code need not look elsewhere (derived, do not set).",
}

SEPLLM_HELP: dict[str, str] = {
    "separator_token_ids": "Token ids treated as separators (kept as global keys). [-1] = none. Must be a real list "
                           "in SepLLM mode. Pythia: [15, 13, 32, 2, 28, 27, 209, 186, 187]. Checked against the "
                           "tokenizer's vocabulary at start-up (check_separator_ids).",
    "PADDING_ID": "Token id counted as left padding by BATCH_ADAPTIVE_INIT_POS (any id; Llama 3 uses 128009).",
    "prefill_k": "Deprecated in SepLLM; must be 0.",
    "generate_k": "Deprecated in SepLLM; must be 0.",
    "prefill_local_window_size": "Local window w for training/prefill (counts the query token), >= 1.",
    "generate_local_window_size": "Local window for single-token decode steps, >= 1.",
    "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS": "Use prefill_loc_win_size_list (one window per layer).",
    "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS": "Use generate_win_loc_size_list (one window per layer).",
    "prefill_loc_win_size_list": "Per-layer training/prefill windows (length = num_layers); a window >= seq_length "
                                 "makes that layer full causal attention.",
    "generate_win_loc_size_list": "Per-layer decode windows (length = num_layers).",
    "init_tok_max_idx": "Largest index of kept initial tokens: a = init_tok_max_idx + 1 (default 3); -1 = none.",
    "USE_ORIGINAL_FULL_ATTEN": "Plain causal attention; resets every SepLLM knob (each change logged).",
    "streamingLLM": "StreamingLLM: initial tokens + local window only (separators forced to [-1]).",
    "USE_SEP_ATTN_KERNEL_ACCELERATOR": "Reference switch for the FlexAttention path. Here it only selects the fastest "
                                       "execution path, which sep_attention_impl decides; combines with every mode.",
    "RECOMPILE_SEP_ATTN_KERNEL": "Compile the block-mask construction; needs USE_SEP_ATTN_KERNEL_ACCELERATOR.",
    "BATCH_ADAPTIVE_INIT_POS": "Shift each row's initial tokens past its left padding (evaluation with left padding).",
    "PRINT_KV_RATIO": "Log retention statistics (kept / causal attention entries).",
    "print_ratio_intervals": "Log the retention ratio every N forward calls.",
    "USE_BiPE": "Bilevel positional encoding (needs BiPE_seps and pos_emb rotary or alibi).",
    "BiPE_seps": "Separator ids that cut BiPE segments.",
    "EXCLUDE_DIAGONAL": "Reference semantics flag; True = the window counts the query token itself.",
    "_DEFAULT_SPARSE_BLOCK_SIZE": "FlexAttention block size for queries and keys.",
    "USE_SA_SOFTMAX": "Self-adjusting softmax (dense path, causal mask; no separators).",
    "USE_SA_SOFTMAX_NO_DENO": "Self-adjusting softmax without denominator (dense path, causal mask).",
    "SA_Numerator_Bias": "SA numerator bias epsilon_n.",
    "SA_Denominator_Bias": "SA denominator bias epsilon_d.",
    "Layer_num": "Training-free configs: layer count of the Hugging Face model. Never sets num_layers; cross-checked "
                 "against it when num_layers is given; sizes the per-layer lists otherwise.",
    "USE_FIXED_SEP_INTERVALs": "FixLLM: keep every interval-th position instead of separators.",
    "fixed_sep_intervals_list": "FixLLM per-layer intervals (length = num_layers, each >= 1).",
    "sep_attention_impl": "SepLLM execution path: auto | dense | flex | compact | flex_compact | triton (all give the "
                          "same result; auto picks the fastest available). Command line: --sep_attention_impl compact.",
    "mode": "Derived: full | sepllm | streamingllm | fixllm | sa | sa_no_deno.",
    "prefill_windows": "Derived: the per-layer training/prefill window (length num_layers); [seq_length]*L in full "
                       "mode.",
    "generate_windows": "Derived: the per-layer decode window.",
}
