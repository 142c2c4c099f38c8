"""``GPTModel`` <-> Hugging Face ``GPTNeoXForCausalLM`` / ``LlamaForCausalLM`` / ``MistralForCausalLM``: what each HF
class can represent, the HF config describing the same function, and the state-dict conversions (through the key
tables of :mod:`megatron.model.weight_names`; Mistral's tensor names are Llama's). Mistral is the Llama shape
without biases plus ``sliding_window`` (= ``sliding_window_width + 1``, :func:`hf_sliding_window`).

Every check raises ``ValueError`` naming the config key: an export that silently changes the function is worse than
none. Rotary settings go into transformers 5.x ``rope_parameters`` (``rope_theta``, ``partial_rotary_factor``).
``hidden_act`` is the activation ``GPTModel`` computes: exact (erf) GELU for ``gelu``, and HF's
``gelu_pytorch_tanh`` when ``bias_gelu_fusion`` made it the tanh approximation (``derived.gelu_approximation``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import Tensor

from megatron.config import derived
from megatron.config.model import ModelConfig
from megatron.model.attention import head_dim, kv_heads
from megatron.model.weight_names import (
    GPT_NEOX_TABLE,
    LLAMA_TABLE,
    clean_state_dict,
    from_hf_state,
    model_keys,
    to_hf_state,
)
from megatron.model.mlp import ffn_width
from megatron.config.sepllm import SepLLMConfig

HF_CLASSES = {"neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
#: our gated activations -> the ``hidden_act`` an HF gated MLP (Llama, Mistral) applies to ``gate_proj``
HF_GATED_ACTS = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu", "glu": "sigmoid", "bilinear": "linear"}


def max_positions(cfg: ModelConfig) -> int:
    return cfg.max_position_embeddings or cfg.seq_length


def check_vocab(cfg: ModelConfig, vocab_size: Optional[int]) -> int:
    """The HF vocabulary size: ``vocab_size`` (1..padded_vocab_size) or ``padded_vocab_size``."""
    if cfg.padded_vocab_size is None:
        raise ValueError("model config 'padded_vocab_size' is None: set it (the embedding rows) before exporting")
    if vocab_size is None:
        return cfg.padded_vocab_size
    if not 0 < vocab_size <= cfg.padded_vocab_size:
        raise ValueError(f"vocab_size = {vocab_size}: expected 1..padded_vocab_size ({cfg.padded_vocab_size})")
    return vocab_size


def rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """transformers 5.x ``rope_parameters`` for our rotary settings (``rotary_pct`` -> ``partial_rotary_factor``)."""
    # always explicit: GPTNeoXConfig's own default partial_rotary_factor is 0.25
    return {"rope_type": "default", "rope_theta": float(cfg.rotary_emb_base),
            "partial_rotary_factor": float(cfg.rotary_pct)}


# ------------------------------------------------------------------------------------------------------- GPT-NeoX
# our plain (ungated) activations -> the transformers ACT2FN name computing the same function
HF_PLAIN_ACTS = {"gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu", "mish": "mish"}


def hf_hidden_act(cfg: ModelConfig) -> str:
    """HF ``hidden_act`` of the non-gated MLP: the function the model was trained with."""
    if cfg.activation == "gelu" and derived.gelu_approximation(cfg.activation, cfg.bias_gelu_fusion) == "tanh":
        return "gelu_pytorch_tanh"
    return HF_PLAIN_ACTS[cfg.activation]


def check_gpt_neox_compatible(cfg: ModelConfig) -> None:
    """Raise ``ValueError`` if ``GPTNeoXForCausalLM`` cannot represent this architecture exactly."""
    problems = []
    if cfg.pos_emb != "rotary":
        problems.append(f"pos_emb = {cfg.pos_emb!r} (HF GPT-NeoX has rotary only)")
    if cfg.norm != "layernorm" or not cfg.use_bias_in_norms:
        problems.append(f"norm = {cfg.norm!r}, use_bias_in_norms = {cfg.use_bias_in_norms} (needs LayerNorm with bias)")
    if cfg.activation not in HF_PLAIN_ACTS:
        problems.append(f"activation = {cfg.activation!r} (HF GPT-NeoX's MLP is not gated; plain activations it "
                        f"computes: {', '.join(HF_PLAIN_ACTS)})")
    if cfg.use_qk_layernorm:
        problems.append("use_qk_layernorm = True (HF GPT-NeoX has no query/key norm)")
    if not cfg.use_bias_in_mlp:
        problems.append("use_bias_in_mlp = False (HF GPT-NeoX MLP always has biases)")
    if kv_heads(cfg) != cfg.num_attention_heads:
        problems.append(f"num_kv_heads = {cfg.num_kv_heads} (HF GPT-NeoX has no grouped-query attention)")
    if cfg.sliding_window_width is not None:
        problems.append(f"sliding_window_width = {cfg.sliding_window_width} (HF GPT-NeoX attends every earlier token; "
                        f"a Llama-shaped model exports to Mistral)")
    if problems:
        raise ValueError("cannot export to HF GPTNeoXForCausalLM: " + "; ".join(problems) +
                         ". Use the Llama export for rmsnorm/swiglu/GQA models.")


def to_hf_gpt_neox_state_dict(model_state: Mapping[str, Any], model_cfg: ModelConfig,
                              vocab_size: Optional[int] = None, keep_bipe_embeddings: bool = False,
                              include_tied_head: bool = True) -> dict[str, Tensor]:
    """``GPTModel`` state dict -> ``GPTNeoXForCausalLM`` state dict (tensors are shared, not copied).

    ``vocab_size`` trims the padded embedding rows (default: keep ``padded_vocab_size`` rows). A BiPE model's
    learned ``position_embeddings`` table, which plain HF GPT-NeoX would silently ignore, is an error unless
    ``keep_bipe_embeddings`` (then written as ``gpt_neox.position_embeddings.weight`` for a SepLLM-aware class).
    ``gpt_j_tied`` writes the shared norm as both HF layer norms (the same function). A tied head is written as
    ``lm_head.weight`` only with ``include_tied_head`` (``load_state_dict`` wants it; safetensors files must not
    hold it twice).
    """
    cfg = model_cfg
    check_gpt_neox_compatible(cfg)
    vocab = check_vocab(cfg, vocab_size)
    state = clean_state_dict(model_state)
    if "embed.position_embeddings.weight" in state and not keep_bipe_embeddings:
        raise ValueError("the model has a learned position table (BiPE); HF GPTNeoXForCausalLM would ignore it. "
                         "Pass keep_bipe_embeddings=True to export it for a SepLLM-aware class.")
    _require(state, cfg, "GPTModel state dict")
    out = to_hf_state(GPT_NEOX_TABLE, state, cfg, vocab)
    if cfg.gpt_j_tied:
        for i in range(cfg.num_layers):
            q = f"gpt_neox.layers.{i}."
            for p in ("weight", "bias"):
                out[q + f"post_attention_layernorm.{p}"] = out[q + f"input_layernorm.{p}"].clone()
    if not cfg.no_weight_tying and include_tied_head:
        out["lm_head.weight"] = out["gpt_neox.embed_in.weight"]
    return out


def hf_gpt_neox_config(model_cfg: ModelConfig, vocab_size: Optional[int] = None, **overrides: Any):
    """``transformers.GPTNeoXConfig`` describing the same function as ``GPTModel(model_cfg)``.

    ``vocab_size`` defaults to ``padded_vocab_size``; ``overrides`` (e.g. ``bos_token_id``, ``eos_token_id``,
    ``dtype``) are passed through.
    """
    from transformers import GPTNeoXConfig

    cfg = model_cfg
    check_gpt_neox_compatible(cfg)
    kwargs: dict[str, Any] = dict(
        vocab_size=check_vocab(cfg, vocab_size),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=ffn_width(cfg),
        hidden_act=hf_hidden_act(cfg),
        rope_parameters=rope_parameters(cfg),
        attention_dropout=cfg.attention_dropout,
        hidden_dropout=cfg.hidden_dropout,
        max_position_embeddings=max_positions(cfg),
        initializer_range=cfg.init_method_std,
        layer_norm_eps=cfg.layernorm_epsilon,
        use_parallel_residual=cfg.gpt_j_residual,
        tie_word_embeddings=not cfg.no_weight_tying,
        attention_bias=cfg.use_bias_in_attn_linear,
    )
    kwargs.update(overrides)
    return GPTNeoXConfig(**kwargs)


def from_hf_gpt_neox_state_dict(hf_state: Mapping[str, Any], model_cfg: ModelConfig,
                                sepllm_cfg: Optional[SepLLMConfig] = None) -> dict[str, Tensor]:
    """``GPTNeoXForCausalLM`` state dict -> ``GPTModel`` state dict (inverse of ``to_hf_gpt_neox_state_dict``).

    Embedding rows are zero-padded up to ``padded_vocab_size``. ``gpt_j_tied`` is refused (HF has two norms).
    """
    cfg = model_cfg
    check_gpt_neox_compatible(cfg)
    if cfg.gpt_j_tied:
        raise ValueError("model config key 'gpt_j_tied' = True cannot load HF GPT-NeoX weights (two separate norms)")
    expected = model_keys(cfg, sepllm_cfg)
    if "gpt_neox.position_embeddings.weight" in hf_state and "embed.position_embeddings.weight" not in expected:
        expected.append("embed.position_embeddings.weight")  # a SepLLM-aware export of a BiPE model
    if cfg.no_weight_tying and "lm_head.weight" not in hf_state:
        raise KeyError("HF GPT-NeoX state dict: missing key 'lm_head.weight' for an untied model")
    return from_hf_state(GPT_NEOX_TABLE, hf_state, cfg, expected, "HF GPT-NeoX state dict")


# ---------------------------------------------------------------------------------------------------------- Llama
def llama_shape_problems(cfg: ModelConfig) -> list[str]:
    """What keeps ``cfg`` from the Llama shape (shared by the Llama and Mistral classes): one entry per key."""
    problems = []
    if cfg.pos_emb != "rotary" or cfg.rotary_pct != 1.0:
        problems.append(f"pos_emb = {cfg.pos_emb!r}, rotary_pct = {cfg.rotary_pct} (Llama rotates the full head)")
    if cfg.norm != "rmsnorm":
        problems.append(f"norm = {cfg.norm!r} (Llama uses rmsnorm)")
    if cfg.activation not in HF_GATED_ACTS:
        problems.append(f"activation = {cfg.activation!r} (Llama's MLP is gated: {', '.join(HF_GATED_ACTS)})")
    if cfg.gpt_j_residual:
        problems.append("gpt_j_residual = True (Llama is sequential)")
    if cfg.use_qk_layernorm:
        problems.append("use_qk_layernorm = True (Llama has no query/key norm)")
    return problems


def check_llama_compatible(cfg: ModelConfig) -> None:
    """Raise ``ValueError`` if ``LlamaForCausalLM`` cannot represent this architecture exactly."""
    problems = llama_shape_problems(cfg)
    if cfg.sliding_window_width is not None:
        problems.append(f"sliding_window_width = {cfg.sliding_window_width} (Llama attends every earlier token; "
                        f"export with --architecture mistral)")
    if problems:
        raise ValueError("cannot export to HF LlamaForCausalLM: " + "; ".join(problems))


def _llama_family_state(model_state: Mapping[str, Any], cfg: ModelConfig, vocab_size: Optional[int],
                        include_tied_head: bool) -> dict[str, Tensor]:
    """Llama's tensor names (Mistral uses the same ones) for a ``GPTModel`` state dict already checked for the class."""
    vocab = check_vocab(cfg, vocab_size)
    state = clean_state_dict(model_state)
    _require(state, cfg, "GPTModel state dict")
    out = to_hf_state(LLAMA_TABLE, state, cfg, vocab)
    if not cfg.no_weight_tying and include_tied_head:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def _llama_family_config(cfg: ModelConfig, vocab_size: Optional[int]) -> dict[str, Any]:
    """The config fields LlamaConfig and MistralConfig share, describing ``GPTModel(cfg)``."""
    return dict(
        vocab_size=check_vocab(cfg, vocab_size),
        hidden_size=cfg.hidden_size,
        intermediate_size=ffn_width(cfg),
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=kv_heads(cfg),
        head_dim=head_dim(cfg),
        hidden_act=HF_GATED_ACTS[cfg.activation],
        max_position_embeddings=max_positions(cfg),
        initializer_range=cfg.init_method_std,
        rms_norm_eps=cfg.rms_norm_epsilon,
        tie_word_embeddings=not cfg.no_weight_tying,
        rope_parameters=rope_parameters(cfg),
        attention_dropout=cfg.attention_dropout,
    )


