"""Weight mapping between ``GPTModel`` and Hugging Face ``GPTNeoXForCausalLM`` / ``LlamaForCausalLM``.

Because our fused QKV uses HF GPT-NeoX's per-head ``[q_h, k_h, v_h]`` layout and rotary is HF's rotate-half, the
GPT-NeoX export is a rename (no permutation). The Llama export slices each KV group of the fused QKV
(``[q_g0 .. q_g(r-1), k_g, v_g]``, see ``megatron.model.attention``) into ``q_proj`` / ``k_proj`` / ``v_proj`` and
the gated MLP's ``[value; gate]`` into ``up_proj`` / ``gate_proj``.

Every function checks that the architecture can be represented by the target class and raises ``ValueError`` naming
the config key otherwise: an export that silently changes the function is worse than none.
The reverse mappings (``from_hf_*``) load HF weights into a ``GPTModel`` state dict.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from megatron.config.model import ModelConfig
from megatron.model.attention import head_dim, kv_heads
from megatron.model.mlp import GATED, ffn_width

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def _plain(t: Any) -> Tensor:
    """A regular tensor from a (possibly distributed) state-dict entry."""
    full = getattr(t, "full_tensor", None)
    return (full() if callable(full) else t).detach()


def clean_state_dict(model_state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Drop wrapper prefixes (DDP/DeepSpeed ``module.``, ``torch.compile``'s ``_orig_mod.``) from a GPTModel state."""
    out: dict[str, Tensor] = {}
    for key, value in model_state.items():
        k = key
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if k.startswith(prefix):
                    k, changed = k[len(prefix):], True
        out[k] = _plain(value)
    return out


class _Reader:
    """Pops keys from a state dict so that leftovers (unexpected keys) can be reported."""

    def __init__(self, state: dict[str, Tensor], what: str) -> None:
        self.state, self.what = dict(state), what

    def pop(self, key: str) -> Tensor:
        if key not in self.state:
            raise KeyError(f"{self.what}: missing key {key!r}")
        return self.state.pop(key)

    def pop_optional(self, key: str) -> Optional[Tensor]:
        return self.state.pop(key, None)

    def finish(self) -> None:
        if self.state:
            raise KeyError(f"{self.what}: unexpected keys {sorted(self.state)[:8]}")


def _max_positions(cfg: ModelConfig) -> int:
    return cfg.max_position_embeddings or cfg.seq_length


def _check_vocab(cfg: ModelConfig, vocab_size: Optional[int]) -> int:
    if cfg.padded_vocab_size is None:
        raise ValueError("model config 'padded_vocab_size' is None: set it (the embedding rows) before exporting")
    if vocab_size is None:
        return cfg.padded_vocab_size
    if not 0 < vocab_size <= cfg.padded_vocab_size:
        raise ValueError(f"vocab_size = {vocab_size}: expected 1..padded_vocab_size ({cfg.padded_vocab_size})")
    return vocab_size


# ------------------------------------------------------------------------------------------------------- GPT-NeoX
def check_gpt_neox_compatible(cfg: ModelConfig) -> None:
    """Raise ``ValueError`` if ``GPTNeoXForCausalLM`` cannot represent this architecture exactly."""
    problems = []
    if cfg.pos_emb != "rotary":
        problems.append(f"pos_emb = {cfg.pos_emb!r} (HF GPT-NeoX has rotary only)")
    if cfg.norm != "layernorm" or not cfg.use_bias_in_norms:
        problems.append(f"norm = {cfg.norm!r}, use_bias_in_norms = {cfg.use_bias_in_norms} (needs LayerNorm with bias)")
    if cfg.activation not in ("gelu", "relu"):
        problems.append(f"activation = {cfg.activation!r} (HF GPT-NeoX MLP is not gated)")
    if not cfg.use_bias_in_mlp:
        problems.append("use_bias_in_mlp = False (HF GPT-NeoX MLP always has biases)")
    if kv_heads(cfg) != cfg.num_attention_heads:
        problems.append(f"num_kv_heads = {cfg.num_kv_heads} (HF GPT-NeoX has no grouped-query attention)")
    if problems:
        raise ValueError("cannot export to HF GPTNeoXForCausalLM: " + "; ".join(problems) +
                         ". Use the Llama export for rmsnorm/swiglu/GQA models.")


