"""Recognised keys whose feature is not built yet: setting them to a non-default value fails loudly.

ONE table. When a feature lands, delete its row (and its test case in tests/test_config_errors.py).
Each row: (key shown to the user, predicate on the resolved NeoXConfig that is True when the unbuilt feature is
requested, what to do instead).
"""

from __future__ import annotations

from typing import Callable

from megatron.config.errors import ConfigError, Where, unknown_source

# GPT-NeoX keys for features not built here. They are accepted at their GPT-NeoX default (configs copied from
# GPT-NeoX often spell the default out) and refused otherwise. Delete a row when the feature lands.
NEOX_DEFAULT_ONLY: dict[str, object] = {
    "apply_query_key_layer_scaling": False,
    "use_cpu_initialization": False,
    "reset_position_ids": False,
    "reset_attention_mask": False,
    "char_level_ppl": False,
    "checkpoint_validation_with_forward_pass": False,
    "num_unique_layers": None,
    "sparsity_config": None,
    "opt_pos_emb_offset": 0,
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


UNSUPPORTED: list[tuple[str, Callable, Callable, str]] = [
    # (key, value getter, is-unsupported predicate on that value, advice)
    ("attention_config", lambda c: sorted(set(c.model.attention_config or [])),
     lambda v: any(t not in _SUPPORTED_ATTENTION for t in v),
     "only 'global' and 'flash' attention types exist (SepLLM sparsity comes from the SepLLM keys, not from "
     "attention_config)"),
    ("zero_optimization", lambda c: c.training.zero_optimization, lambda v: _zero_offload(v),
     "ZeRO CPU/NVMe offload (cpu_offload, offload_optimizer, offload_param) is not built yet; remove it"),
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
            raise ConfigError(f"{where(key)}: {key}={value!r}: not supported yet: {advice}")
