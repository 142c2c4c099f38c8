"""GPT-NeoX keys that are more than a field name: spellings of earlier GPT-NeoX releases, values GPT-NeoX derives
itself, and switches that only pick a kernel, a memory placement or a launch detail.

Each key is read with the meaning it has (or had) in GPT-NeoX, so a config written for any release builds the same
model and trains the same way; the tables say why each key is here. Keys of features that are not built live in
``unsupported.py``.
"""

from __future__ import annotations

from typing import Any, Callable

from megatron.config.derived import ATTENTION_TYPES
from megatron.config.errors import ConfigError

# Spellings of earlier GPT-NeoX releases (the ones the Pythia suite was trained with): same meaning, new name.
#   save_interval (renamed checkpoint_factor in Dec 2022, linear scale), gas (removed in Feb 2024).
OLDER_SPELLINGS: dict[str, str] = {"save_interval": "checkpoint_factor", "gas": "gradient_accumulation_steps"}

# Same meaning in another unit: key -> (our key, factor). GPT-NeoX gives the MFU peak in TFLOP/s.
SCALED_KEYS: dict[str, tuple[str, float]] = {"peak_theoretical_tflops": ("peak_flops", 1.0e12)}

# Values GPT-NeoX computes from other keys in ``calculate_derived``, overwriting anything a config gives; a config
# that spells them out therefore means nothing by them, and they are accepted and ignored here too.
NEOX_DERIVED = frozenset({
    "optimizer_type", "zero_reduce_scatter", "zero_contiguous_gradients", "zero_reduce_bucket_size",
    "zero_allgather_bucket_size", "is_pipe_parallel", "batch_size", "curriculum_seqlen", "do_train", "do_valid",
    "comet_experiment",
})

# Switches that choose an implementation, not a result: the same values are computed with any setting.
NEOX_HINTS: dict[str, str] = {
    "use_flashattn_swiglu": "flash-attn's fused SwiGLU kernel (same function)",
    "bias_dropout_fusion": "a fused bias+dropout+add kernel (same function)",
    "fused_kernels_build_path": "where GPT-NeoX builds its CUDA kernels (ours: csrc/, docs/kernels.md)",
    "attention_softmax_in_fp32": "fp16 softmax upcast of the unfused path (our attention kernels accumulate the "
                                 "softmax in fp32)",
    "deepspeed_activation_checkpointing": "which activation-checkpointing implementation recomputes layers",
    "contiguous_checkpointing": "memory layout of checkpointed activations",
    "checkpoint_in_cpu": "where checkpointed activations are kept",
    "pipe_partition_method": "how layers are placed on pipeline stages (ours: even split of transformer layers)",
    "lazy_mpu_init": "an initialisation hook for external tools",
    "short_seq_prob": "declared by GPT-NeoX but read nowhere in its training",
    "deepscale": "DeepSpeed's deprecated alias of 'deepspeed'",
    "apply_query_key_layer_scaling": "fp16 overflow guard: scores divided by the layer number before the softmax, "
                                     "which multiplies it back (the same attention in exact arithmetic)",
    "use_cpu_initialization": "where the initial weights are drawn (same distributions)",
    "deepscale_config": "DeepSpeed's deprecated alias of 'deepspeed_config'",
}

# GPT-NeoX requires DeepSpeed; ``deepspeed: false`` cannot train there either.
_MUST_BE = {"deepspeed": True}


def handles(key: str) -> bool:
    """Whether ``key`` (normalised) is read here rather than as a field name."""
    return (key in OLDER_SPELLINGS or key in SCALED_KEYS or key in NEOX_DERIVED or key in NEOX_HINTS
            or key in _MUST_BE)


def read(key: str, value: Any, source: str, put: Callable[[str, Any], None]) -> None:
    """Read one such key: ``put(flat key, value)`` stores what it means (older spellings); derived values and hints
    store nothing."""
    if key in OLDER_SPELLINGS:
        put(OLDER_SPELLINGS[key], value)
    elif key in SCALED_KEYS:
        target, factor = SCALED_KEYS[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{source}: {key}={value!r}: expected a number")
        put(target, None if value is None else float(value) * factor)
    elif key in _MUST_BE and value != _MUST_BE[key]:
        raise ConfigError(f"{source}: {key}={value!r}: training always runs on DeepSpeed (as in GPT-NeoX); remove the "
                          f"key or set it to {str(_MUST_BE[key]).lower()}")



def resolve_attention_type(model: Any, where: Callable[[str], str]) -> None:
    """The Llemma release's ``attention_type`` said which attention ``num_kv_heads`` builds; check that they agree
    (``multiquery`` alone sets one KV head)."""
    kind = model.attention_type
    if kind is None:
        return
    kind = str(kind).lower()
    if kind not in ATTENTION_TYPES:
        raise ConfigError(f"{where('attention_type')}: attention_type={model.attention_type!r}: expected one of "
                          f"{', '.join(ATTENTION_TYPES)}")
    model.attention_type = kind
    heads, kv = model.num_attention_heads, model.num_kv_heads
    if kind == "multiquery" and kv is None:
        model.num_kv_heads = kv = 1
    agrees = {"multihead": kv in (None, heads), "groupedquery": kv is not None,
              "multiquery": kv == 1}[kind]
    if not agrees:
        raise ConfigError(f"{where('attention_type')}: attention_type={kind!r} disagrees with num_kv_heads={kv} "
                          f"({where('num_kv_heads')}) for {heads} query heads")


def resolve_decay_lr_to(schedule: Any, peak_lr: float, min_lr_given: bool, where: Callable[[str], str]) -> None:
    """The Llemma release's ``decay_lr_to``: the floor of the decay as a fraction of the peak rate."""
    if schedule.decay_lr_to is None:
        return
    if min_lr_given:
        raise ConfigError(f"{where('decay_lr_to')}: decay_lr_to={schedule.decay_lr_to} and min_lr="
                          f"{schedule.min_lr} ({where('min_lr')}) both set the floor of the decay; give one of them")
    if not 0.0 <= schedule.decay_lr_to <= 1.0:
        raise ConfigError(f"{where('decay_lr_to')}: decay_lr_to={schedule.decay_lr_to}: expected a fraction of the "
                          f"peak learning rate in [0, 1]")
    schedule.min_lr = schedule.decay_lr_to * peak_lr
