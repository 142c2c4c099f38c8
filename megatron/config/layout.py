"""The parallel layout check: one function, run by config validation for the launched world size.

``check_layout`` answers "can ``world_size`` ranks run this model with this TP / PP / ZeRO setting?" before anything
starts: the world size must divide by ``model_parallel_size x pipe stages``, tensor parallelism must split the query
heads, the KV heads, the MLP width (and, with sequence parallelism, the sequence) evenly, a pipeline needs at least
one layer per stage and DeepSpeed's pipeline engine allows ZeRO 0 or 1 only. ``deepy.py`` validates with the world
size of the launch (hostfile slots, ``num_gpus``, visible devices), ``train.py`` with the world size its launcher
set, and ``pretrain`` repeats the call for configs built in code. Pure: no torch, no process groups.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from megatron.config.derived import ffn_width
from megatron.config.errors import ConfigError, Where, unknown_source

if TYPE_CHECKING:
    from megatron.config.neox import NeoXConfig


def pipeline_engine_stages(pipe_parallel_size: Optional[int]) -> int:
    """The one rule for ``pipe-parallel-size``: 0 (or unset) and 1 run the plain engine (returns 0; a one-stage
    pipeline computes the same numbers, and the plain engine allows ZeRO 2/3 and per-forward hooks); N >= 2 runs
    DeepSpeed's pipeline engine with N stages (returns N)."""
    pp = int(pipe_parallel_size or 0)
    if pp < 0:
        raise ConfigError(f"pipe_parallel_size = {pp}: expected 0, 1 or a number of stages >= 2")
    return pp if pp >= 2 else 0


def pipeline_stages(pipe_parallel_size: Optional[int]) -> int:
    """Pipeline stages the ranks are split into (1 without the pipeline engine), by :func:`pipeline_engine_stages`."""
    return pipeline_engine_stages(pipe_parallel_size) or 1


def check_world_size(world_size: int, tp: int, stages: int, where: Where = unknown_source) -> int:
    """``world_size`` ranks must split into ``stages`` x DP x ``tp``; returns the data-parallel size."""
    if world_size < 1:
        raise ConfigError(f"world size {world_size}: expected >= 1")
    if tp < 1:
        raise ConfigError(f"{where('model_parallel_size')}: model_parallel_size = {tp}: expected >= 1")
    if world_size % (tp * stages):
        raise ConfigError(
            f"{where('model_parallel_size')}: world size {world_size} is not divisible by model_parallel_size x "
            f"pipe stages = {tp} x {stages} = {tp * stages}; launch a multiple of {tp * stages} processes or change "
            f"model_parallel_size / pipe_parallel_size")
    return world_size // (tp * stages)


def check_tp_split(model: Any, tp: int, sequence_parallel: bool = False, where: Where = unknown_source) -> None:
    """Tensor parallelism splits the query heads, whole KV groups, the MLP width, the padded vocabulary (once known)
    and, with sequence parallelism, the sequence evenly over ``tp`` ranks."""
    if tp < 1:
        raise ConfigError(f"{where('model_parallel_size')}: model_parallel_size = {tp}: expected >= 1")
    if tp == 1 and not sequence_parallel:
        return
    kv = model.num_kv_heads if model.num_kv_heads is not None else model.num_attention_heads
    ffn = ffn_width(model.hidden_size, model.activation, model.intermediate_size, model.expansion_factor,
                    model.mlp_multiple_of)
    checks = [("num_attention_heads", model.num_attention_heads),
              ("num_kv_heads" if model.num_kv_heads is not None else "num_attention_heads (= KV heads)", kv),
              ("intermediate_size (MLP width)", ffn)]
    if getattr(model, "padded_vocab_size", None) is not None:
        checks.append(("padded_vocab_size", model.padded_vocab_size))
    if sequence_parallel:
        checks.append(("seq_length (sequence_parallel)", model.seq_length))
    for key, value in checks:
        if value % tp:
            raise ConfigError(f"{where(key.split()[0])}: {key} = {value} is not divisible by model_parallel_size "
                              f"= {tp}; tensor parallelism splits it evenly across ranks")


def check_layout(model: Any, parallel: Any, zero_stage: int, world_size: int, where: Where = unknown_source) -> int:
    """Raise ConfigError naming the keys when ``world_size`` ranks cannot run the layout; return the DP size.

    ``model`` / ``parallel``: the ModelConfig and ParallelConfig; ``where(key)`` names the source of a key.
    """
    tp = int(parallel.model_parallel_size or 1)
    pp = int(parallel.pipe_parallel_size or 0)
    dp = check_world_size(world_size, tp, pipeline_stages(pp), where)
    check_tp_split(model, tp, bool(parallel.sequence_parallel), where)
    if pp >= 2:
        if zero_stage >= 2:
            raise ConfigError(f"{where('zero_optimization')}: zero_optimization.stage = {zero_stage} with "
                              f"pipe_parallel_size = {pp}: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 "
                              f"(as GPT-NeoX); use stage 1")
        check_pipeline_depth(model.num_layers, pp, where)
    return dp


def check_pipeline_depth(num_layers: int, stages: int, where: Where = unknown_source) -> None:
    """Every pipeline stage needs a transformer layer (the config check and ``build_pipeline_model`` share it)."""
    if num_layers < stages:
        raise ConfigError(f"{where('pipe_parallel_size')}: pipe_parallel_size = {stages} needs at least one layer "
                          f"per stage, but num_layers = {num_layers}")


def check_config_layout(cfg: NeoXConfig, world_size: int) -> int:
    """``check_layout`` for a resolved NeoXConfig (used by ``pretrain`` on the real world size)."""
    return check_layout(cfg.model, cfg.parallel, int(cfg.training.zero_stage), world_size)


__all__ = ["check_config_layout", "check_layout", "check_pipeline_depth", "check_tp_split", "check_world_size",
           "pipeline_engine_stages", "pipeline_stages"]
