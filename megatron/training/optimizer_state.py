"""A DeepSpeed engine's optimizer state to and from the layout-free format (:mod:`megatron.checkpoint.layout_free`).

Save: for every local parameter (named as in ``GPTModel``), the whole fp32 master weight and every elementwise
optimizer state (Adam ``exp_avg`` / ``exp_avg_sq``, Lion ``exp_avg``, SGD ``momentum_buffer``) are gathered over the
data-parallel group with DeepSpeed's ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` (ZeRO-1/2/3
and bf16 partitions; without ZeRO in fp32 the parameter is its own master and the torch optimizer state is read
directly). Data-parallel rank 0 of each (TP rank, stage) slot keeps the result; one parameter is gathered at a
time.

Load: the engine has taken no step yet, so its optimizer holds no state: one step with zero gradients and learning
rate 0 creates it (no weight moves: AdamW, Lion and SGD all scale their update and decay by the rate), then every
local fragment is overwritten from the whole tensors with ``safe_set_full_fp32_param`` /
``safe_set_full_optimizer_state`` (or directly), and every state's step count is set.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor

from megatron.checkpoint.format import CheckpointError, CheckpointLayout
from megatron.checkpoint.layout_free import MASTER, FullOptimizerState

_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis", "scale_factor", "scale_window",
                  "min_scale", "delayed_shift", "dynamic")


def _base_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer that owns the state tensors (DeepSpeed's ZeRO / bf16 wrappers hold it as ``.optimizer``)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else opt


def supports_layout_free(engine: Any) -> bool:
    """Whether this engine's optimizer maps parameters to fp32 masters: DeepSpeed's ZeRO 1-3 and bf16 wrappers, or a
    plain torch optimizer over the module's own fp32 parameters. (DeepSpeed's fp16 optimizer without ZeRO keeps one
    flat master per group with no per-parameter map: not supported.)"""
    if int(engine.zero_optimization_stage()) >= 1:
        return True
    base = _base_optimizer(engine)
    if base is engine.optimizer:
        return True
    return type(engine.optimizer).__name__ in ("BF16_Optimizer", "FP16_UnfusedOptimizer")


def _masters(engine: Any) -> dict[int, Tensor]:
    """``id(module parameter) -> its fp32 master`` where DeepSpeed keeps one per parameter without ZeRO (bf16 /
    fp16 ``FP16_UnfusedOptimizer``); a parameter not listed is its own master (fp32 without ZeRO)."""
    opt = engine.optimizer
    if type(opt).__name__ != "FP16_UnfusedOptimizer":
        return {}
    return {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}


def local_parameters(engine: Any, layout: CheckpointLayout) -> list[tuple[str, torch.nn.Parameter]]:
    """This rank's trainable parameters under their ``GPTModel`` state-dict names (a pipeline stage maps its own
    names; a tied copy appears once)."""
    if layout.pp_size > 1:
        from megatron.parallel.pipeline import local_gpt_names

        named = [(gpt, t) for gpt, (_, t) in local_gpt_names(engine.module).items()]
    else:
        named = list(engine.module.named_parameters())
    return [(n, p) for n, p in named if isinstance(p, torch.nn.Parameter) and p.requires_grad]


def _full_shape(param: Tensor) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))


def _state_keys(base: torch.optim.Optimizer) -> tuple[list[str], bool]:
    """(elementwise state keys, whether states count steps), read from any state entry (the same on every rank)."""
    for state in base.state.values():
        keys = [k for k, v in state.items() if isinstance(v, Tensor) and v.dim() > 0]
        return sorted(keys), "step" in state
    return [], False


def _step_of(base: torch.optim.Optimizer) -> int | None:
    for state in base.state.values():
        if "step" in state:
            step = state["step"]
            return int(step.item() if isinstance(step, Tensor) else step)
    return None


def _scaler_state(engine: Any) -> dict[str, Any] | None:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None or not getattr(scaler, "dynamic", False):
        return None
    return {k: getattr(scaler, k) for k in _SCALER_FIELDS
            if isinstance(getattr(scaler, k, None), (bool, int, float))}


def _zero_managed(param: Tensor) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _get_full(param: Tensor, base: torch.optim.Optimizer, key: str | None, masters: dict[int, Tensor]) -> Tensor:
    """Whole fp32 master (``key`` None) or state ``key`` of ``param`` (collective over data parallelism under ZeRO /
    bf16)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _zero_managed(param):
        value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
        return value.detach().reshape(_full_shape(param)).to("cpu", torch.float32, copy=True)
    master = masters.get(id(param), param)
    value = master if key is None else base.state[master][key]
    return value.detach().to("cpu", torch.float32, copy=True)


def gather_full_optimizer_state(engine: Any, layout: CheckpointLayout, keep: bool) -> FullOptimizerState | None:
    """This slot's whole optimizer state (collective over the data-parallel group); None on ranks with ``keep``
    False."""
    base = _base_optimizer(engine)
    _link_state_fragments(engine)
    keys, _ = _state_keys(base)
    out = FullOptimizerState(step=_step_of(base), loss_scaler=_scaler_state(engine))
    for kind in [MASTER, *keys]:
        out.states[kind] = {}
    masters = _masters(engine)
    for name, param in local_parameters(engine, layout):
        for kind in [MASTER, *keys]:
            value = _get_full(param, base, None if kind == MASTER else kind, masters)
            if keep:
                out.states[kind][name] = value
    return out if keep else None


