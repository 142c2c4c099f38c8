"""Turning each source (file, dict, command line) into one canonical nested form, and merging them left to right.

Canonical form: ``{section: {field: raw value}, "deepspeed_extra": {key: block}}``. Every source is canonicalised
on its own before merging, so ``num-layers`` in one file and ``model: {num_layers: ...}`` in the next, or a
top-level ``lr`` and ``optimizer.params.lr``, override each other in the order given. ``origins`` remembers which
source set each value last, so later errors can name the file.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Optional

from megatron.config._loading import neox_compat
from megatron.config._loading.keys import (
    BLOCK_FIELDS,
    DEEPSPEED_PASSTHROUGH,
    IGNORED,
    all_top_level_names,
    lookup_flat,
    norm,
    section_fields,
    suggest,
)
from megatron.config._loading.unsupported import (FEATURE_OF_KEY, NEOX_DEFAULT_ONLY, NEOX_NO_EFFECT,
                                                  check_default_only, check_no_effect, check_unbuilt_feature_key)
from megatron.config._loading.yaml_io import parse_scalar
from megatron.config.errors import ConfigError
from megatron.config.neox import DERIVED_KEYS_KEY, SECTIONS, derivable_fields

EXTRA = "deepspeed_extra"
# Optimizer arguments that have a typed field; any other ``optimizer.params`` entry stays in ``params``.
OPTIMIZER_LIFTED = ("lr", "betas", "eps", "momentum", "weight_decay")

Origins = dict  # (section, field) -> source name


class _Canon:
    """Collects one source's values and refuses two spellings of the same key inside that source."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.data: dict[str, dict[str, Any]] = {}
        self.origins: Origins = {}
        self._spelling: dict[tuple[str, str], str] = {}

    def put(self, section: str, name: str, value: Any, spelled: str) -> None:
        slot = (section, name)
        if slot in self._spelling:
            raise ConfigError(f"{self.source}: {self._spelling[slot]!r} and {spelled!r} both set "
                              f"{section}.{name}; keep one of them")
        self._spelling[slot] = spelled
        self.data.setdefault(section, {})[name] = value
        self.origins[slot] = self.source


def _optimizer_block(canon: _Canon, block: Any, spelled: str) -> None:
    if not isinstance(block, dict):
        raise ConfigError(f"{canon.source}: key {spelled!r}: expected a mapping like "
                          f"{{type: Adam, params: {{lr: 6.0e-4}}}}, got {block!r} ({type(block).__name__})")
    fields = section_fields("optimizer")
    for key, value in block.items():
        n = norm(key)
        if n == "params":
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{canon.source}: key '{spelled}.params': expected a mapping, got {value!r}")
            extras = {}
            for pkey, pvalue in value.items():
                pn = norm(pkey)
                if pn in OPTIMIZER_LIFTED:
                    canon.put("optimizer", pn, pvalue, f"{spelled}.params.{pkey}")
                else:
                    extras[str(pkey)] = pvalue
            if extras:
                canon.put("optimizer", "params", extras, f"{spelled}.params")
        elif n in fields:
            canon.put("optimizer", fields[n], value, f"{spelled}.{key}")
        else:
            raise ConfigError(f"{canon.source}: unknown key '{spelled}.{key}'"
                              f"{suggest(n, list(fields.values()))}; optimizer blocks hold type and params")


def _section_block(canon: _Canon, section: str, block: dict, spelled: str) -> None:
    fields = section_fields(section)
    for key, value in block.items():
        n = norm(key)
        if n not in fields:
            raise ConfigError(f"{canon.source}: unknown key '{spelled}.{key}'{suggest(n, list(fields.values()))}")
        canon.put(section, fields[n], value, f"{spelled}.{key}")


