"""Recognised keys whose feature is not built yet: setting them to a non-default value fails loudly.

ONE table. When a feature lands, delete its row (and its test case in tests/test_config_errors.py).
Each row: (key shown to the user, predicate on the resolved NeoXConfig that is True when the unbuilt feature is
requested, what to do instead).
"""

from __future__ import annotations

from typing import Callable, Union

from megatron.config.errors import ConfigError, Where, unknown_source

# GPT-NeoX keys for features not built here. They are accepted at their GPT-NeoX default (configs copied from
# GPT-NeoX often spell the default out) and refused otherwise. Delete a row when the feature lands.
NEOX_DEFAULT_ONLY: dict[str, object] = {
    "char_level_ppl": False,
    "checkpoint_validation_with_forward_pass": False,
    "num_unique_layers": None,
    # muP (maximal update parametrisation): init, attention and output multipliers, base-shape files
    "use_mup": False, "coord_check": False, "save_base_shapes": False, "base_shapes_file": None,
    "mup_init_scale": 1.0, "mup_attn_temp": 1.0, "mup_output_temp": 1.0, "mup_embedding_mult": 1.0,
    "mup_rp_embedding_mult": 1.0, "mup_width_scale": 2,
    # T5 relative position buckets (pos_emb rpe) and cross-layer parameter sharing
    "rpe_num_buckets": 32, "rpe_max_distance": 128, "param_sharing_style": "grouped",
    # S3 checkpoint upload
    "s3_path": None, "s3_chunk_size": 104857600,
    # cluster-specific hooks
    "adlr_autoresume": False, "adlr_autoresume_interval": 1000, "autotuning_run": None,
    "return_logits": False,
}

# GPT-NeoX's flat fp16 loss-scale keys: declared, but GPT-NeoX stopped passing them to DeepSpeed in 2021 (loss
# scaling is the DeepSpeed fp16 block's), so they change nothing there. Accepted at the GPT-NeoX default; any other
# value is refused, since honouring it would make the config train differently here and in GPT-NeoX.
# key -> (GPT-NeoX default, the fp16-block key that does the job)
NEOX_NO_EFFECT: dict[str, tuple[object, str]] = {
    "loss_scale": (None, "loss_scale"),
    "loss_scale_window": (1000.0, "loss_scale_window"),
    "hysteresis": (2, "hysteresis"),
    "min_scale": (1.0, "min_loss_scale"),
    "dynamic_loss_scale": (None, "loss_scale (0 = dynamic)"),
}

# Whole GPT-NeoX features not built here, each named once. A key that only serves one of them is accepted at its
# GPT-NeoX default (configs copied from GPT-NeoX spell defaults out) and refused otherwise, naming the feature; the
# attention types and norms that select one are refused the same way. Everything else GPT-NeoX defines is built.
UNBUILT_FEATURES: dict[str, dict[str, object]] = {
    "mixture of experts (MoE)": {
        "moe_num_experts": 1, "moe_expert_interval": 1, "moe_top_k": 1, "moe_router_type": "sinkhorn",
        "moe_lbl_in_fp32": False, "moe_jitter_eps": None},
    "Mamba": {
        "mamba_selective_scan_fusion": False, "mamba_causal_conv_fusion": False, "mamba_inner_func_fusion": False,
        "mamba_selective_fp32_params": True, "mamba_use_bias_in_conv": True, "mamba_use_bias_in_linears": False},
    "RWKV": {"dim_att": None, "head_size": None, "ffn_dim": None},
    "gMLP": {"gmlp_attn_dim": 64},
    "Transformer Engine": {
        "te_columnparallel": False, "te_rowparallel": False, "te_layernorm_mlp": False, "te_mha": False,
        "te_fp8_format": "hybrid", "te_fp8_wgrad": True, "te_fp8_amax_history_len": 1,
        "te_fp8_amax_compute_algo": "most_recent", "te_fp8_margin": 0, "te_fp8_mha": False},
    "bitsandbytes optimizers": {"use_bnb_optimizer": False},
    "block-sparse attention": {"sparsity_config": None, "sparse_attention": None},
    "post-training modes (KTO, reward models, REINFORCE, soft prompts, online data)": {
        "kto_fp32": True, "kto_desirable_weight": 1.0, "kto_undesirable_weight": 1.0,
        "kto_beta": 0.1, "z_loss": 0.0, "fp32_reinforce": True, "kl_impl": "mse", "kl_div_beta": 0.1,
        "reinforce_leave_one_out": False, "soft_prompt_tuning": None,
        "serve_model_weights": False, "weight_server_port": 6000, "online_dataserver_ips": "localhost",
        "online_dataserver_ports": 10000,
        # SFT label paths and DPO's pos_/neg_ text and label paths are built (config/components.py DataConfig)
        **{f"{split}_reward_data_paths": None for split in ("train", "valid", "test")}},
}
FEATURE_OF_KEY: dict[str, str] = {key: feature for feature, keys in UNBUILT_FEATURES.items() for key in keys}
# attention_config types and norms that select an unbuilt feature
FEATURE_OF_ATTENTION_TYPE: dict[str, str] = {
    "mamba": "Mamba", "rwkv": "RWKV", "gmlp": "gMLP", "amlp": "gMLP",
    **{t: "block-sparse attention" for t in ("local", "sparse_fixed", "sparse_variable", "bigbird", "bslongformer")}}
