"""From the merged canonical dict to a validated ``NeoXConfig``: types, enumerations, cross-key checks, derived values.

Order matters and is fixed here: coerce every field, then model -> parallel -> batch -> precision -> schedule ->
SepLLM -> the unsupported-feature table. Each error names the key, the value, the source that set it and what was
expected.
"""

from __future__ import annotations

import logging
import typing
from types import SimpleNamespace
from typing import Any, Callable, Union

from megatron.config._loading import neox_compat, training_checks
from megatron.config._loading.coerce import coerce, coerce_items, to_float
from megatron.config._loading.merge import EXTRA, Origins
from megatron.config._loading.sepllm_checks import DERIVED_FIELDS, resolve_sepllm
from megatron.config._loading.unsupported import FEATURE_OF_NORM, check_unsupported
from megatron.config.derived import (ACTIVATIONS, BATCH_KEYS, CHECKPOINT_SCALES, DATA_IMPLS, DISTRIBUTED_BACKENDS,
                                     LAUNCHERS, NORMS, PACK_IMPLS, POS_EMBS, PRECISION_SPELLINGS, TOKENIZER_TYPES,
                                     WANDB_MODES, expand_attention_config, precision_from_blocks,
                                     resolve_batch_triple)
from megatron.config.errors import ConfigError
from megatron.config.generation import check_generation
from megatron.config.preference import SPLITS, check_preference, pair_keys
from megatron.config.layout import check_layout
from megatron.config.model import resolve_model_config
from megatron.config.neox import READ_ONLY_FIELDS, SECTIONS, NeoXConfig
from megatron.device import DEVICES, cuda_available

logger = logging.getLogger("megatron.config")

# Element types of list fields (the dataclasses only say ``list``).
ITEM_TYPES: dict[tuple[str, str], type] = {
    ("optimizer", "betas"): float,
    ("sepllm", "separator_token_ids"): int,
    ("sepllm", "BiPE_seps"): int,
    ("sepllm", "prefill_loc_win_size_list"): int,
    ("sepllm", "generate_win_loc_size_list"): int,
    ("sepllm", "fixed_sep_intervals_list"): int,
    ("sepllm", "prefill_windows"): int,
    ("sepllm", "generate_windows"): int,
    ("data", "train_data_paths"): str,
    ("data", "valid_data_paths"): str,
    ("data", "test_data_paths"): str,
    ("data", "train_label_data_paths"): str,
    ("data", "valid_label_data_paths"): str,
    ("data", "test_label_data_paths"): str,
    ("data", "train_data_weights"): float,
    ("data", "valid_data_weights"): float,
    ("data", "test_data_weights"): float,
    **{("data", key): str for split in SPLITS for key in pair_keys(split)},
    ("checkpoint", "extra_save_iters"): int,
    ("training", "eval_tasks"): str,
}


