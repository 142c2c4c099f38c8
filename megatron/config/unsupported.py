"""Recognised keys whose feature is not built yet: setting them to a non-default value fails loudly.

ONE table. When a feature lands, delete its row (and its test case in tests/test_config_errors.py).
Each row: (key shown to the user, predicate on the resolved NeoXConfig that is True when the unbuilt feature is
requested, what to do instead).
"""

from __future__ import annotations

from typing import Callable

from megatron.config.errors import ConfigError

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
    ("model_parallel_size", lambda c: c.parallel.model_parallel_size, lambda v: v > 1,
     "tensor parallelism is not built yet; use 1 (data parallel / ZeRO scale out instead)"),
    ("pipe_parallel_size", lambda c: c.parallel.pipe_parallel_size, lambda v: v > 1,
     "pipeline parallelism is not built yet; use 0 or 1"),
    ("sequence_parallel", lambda c: c.parallel.sequence_parallel, bool,
     "sequence parallelism is not built yet; use false"),
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


def check_unsupported(cfg, where: Callable[[str], str] = lambda key: "config") -> None:
    """Raise ConfigError (naming key, value and source) for the first requested feature that is not built yet."""
    for key, get, requested, advice in UNSUPPORTED:
        value = get(cfg)
        if requested(value):
            raise ConfigError(f"{where(key)}: {key}={value!r}: not supported yet: {advice}")
