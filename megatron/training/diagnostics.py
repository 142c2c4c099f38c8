"""Per-iteration diagnostics GPT-NeoX logs: parameter / gradient norms, zero-gradient percentages, optimizer-state
norms (``log_param_norm``, ``log_grad_norm``, ``log_grad_pct_zeros``, ``log_optimizer_states``) and the gradient
noise scale (``log_gradient_noise_scale``, :class:`GradientNoiseScale`).

Values are per parameter and cover the whole parameter: a tensor-parallel shard's squares and zero counts are summed
over its TP group (GPT-NeoX logs each rank's shard), a ZeRO-3 partition is gathered. Gradients are read at the
accumulation boundary, after the data-parallel reduction and before clipping and the optimizer step; under fp16 they
are divided by the loss scale. Every rank calls the hooks (the reductions are collective); the loop logs the rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from megatron.config import LoggingConfig


def ema(avg: Optional[float], beta: float, value: float, i: int) -> tuple[float, float]:
    """Exponential moving average and its bias-corrected value after sample number ``i`` (0-based), GPT-NeoX's."""
    avg = beta * (avg or 0.0) + (1 - beta) * value
    return avg, avg / (1 - beta ** (i + 1))


class GradientNoiseScale:
    """GPT-NeoX's simple noise scale B_simple = tr(S) / |G|^2 (McCandlish et al. 2018, arXiv 1812.06162).

    B_small is one step's global batch, B_big = n_batches x B_small its running mean over ``n_batches`` steps:
    ``|G|^2 ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)`` and ``tr(S) ~ (|G_small|^2 -
    |G_big|^2) / (1 / B_small - 1 / B_big)``, both smoothed by :func:`ema` (beta 0.99) counted in steps. A step with a
    non-finite gradient is left out and not counted, as in GPT-NeoX.
    """

    def __init__(self, batch_size_small: int, n_batches: int, sq_norm: Callable[[list[torch.Tensor]], float],
                 beta: float = 0.99, cpu_offload: bool = False) -> None:
        if n_batches < 2:
            raise ValueError(f"gradient_noise_scale_n_batches must be >= 2, got {n_batches}")
        self.batch_size_small = float(batch_size_small)
        self.batch_size_large = float(batch_size_small * n_batches)
        self.n_batches = int(n_batches)
        self.sq_norm = sq_norm
        self.beta = beta
        self.cpu_offload = cpu_offload
        self.buffer: Optional[list[torch.Tensor]] = None
        self.ema_scale: Optional[float] = None
        self.ema_noise: Optional[float] = None
        self.noise_scale: Optional[float] = None
        self.n_updates = 0

    def update(self, grads: list[torch.Tensor]) -> None:
        """Feed one step's gradients (one tensor per parameter, already averaged over the global batch)."""
        if any(not bool(torch.isfinite(g).all()) for g in grads):
            return
        kept = [g.detach().float().to("cpu" if self.cpu_offload else g.device, copy=True) for g in grads]
        if self.buffer is None:
            self.buffer = kept
        else:
            for acc, g in zip(self.buffer, kept):
                acc.add_(g)
        if self.n_updates % self.n_batches == self.n_batches - 1:
            big = [acc / self.n_batches for acc in self.buffer]
            self.buffer = None
            g_big, g_small = self.sq_norm(big), self.sq_norm(grads)
            if not all(map(lambda v: v == v and abs(v) != float("inf"), (g_big, g_small))):
                return
            small_b, large_b = self.batch_size_small, self.batch_size_large
            noise = (large_b * g_big - small_b * g_small) / (large_b - small_b)
            scale = (g_small - g_big) / (1 / small_b - 1 / large_b)
            self.ema_noise, noise = ema(self.ema_noise, self.beta, noise, self.n_updates)
            self.ema_scale, scale = ema(self.ema_scale, self.beta, scale, self.n_updates)
            self.noise_scale = scale / noise if noise != 0 else None
        self.n_updates += 1


def _tp_group(module: torch.nn.Module) -> Any:
    info = getattr(module, "tensor_parallel", None)
    return info.group if info is not None and info.size > 1 else None


def _zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def _full_grad(param: torch.Tensor) -> Optional[torch.Tensor]:
    """This parameter's reduced gradient whatever holds it (``param.grad``, ZeRO-1/2 fp32 partitions, ZeRO-3)."""
    if param.grad is not None:
        return param.grad
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(param)