class _Ctx:
    """Source lookup for messages."""

    def __init__(self, origins: Origins) -> None:
        self.origins = origins
        self._by_field = {f: s for (sec, f), s in origins.items()}

    def src(self, section: str, name: str) -> str:
        return self.origins.get((section, name), "default")

    def where(self, section: str) -> Callable[[str], str]:
        return lambda name: self.origins.get((section, name), self._by_field.get(name, "default"))

    def err(self, section: str, name: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{self.src(section, name)}: key '{name}': expected {expected}, got {value!r}")


def _build_sections(merged: dict, ctx: _Ctx) -> dict[str, Any]:
    objs: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        obj = cls()
        hints = typing.get_type_hints(cls)
        for name, raw in merged.get(section, {}).items():
            where = f"{ctx.src(section, name)}: key '{name}'"
            if (section, name) == ("training", "eval_tasks") and isinstance(raw, str):
                raw = [part.strip() for part in raw.split(",") if part.strip()]  # GPT-NeoX "a,b" / one name
            value = coerce(raw, hints[name], where)
            if (section, name) in ITEM_TYPES and value is not None:
                value = coerce_items(value, ITEM_TYPES[(section, name)], where)
            setattr(obj, name, value)
        objs[section] = obj
    return objs


def _one_of(ctx: _Ctx, section: str, name: str, value: Any, allowed: tuple, normalise: bool = False) -> Any:
    if normalise and isinstance(value, str):
        by_lower = {a.lower(): a for a in allowed if isinstance(a, str)}
        value = by_lower.get(value.lower(), value)
    if value not in allowed:
        shown = ", ".join("null" if a is None else str(a) for a in allowed)
        raise ctx.err(section, name, value, f"one of {shown}")
    return value


def _at_least(ctx: _Ctx, section: str, name: str, value: Any, low: float) -> None:
    if value is not None and value < low:
        raise ctx.err(section, name, value, f"a value >= {low}")


def _check_model(m, ctx: _Ctx) -> None:
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "checkpoint_num_layers",
                 "make_vocab_size_divisible_by", "fused_cross_entropy_chunk"):
        _at_least(ctx, "model", name, getattr(m, name), 1)
    _at_least(ctx, "model", "num_kv_heads", m.num_kv_heads, 1)
    if m.activation_checkpoint_mode not in ("full", "selective"):
        raise ctx.err("model", "activation_checkpoint_mode", m.activation_checkpoint_mode, "full or selective")
    if not (m.selective_ac_option == "op" or (m.selective_ac_option.isdigit() and int(m.selective_ac_option) >= 1)):
        raise ctx.err("model", "selective_ac_option", m.selective_ac_option, "op or a layer interval >= 1 (\"2\")")
    neox_compat.resolve_attention_type(m, ctx.where("model"))
    _at_least(ctx, "model", "intermediate_size", m.intermediate_size, 1)
    _at_least(ctx, "model", "padded_vocab_size", m.padded_vocab_size, 1)
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"hidden_size={m.hidden_size} ({ctx.src('model', 'hidden_size')}) is not divisible by "
                          f"num_attention_heads={m.num_attention_heads} ({ctx.src('model', 'num_attention_heads')})")
    if m.num_kv_heads is not None and m.num_attention_heads % m.num_kv_heads:
        raise ConfigError(f"num_attention_heads={m.num_attention_heads} ({ctx.src('model', 'num_attention_heads')}) "
                          f"is not divisible by num_kv_heads={m.num_kv_heads} ({ctx.src('model', 'num_kv_heads')})")
    if str(m.pos_emb).lower() == "rpe":
        raise ConfigError(f"{ctx.src('model', 'pos_emb')}: pos_emb='rpe': T5 relative position buckets are not built "
                          f"in this framework; use rotary, alibi, learned, sinusoidal or none")
    m.pos_emb = _one_of(ctx, "model", "pos_emb", m.pos_emb, POS_EMBS, normalise=True)
    if m.norm in FEATURE_OF_NORM:
        raise ConfigError(f"{ctx.src('model', 'norm')}: norm={m.norm!r}: {FEATURE_OF_NORM[m.norm]} is not built in "
                          f"this framework; use {m.norm[3:]!r} (the same norm in PyTorch)")
    m.norm = _one_of(ctx, "model", "norm", m.norm, NORMS, normalise=True)
    m.activation = _one_of(ctx, "model", "activation", m.activation, ACTIVATIONS, normalise=True)
    if not 0.0 < m.rotary_pct <= 1.0:
        raise ctx.err("model", "rotary_pct", m.rotary_pct, "a fraction in (0, 1]")
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(m, name) < 1.0:
            raise ctx.err("model", name, getattr(m, name), "a probability in [0, 1)")
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    _at_least(ctx, "model", "opt_pos_emb_offset", m.opt_pos_emb_offset, 0)
    if m.pos_emb == "learned" and m.seq_length + m.opt_pos_emb_offset > m.max_position_embeddings:
        raise ConfigError(f"seq_length={m.seq_length} (+ opt_pos_emb_offset={m.opt_pos_emb_offset}) exceeds "
                          f"max_position_embeddings={m.max_position_embeddings} "
                          f"({ctx.src('model', 'max_position_embeddings')}) with learned positions")
    m.attention_config = expand_attention_config(m.attention_config, m.num_layers)
    if m.onnx_safe and m.bias_gelu_fusion:
        fusion_src = ctx.src("model", "bias_gelu_fusion")
        raise ConfigError(f"{ctx.src('model', 'onnx_safe')}: onnx_safe and bias_gelu_fusion ({fusion_src}) choose "
                          f"two different GeLUs (GPT-NeoX refuses the pair too); drop one")
    if m.norm == "layernorm" and not m.use_bias_in_norms:
        logger.warning("use_bias_in_norms=false (%s): LayerNorm is built without bias, as GPT-NeoX documents the key; "
                       "GPT-NeoX's own model code ignores it and keeps the bias", ctx.src("model", "use_bias_in_norms"))
    _at_least(ctx, "model", "mlp_multiple_of", m.mlp_multiple_of, 1)
    _at_least(ctx, "model", "expansion_factor", m.expansion_factor, 0.0)
    _at_least(ctx, "model", "sliding_window_width", m.sliding_window_width, 1)
    try:
        resolve_model_config(m)   # the MLP widths and the GeLU form the model builds
    except ConfigError as exc:
        raise ConfigError(f"{ctx.src('model', 'intermediate_size')}: {exc}") from None
    if m.use_qk_layernorm and m.num_kv_heads not in (None, m.num_attention_heads):
        raise ConfigError(f"{ctx.src('model', 'use_qk_layernorm')}: use_qk_layernorm with num_kv_heads="
                          f"{m.num_kv_heads} < num_attention_heads={m.num_attention_heads}: GPT-NeoX's query/key norm "
                          f"has one shape for both and cannot run with grouped-query attention; drop one of them")