def _from_llama_family_state(hf_state: Mapping[str, Any], cfg: ModelConfig, sepllm_cfg: Optional[SepLLMConfig],
                             what: str) -> dict[str, Tensor]:
    if cfg.no_weight_tying and "lm_head.weight" not in hf_state:
        raise KeyError(f"{what}: missing key 'lm_head.weight' for an untied model")
    return from_hf_state(LLAMA_TABLE, hf_state, cfg, model_keys(cfg, sepllm_cfg), what)


def to_hf_llama_state_dict(model_state: Mapping[str, Any], model_cfg: ModelConfig,
                           vocab_size: Optional[int] = None, include_tied_head: bool = True) -> dict[str, Tensor]:
    """``GPTModel`` state dict -> ``LlamaForCausalLM`` state dict (QKV and gated MLP split by the table's codecs)."""
    check_llama_compatible(model_cfg)
    return _llama_family_state(model_state, model_cfg, vocab_size, include_tied_head)


def hf_llama_config(model_cfg: ModelConfig, vocab_size: Optional[int] = None, **overrides: Any):
    """``transformers.LlamaConfig`` describing the same function as ``GPTModel(model_cfg)``."""
    from transformers import LlamaConfig

    cfg = model_cfg
    check_llama_compatible(cfg)
    kwargs = _llama_family_config(cfg, vocab_size)
    kwargs.update(attention_bias=cfg.use_bias_in_attn_linear, mlp_bias=cfg.use_bias_in_mlp)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def from_hf_llama_state_dict(hf_state: Mapping[str, Any], model_cfg: ModelConfig,
                             sepllm_cfg: Optional[SepLLMConfig] = None) -> dict[str, Tensor]:
    """``LlamaForCausalLM`` state dict -> ``GPTModel`` state dict (inverse of ``to_hf_llama_state_dict``): q/k/v
    are re-interleaved into the grouped fused-QKV layout, up/gate concatenated as ``[value; gate]``."""
    check_llama_compatible(model_cfg)
    return _from_llama_family_state(hf_state, model_cfg, sepllm_cfg, "HF Llama state dict")


