"""One training step and one evaluation pass, on whichever engine runs them (the loop only drives).

The loop asks :func:`build_stepper` once and then calls ``stepper.train_step`` / ``stepper.eval_loss`` without
knowing which engine runs: the plain DeepSpeed engine (``pipe-parallel-size`` 0 or 1: :func:`train_step`, i.e.
``gas`` x (:func:`forward_loss`, backward, step), optional own grad norm, per-forward hooks) or DeepSpeed's pipeline
engine (N >= 2: 1F1B in ``engine.train_batch``). Which one is :func:`megatron.config.layout.pipeline_engine_stages`'s
rule, read through ``ParallelPlan.pipeline``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Protocol

import torch

from megatron.errors import RunError
from megatron.model.compile import BlockCompiler, FirstStepTimer
from megatron.model.fused_loss import FusedLMLoss
from megatron.model.loss import lm_loss
from megatron.training.batches import Batch, BatchRules, make_batch
from megatron.training.data_setup import build_loader
from megatron.training.distributed import DistInfo, capture_rng_state, mean_over_ranks, restore_rng_state
from megatron.training.engine import build_engine
from megatron.training.optimizer import build_optimizer
from megatron.training.parallel_setup import ParallelPlan

if TYPE_CHECKING:
    from megatron.config.neox import NeoXConfig


class TrainingError(RunError, RuntimeError):
    """The run cannot start or continue (with a message that says why)."""


# ----------------------------------------------------------------------------------------------------------------
# the plain engine's step


def forward_loss(engine: Any, batch: Batch, loss_fn: Callable[..., torch.Tensor] = lm_loss) -> torch.Tensor:
    """``loss_fn`` is ``lm_loss`` or, for a tensor-parallel model, the vocab-parallel loss over its TP group; a
    ``FusedLMLoss`` runs inside the model's forward on the final hidden states (no logits are formed)."""
    inputs = batch_inputs(batch)
    if isinstance(loss_fn, FusedLMLoss):
        return engine(batch.tokens, **inputs, head_loss=functools.partial(loss_fn, labels=batch.labels,
                                                                          loss_mask=batch.loss_mask))
    logits = engine(batch.tokens, **inputs)
    return loss_fn(logits, batch.labels, batch.loss_mask)


def batch_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The model's keyword inputs besides the tokens: restarted positions and document ids when the batch has them."""
    inputs = {}
    if batch.position_ids is not None:
        inputs["position_ids"] = batch.position_ids
    if batch.document_ids is not None:
        inputs["document_ids"] = batch.document_ids
    return inputs


def train_step(engine: Any, batches: Iterator[Batch], gas: int, own_grad_norm: bool,
               on_forward: Optional[Callable[[], None]] = None, clip: float = 0.0,
               loss_fn: Callable[..., torch.Tensor] = lm_loss,
               on_boundary: Optional[Callable[[Any], None]] = None,
               forward: Callable[[Any, Any, Callable[..., torch.Tensor]], torch.Tensor] = forward_loss,
               ) -> tuple[torch.Tensor, float | None]:
    """One optimizer step over ``gas`` micro-batches; returns (mean local loss, global grad norm).

    ``on_boundary(engine)`` runs once the step's gradients are final (reduced), before clipping and the update
    (the per-parameter diagnostics read them there).

    ``own_grad_norm`` (ZeRO-0 fp32, where DeepSpeed does not report the norm): we measure the norm at the
    accumulation boundary and clip to ``clip`` ourselves in the same pass (DeepSpeed's clipping is then off). The
    squares are summed in fp64 like DeepSpeed's ZeRO norm: an fp32 sum over the millions of entries of a CPU
    embedding gradient is off by ~1e-4 relative, which changed the clipping and made ZeRO-0 and ZeRO-1..3 diverge.
    """
    from megatron.parallel.tensor_parallel import clip_tp_grad_norm_, tp_grad_norm

    losses = []
    norm = None
    for _ in range(gas):
        batch = next(batches)
        loss = forward(engine, batch, loss_fn)
        if on_forward is not None:
            on_forward()
        engine.backward(loss)
        if on_boundary is not None and engine.is_gradient_accumulation_boundary():
            on_boundary(engine)
        if own_grad_norm and engine.is_gradient_accumulation_boundary():
            # grads are final (all-reduced) at the boundary; one pass gives the norm and clips (a plain model is a
            # tensor-parallel model of size 1 for these two)
            norm = clip_tp_grad_norm_(engine.module, clip) if clip > 0 else float(tp_grad_norm(engine.module))
        engine.step()
        losses.append(loss.detach().float())
    ds_norm = engine.get_global_grad_norm()
    if ds_norm is not None:
        norm = float(ds_norm)
    return torch.stack(losses).mean(), norm


# ----------------------------------------------------------------------------------------------------------------
# the engines behind one interface