def _check_optimizer(o, merged_optimizer: dict, ctx: _Ctx) -> None:
    training_checks.check_optimizer(o, merged_optimizer, ctx)


WorldSize = Union[int, Callable[[Any], int], None]


def _world_size(p, launcher, launch_world: WorldSize, ctx: _Ctx) -> int:
    """The ranks this config runs on: ``world_size`` if given, else the launch's (``launch_world``: a number, or a
    function of the launcher section that reads the hostfile / visible devices), else ``num_nodes x num_gpus``,
    ``num_gpus`` (one node), and finally ``model_parallel_size x pipe stages`` (unknown until launch)."""
    launched = launch_world(launcher) if callable(launch_world) else launch_world
    if p.world_size is not None:
        if launched is not None and launched != p.world_size:
            raise ConfigError(f"{ctx.src('parallel', 'world_size')}: world_size={p.world_size}, but the launch has "
                              f"{launched} ranks; remove world_size or launch {p.world_size} processes")
        return p.world_size
    if launched is not None:
        return int(launched)
    nodes, gpus = launcher.num_nodes, launcher.num_gpus
    if gpus is not None and gpus > 0:
        if nodes is not None and nodes > 0:
            return nodes * gpus
        if not launcher.hostfile:
            return gpus
    return p.model_parallel_size * max(p.pipe_parallel_size, 1)


def _resolve_parallel(p, launcher, device: str, launch_world: WorldSize, ctx: _Ctx) -> None:
    for name in ("model_parallel_size", "world_size"):
        _at_least(ctx, "parallel", name, getattr(p, name), 1)
    _at_least(ctx, "parallel", "pipe_parallel_size", p.pipe_parallel_size, 0)
    p.world_size = _world_size(p, launcher, launch_world, ctx)
    backend = _one_of(ctx, "parallel", "distributed_backend", p.distributed_backend, DISTRIBUTED_BACKENDS,
                      normalise=True)
    if backend in (None, "auto", "nccl"):
        cuda = device != "cpu" and cuda_available()
        if backend == "nccl" and not cuda:
            logger.info("distributed_backend 'nccl' needs CUDA; using 'gloo' on this CPU run")
        backend = "nccl" if cuda else "gloo"
    p.distributed_backend = backend


def _resolve_layout(model, p, zero_stage: int, ctx: _Ctx) -> None:
    """The one layout check (``megatron.config.layout``) for the resolved world size; sets the data-parallel size."""
    given_dp = p.data_parallel_size
    p.data_parallel_size = check_layout(model, p, zero_stage, p.world_size,
                                        where=lambda key: ctx._by_field.get(key, "config"))
    if given_dp is not None and given_dp != p.data_parallel_size:
        raise ConfigError(f"{ctx.src('parallel', 'data_parallel_size')}: data_parallel_size={given_dp} is derived "
                          f"(world_size / (model x pipe parallel) = {p.data_parallel_size}); set world_size instead")


