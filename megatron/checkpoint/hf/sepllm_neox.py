"""``GPTModel`` -> the ``sepllm_neox`` Hugging Face folder: a model with its own modeling code.

The standard exports (``GPTNeoXForCausalLM``, ``LlamaForCausalLM``) reuse transformers' classes and so refuse what
those classes cannot compute (ALiBi, learned or no positions, BiPE, self-adjusting softmax, ScaleNorm, ...). This
export instead writes ``configuration_sepllm_neox.py`` and ``modeling_sepllm_neox.py`` (``remote_code/``) beside the
weights and points ``config.json``'s ``auto_map`` at them, so every model the framework trains loads with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` and computes what ``GPTModel`` computes.
The weights keep our names under ``model.`` (``weight_names.sepllm_neox_key``): the modeling file mirrors our modules.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

from torch import Tensor

from megatron.config import derived
from megatron.config.model import ModelConfig
from megatron.config.sepllm_settings import settings_of
from megatron.model.attention import kv_heads
from megatron.checkpoint.hf.mapping import check_vocab, max_positions
from megatron.checkpoint.hf.remote_code import REMOTE_CODE_FILES
from megatron.model.mlp import ffn_width
from megatron.model.weight_names import IGNORED_BUFFERS, clean_state_dict, model_keys, sepllm_neox_key
from megatron.config.sepllm import SepLLMConfig

ARCHITECTURE = "sepllm_neox"
HF_CLASS = "SepLLMNeoXForCausalLM"
AUTO_MAP = {"AutoConfig": "configuration_sepllm_neox.SepLLMNeoXConfig",
            "AutoModel": "modeling_sepllm_neox.SepLLMNeoXModel",
            "AutoModelForCausalLM": "modeling_sepllm_neox.SepLLMNeoXForCausalLM"}
REMOTE_CODE_DIR = Path(__file__).resolve().parent / "remote_code"


def _norm_epsilon(cfg: ModelConfig) -> float:
    """The epsilon key that belongs to the model's norm."""
    if cfg.norm == "rmsnorm":
        return float(cfg.rms_norm_epsilon)
    if cfg.norm == "scalenorm":
        return float(cfg.scalenorm_epsilon)
    return float(cfg.layernorm_epsilon)


def _bipe_separators(sepllm_cfg: Optional[SepLLMConfig]) -> list[int]:
    if not getattr(sepllm_cfg, "USE_BiPE", False):
        return []
    seps = sepllm_cfg.BiPE_seps if sepllm_cfg.BiPE_seps is not None else sepllm_cfg.separator_token_ids
    return [int(s) for s in seps or ()]


def sepllm_neox_config(model_cfg: ModelConfig, sepllm_cfg: Optional[SepLLMConfig], vocab_size: Optional[int] = None,
                       **overrides: Any) -> Any:
    """The ``SepLLMNeoXConfig`` describing ``GPTModel(model_cfg, sepllm_cfg)``: our model keys plus the resolved
    SepLLM settings (mode, one prefill and one decode window per layer, initial tokens, separators)."""
    from megatron.checkpoint.hf.remote_code.configuration_sepllm_neox import SepLLMNeoXConfig

    cfg = model_cfg
    sliding = {} if cfg.sliding_window_width is None else {"sliding_window_width": cfg.sliding_window_width}
    settings = settings_of(sepllm_cfg, cfg.num_layers, **sliding)     # mode "sliding_window" for Mistral's window
    kwargs: dict[str, Any] = dict(
        vocab_size=check_vocab(cfg, vocab_size), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=kv_heads(cfg),
        intermediate_size=ffn_width(cfg), activation=cfg.activation,
        gelu_approximate=("onnx" if cfg.onnx_safe and cfg.activation == "gelu"
                          else derived.gelu_approximation(cfg.activation, cfg.bias_gelu_fusion)),
        pos_emb=cfg.pos_emb, position_offset=cfg.opt_pos_emb_offset,
        rotary_pct=float(cfg.rotary_pct), rotary_emb_base=float(cfg.rotary_emb_base),
        max_position_embeddings=max_positions(cfg), norm=cfg.norm, norm_epsilon=_norm_epsilon(cfg),
        use_bias_in_norms=cfg.use_bias_in_norms, use_qk_layernorm=cfg.use_qk_layernorm,
        use_bias_in_attn_linear=cfg.use_bias_in_attn_linear, use_bias_in_mlp=cfg.use_bias_in_mlp,
        gpt_j_residual=cfg.gpt_j_residual, gpt_j_tied=cfg.gpt_j_tied, hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout, initializer_range=cfg.init_method_std,
        sepllm_mode=settings.mode, separator_ids=list(settings.separator_ids),
        num_initial_tokens=settings.num_initial, prefill_windows=list(settings.prefill_windows),
        generate_windows=list(settings.generate_windows),
        fixed_intervals=None if settings.fixed_intervals is None else list(settings.fixed_intervals),
        batch_adaptive_init_pos=settings.batch_adaptive_init_pos, sa_numerator_bias=settings.sa_numerator_bias,
        sa_denominator_bias=settings.sa_denominator_bias, use_bipe=bool(getattr(sepllm_cfg, "USE_BiPE", False)),
        bipe_separator_ids=_bipe_separators(sepllm_cfg), tie_word_embeddings=not cfg.no_weight_tying,
        architectures=[HF_CLASS], auto_map=dict(AUTO_MAP))
    kwargs.update(overrides)
    try:
        return SepLLMNeoXConfig(**kwargs)
    except ValueError as exc:
        raise ValueError(f"cannot export to {HF_CLASS}: {exc}") from None


def to_sepllm_neox_state_dict(model_state: Mapping[str, Any], model_cfg: ModelConfig,
                              sepllm_cfg: Optional[SepLLMConfig] = None, vocab_size: Optional[int] = None,
                              include_tied_head: bool = True) -> dict[str, Tensor]:
    """``GPTModel`` state dict -> ``SepLLMNeoXForCausalLM`` state dict (renames only; tensors are shared).

    Every key of ``GPTModel(model_cfg, sepllm_cfg)`` must be present and no other (buffers older checkpoints saved,
    such as ``rotary_emb.inv_freq``, are dropped). ``vocab_size`` trims the padded embedding rows; a tied head is
    written as ``lm_head.weight`` only with ``include_tied_head``."""
    state = {k: v for k, v in clean_state_dict(model_state).items() if not IGNORED_BUFFERS.search(k)}
    expected = {k for k in model_keys(model_cfg, sepllm_cfg) if not IGNORED_BUFFERS.search(k)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(f"GPTModel state dict: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    vocab = check_vocab(model_cfg, vocab_size)
    out = {}
    for key, value in state.items():
        out[sepllm_neox_key(key)] = value[:vocab] if key in ("embed.word_embeddings.weight",
                                                             "output_layer.weight") else value
    if not model_cfg.no_weight_tying and include_tied_head:
        out[sepllm_neox_key("output_layer.weight")] = out[sepllm_neox_key("embed.word_embeddings.weight")]
    return out


def copy_remote_code(folder: Path) -> list[str]:
    """Copy the configuration and modeling files into an export folder; returns their names."""
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(REMOTE_CODE_DIR / name, Path(folder) / name)
    return list(REMOTE_CODE_FILES)


__all__ = ["ARCHITECTURE", "AUTO_MAP", "HF_CLASS", "copy_remote_code", "sepllm_neox_config",
           "to_sepllm_neox_state_dict"]