def to_hf_gpt_neox_state_dict(model_state: Mapping[str, Any], model_cfg: ModelConfig,
                              vocab_size: Optional[int] = None,
                              keep_bipe_embeddings: bool = False) -> dict[str, Tensor]:
    """``GPTModel`` state dict -> ``GPTNeoXForCausalLM`` state dict (tensors are shared, not copied).

    ``vocab_size`` trims the padded embedding rows (default: keep ``padded_vocab_size`` rows). A BiPE model has a
    learned ``position_embeddings`` table that plain HF GPT-NeoX would silently ignore, so it is an error unless
    ``keep_bipe_embeddings`` (then it is written as ``gpt_neox.position_embeddings.weight`` for a SepLLM-aware
    HF class). ``gpt_j_tied`` writes the shared norm as both HF layer norms.
    """
    cfg = model_cfg
    check_gpt_neox_compatible(cfg)
    vocab = _check_vocab(cfg, vocab_size)
    src = _Reader(clean_state_dict(model_state), "GPTModel state dict")
    out: dict[str, Tensor] = {"gpt_neox.embed_in.weight": src.pop("embed.word_embeddings.weight")[:vocab]}
    pos_table = src.pop_optional("embed.position_embeddings.weight")
    if pos_table is not None:
        if not keep_bipe_embeddings:
            raise ValueError("the model has a learned position table (BiPE); HF GPTNeoXForCausalLM would ignore it. "
                             "Pass keep_bipe_embeddings=True to export it for a SepLLM-aware class.")
        out["gpt_neox.position_embeddings.weight"] = pos_table
    for i in range(cfg.num_layers):
        p, q = f"layers.{i}.", f"gpt_neox.layers.{i}."
        ln1_w, ln1_b = src.pop(p + "input_layernorm.weight"), src.pop(p + "input_layernorm.bias")
        out[q + "input_layernorm.weight"], out[q + "input_layernorm.bias"] = ln1_w, ln1_b
        if cfg.gpt_j_tied:
            out[q + "post_attention_layernorm.weight"] = ln1_w.clone()
            out[q + "post_attention_layernorm.bias"] = ln1_b.clone()
        else:
            out[q + "post_attention_layernorm.weight"] = src.pop(p + "post_attention_layernorm.weight")
            out[q + "post_attention_layernorm.bias"] = src.pop(p + "post_attention_layernorm.bias")
        for name in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
            out[q + name + ".weight"] = src.pop(p + name + ".weight")
            bias = src.pop_optional(p + name + ".bias")
            if bias is not None:
                out[q + name + ".bias"] = bias
    out["gpt_neox.final_layer_norm.weight"] = src.pop("final_layernorm.weight")
    out["gpt_neox.final_layer_norm.bias"] = src.pop("final_layernorm.bias")
    head = src.pop("output_layer.weight") if cfg.no_weight_tying else out["gpt_neox.embed_in.weight"]
    out["lm_head.weight"] = head[:vocab]
    src.finish()
    return out


def hf_gpt_neox_config(model_cfg: ModelConfig, vocab_size: Optional[int] = None, **overrides: Any):
    """``transformers.GPTNeoXConfig`` describing the same function as ``GPTModel(model_cfg)``.

    ``vocab_size`` defaults to ``padded_vocab_size``; ``overrides`` (e.g. ``bos_token_id``, ``eos_token_id``,
    ``torch_dtype``) are passed through.
    """
    from transformers import GPTNeoXConfig

    cfg = model_cfg
    check_gpt_neox_compatible(cfg)
    kwargs: dict[str, Any] = dict(
        vocab_size=_check_vocab(cfg, vocab_size),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=ffn_width(cfg),
        hidden_act=cfg.activation,
        rotary_pct=cfg.rotary_pct,
        rotary_emb_base=cfg.rotary_emb_base,
        attention_dropout=cfg.attention_dropout,
        hidden_dropout=cfg.hidden_dropout,
        max_position_embeddings=_max_positions(cfg),
        initializer_range=cfg.init_method_std,
        layer_norm_eps=cfg.layernorm_epsilon,
        use_parallel_residual=cfg.gpt_j_residual,
        tie_word_embeddings=not cfg.no_weight_tying,
        attention_bias=cfg.use_bias_in_attn_linear,
    )
    kwargs.update(overrides)
    return GPTNeoXConfig(**kwargs)