def _resolve_training(t, p, merged_training: dict, ctx: _Ctx) -> None:
    t.device = _one_of(ctx, "training", "device", t.device, DEVICES, normalise=True)
    _at_least(ctx, "training", "train_iters", t.train_iters, 1)
    _at_least(ctx, "training", "gradient_clipping", t.gradient_clipping, 0.0)
    for name in ("eval_interval",):
        _at_least(ctx, "training", name, getattr(t, name), 1)
    _at_least(ctx, "training", "eval_iters", t.eval_iters, 0)
    for name, low in (("eval_num_fewshot", 0), ("eval_limit", 1), ("eval_batch_size", 1),
                      ("eval_bootstrap_iters", 0)):
        _at_least(ctx, "training", name, getattr(t, name), low)
    t.batch_inputs = [k for k in BATCH_KEYS if merged_training.get(k) is not None]
    try:
        t.train_batch_size, t.train_micro_batch_size_per_gpu, t.gradient_accumulation_steps = (
            resolve_batch_triple(t.train_batch_size, t.train_micro_batch_size_per_gpu,
                                         t.gradient_accumulation_steps, p.data_parallel_size))
    except ConfigError as exc:
        srcs = sorted({ctx.src("training", k) for k in t.batch_inputs} or {"default"})
        raise ConfigError(f"{', '.join(srcs)}: {exc}") from None
    _resolve_precision(t, merged_training, ctx)


def _resolve_precision(t, merged_training: dict, ctx: _Ctx) -> None:
    for name in ("fp16", "bf16"):
        block = getattr(t, name)
        if block is not None and name in block:
            # GPT-NeoX configs repeat the switch inside the block ("fp16": {"fp16": true, ...}); DeepSpeed rejects
            # that key, so it becomes ``enabled`` (when that is not given) and is dropped.
            block = dict(block)
            inner = block.pop(name)
            block.setdefault("enabled", bool(inner))
            setattr(t, name, block)
            logger.info("%s.%s folded into %s.enabled=%s (DeepSpeed does not accept the inner key)", name, name,
                        name, block["enabled"])
    given_precision = merged_training.get("precision")
    if given_precision is not None:
        spelled = str(t.precision).strip().lower()
        if spelled not in PRECISION_SPELLINGS:
            raise ctx.err("training", "precision", t.precision, "one of fp16, bfloat16 (or bf16), fp32")
        given_precision = PRECISION_SPELLINGS[spelled]
    try:
        t.precision = precision_from_blocks(t.fp16, t.bf16, given_precision)
    except ConfigError as exc:
        raise ConfigError(f"{ctx.src('training', 'precision')}: {exc}") from None
    if t.precision in ("fp16", "bf16") and not (getattr(t, t.precision) or {}).get("enabled", False):
        if (getattr(t, t.precision) or {}).get("enabled") is False:
            raise ConfigError(f"{ctx.src('training', 'precision')}: precision={t.precision!r} contradicts "
                              f"{t.precision}.enabled=false ({ctx.src('training', t.precision)})")
        block = dict(getattr(t, t.precision) or {})
        block["enabled"] = True
        setattr(t, t.precision, block)
    for name in ("fp16", "bf16"):
        block = getattr(t, name)
        if block is not None and not block.get("enabled", False):
            logger.info("%s block present but not enabled (DeepSpeed default enabled=false)", name)


def _resolve_zero(t, ctx: _Ctx) -> None:
    zero = dict(t.zero_optimization or {})
    stage = coerce(zero.get("stage", 0), int, f"{ctx.src('training', 'zero_optimization')}: key "
                                             f"'zero_optimization.stage'")
    if stage not in (0, 1, 2, 3):
        raise ctx.err("training", "zero_optimization", stage, "zero_optimization.stage in 0, 1, 2, 3")
    zero["stage"] = stage
    if zero.get("cpu_offload") is False:
        del zero["cpu_offload"]  # GPT-NeoX configs spell out the default; DeepSpeed warns that the key is deprecated
    t.zero_optimization = zero
    t.zero_stage = stage


