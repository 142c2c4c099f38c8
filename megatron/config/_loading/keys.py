"""Which key goes where: GPT-NeoX flat keys, DeepSpeed blocks and section blocks mapped onto (section, field).

Spelling rules: ``-`` and ``_`` are the same; matching is case-insensitive, so ``use_bipe`` finds ``USE_BiPE`` and the
SepLLM upper-case spellings are kept as canonical names. This module only answers "where does this key live"; values
are checked elsewhere.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Optional

from megatron.config._loading.unsupported import NEOX_DEFAULT_ONLY, NEOX_NO_EFFECT
from megatron.config.neox import SECTIONS

# A flat key owned by two sections is written to the first one listed here (the other copy is derived).
_FLAT_OWNER_OVERRIDES = {"precision": "training"}

# Fields of these sections are reachable only through their block, never as flat keys.
_BLOCK_ONLY_SECTIONS = {"optimizer"}

# GPT-NeoX spellings that are not field names. Target is (section, field).
ALIASES: dict[str, tuple[str, str]] = {
    "lr": ("optimizer", "lr"),
    "weight_decay": ("optimizer", "weight_decay"),
    "clip_grad": ("training", "gradient_clipping"),
    "world_size": ("parallel", "world_size"),
    "global_num_gpus": ("parallel", "world_size"),
    "tensor_model_parallel_size": ("parallel", "model_parallel_size"),
}

# DeepSpeed / GPT-NeoX blocks that land in a typed field as a whole dict.
BLOCK_FIELDS: dict[str, tuple[str, str]] = {
    "fp16": ("training", "fp16"),
    "bf16": ("training", "bf16"),
    "zero_optimization": ("training", "zero_optimization"),
}

# Other DeepSpeed config keys, passed to DeepSpeed verbatim through ``NeoXConfig.deepspeed_extra``.
DEEPSPEED_PASSTHROUGH = frozenset({
    "amp", "flops_profiler", "comms_logger", "activation_checkpointing", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "prescale_gradients", "gradient_predivide_factor", "sparse_gradients",
    "memory_breakdown", "communication_data_type", "data_types", "dump_state", "autotuning", "elasticity", "aio",
    "compression_training", "csv_monitor", "tensorboard", "wandb", "nebula", "curriculum_learning",
    "data_efficiency", "monitor_config", "disable_allgather", "seq_parallel_communication_data_type",
})

# Keys accepted and ignored (they only describe the author's environment, or are read by external tools).
IGNORED = frozenset({"git_hash", "user_script", "local_rank", "rank", "config_files"})


def norm(key: str) -> str:
    """The spelling-insensitive form of a key: ``-`` -> ``_``, lower case, surrounding blanks dropped."""
    return str(key).strip().replace("-", "_").lower()


def section_fields(section: str) -> dict[str, str]:
    """norm(field) -> field name of one section (internal fields excluded)."""
    return {norm(f.name): f.name for f in dataclasses.fields(SECTIONS[section]) if not f.metadata.get("internal")}


def _build_flat_index() -> dict[str, tuple[str, str]]:
    index: dict[str, tuple[str, str]] = {}
    for section in SECTIONS:
        if section in _BLOCK_ONLY_SECTIONS:
            continue
        for key, name in section_fields(section).items():
            owner = _FLAT_OWNER_OVERRIDES.get(key)
            if owner is not None and owner != section:
                continue
            if key in index and owner is None:
                raise RuntimeError(f"config field {name!r} is defined in both {index[key][0]} and {section}; "
                                   f"add it to _FLAT_OWNER_OVERRIDES in megatron/config/_loading/keys.py")
            index[key] = (section, name)
    for alias, target in ALIASES.items():
        index[norm(alias)] = target
    return index


FLAT_INDEX = _build_flat_index()


def all_top_level_names() -> list[str]:
    """Every spelling accepted at the top level (for 'did you mean')."""
    names = {name for _, name in FLAT_INDEX.values()} | set(ALIASES) | set(BLOCK_FIELDS) | set(SECTIONS)
    names |= DEEPSPEED_PASSTHROUGH | {"scheduler", "deepspeed_extra_args"} | set(NEOX_DEFAULT_ONLY)
    names |= set(NEOX_NO_EFFECT)
    return sorted(names)


def suggest(key: str, candidates: list[str]) -> str:
    """' (did you mean X?)' for the closest spelling, or ''."""
    by_norm = {norm(c): c for c in candidates}
    close = difflib.get_close_matches(norm(key), list(by_norm), n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(by_norm[c]) for c in close) + "?)"


def lookup_flat(key: str) -> Optional[tuple[str, str]]:
    """(section, field) of a flat GPT-NeoX key, or None."""
    return FLAT_INDEX.get(norm(key))