def from_hf_gpt_neox_state_dict(hf_state: Mapping[str, Any], model_cfg: ModelConfig) -> dict[str, Tensor]:
    """``GPTNeoXForCausalLM`` state dict -> ``GPTModel`` state dict (inverse of ``to_hf_gpt_neox_state_dict``).

    Embedding rows are zero-padded up to ``padded_vocab_size``. ``gpt_j_tied`` is refused (HF has two norms).
    """
    cfg = model_cfg
    check_gpt_neox_compatible(cfg)
    if cfg.gpt_j_tied:
        raise ValueError("model config key 'gpt_j_tied' = True cannot load HF GPT-NeoX weights (two separate norms)")
    src = _Reader({k: _plain(v) for k, v in hf_state.items()}, "HF GPT-NeoX state dict")
    for k in [k for k in src.state if k.endswith("attention.bias") or k.endswith("attention.masked_bias")
              or k.endswith("rotary_emb.inv_freq")]:
        src.state.pop(k)  # buffers of old HF versions
    out: dict[str, Tensor] = {"embed.word_embeddings.weight": _pad_rows(src.pop("gpt_neox.embed_in.weight"), cfg)}
    pos_table = src.pop_optional("gpt_neox.position_embeddings.weight")
    if pos_table is not None:
        out["embed.position_embeddings.weight"] = pos_table
    for i in range(cfg.num_layers):
        p, q = f"layers.{i}.", f"gpt_neox.layers.{i}."
        for name in ("input_layernorm", "post_attention_layernorm"):
            out[p + name + ".weight"] = src.pop(q + name + ".weight")
            out[p + name + ".bias"] = src.pop(q + name + ".bias")
        for name in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
            out[p + name + ".weight"] = src.pop(q + name + ".weight")
            bias = src.pop_optional(q + name + ".bias")
            if bias is not None:
                out[p + name + ".bias"] = bias
    out["final_layernorm.weight"] = src.pop("gpt_neox.final_layer_norm.weight")
    out["final_layernorm.bias"] = src.pop("gpt_neox.final_layer_norm.bias")
    head = src.pop_optional("lm_head.weight")
    if cfg.no_weight_tying:
        if head is None:
            raise KeyError("HF GPT-NeoX state dict: missing key 'lm_head.weight' for an untied model")
        out["output_layer.weight"] = _pad_rows(head, cfg)
    src.finish()
    return out


def _pad_rows(t: Tensor, cfg: ModelConfig) -> Tensor:
    rows = cfg.padded_vocab_size
    if rows is None or t.shape[0] > rows:
        raise ValueError(f"HF vocabulary of {t.shape[0]} rows does not fit padded_vocab_size = {rows}")
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


# ---------------------------------------------------------------------------------------------------------- Llama
def check_llama_compatible(cfg: ModelConfig) -> None:
    """Raise ``ValueError`` if ``LlamaForCausalLM`` cannot represent this architecture exactly."""
    problems = []
    if cfg.pos_emb != "rotary" or cfg.rotary_pct != 1.0:
        problems.append(f"pos_emb = {cfg.pos_emb!r}, rotary_pct = {cfg.rotary_pct} (Llama rotates the full head)")
    if cfg.norm != "rmsnorm":
        problems.append(f"norm = {cfg.norm!r} (Llama uses rmsnorm)")
    if cfg.activation not in GATED:
        problems.append(f"activation = {cfg.activation!r} (Llama's MLP is gated: swiglu or geglu)")
    if cfg.gpt_j_residual:
        problems.append("gpt_j_residual = True (Llama is sequential)")
    if problems:
        raise ValueError("cannot export to HF LlamaForCausalLM: " + "; ".join(problems))


