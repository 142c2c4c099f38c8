"""DeepSpeed engine set-up: device and precision checks, then ``deepspeed.initialize`` with our client optimizer."""

from __future__ import annotations

import logging
from typing import Any

import torch
from megatron.config.derived import PRECISIONS
from megatron.device import DeviceConfigError, resolve_device


def check_device_support(device: str, precision: str, zero_stage: int) -> None:
    """Fail before any work when the device cannot honour the config (one clear sentence)."""
    if device == "cpu" and precision == "fp16":
        raise DeviceConfigError("precision fp16 (dynamic loss scaling) needs a CUDA device; on CPU use bf16 "
                                "(bf16: {enabled: true}) or fp32 (fp16: {enabled: false})")
    if precision not in PRECISIONS:
        raise DeviceConfigError(f"training.precision: expected {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, got "
                                f"{precision!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise DeviceConfigError(f"zero_optimization.stage: expected 0, 1, 2 or 3, got {zero_stage!r}")


def quiet_deepspeed_logs(level: int = logging.WARNING) -> None:
    """DeepSpeed logs its whole config at INFO on start-up; keep the console for our lines."""
    logging.getLogger("DeepSpeed").setLevel(level)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(level)
    except ImportError:  # pragma: no cover - deepspeed is a hard requirement, keep the message clear anyway
        pass


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any],
                 device: str, mpu: Any = None) -> Any:
    """Wrap ``model`` and our torch optimizer in a DeepSpeed engine (ZeRO / bf16 / fp16 / clipping / GAS from
    ``ds_config``). The process group must already exist (``distributed.init_distributed``). ``mpu`` (from
    ``ParallelGroups.deepspeed_mpu()``) restricts gradient all-reduce / ZeRO partitioning to the data-parallel
    group when the model is tensor-parallel."""
    import deepspeed

    ds_config = dict(ds_config)
    ds_config.pop("optimizer", None)  # we always pass a client optimizer
    ds_config.pop("scheduler", None)  # the LR schedule is ours (lr_schedules.AnnealingLR)
    zero_stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0) or 0)
    if zero_stage >= 1 and "zero_allow_untested_optimizer" not in ds_config:
        from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

        # Lion and SGD update elementwise, so they are exact on ZeRO's flat partitions; DeepSpeed only lists Adam(W)
        ds_config["zero_allow_untested_optimizer"] = type(optimizer) not in ZERO_SUPPORTED_OPTIMIZERS
    model = model.to(device)
    _forget_previous_layout()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False, mpu=mpu)
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # an all-reduce over one rank is the identity; DeepSpeed would still flatten and copy every gradient
        engine.enable_backward_allreduce = False
    return engine


def _forget_previous_layout() -> None:
    """DeepSpeed keeps the last engine's model-parallel unit and groups in module globals
    (``deepspeed.utils.groups.mpu``): a plain engine built after a tensor-parallel one in the same process read the
    old unit and failed. Drop those references (the process groups themselves stay) so each engine starts clean."""
    from deepspeed.utils import groups

    release = getattr(groups, "_release_process_group_references", None)
    if release is not None:
        release(None)
    else:  # older DeepSpeed: the unit is the one global a later engine reads
        groups.mpu = None