# -------------------------------------------------------------------------------------------------------- Mistral
def hf_sliding_window(cfg: ModelConfig) -> Optional[int]:
    """HF Mistral's ``sliding_window`` for ``sliding_window_width`` W: transformers keeps key ``k`` for query ``q``
    when ``q - k < sliding_window`` (the query counted), GPT-NeoX / flash-attn ``window_size=(W, -1)`` when
    ``q - k <= W``; so ``W + 1`` (None = full attention)."""
    return None if cfg.sliding_window_width is None else cfg.sliding_window_width + 1


def check_mistral_compatible(cfg: ModelConfig) -> None:
    """Raise ``ValueError`` if ``MistralForCausalLM`` cannot represent this architecture exactly (the Llama shape,
    no biases; any ``sliding_window_width`` or none)."""
    problems = llama_shape_problems(cfg)
    if cfg.use_bias_in_attn_linear:
        problems.append("use_bias_in_attn_linear = True (Mistral's projections have no bias)")
    if cfg.use_bias_in_mlp:
        problems.append("use_bias_in_mlp = True (Mistral's MLP has no bias)")
    if problems:
        raise ValueError("cannot export to HF MistralForCausalLM: " + "; ".join(problems))


def to_hf_mistral_state_dict(model_state: Mapping[str, Any], model_cfg: ModelConfig,
                             vocab_size: Optional[int] = None, include_tied_head: bool = True) -> dict[str, Tensor]:
    """``GPTModel`` state dict -> ``MistralForCausalLM`` state dict (Mistral's tensor names are Llama's)."""
    check_mistral_compatible(model_cfg)
    return _llama_family_state(model_state, model_cfg, vocab_size, include_tied_head)