class StepDiagnostics:
    """Collects GPT-NeoX's per-iteration diagnostics for one engine. ``on_boundary(engine)`` reads the gradients
    (called before clipping and ``engine.step()``), ``rows(engine)`` after the step returns
    ``(per-parameter row, rank-0 row)``: the first is logged by every rank with a W&B run (wandb_init_all_ranks), the
    second by rank 0 only (optimizer-state norms, noise scale), as in GPT-NeoX."""

    def __init__(self, logging_cfg: LoggingConfig, module: torch.nn.Module, global_batch: int, precision: str) -> None:
        lg = logging_cfg
        self.param_norm = bool(lg.log_param_norm)
        self.grad_norm = bool(lg.log_grad_norm)
        self.grad_zeros = bool(lg.log_grad_pct_zeros)
        self.optimizer_states = bool(lg.log_optimizer_states)
        self.module = module
        self.precision = precision
        self.group = _tp_group(module)
        self.named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.noise: Optional[GradientNoiseScale] = None
        if lg.log_gradient_noise_scale:
            self.noise = GradientNoiseScale(global_batch, int(lg.gradient_noise_scale_n_batches), self._sq_norm,
                                            cpu_offload=bool(lg.gradient_noise_scale_cpu_offload))
        self._pending: dict[str, float] = {}

    @property
    def active(self) -> bool:
        return self.param_norm or self.grad_norm or self.grad_zeros or self.optimizer_states or self.noise is not None

    @property
    def reads_grads(self) -> bool:
        return self.grad_norm or self.grad_zeros or self.noise is not None

    def _sharded(self, param: torch.Tensor) -> bool:
        return self.group is not None and bool(getattr(param, "tensor_model_parallel", False))

    def _sum_over_tp(self, values: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        if self._sharded(param):
            dist.all_reduce(values, group=self.group)
        return values

    def _sq_norm(self, tensors: list[torch.Tensor]) -> float:
        """Squared L2 norm of a gradient-shaped list aligned with the parameters (TP shards summed once), in fp64."""
        sharded = torch.zeros((), dtype=torch.float64)
        replicated = torch.zeros((), dtype=torch.float64)
        for (_, p), t in zip(self.named, tensors):
            sq = t.detach().double().pow(2).sum().cpu()
            if self._sharded(p):
                sharded += sq
            else:
                replicated += sq
        if self.group is not None:
            dist.all_reduce(sharded, group=self.group)
        return float(sharded + replicated)

    def _loss_scale(self, engine: Any) -> float:
        if self.precision != "fp16":
            return 1.0
        opt = engine.optimizer
        return float(getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None) or 1.0)

    def on_boundary(self, engine: Any) -> None:
        """Read every parameter's final gradient of this step (collective)."""
        if not self.reads_grads:
            return
        scale = self._loss_scale(engine)
        grads = []
        for name, p in self.named:
            g = _full_grad(p)
            g = torch.zeros_like(p, dtype=torch.float32) if g is None else g.detach().float() / scale
            grads.append(g)
            if self.grad_norm or self.grad_zeros:
                stats = torch.tensor([float(g.double().pow(2).sum()), float((g == 0).sum()), float(g.numel())],
                                     dtype=torch.float64, device=g.device)
                stats = self._sum_over_tp(stats, p).cpu()
                if self.grad_norm:
                    self._pending[f"gradient_norms/{name}"] = float(stats[0].sqrt())
                if self.grad_zeros:
                    self._pending[f"pct_grad_zeros/{name}"] = float(100.0 * stats[1] / stats[2])
        if self.noise is not None:
            self.noise.update(grads)

    def _param_norms(self) -> dict[str, float]:
        out = {}
        for name, p in self.named:
            if _zero3(p):
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    sq = p.detach().double().pow(2).sum().reshape(1)
            else:
                sq = p.detach().double().pow(2).sum().reshape(1)
            out[f"parameter_norms/{name}"] = float(self._sum_over_tp(sq, p).sqrt().cpu())
        return out

    def _optimizer_state_norms(self, engine: Any) -> dict[str, float]:
        inner = engine.optimizer
        while not isinstance(inner, torch.optim.Optimizer) and getattr(inner, "optimizer", None) is not None:
            inner = inner.optimizer
        # numbered like torch's state_dict (position in the param groups); ZeRO-3 keys its states by partition
        # tensors it swaps out of the groups, which are then numbered in the order the optimizer created them
        order = {id(p): i for i, p in enumerate(p for group in inner.param_groups for p in group["params"])}
        states = list(inner.state.items())
        by_group = all(id(p) in order for p, _ in states)
        out = {}
        for position, (param, state) in enumerate(states):
            index = order[id(param)] if by_group else position
            for key, value in state.items():
                if key != "step" and torch.is_tensor(value):
                    out[f"optimizer_state_norms/{index}_{key}"] = float(value.detach().double().norm())
        return out

    def rows(self, engine: Any) -> tuple[dict[str, float], dict[str, float]]:
        """(per-parameter values, rank-0 values) of the step just taken (collective)."""
        per_param = dict(self._pending)
        self._pending.clear()
        if self.param_norm:
            per_param.update(self._param_norms())
        main: dict[str, float] = {}
        if self.optimizer_states:
            main.update(self._optimizer_state_norms(engine))
        if self.noise is not None and self.noise.noise_scale is not None:
            main["noise_scale"] = self.noise.noise_scale
        return per_param, main