class Stepper(Protocol):
    """What the loop needs from an engine."""

    engine: Any
    n_params: int
    batch_of: Callable[[Any, BatchRules, str], Any]  # loader sample -> micro-batch

    def train_step(self, batches: Iterator[Batch]) -> tuple[torch.Tensor, Optional[float]]:
        """One optimizer step over ``gas`` micro-batches: (mean local loss, global grad norm or None)."""

    def eval_loss(self, batches: Iterator[Batch], num_batches: int) -> Optional[float]:
        """Mean loss over ``num_batches`` micro-batches, identical on every rank (None when there are none)."""

    def step_metrics(self) -> dict[str, float]:
        """Metrics of the last ``train_step`` besides the loss (DPO's rewards), averaged over ranks; {} when none."""

    def eval_metrics(self) -> dict[str, float]:
        """The same for the last ``eval_loss`` (collective like it)."""


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
    first_step: Optional[FirstStepTimer] = None  # compile: logs the first step's time (compilation included)
    # how a micro-batch becomes a loss and a loader sample a micro-batch: the language-model pair, or DPO's
    # (megatron.training.dpo.use_dpo); ``metrics("train" / "eval")`` reads the extra metrics of the last step / pass
    forward: Callable[[Any, Any, Callable[..., torch.Tensor]], torch.Tensor] = forward_loss
    batch_of: Callable[[Any, BatchRules, str], Any] = make_batch
    metrics: Optional[Callable[[str], dict[str, float]]] = None

    def train_step(self, batches: Iterator[Batch]) -> tuple[torch.Tensor, Optional[float]]:
        def step() -> tuple[torch.Tensor, Optional[float]]:
            return train_step(self.engine, batches, self.gas, self.own_grad_norm, self.on_forward, clip=self.clip,
                              loss_fn=self.loss_fn, on_boundary=self.on_boundary, forward=self.forward)

        return step() if self.first_step is None else self.first_step(step)

    def eval_loss(self, batches: Iterator[Batch], num_batches: int) -> Optional[float]:
        self.engine.eval()
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        try:
            for _, batch in zip(range(num_batches), batches):
                total += self.forward(self.engine, batch, self.loss_fn).double().cpu()
                count += 1
        finally:
            self.engine.train()
        return mean_over_ranks(total / count, self.info) if count else None

    def step_metrics(self) -> dict[str, float]:
        return self.metrics("train") if self.metrics is not None else {}

    def eval_metrics(self) -> dict[str, float]:
        return self.metrics("eval") if self.metrics is not None else {}


@dataclass
class PipelineStepper:
    """DeepSpeed's pipeline engine (N >= 2 stages, ZeRO 0 / 1)."""

    engine: Any
    n_params: int
    first_step: Optional[FirstStepTimer] = None
    batch_of: Callable[[Any, BatchRules, str], Any] = make_batch

    def train_step(self, batches: Iterator[Batch]) -> tuple[torch.Tensor, Optional[float]]:
        from megatron.training.pipeline_training import pipeline_loop_step

        if self.first_step is None:
            return pipeline_loop_step(self.engine, batches)
        return self.first_step(lambda: pipeline_loop_step(self.engine, batches))

    def eval_loss(self, batches: Iterator[Batch], num_batches: int) -> Optional[float]:
        from megatron.training.pipeline_training import pipeline_loop_eval

        return pipeline_loop_eval(self.engine, batches, num_batches) if num_batches > 0 else None

    def step_metrics(self) -> dict[str, float]:
        return {}

    def eval_metrics(self) -> dict[str, float]:
        return {}


@torch.no_grad()
def evaluate(stepper: Stepper, dataset: Any, num_batches: int, micro_batch: int, plan: ParallelPlan,
             rules: BatchRules, device: str) -> float | None:
    """Mean LM loss over the first ``num_batches`` micro-batches per data-parallel rank of ``dataset`` (None when
    empty)."""
    loader = build_loader(dataset, 0, micro_batch, plan.dp_rank, plan.dp_size, num_workers=0, pin_memory=False)
    if loader is None:
        return None
    batches = (stepper.batch_of(sample, rules, device) for sample in loader)
    return stepper.eval_loss(batches, min(num_batches, len(loader.batch_sampler)))


def build_stepper(cfg: NeoXConfig, plan: ParallelPlan, info: DistInfo, device: str, ds_config: dict,
                  own_grad_norm: bool) -> PlainStepper | PipelineStepper:
    """Build the model and its engine for ``plan`` (collective when TP or PP is on)."""
    from megatron.model.gpt import GPTModel

    if plan.pipeline:
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
        return PipelineStepper(engine=run.engine, n_params=n_params, first_step=_compile(cfg, run.engine.module))
    model = GPTModel(cfg.model, cfg.sepllm)
    n_params = sum(p.numel() for p in model.parameters())
    model = plan.shard_model(model)
    first_step = _compile(cfg, model)
    optimizer = build_optimizer(model, cfg.optimizer, device_type=device)
    engine = build_engine(model, optimizer, ds_config, device, mpu=plan.mpu())
    loss_fn = plan.loss_fn(engine)
    if first_step is not None and loss_fn is lm_loss:  # the plain, unsharded loss: one small graph
        loss_fn = torch.compile(lm_loss, backend=cfg.training.compile_backend)
    return PlainStepper(engine=engine, n_params=n_params, gas=int(ds_config["gradient_accumulation_steps"]),
                        own_grad_norm=own_grad_norm, clip=cfg.training.gradient_clipping,
                        loss_fn=loss_fn, info=info, first_step=first_step)


def _compile(cfg: NeoXConfig, module: torch.nn.Module) -> Optional[FirstStepTimer]:
    """``compile: true``: compile ``module``'s transformer blocks in place; the timer logs the first step."""
    if not cfg.training.compile:
        return None
    return FirstStepTimer(BlockCompiler(module, backend=cfg.training.compile_backend))


__all__ = ["PipelineStepper", "PlainStepper", "Stepper", "TrainingError", "build_stepper", "evaluate",
           "forward_loss", "train_step"]
