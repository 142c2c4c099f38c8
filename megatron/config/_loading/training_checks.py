"""Validation of the training-side keys: optimizer block, LR schedule, epochs / exit, diagnostics and profiling.

Each rule follows what GPT-NeoX computes for the key (``megatron/neox_arguments`` and ``megatron/training.py``
upstream); keys it has no code for are refused here in one line. Called by ``validate`` with its source-naming
context (``ctx.src(section, key)``, ``ctx.err(...)``); ``check_training_ready`` by the loader for ``train.py``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from megatron.config.derived import (LR_DECAY_STYLES, OPTIMIZER_ALIASES, OPTIMIZER_SPELLINGS, OPTIMIZER_TYPES,
                                     WSD_DECAY_STYLES, decay_iters)
from megatron.config.errors import ConfigError
from megatron.config.layout import pipeline_engine_stages
from megatron.config.neox import NeoXConfig

logger = logging.getLogger("megatron.config")

# Types GPT-NeoX (or DeepSpeed) knows that are not built here.
REFUSED_OPTIMIZER_TYPES = ("onebitadam", "sm3", "madgrad_wd", "lamb", "onebitlamb", "zerooneadam", "adagrad",
                           "muadam", "musgd")
# Arguments each optimizer accepts in ``optimizer.params`` (besides nothing else: an unknown one would be dropped).
OPTIMIZER_PARAMS = {
    "Adam": ("lr", "betas", "eps", "weight_decay", "adam_w_mode", "bias_correction", "amsgrad", "torch_adam",
             "set_grad_none"),
    "AdamW": ("lr", "betas", "eps", "weight_decay", "adam_w_mode", "bias_correction", "amsgrad", "torch_adam",
              "set_grad_none"),
    "Lion": ("lr", "betas", "weight_decay"),
    "SGD": ("lr", "momentum", "weight_decay", "dampening", "nesterov"),
    "cpu_adam": ("lr", "betas", "eps", "weight_decay", "adamw_mode", "bias_correction", "amsgrad",
                 "fp32_optimizer_states"),
}
# params whose only accepted value is fixed (the other value is a variant not built here).
_FIXED_PARAMS = {"amsgrad": False}
DEFAULT_BETAS = {"Lion": [0.9, 0.99]}
ADAM_BETAS = [0.9, 0.999]


def _one_of(ctx: Any, section: str, name: str, value: Any, allowed: tuple) -> str:
    spelled = value.lower() if isinstance(value, str) else value
    if spelled not in allowed:
        raise ctx.err(section, name, value, "one of " + ", ".join(allowed))
    return spelled


def _at_least(ctx: Any, section: str, name: str, value: Any, low: float) -> None:
    if value is not None and value < low:
        raise ctx.err(section, name, value, f"a value >= {low}")


# ------------------------------------------------------------------------------------------------ optimizer
def check_optimizer(o: Any, merged_optimizer: dict, ctx: Any) -> None:
    """Normalise ``optimizer.type``, refuse types and arguments we do not build, fill the per-type defaults and the
    resolved ``params`` block (typed fields + the type's other arguments)."""
    raw = o.type.lower() if isinstance(o.type, str) else o.type
    if raw in REFUSED_OPTIMIZER_TYPES:
        raise ConfigError(f"{ctx.src('optimizer', 'type')}: optimizer.type={o.type!r}: this optimizer is not built "
                          f"here; use {', '.join(OPTIMIZER_TYPES[:-1])} or {OPTIMIZER_TYPES[-1]}")
    if raw not in OPTIMIZER_SPELLINGS:
        raise ctx.err("optimizer", "type", o.type,
                      f"one of {', '.join(OPTIMIZER_TYPES)} (or {', '.join(OPTIMIZER_ALIASES)})")
    o.type = OPTIMIZER_SPELLINGS[raw]
    allowed = OPTIMIZER_PARAMS[o.type]
    # typed fields at their defaults are what a saved resolved config repeats for every type: only a value counts
    defaults = {f.name: f.default for f in dataclasses.fields(o) if f.name not in ("type", "params")}
    given = {k for k in set(merged_optimizer) - {"type", "params"} if getattr(o, k) != defaults.get(k)}
    for name in sorted(given | set(o.params or {})):
        if name not in allowed:
            raise ConfigError(f"{ctx.src('optimizer', name if name in given else 'params')}: optimizer.params.{name}: "
                              f"not an argument of optimizer {o.type} (it takes {', '.join(allowed)})")
    for name, only in _FIXED_PARAMS.items():
        if name in (o.params or {}) and bool(o.params[name]) is not only:
            raise ConfigError(f"{ctx.src('optimizer', 'params')}: optimizer.params.{name}={o.params[name]!r}: only "
                              f"{str(only).lower()} is built (GPT-NeoX's FusedAdam refuses the AMSGrad variant)")
    if o.type in ("Adam", "AdamW", "cpu_adam") and (o.params or {}).get("bias_correction", True) is not True:
        raise ConfigError(f"{ctx.src('optimizer', 'params')}: optimizer.params.bias_correction="
                          f"{o.params['bias_correction']!r}: Adam without bias correction is not built; remove it")
    if o.type == "AdamW" and (o.params or {}).get("adam_w_mode", True) is not True:
        raise ConfigError(f"{ctx.src('optimizer', 'params')}: optimizer.params.adam_w_mode=false contradicts type "
                          f"AdamW; use type Adam for L2-style Adam")
    if o.betas is None:
        o.betas = list(DEFAULT_BETAS.get(o.type, ADAM_BETAS))
    if o.lr <= 0:
        raise ctx.err("optimizer", "lr", o.lr, "a learning rate > 0")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ctx.err("optimizer", "betas", o.betas, "two values in [0, 1), e.g. [0.9, 0.95]")
    _at_least(ctx, "optimizer", "eps", o.eps, 0.0)
    _at_least(ctx, "optimizer", "weight_decay", o.weight_decay, 0.0)
    _at_least(ctx, "optimizer", "momentum", o.momentum, 0.0)
    typed: dict[str, Any] = {"lr": o.lr, "weight_decay": o.weight_decay}
    if o.type == "SGD":
        typed["momentum"] = o.momentum
    else:
        typed["betas"] = list(o.betas)
        if o.type != "Lion":
            typed["eps"] = o.eps
    extras = {k: v for k, v in (o.params or {}).items() if k not in ("lr", "betas", "eps", "momentum", "weight_decay")}
    o.params = {**typed, **extras}


# ------------------------------------------------------------------------------------------------ LR schedule
def resolve_schedule(s: Any, t: Any, optimizer: Any, merged_schedule: dict, ctx: Any) -> None:
    """Check the schedule keys and derive ``lr_decay_iters`` / ``warmup_iters`` (None while train_iters is unknown,
    i.e. with train_epochs: the trainer derives them once the data is built)."""
    s.lr_decay_style = _one_of(ctx, "lr_schedule", "lr_decay_style", s.lr_decay_style, LR_DECAY_STYLES)
    s.wsd_decay_style = _one_of(ctx, "lr_schedule", "wsd_decay_style", s.wsd_decay_style, WSD_DECAY_STYLES)
    _at_least(ctx, "lr_schedule", "lr_decay_iters", s.lr_decay_iters, 1)
    _at_least(ctx, "lr_schedule", "min_lr", s.min_lr, 0.0)
    _at_least(ctx, "lr_schedule", "warmup_iters", s.warmup_iters, 0)
    if not 0.0 <= s.warmup <= 1.0:
        raise ctx.err("lr_schedule", "warmup", s.warmup, "a fraction of lr_decay_iters in [0, 1]")
    if s.lr_decay_fraction is not None and not s.lr_decay_fraction > 0:
        raise ctx.err("lr_schedule", "lr_decay_fraction", s.lr_decay_fraction, "a fraction of train_iters > 0")
    if not 0.0 < s.wsd_decay_fraction <= 1.0:
        raise ctx.err("lr_schedule", "wsd_decay_fraction", s.wsd_decay_fraction, "a fraction in (0, 1]")
    if s.min_lr > optimizer.lr:
        raise ConfigError(f"{ctx.src('lr_schedule', 'min_lr')}: min_lr={s.min_lr} exceeds lr={optimizer.lr} "
                          f"({ctx.src('optimizer', 'lr')}); GPT-NeoX requires min_lr <= lr")
    explicit_decay = merged_schedule.get("lr_decay_iters") is not None
    if explicit_decay and s.lr_decay_fraction is not None:
        raise ConfigError(f"{ctx.src('lr_schedule', 'lr_decay_fraction')}: lr_decay_fraction={s.lr_decay_fraction} "
                          f"and lr_decay_iters={s.lr_decay_iters} ({ctx.src('lr_schedule', 'lr_decay_iters')}) both "
                          f"set the decay length; keep one")
    if s.override_lr_scheduler and s.use_checkpoint_lr_scheduler:
        raise ConfigError(f"{ctx.src('lr_schedule', 'override_lr_scheduler')}: override_lr_scheduler and "
                          f"use_checkpoint_lr_scheduler ({ctx.src('lr_schedule', 'use_checkpoint_lr_scheduler')}) "
                          f"are both true; the schedule comes either from the config or from the checkpoint")
    if not explicit_decay:
        s.lr_decay_iters = (None if t.train_iters is None
                            else decay_iters(t.train_iters, None, s.lr_decay_fraction))
    if merged_schedule.get("warmup_iters") is None:
        s.warmup_iters = None if s.lr_decay_iters is None else s.warmup * s.lr_decay_iters


# ------------------------------------------------------------------------------------------------ run length
def check_run_keys(objs: dict, ctx: Any) -> None:
    """train_epochs / exit_interval, fp32_allreduce vs communication_data_type, diagnostics and profiling keys."""
    t, d, lg = objs["training"], objs["data"], objs["logging"]
    _at_least(ctx, "training", "train_epochs", t.train_epochs, 1)
    _at_least(ctx, "training", "exit_interval", t.exit_interval, 1)
    if t.train_epochs is not None:
        if t.train_iters is not None:
            raise ConfigError(f"{ctx.src('training', 'train_epochs')}: train_epochs={t.train_epochs} and "
                              f"train_iters={t.train_iters} ({ctx.src('training', 'train_iters')}) both set the "
                              f"run length; keep one (GPT-NeoX refuses both)")
        if d.weight_by_num_documents:
            raise ConfigError(f"{ctx.src('data', 'weight_by_num_documents')}: weight_by_num_documents with "
                              f"train_epochs: an epoch of a re-weighted blend is not defined (GPT-NeoX refuses it)")
        if d.train_data_paths and len(d.train_data_paths) > 1:
            raise ConfigError(f"{ctx.src('training', 'train_epochs')}: train_epochs with {len(d.train_data_paths)} "
                              f"train_data_paths: an epoch of a blend (GPT-NeoX re-reads the smaller datasets to fill "
                              f"equal shares) is not built; use one train dataset or train_iters")
        if d.train_data_weights and any(w != 1.0 for w in d.train_data_weights):
            raise ConfigError(f"{ctx.src('data', 'train_data_weights')}: train_data_weights="
                              f"{d.train_data_weights} with train_epochs: only weights of 1.0 define an epoch "
                              f"(GPT-NeoX refuses other weights)")
    _at_least(ctx, "logging", "gradient_noise_scale_n_batches", lg.gradient_noise_scale_n_batches, 2)
    _at_least(ctx, "logging", "profile_step_start", lg.profile_step_start, 0)
    if (lg.profile or lg.memory_profiling) and lg.profile_step_stop <= lg.profile_step_start:
        raise ConfigError(f"{ctx.src('logging', 'profile_step_stop')}: profile_step_stop={lg.profile_step_stop} must "
                          f"be larger than profile_step_start={lg.profile_step_start}")
    if lg.profile and lg.log_dir is None and objs["checkpoint"].save is None and lg.tensorboard_dir is None:
        raise ConfigError(f"{ctx.src('logging', 'profile')}: profile writes its trace into <log_dir>/profile (or "
                          f"tensorboard_dir without a log_dir, as GPT-NeoX); set log_dir, save or tensorboard_dir")
    if lg.memory_profiling and not lg.memory_profiling_path:
        raise ConfigError(f"{ctx.src('logging', 'memory_profiling')}: memory_profiling needs memory_profiling_path "
                          f"(the folder for mem_snapshot.pickle)")
    stages = pipeline_engine_stages(objs["parallel"].pipe_parallel_size)
    for key in ("log_gradient_noise_scale", "log_grad_pct_zeros", "log_grad_norm"):
        if getattr(lg, key) and stages:
            raise ConfigError(f"{ctx.src('logging', key)}: {key} with pipe_parallel_size={stages}: the pipeline "
                              f"engine applies the gradients inside its schedule where they cannot be read; use "
                              f"pipe_parallel_size 0 or 1")
    zero = int((t.zero_optimization or {}).get("stage", 0) or 0)
    if lg.log_gradient_noise_scale and zero >= 1:
        raise ConfigError(f"{ctx.src('logging', 'log_gradient_noise_scale')}: log_gradient_noise_scale with ZeRO "
                          f"stage {zero}: the gradients are partitioned across ranks (GPT-NeoX refuses it too); use "
                          f"stage 0")
    if lg.comet_tags is not None and not all(isinstance(x, str) for x in lg.comet_tags):
        raise ctx.err("logging", "comet_tags", lg.comet_tags, "a list of strings")


def check_fp32_allreduce(t: Any, extra: dict, ctx: Any) -> None:
    """fp32_allreduce is DeepSpeed's communication_data_type fp32: an explicit other type contradicts it."""
    given = extra.get("communication_data_type")
    if t.fp32_allreduce and given is not None and str(given).lower() not in ("fp32", "float32"):
        raise ConfigError(f"{ctx.src('training', 'fp32_allreduce')}: fp32_allreduce=true contradicts "
                          f"communication_data_type={given!r}; keep one of them")


# ------------------------------------------------------------------------------------------------ train.py
def check_training_ready(cfg: NeoXConfig) -> None:
    """The keys ``train.py`` cannot do without; partial configs (e.g. training-free SepLLM blocks) skip this."""
    missing = []
    if cfg.training.train_iters is None and cfg.training.train_epochs is None:
        missing.append("train_iters (or train_epochs)")
    d = cfg.data
    if d.data_path is None and not d.train_data_paths and not d.pos_train_data_paths:  # dpo: checked with its keys
        missing.append("train_data_paths (or data_path)")
    tok = cfg.tokenizer
    if tok.tokenizer_type != "CharLevelTokenizer" and tok.vocab_file is None:
        missing.append(f"vocab_file (needed by tokenizer_type {tok.tokenizer_type})")
    where = ", ".join(cfg.sources) or "config"
    if cfg.checkpoint.iteration is not None:
        raise ConfigError(f"{cfg.source_of('checkpoint.iteration')}: key 'iteration' = {cfg.checkpoint.iteration} "
                          f"picks the checkpoint eval.py / "
                          f"generate.py / the converters read; training resumes from 'latest': set load to the "
                          f"global_step{cfg.checkpoint.iteration} folder instead")
    if missing:
        raise ConfigError(f"{where}: missing required key(s) for training: {', '.join(missing)}")
    windows = cfg.sepllm.prefill_windows or []
    if len(windows) != cfg.model.num_layers:
        raise ConfigError(f"{cfg.source_of('sepllm.Layer_num')}: the SepLLM block describes {len(windows)} layers "
                          f"(Layer_num={cfg.sepllm.Layer_num}) but the model has num_layers={cfg.model.num_layers} "
                          f"({cfg.source_of('model.num_layers')}); set num_layers explicitly to train")
    if cfg.sepllm.BATCH_ADAPTIVE_INIT_POS:
        logger.warning("BATCH_ADAPTIVE_INIT_POS=True during training: pretraining batches are not left-padded")