def _resolve_schedule(s, t, optimizer, merged_schedule: dict, ctx: _Ctx) -> None:
    training_checks.resolve_schedule(s, t, optimizer, merged_schedule, ctx)


def _check_data(d, ctx: _Ctx) -> None:
    if str(d.data_impl).lower() == "cached":
        raise ConfigError(f"{ctx.src('data', 'data_impl')}: data_impl='cached': GPT-NeoX's legacy cached dataset "
                          f"format is not read here; prepare the data as mmap (.bin/.idx, prepare_data.py) and use "
                          f"mmap or infer")
    d.data_impl = _one_of(ctx, "data", "data_impl", d.data_impl, DATA_IMPLS, normalise=True)
    d.pack_impl = _one_of(ctx, "data", "pack_impl", d.pack_impl, PACK_IMPLS, normalise=True)
    _at_least(ctx, "data", "num_workers", d.num_workers, 0)
    parts = [x.strip() for x in str(d.split).split(",")]
    try:
        values = [to_float(x, "split") for x in parts]
    except ConfigError:
        values = []
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise ctx.err("data", "split", d.split, "three comma-separated non-negative numbers like '969, 30, 1'")
    if d.data_path is not None and any(getattr(d, f"{k}_data_paths") for k in ("train", "valid", "test")):
        raise ConfigError(f"{ctx.src('data', 'data_path')}: data_path is split into train/valid/test by 'split'; "
                          f"it cannot be combined with train/valid/test_data_paths ({ctx.src('data', 'train_data_paths')})"
                          f"; give one or the other")
    for kind in ("train", "valid", "test"):
        paths, weights = getattr(d, f"{kind}_data_paths"), getattr(d, f"{kind}_data_weights")
        if weights is not None and (paths is None or len(weights) != len(paths)):
            raise ConfigError(f"{ctx.src('data', f'{kind}_data_weights')}: {kind}_data_weights has "
                              f"{len(weights)} entries but {kind}_data_paths has {len(paths or [])}")
        if weights is not None and any(w < 0 for w in weights):
            raise ctx.err("data", f"{kind}_data_weights", weights, "non-negative weights")
        labels = getattr(d, f"{kind}_label_data_paths")
        if labels and len(labels) != len(paths or []):
            raise ConfigError(f"{ctx.src('data', f'{kind}_label_data_paths')}: {kind}_label_data_paths has "
                              f"{len(labels)} entries but {kind}_data_paths has {len(paths or [])}: give one label "
                              f"dataset per {kind} dataset (label rows are aligned with their text rows)")


def _check_rest(objs: dict, ctx: _Ctx) -> None:
    tok = objs["tokenizer"]
    tok.tokenizer_type = _one_of(ctx, "tokenizer", "tokenizer_type", tok.tokenizer_type, TOKENIZER_TYPES,
                                 normalise=True)
    ck = objs["checkpoint"]
    ck.checkpoint_scale = _one_of(ctx, "checkpoint", "checkpoint_scale", ck.checkpoint_scale, CHECKPOINT_SCALES)
    _at_least(ctx, "checkpoint", "checkpoint_factor", ck.checkpoint_factor, 1)
    _at_least(ctx, "checkpoint", "keep_last_n_checkpoints", ck.keep_last_n_checkpoints, 1)
    _at_least(ctx, "checkpoint", "iteration", ck.iteration, 0)
    if ck.extra_save_iters is not None:
        _at_least(ctx, "checkpoint", "extra_save_iters", min(ck.extra_save_iters, default=0), 0)
    lg = objs["logging"]
    lg.wandb_mode = _one_of(ctx, "logging", "wandb_mode", lg.wandb_mode, WANDB_MODES, normalise=True)
    _at_least(ctx, "logging", "log_interval", lg.log_interval, 1)
    _at_least(ctx, "logging", "steps_per_print", lg.steps_per_print, 1)
    _at_least(ctx, "logging", "peak_flops", lg.peak_flops, 0.0)
    if lg.log_dir is None and ck.save is not None:
        lg.log_dir = ck.save.rstrip("/") + "/logs"
    la = objs["launcher"]
    la.launcher = _one_of(ctx, "launcher", "launcher", la.launcher, LAUNCHERS, normalise=True)
    if not 0 < la.master_port < 65536:
        raise ctx.err("launcher", "master_port", la.master_port, "a TCP port in 1..65535")
    _at_least(ctx, "launcher", "num_gpus", la.num_gpus, 1)
    for key, value in la.env.items():
        if not isinstance(value, (str, int, float, bool)):
            raise ctx.err("launcher", "env", {key: value}, "environment values that are strings or numbers")
    la.env = {str(k): str(v) for k, v in la.env.items()}