def _link_state_fragments(engine: Any) -> None:
    """Point every ZeRO-1/2 / bf16 parameter's ``_hp_mapping`` at its slice of the optimizer state. DeepSpeed links
    them once, after the first group's first step, so a later group's states (created by its own step) stay
    unlinked and ``safe_get_full_optimizer_state`` cannot find them."""
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "single_partition_of_fp32_groups"):
        pairs = zip(opt.bit16_groups, opt.single_partition_of_fp32_groups)
    elif hasattr(opt, "fp32_groups_flat_partition"):
        pairs = zip(opt.bf16_groups, opt.fp32_groups_flat_partition)
    else:
        return
    for lp_params, flat in pairs:
        if flat in opt.optimizer.state:
            lazy_init_hp_params_optimizer_state(lp_params, flat, opt.optimizer.state)


def _params_of(base: torch.optim.Optimizer) -> Iterator[Tensor]:
    for group in base.param_groups:
        yield from group["params"]


@torch.no_grad()
def _create_state(engine: Any, base: torch.optim.Optimizer) -> None:
    """One step at learning rate 0 over zero gradients: the lazily created state tensors exist afterwards, and no
    weight changes (every value is then overwritten from the checkpoint)."""
    zero3 = hasattr(engine.optimizer, "_set_fp32_optimizer_param_groups")
    if zero3:  # ZeRO-3 hands its flat fp32 partitions to the torch optimizer only for the step
        engine.optimizer._set_fp32_optimizer_param_groups()
    params = [p for p in _params_of(base) if p not in base.state]
    saved_lr = [g["lr"] for g in base.param_groups]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        for g in base.param_groups:
            g["lr"] = 0.0
        if params:
            base.step()
    finally:
        for g, lr in zip(base.param_groups, saved_lr):
            g["lr"] = lr
        for p in params:
            p.grad = None
        if zero3:
            engine.optimizer._clear_fp32_optimizer_param_groups()
    _link_state_fragments(engine)


def _set_full(param: Tensor, base: torch.optim.Optimizer, key: str | None, value: Tensor,
              masters: dict[int, Tensor]) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if tuple(value.shape) != _full_shape(param):
        raise CheckpointError(f"optimizer state {key or MASTER}: checkpoint shape {tuple(value.shape)} vs model "
                              f"{_full_shape(param)}")
    if hasattr(param, "ds_id"):  # ZeRO-3: DeepSpeed narrows the flat value by partition size (padding included)
        part = int(param.partition_numel())
        world = int(engine_partition_world(param))
        flat = torch.zeros(part * world, dtype=torch.float32)
        flat[: value.numel()] = value.flatten()
        value = flat
    if _zero_managed(param):
        target = param.ds_tensor if hasattr(param, "ds_id") else param
        value = value.to(target.device)
        if key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
        return
    master = masters.get(id(param), param)
    dest = master if key is None else base.state[master][key]
    dest.copy_(value.to(dest.device, dest.dtype))


def engine_partition_world(param: Tensor) -> int:
    """Number of ZeRO-3 partitions of ``param``."""
    import torch.distributed as dist

    z3 = param._z3_optimizer
    return dist.get_world_size(group=z3._get_param_partition_group(param))


@torch.no_grad()
def load_full_optimizer_state(engine: Any, layout: CheckpointLayout, state: FullOptimizerState) -> None:
    """Overwrite this rank's fp32 masters, optimizer states, step counts and loss scaler from ``state`` (whole
    tensors in this rank's TP layout, see :func:`megatron.checkpoint.layout_free.read_full_optimizer_state`)."""
    base = _base_optimizer(engine)
    kinds = [k for k in state.states if k != MASTER]
    if kinds:
        _create_state(engine, base)
        live, counts_steps = _state_keys(base)
        if sorted(kinds) != live:
            raise CheckpointError(f"the checkpoint's optimizer state holds {sorted(kinds)}, the configured optimizer "
                                  f"keeps {live}; set no_load_optim to load weights only")
    masters = _masters(engine)
    for name, param in local_parameters(engine, layout):
        _set_full(param, base, None, state.states[MASTER][name], masters)
        for kind in kinds:
            _set_full(param, base, kind, state.states[kind][name], masters)
    if kinds and state.step is not None:
        for st in base.state.values():
            if "step" in st:
                if isinstance(st["step"], Tensor):
                    st["step"].fill_(state.step)
                else:
                    st["step"] = state.step
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if state.loss_scaler and scaler is not None:
        for key, value in state.loss_scaler.items():
            setattr(scaler, key, value)


__all__ = ["gather_full_optimizer_state", "load_full_optimizer_state", "local_parameters", "supports_layout_free"]