def hf_mistral_config(model_cfg: ModelConfig, vocab_size: Optional[int] = None, **overrides: Any):
    """``transformers.MistralConfig`` describing the same function as ``GPTModel(model_cfg)``
    (``sliding_window`` = :func:`hf_sliding_window`)."""
    from transformers import MistralConfig

    cfg = model_cfg
    check_mistral_compatible(cfg)
    kwargs = _llama_family_config(cfg, vocab_size)
    kwargs.update(sliding_window=hf_sliding_window(cfg))
    kwargs.update(overrides)
    return MistralConfig(**kwargs)


def from_hf_mistral_state_dict(hf_state: Mapping[str, Any], model_cfg: ModelConfig,
                               sepllm_cfg: Optional[SepLLMConfig] = None) -> dict[str, Tensor]:
    """``MistralForCausalLM`` state dict -> ``GPTModel`` state dict (inverse of ``to_hf_mistral_state_dict``)."""
    check_mistral_compatible(model_cfg)
    return _from_llama_family_state(hf_state, model_cfg, sepllm_cfg, "HF Mistral state dict")


def _require(state: Mapping[str, Tensor], cfg: ModelConfig, what: str) -> None:
    """Every key ``GPTModel(cfg)`` has must be in ``state`` (the tables skip absent keys, e.g. bias-free layers)."""
    missing = [k for k in model_keys(cfg) if k not in state]
    if missing:
        raise KeyError(f"{what}: missing keys {missing[:8]}" + (" ..." if len(missing) > 8 else ""))


ARCHITECTURES = ("neox", "llama", "mistral")
CHECKS = {"neox": check_gpt_neox_compatible, "llama": check_llama_compatible, "mistral": check_mistral_compatible}
TO_HF = {"neox": to_hf_gpt_neox_state_dict, "llama": to_hf_llama_state_dict, "mistral": to_hf_mistral_state_dict}
FROM_HF = {"neox": from_hf_gpt_neox_state_dict, "llama": from_hf_llama_state_dict,
           "mistral": from_hf_mistral_state_dict}
HF_CONFIGS = {"neox": hf_gpt_neox_config, "llama": hf_llama_config, "mistral": hf_mistral_config}
