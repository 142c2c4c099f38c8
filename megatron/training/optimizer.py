"""Client optimizer for DeepSpeed: parameter groups (no weight decay on norms and biases) and a torch optimizer.

We always hand DeepSpeed a torch optimizer: DeepSpeed's FusedAdam/CPUAdam JIT-compile for over a minute on CPU
machines, while torch's fused AdamW (CPU and CUDA kernels ship with torch) is fast everywhere and needs no build.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from megatron.errors import UserInputError

OPTIMIZER_TYPES = ("adam", "adamw", "sgd")


class OptimizerConfigError(UserInputError, ValueError):
    """The ``optimizer`` config block asks for something we cannot build."""


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: matrices (incl. embeddings) decay, vectors (biases, norm gains/shifts) do not.

    Deciding by ``ndim < 2`` catches every bias and every norm parameter whatever class implements the norm, which a
    name- or type-based rule would miss for custom norms. Empty groups are dropped.
    """
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from the typed block first, then from its free-form ``params`` dict (GPT-NeoX layout)."""
    value = getattr(cfg, key, None)
    if value is None:
        value = (getattr(cfg, "params", None) or {}).get(key, default)
    return default if value is None else value


def build_optimizer(model: torch.nn.Module, optimizer_cfg: Any, weight_decay: float | None = None,
                    device_type: str = "cpu") -> torch.optim.Optimizer:
    """Build Adam / AdamW / SGD from the config's ``optimizer`` block.

    ``Adam`` follows GPT-NeoX (whose FusedAdam runs in AdamW mode by default): decoupled weight decay, unless
    ``params.adam_w_mode`` is false, in which case torch's L2-style Adam is used.
    """
    opt_type = str(_get(optimizer_cfg, "type", "adamw")).lower()
    if opt_type not in OPTIMIZER_TYPES:
        raise OptimizerConfigError(
            f"optimizer.type: expected one of Adam, AdamW, SGD, got {getattr(optimizer_cfg, 'type', None)!r}")
    lr = float(_get(optimizer_cfg, "lr", 1e-3))
    wd = float(weight_decay if weight_decay is not None else _get(optimizer_cfg, "weight_decay", 0.0))
    groups = param_groups(model, wd)
    if opt_type == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(_get(optimizer_cfg, "momentum", 0.0)))
    betas: Sequence[float] = _get(optimizer_cfg, "betas", (0.9, 0.999))
    if len(betas) != 2:
        raise OptimizerConfigError(f"optimizer.betas: expected two numbers, got {betas!r}")
    kwargs = dict(lr=lr, betas=(float(betas[0]), float(betas[1])), eps=float(_get(optimizer_cfg, "eps", 1e-8)))
    if device_type in ("cuda", "cpu"):
        kwargs["fused"] = True  # one fused kernel over all tensors; ~2x faster than per-tensor Adam on CPU (measured)
    adam_w_mode = bool((getattr(optimizer_cfg, "params", None) or {}).get("adam_w_mode", True))
    if opt_type == "adam" and not adam_w_mode:
        return torch.optim.Adam(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)