def _check_derived_repeats(given: dict, objs: dict, ctx: _Ctx) -> None:
    for section, name in READ_ONLY_FIELDS:
        if (section, name) in given and given[(section, name)] != getattr(objs[section], name):
            raise ConfigError(f"{ctx.src(section, name)}: {section}.{name}={given[(section, name)]!r} is derived "
                              f"(here it resolves to {getattr(objs[section], name)!r}) and cannot be set; change the "
                              f"keys it is computed from")


def build_config(merged: dict, origins: Origins, sources: list[str], overrides: list[str],
                 world_size: WorldSize = None) -> NeoXConfig:
    """Validate the merged canonical dict into a ``NeoXConfig`` (raises ConfigError).

    ``world_size``: the ranks of the launch (or a function of the launcher section returning them), against which
    the layout and the batch triple are checked; None derives it from the config (see ``_world_size``).
    """
    ctx = _Ctx(origins)
    objs = _build_sections(merged, ctx)
    given_derived = {(s, n): getattr(objs[s], n) for s, n in READ_ONLY_FIELDS if n in merged.get(s, {})}
    for s, n in given_derived:  # reset so that derivation starts from defaults
        setattr(objs[s], n, getattr(SECTIONS[s](), n))

    model, training, parallel = objs["model"], objs["training"], objs["parallel"]
    _check_model(model, ctx)
    # Refuse unbuilt features before deriving from them (e.g. TP=2 would first fail the world-size division).
    extra = dict(merged.get(EXTRA, {}))
    check_unsupported(SimpleNamespace(**objs, deepspeed_extra=extra), lambda key: ctx._by_field.get(key, "config"))
    _check_optimizer(objs["optimizer"], merged.get("optimizer", {}), ctx)
    _resolve_parallel(parallel, objs["launcher"], training.device, world_size, ctx)
    _resolve_zero(training, ctx)
    _resolve_layout(model, parallel, training.zero_stage, ctx)
    _resolve_training(training, parallel, merged.get("training", {}), ctx)
    model.precision = training.precision
    neox_compat.resolve_decay_lr_to(objs["lr_schedule"], objs["optimizer"].lr,
                                    "min_lr" in merged.get("lr_schedule", {}), ctx.where("lr_schedule"))
    _resolve_schedule(objs["lr_schedule"], training, objs["optimizer"], merged.get("lr_schedule", {}), ctx)
    training_checks.check_run_keys(objs, ctx)
    training_checks.check_fp32_allreduce(training, extra, ctx)
    _check_data(objs["data"], ctx)
    check_preference(training, objs["data"], parallel, model, ctx.where("training"))
    _check_rest(objs, ctx)
    check_generation(objs["generation"], ctx.where("generation"))

    # sep_attention_impl only picks an execution path; alone it does not turn a GPT-NeoX config into a SepLLM one.
    sep_keys = set(merged.get("sepllm", {})) - set(DERIVED_FIELDS) - {"sep_attention_impl"}
    resolve_sepllm(objs["sepllm"], model, has_sepllm_keys=bool(sep_keys),
                   num_layers_explicit="num_layers" in merged.get("model", {}), where=ctx.where("sepllm"))
    _check_derived_repeats(given_derived, objs, ctx)

    cfg = NeoXConfig(**objs, deepspeed_extra=extra, sources=list(sources), overrides=list(overrides))
    cfg.explicit_keys = frozenset(f"{s}.{n}" for s, n in origins)
    cfg.key_sources = {f"{s}.{n}": where for (s, n), where in origins.items()}
    return cfg