def to_hf_llama_state_dict(model_state: Mapping[str, Any], model_cfg: ModelConfig,
                           vocab_size: Optional[int] = None) -> dict[str, Tensor]:
    """``GPTModel`` state dict -> ``LlamaForCausalLM`` state dict (QKV and gated MLP split, see module docstring)."""
    cfg = model_cfg
    check_llama_compatible(cfg)
    vocab = _check_vocab(cfg, vocab_size)
    src = _Reader(clean_state_dict(model_state), "GPTModel state dict")
    hq, hkv, d, ffn = cfg.num_attention_heads, kv_heads(cfg), head_dim(cfg), ffn_width(cfg)
    r = hq // hkv
    out: dict[str, Tensor] = {"model.embed_tokens.weight": src.pop("embed.word_embeddings.weight")[:vocab]}
    for i in range(cfg.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out[q + "input_layernorm.weight"] = src.pop(p + "input_layernorm.weight")
        out[q + "post_attention_layernorm.weight"] = src.pop(p + "post_attention_layernorm.weight")
        for suffix in ("weight", "bias"):
            qkv = src.pop_optional(p + f"attention.query_key_value.{suffix}")
            if qkv is None:
                continue
            grouped = qkv.reshape(hkv, r + 2, d, *qkv.shape[1:])
            out[q + f"self_attn.q_proj.{suffix}"] = grouped[:, :r].reshape(hq * d, *qkv.shape[1:]).contiguous()
            out[q + f"self_attn.k_proj.{suffix}"] = grouped[:, r].reshape(hkv * d, *qkv.shape[1:]).contiguous()
            out[q + f"self_attn.v_proj.{suffix}"] = grouped[:, r + 1].reshape(hkv * d, *qkv.shape[1:]).contiguous()
            o = src.pop_optional(p + f"attention.dense.{suffix}")
            if o is not None:
                out[q + f"self_attn.o_proj.{suffix}"] = o
            up_gate = src.pop_optional(p + f"mlp.dense_h_to_4h.{suffix}")
            if up_gate is not None:
                out[q + f"mlp.up_proj.{suffix}"] = up_gate[:ffn].contiguous()
                out[q + f"mlp.gate_proj.{suffix}"] = up_gate[ffn:].contiguous()
            down = src.pop_optional(p + f"mlp.dense_4h_to_h.{suffix}")
            if down is not None:
                out[q + f"mlp.down_proj.{suffix}"] = down
    out["model.norm.weight"] = src.pop("final_layernorm.weight")
    head = src.pop("output_layer.weight") if cfg.no_weight_tying else out["model.embed_tokens.weight"]
    out["lm_head.weight"] = head[:vocab]
    src.finish()
    return out


def hf_llama_config(model_cfg: ModelConfig, vocab_size: Optional[int] = None, **overrides: Any):
    """``transformers.LlamaConfig`` describing the same function as ``GPTModel(model_cfg)``."""
    from transformers import LlamaConfig

    cfg = model_cfg
    check_llama_compatible(cfg)
    kwargs: dict[str, Any] = dict(
        vocab_size=_check_vocab(cfg, vocab_size),
        hidden_size=cfg.hidden_size,
        intermediate_size=ffn_width(cfg),
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=kv_heads(cfg),
        head_dim=head_dim(cfg),
        hidden_act="silu" if cfg.activation == "swiglu" else "gelu",
        max_position_embeddings=_max_positions(cfg),
        initializer_range=cfg.init_method_std,
        rms_norm_eps=cfg.rms_norm_epsilon,
        tie_word_embeddings=not cfg.no_weight_tying,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rotary_emb_base)},
        attention_bias=cfg.use_bias_in_attn_linear,
        attention_dropout=cfg.attention_dropout,
        mlp_bias=cfg.use_bias_in_mlp,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def from_hf_llama_state_dict(hf_state: Mapping[str, Any], model_cfg: ModelConfig) -> dict[str, Tensor]:
    """``LlamaForCausalLM`` state dict -> ``GPTModel`` state dict (inverse of ``to_hf_llama_state_dict``): q/k/v
    are re-interleaved into the grouped fused-QKV layout, up/gate concatenated as ``[value; gate]``."""
    cfg = model_cfg
    check_llama_compatible(cfg)
    src = _Reader({k: _plain(v) for k, v in hf_state.items()}, "HF Llama state dict")
    for k in [k for k in src.state if k.endswith("rotary_emb.inv_freq")]:
        src.state.pop(k)
    hq, hkv, d = cfg.num_attention_heads, kv_heads(cfg), head_dim(cfg)
    r = hq // hkv
    out: dict[str, Tensor] = {"embed.word_embeddings.weight": _pad_rows(src.pop("model.embed_tokens.weight"), cfg)}
    for i in range(cfg.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = src.pop(q + "input_layernorm.weight")
        out[p + "post_attention_layernorm.weight"] = src.pop(q + "post_attention_layernorm.weight")
        for suffix in ("weight", "bias"):
            qp = src.pop_optional(q + f"self_attn.q_proj.{suffix}")
            if qp is not None:
                kp, vp = src.pop(q + f"self_attn.k_proj.{suffix}"), src.pop(q + f"self_attn.v_proj.{suffix}")
                tail = qp.shape[1:]
                grouped = torch.cat([qp.reshape(hkv, r, d, *tail), kp.reshape(hkv, 1, d, *tail),
                                     vp.reshape(hkv, 1, d, *tail)], dim=1)
                out[p + f"attention.query_key_value.{suffix}"] = grouped.reshape(hkv * (r + 2) * d, *tail)
            o = src.pop_optional(q + f"self_attn.o_proj.{suffix}")
            if o is not None:
                out[p + f"attention.dense.{suffix}"] = o
            up = src.pop_optional(q + f"mlp.up_proj.{suffix}")
            if up is not None:
                out[p + f"mlp.dense_h_to_4h.{suffix}"] = torch.cat([up, src.pop(q + f"mlp.gate_proj.{suffix}")])
            down = src.pop_optional(q + f"mlp.down_proj.{suffix}")
            if down is not None:
                out[p + f"mlp.dense_4h_to_h.{suffix}"] = down
    out["final_layernorm.weight"] = src.pop("model.norm.weight")
    head = src.pop_optional("lm_head.weight")
    if cfg.no_weight_tying:
        if head is None:
            raise KeyError("HF Llama state dict: missing key 'lm_head.weight' for an untied model")
        out["output_layer.weight"] = _pad_rows(head, cfg)
    src.finish()
    return out
