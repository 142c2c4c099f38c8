"""One training step, one evaluation pass and the engine behind them: a plain and a pipeline implementation.

The loop asks :func:`build_stepper` once and then calls ``stepper.train_step`` / ``stepper.eval_loss`` without
knowing which engine runs: the plain DeepSpeed engine (``pipe-parallel-size`` 0 or 1: ``gas`` x forward / backward /
step, optional own grad norm, per-forward hooks) or DeepSpeed's pipeline engine (N >= 2: 1F1B in
``engine.train_batch``). Which one is :func:`megatron.config.layout.pipeline_engine_stages`'s rule, read through
``ParallelPlan.pipeline``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol

import torch

from megatron.training.batches import Batch
from megatron.training.distributed import DistInfo, capture_rng_state, restore_rng_state
from megatron.training.engine import build_engine
from megatron.training.optimizer import build_optimizer
from megatron.training.parallel_setup import ParallelPlan


class Stepper(Protocol):
    """What the loop needs from an engine."""

    engine: Any
    n_params: int

    def train_step(self, batches: Iterator[Batch]) -> tuple[torch.Tensor, Optional[float]]:
        """One optimizer step over ``gas`` micro-batches: (mean local loss, global grad norm or None)."""

    def eval_loss(self, batches: Iterator[Batch], num_batches: int) -> Optional[float]:
        """Mean loss over ``num_batches`` micro-batches, identical on every rank (None when there are none)."""


@dataclass
class PlainStepper:
    """The plain DeepSpeed engine (TP / DP / ZeRO 0-3)."""

    engine: Any
    n_params: int
    gas: int
    own_grad_norm: bool
    clip: Any
    loss_fn: Callable[..., torch.Tensor]
    info: DistInfo
    on_forward: Optional[Callable[[], None]] = None
    on_boundary: Optional[Callable[[Any], None]] = None

    def train_step(self, batches: Iterator[Batch]) -> tuple[torch.Tensor, Optional[float]]:
        from megatron.training.loop import train_step

        return train_step(self.engine, batches, self.gas, self.own_grad_norm, self.on_forward, clip=self.clip,
                          loss_fn=self.loss_fn, on_boundary=self.on_boundary)

    def eval_loss(self, batches: Iterator[Batch], num_batches: int) -> Optional[float]:
        from megatron.training.loop import _mean_over_ranks, forward_loss

        self.engine.eval()
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        try:
            for _, batch in zip(range(num_batches), batches):
                total += forward_loss(self.engine, batch, self.loss_fn).double().cpu()
                count += 1
        finally:
            self.engine.train()
        return _mean_over_ranks(total / count, self.info) if count else None


@dataclass
class PipelineStepper:
    """DeepSpeed's pipeline engine (N >= 2 stages, ZeRO 0 / 1)."""

    engine: Any
    n_params: int

    def train_step(self, batches: Iterator[Batch]) -> tuple[torch.Tensor, Optional[float]]:
        from megatron.training.pipeline_training import pipeline_loop_step

        return pipeline_loop_step(self.engine, batches)

    def eval_loss(self, batches: Iterator[Batch], num_batches: int) -> Optional[float]:
        from megatron.training.pipeline_training import pipeline_loop_eval

        return pipeline_loop_eval(self.engine, batches, num_batches) if num_batches > 0 else None


def build_stepper(cfg: Any, plan: ParallelPlan, info: DistInfo, device: str, ds_config: dict,
                  own_grad_norm: bool) -> PlainStepper | PipelineStepper:
    """Build the model and its engine for ``plan`` (collective when TP or PP is on)."""
    from megatron.model.gpt import GPTModel

    if plan.pipeline:
        from megatron.training.loop import TrainingError
        from megatron.training.pipeline_training import build_pipeline_engine, load_pipeline_module_state

        # initialise the stages from the GPTModel the plain engine would build, and leave the global RNG where the
        # plain engine leaves it: a pipeline run starts from the same weights and dropout stream as any other layout
        reference = GPTModel(cfg.model, cfg.sepllm)
        n_params = sum(p.numel() for p in reference.parameters())
        rng_after_init = capture_rng_state()
        run = build_pipeline_engine(cfg, device, info.world_size, groups=plan.groups)
        restore_rng_state(rng_after_init)
        if (run.dp_rank, run.dp_size) != (plan.dp_rank, plan.dp_size):
            raise TrainingError(f"pipeline engine data-parallel coordinates {(run.dp_rank, run.dp_size)} differ from "
                                f"the mesh's {(plan.dp_rank, plan.dp_size)}")
        load_pipeline_module_state(run.engine, reference.state_dict())
        return PipelineStepper(engine=run.engine, n_params=n_params)
    model = GPTModel(cfg.model, cfg.sepllm)
    n_params = sum(p.numel() for p in model.parameters())
    model = plan.shard_model(model)
    optimizer = build_optimizer(model, cfg.optimizer, device_type=device)
    engine = build_engine(model, optimizer, ds_config, device, mpu=plan.mpu())
    return PlainStepper(engine=engine, n_params=n_params, gas=int(ds_config["gradient_accumulation_steps"]),
                        own_grad_norm=own_grad_norm, clip=cfg.training.gradient_clipping,
                        loss_fn=plan.loss_fn(engine), info=info)


__all__ = ["PipelineStepper", "PlainStepper", "Stepper", "build_stepper"]