# DeepSpeed config keys ``deepspeed_extra_args`` may hold (GPT-NeoX merges that dict into the DeepSpeed config).
DEEPSPEED_EXTRA_KEYS = frozenset(set(BLOCK_FIELDS) | DEEPSPEED_PASSTHROUGH | {
    "scheduler", "optimizer", "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "steps_per_print", "wall_clock_breakdown", "fp32_allreduce"})


def _deepspeed_extra_args(canon: _Canon, block: Any, spelled: str) -> None:
    """GPT-NeoX's ``deepspeed_extra_args``: DeepSpeed keys merged into the DeepSpeed config. Each entry is read as the
    same key written at the top level, so the trainer sees what DeepSpeed gets; one also given at the top level of the
    same source is refused like any key spelled twice."""
    if block is None:
        return
    if not isinstance(block, dict):
        raise ConfigError(f"{canon.source}: key {spelled!r}: expected a mapping of DeepSpeed config keys, got "
                          f"{block!r} ({type(block).__name__})")
    for key, value in block.items():
        n = norm(key)
        if n not in DEEPSPEED_EXTRA_KEYS:
            raise ConfigError(f"{canon.source}: '{spelled}.{key}': not a DeepSpeed config key"
                              f"{suggest(n, sorted(DEEPSPEED_EXTRA_KEYS))}; deepspeed_extra_args holds DeepSpeed keys "
                              f"such as communication_data_type or data_types")
        _one_key(canon, str(key), value, f"{spelled}.{key}")


def _one_key(canon: _Canon, key: str, value: Any, spelled: str) -> None:
    n = norm(key)
    source = canon.source
    if n == "optimizer":
        _optimizer_block(canon, value, spelled)
    elif n in BLOCK_FIELDS:
        section, name = BLOCK_FIELDS[n]
        canon.put(section, name, value, spelled)
    elif n in DEEPSPEED_PASSTHROUGH or n == "scheduler":
        canon.put(EXTRA, n, value, spelled)
    elif n in NEOX_NO_EFFECT:
        check_no_effect(n, value, source)
    else:
        section, name = lookup_flat(n)
        canon.put(section, name, value, spelled)


def canonicalise(raw: dict, source: str) -> tuple[dict, Origins]:
    """One source's raw mapping -> (canonical nested dict, origins). Unknown keys raise ConfigError."""
    canon = _Canon(source)
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: key {key!r} is not a string")
        n = norm(key)
        if n == "deepspeed_extra_args":
            _deepspeed_extra_args(canon, value, key)
        elif n == "optimizer":
            _optimizer_block(canon, value, key)
        elif n in SECTIONS and isinstance(value, dict):
            _section_block(canon, n, value, key)
        elif n in SECTIONS and value is None:
            continue  # an empty block (``model:`` with nothing under it)
        elif n in SECTIONS and lookup_flat(n) is None:
            raise ConfigError(f"{source}: key {key!r} is a block: expected a mapping of {n} keys such as "
                              f"{sorted(section_fields(n).values())[:3]}, got {value!r} ({type(value).__name__})")
        elif n in BLOCK_FIELDS:
            section, name = BLOCK_FIELDS[n]
            canon.put(section, name, value, key)
        elif n in DEEPSPEED_PASSTHROUGH or n == "scheduler":
            canon.put(EXTRA, n, value, key)
        elif n == DERIVED_KEYS_KEY:
            continue
        elif n in IGNORED:
            continue
        elif n in NEOX_DEFAULT_ONLY:
            check_default_only(n, value, source)
        elif n in NEOX_NO_EFFECT:
            check_no_effect(n, value, source)
        elif n in FEATURE_OF_KEY:
            check_unbuilt_feature_key(n, value, source)
        elif neox_compat.handles(n):
            neox_compat.read(n, value, source, lambda flat, v, spelled=key: canon.put(*lookup_flat(flat), v, spelled))
        elif lookup_flat(n) is not None:
            section, name = lookup_flat(n)
            canon.put(section, name, value, key)
        else:
            raise ConfigError(f"{source}: unknown key {key!r}{suggest(n, all_top_level_names())}")
    _drop_derived(canon, raw)
    return canon.data, canon.origins


def _drop_derived(canon: _Canon, raw: dict) -> None:
    """A resolved config lists its computed values under ``derived_keys``; they are recomputed, not read back."""
    listed = next((v for k, v in raw.items() if isinstance(k, str) and norm(k) == DERIVED_KEYS_KEY), None)
    if listed is None:
        return
    if not isinstance(listed, list) or not all(isinstance(x, str) for x in listed):
        raise ConfigError(f"{canon.source}: key '{DERIVED_KEYS_KEY}': expected a list of 'section.key' strings, "
                          f"got {listed!r}")
    derivable = {f"{s}.{n}" for s, n in derivable_fields()}
    for item in listed:
        if item not in derivable:
            raise ConfigError(f"{canon.source}: '{DERIVED_KEYS_KEY}' lists {item!r}, which is not a derived value "
                              f"(derived values: {', '.join(sorted(derivable))})")
        section, name = item.split(".", 1)
        if name in canon.data.get(section, {}):
            del canon.data[section][name]
            canon.origins.pop((section, name), None)


def deep_merge(base: dict, new: dict) -> dict:
    """``new`` over ``base``: nested mappings merge key by key, anything else (lists included) is replaced."""
    out = copy.deepcopy(base)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(args: Iterable[str]) -> list[tuple[str, Any, str]]:
    """``["--a", "1", "--b.c=x", "--flag"]`` -> [(dotted key, parsed value, original text)].

    Values are YAML scalars or flow lists (``1e-3``, ``true``, ``[1, 2]``, ``-1``); a flag with no value is ``true``;
    several words after one key (``--eval_tasks lambada_openai piqa``) are a list.
    """
    args = list(args)
    out: list[tuple[str, Any, str]] = []
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"command line: expected '--key value' or '--key=value', got {token!r}")
        body = token[2:]
        if "=" in body:
            key, text = body.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            j = i + 1
            while j < len(args) and not args[j].startswith("--"):
                j += 1
            key, words = body, args[i + 1:j]
            i = j
            if len(words) > 1:  # `--eval_tasks lambada_openai piqa`: several words are a list
                if not key or any(not part for part in key.split(".")):
                    raise ConfigError(f"command line: malformed key in {token!r}")
                value = [parse_scalar(w, f"command line --{key}") for w in words]
                out.append((key, value, f"--{key}={' '.join(words)}"))
                continue
            text = words[0]
        else:
            key, text = body, "true"
            i += 1
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"command line: malformed key in {token!r}")
        value = parse_scalar(text, f"command line --{key}")
        out.append((key, value, f"--{key}={text}"))
    return out


def override_to_raw(dotted: str, value: Any) -> dict:
    """``"optimizer.params.lr", 1e-3`` -> ``{"optimizer": {"params": {"lr": 1e-3}}}``."""
    raw: Any = value
    for part in reversed(dotted.split(".")):
        raw = {part: raw}
    return raw


def merge_sources(sources: list[tuple[str, dict]], overrides: Optional[list[tuple[str, Any, str]]] = None
                  ) -> tuple[dict, Origins]:
    """Canonicalise and merge ``[(name, raw dict), ...]`` then the parsed command-line overrides, later wins."""
    merged: dict = {}
    origins: Origins = {}
    for name, raw in sources:
        canon, org = canonicalise(raw, name)
        merged = deep_merge(merged, canon)
        origins.update(org)
    for dotted, value, text in overrides or []:
        canon, org = canonicalise(override_to_raw(dotted, value), f"command line {text}")
        merged = deep_merge(merged, canon)
        origins.update(org)
    return merged, origins