FEATURE_OF_NORM: dict[str, str] = {"te_rmsnorm": "Transformer Engine", "te_layernorm": "Transformer Engine"}


def check_unbuilt_feature_key(key: str, value: object, source: str) -> None:
    """A key of an UNBUILT_FEATURES feature is fine at its GPT-NeoX default; another value names the feature."""
    feature = FEATURE_OF_KEY[key]
    default = UNBUILT_FEATURES[feature][key]
    if value == default or (default is None and value in ({}, [])):
        return
    raise ConfigError(f"{source}: {key}={value!r}: {feature} is not built in this framework; remove the key (or set "
                      f"it to its GPT-NeoX default {default!r})")


_OFFLOAD_KEYS = ("cpu_offload", "cpu_offload_params", "offload_optimizer", "offload_param")
_SUPPORTED_ATTENTION = ("global", "flash")


def _zero_offload(zero: dict) -> bool:
    zero = zero or {}
    for key in _OFFLOAD_KEYS:
        value = zero.get(key)
        if isinstance(value, dict):
            if str(value.get("device", "none")).lower() != "none":
                return True
        elif value:
            return True
    return False


UNSUPPORTED: list[tuple[str, Callable, Callable, Union[str, Callable]]] = [
    # (key, value getter, is-unsupported predicate on that value, advice or a function of the value giving it)
    ("attention_config", lambda c: sorted(set(c.model.attention_config or [])),
     lambda v: any(t not in _SUPPORTED_ATTENTION for t in v),
     lambda v: "; ".join(f"{t!r} is {FEATURE_OF_ATTENTION_TYPE.get(t, 'an unknown attention type')}"
                         for t in v if t not in _SUPPORTED_ATTENTION)
     + ", not built in this framework; 'global' and 'flash' (both dense causal attention) are (SepLLM sparsity comes "
       "from the SepLLM keys, not from attention_config)"),
    ("zero_optimization", lambda c: c.training.zero_optimization, lambda v: _zero_offload(v),
     "ZeRO CPU/NVMe offload (cpu_offload, offload_optimizer, offload_param) is not built yet; remove it"),
    ("use_qk_layernorm", lambda c: (c.model.use_qk_layernorm, c.parallel.model_parallel_size),
     lambda v: v[0] and v[1] > 1,
     "query/key normalisation with tensor parallelism (GPT-NeoX normalises each rank's heads on their own) is not "
     "built; use model_parallel_size 1 or drop use_qk_layernorm"),
    ("scheduler", lambda c: c.deepspeed_extra.get("scheduler"), lambda v: v is not None,
     "the DeepSpeed scheduler block is not used: the learning-rate schedule comes from lr_decay_style, warmup, "
     "min_lr and lr_decay_iters"),
]


def check_default_only(key: str, value: object, source: str) -> None:
    """A NEOX_DEFAULT_ONLY key is fine at its default; anything else names the unbuilt feature."""
    default = NEOX_DEFAULT_ONLY[key]
    if value != default and not (default is None and value in ({}, [])):
        shown = "null" if default is None else repr(default).lower() if isinstance(default, bool) else repr(default)
        raise ConfigError(f"{source}: {key}={value!r}: not supported yet (the GPT-NeoX feature behind this key is not "
                          f"built); remove the key or set it to {shown}")


def check_no_effect(key: str, value: object, source: str) -> None:
    """A NEOX_NO_EFFECT key is fine at GPT-NeoX's default (``dynamic_loss_scale: true`` is what GPT-NeoX derives for
    the default ``loss_scale: null``); another value names the fp16-block key that does what was meant."""
    default, block_key = NEOX_NO_EFFECT[key]
    if value == default or (key == "dynamic_loss_scale" and value is True):
        return
    raise ConfigError(f"{source}: {key}={value!r}: GPT-NeoX does not pass the flat loss-scale keys to DeepSpeed "
                      f"(they have no effect there); set fp16.{block_key} in the DeepSpeed fp16 block instead")


def check_unsupported(cfg, where: Where = unknown_source) -> None:
    """Raise ConfigError (naming key, value and source) for the first requested feature that is not built yet."""
    for key, get, requested, advice in UNSUPPORTED:
        value = get(cfg)
        if requested(value):
            said = advice(value) if callable(advice) else advice
            raise ConfigError(f"{where(key)}: {key}={value!r}: not supported yet: {said}")
