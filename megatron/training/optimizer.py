"""Client optimizer for DeepSpeed: parameter groups (no weight decay on norms and biases) and the optimizer GPT-NeoX
builds for ``optimizer.type``.

Adam / AdamW are torch's fused AdamW (decoupled weight decay, the maths of GPT-NeoX's FusedAdam in its default
``adam_w_mode``; torch's fused kernels ship for CPU and CUDA, DeepSpeed's FusedAdam JIT-compiles for minutes on CPU
machines). Lion is GPT-NeoX's Lion (:class:`Lion`). cpu_adam is DeepSpeed's ``DeepSpeedCPUAdam`` (JIT-built once).
SGD is torch's SGD (GPT-NeoX's MuSGD without muP is the same update).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from megatron.config.derived import OPTIMIZER_SPELLINGS, OPTIMIZER_TYPES
from megatron.errors import UserInputError


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


class Lion(torch.optim.Optimizer):
    """GPT-NeoX's Lion (Chen et al. 2023, arXiv 2302.06675), per parameter and step:
    ``p <- p (1 - lr wd)``; ``p <- p - lr sign(beta1 m + (1 - beta1) g)``; ``m <- beta2 m + (1 - beta2) g``.

    Only one state tensor (``exp_avg``) per parameter. Elementwise, so it runs unchanged on ZeRO-1/2 partitions.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: Sequence[float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        if lr <= 0:
            raise OptimizerConfigError(f"Lion: lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise OptimizerConfigError(f"Lion: weight_decay must be >= 0, got {weight_decay}")
        if len(betas) != 2 or not all(0.0 <= b <= 1.0 for b in betas):
            raise OptimizerConfigError(f"Lion: betas must be two values in [0, 1], got {betas!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - lr * wd)
                direction = exp_avg.clone().mul_(beta1).add_(grad, alpha=1 - beta1).sign_()
                p.add_(direction, alpha=-lr)
                exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
        return loss


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from the typed block first, then from its free-form ``params`` dict (GPT-NeoX layout)."""
    value = getattr(cfg, key, None)
    if value is None:
        value = (getattr(cfg, "params", None) or {}).get(key, default)
    return default if value is None else value


def _cpu_adam(groups: list[dict[str, Any]], lr: float, betas: Sequence[float], eps: float, params: dict,
              device_type: str) -> torch.optim.Optimizer:
    """DeepSpeed's CPU Adam, as GPT-NeoX builds it for cpu_adam / cpu_torch_adam."""
    if device_type != "cpu":
        raise OptimizerConfigError(f"optimizer.type cpu_adam on a {device_type} run: DeepSpeedCPUAdam updates "
                                   f"parameters held in CPU memory, which needs ZeRO CPU offload (not built); use "
                                   f"Adam, or train on the CPU (device: cpu)")
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps,
                                bias_correction=bool(params.get("bias_correction", True)),
                                adamw_mode=bool(params.get("adamw_mode", True)),
                                fp32_optimizer_states=bool(params.get("fp32_optimizer_states", True)))
    except OptimizerConfigError:
        raise
    except Exception as exc:  # the JIT build fails with compiler / ninja errors of several types
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise OptimizerConfigError(f"optimizer.type cpu_adam: DeepSpeed's CPU Adam could not be built or loaded "
                                   f"({type(exc).__name__}: {first}); it JIT-compiles with the C++ compiler and "
                                   f"ninja on first use; use Adam instead") from exc


def build_optimizer(model: torch.nn.Module, optimizer_cfg: Any, weight_decay: float | None = None,
                    device_type: str = "cpu") -> torch.optim.Optimizer:
    """Build the optimizer ``optimizer_cfg.type`` names (see the module docstring) over :func:`param_groups`.

    ``Adam`` follows GPT-NeoX (whose FusedAdam runs in AdamW mode by default): decoupled weight decay, unless
    ``params.adam_w_mode`` is false, in which case torch's L2-style Adam is used.
    """
    opt_type = str(_get(optimizer_cfg, "type", "adamw")).lower()
    if opt_type not in OPTIMIZER_SPELLINGS:
        raise OptimizerConfigError(f"optimizer.type: expected one of {', '.join(OPTIMIZER_TYPES)}, got "
                                   f"{getattr(optimizer_cfg, 'type', None)!r}")
    params = dict(getattr(optimizer_cfg, "params", None) or {})
    lr = float(_get(optimizer_cfg, "lr", 1e-3))
    wd = float(weight_decay if weight_decay is not None else _get(optimizer_cfg, "weight_decay", 0.0))
    groups = param_groups(model, wd)
    if opt_type == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(_get(optimizer_cfg, "momentum", 0.0)),
                               dampening=float(params.get("dampening", 0.0)),
                               nesterov=bool(params.get("nesterov", False)))
    default_betas = (0.9, 0.99) if opt_type == "lion" else (0.9, 0.999)
    betas: Sequence[float] = _get(optimizer_cfg, "betas", default_betas)
    if len(betas) != 2:
        raise OptimizerConfigError(f"optimizer.betas: expected two numbers, got {betas!r}")
    if opt_type == "lion":
        return Lion(groups, lr=lr, betas=(float(betas[0]), float(betas[1])))
    eps = float(_get(optimizer_cfg, "eps", 1e-8))
    if opt_type in ("cpu_adam", "cpu_torch_adam"):
        return _cpu_adam(groups, lr, betas, eps, params, device_type)
    kwargs = dict(lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps)
    if device_type in ("cuda", "cpu"):
        kwargs["fused"] = True  # one fused kernel over all tensors; ~2x faster than per-tensor Adam on CPU (measured)
    if opt_type == "adam" and not bool(params.get("adam_w_mode", True)):
        return torch.optim.Adam(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)

