"""The pipeline engine for the training loop: engine set-up, one step, weights for checkpoints.

The loop uses it when :func:`megatron.config.layout.pipeline_engine_stages` says so (``pipe_parallel_size >= 2``);
:func:`build_pipeline_engine` also builds a one-stage pipeline when asked directly (``pipe_parallel_size: 1``), which
the tests use to show it computes what the plain engine computes.

The loop's non-pipeline path is ``GPTModel -> build_optimizer -> build_engine -> (forward, backward, step) x gas``.
With a pipeline the same building blocks are reused (``cfg.deepspeed_config``, ``build_optimizer``,
``build_engine``: ``deepspeed.initialize`` returns a ``PipelineEngine`` for a ``PipelineModule``), and the
micro-batch loop is replaced by ``engine.train_batch``, which runs the 1F1B schedule over ``gas`` micro-batches and
then the optimizer step. Differences the loop must respect (all handled by the functions below):

* data: slice the global batch by data-parallel rank / size (``PipelineRun.dp_rank`` / ``dp_size``), not by the
  global rank: the stages of one pipeline must read the same samples (only the first and last stage read them);
* the DeepSpeed config is resolved for the data-parallel size ``world / stages``;
* the module is one stage: checkpoint the weights with :func:`pipeline_module_state` (``GPTModel`` layout, so a
  pipeline checkpoint loads with or without a pipeline and with any stage count) and restore them with
  :func:`load_pipeline_module_state`; optimizer state is per stage (save it on every rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron.config.layout import pipeline_engine_stages
from megatron.parallel.pipeline import (PipelineConfigError, build_pipeline_model, carried_inputs,
                                        data_parallel_coords, gather_gpt_state_dict, load_gpt_state_dict,
                                        pipeline_data_iter, pipeline_eval_loss, pipeline_train_step)

if TYPE_CHECKING:
    from megatron.config.neox import NeoXConfig


@dataclass
class PipelineRun:
    """A built pipeline engine and where this rank sits (what the loop needs to size and slice its data)."""

    engine: Any
    num_stages: int
    stage_id: int
    dp_rank: int
    dp_size: int
    ds_config: dict

    @property
    def micro_batch(self) -> int:
        return int(self.ds_config["train_micro_batch_size_per_gpu"])

    @property
    def gradient_accumulation_steps(self) -> int:
        return int(self.ds_config["gradient_accumulation_steps"])


def build_pipeline_engine(cfg: NeoXConfig, device: str, world_size: int, *, partition_method: str = "uniform",
                          groups: Any = None) -> PipelineRun:
    """Build the pipeline model, the client optimizer and the DeepSpeed ``PipelineEngine`` from a resolved
    ``NeoXConfig`` (collective: every rank calls it). ``torch.distributed`` must be initialised; the global RNG
    is not consumed (stage weights are seeded from ``training.seed``)."""
    from megatron.training.engine import build_engine
    from megatron.training.optimizer import build_optimizer

    stages = pipeline_engine_stages(cfg.parallel.pipe_parallel_size)
    if stages == 0:
        raise PipelineConfigError(f"pipe_parallel_size = {cfg.parallel.pipe_parallel_size} means no pipeline engine "
                                  f"(0 and 1 run the plain engine): build GPTModel instead")
    tp = int(cfg.parallel.model_parallel_size or 1)
    from megatron.config import ConfigError
    from megatron.config.layout import check_layout

    zero = int((cfg.training.zero_optimization or {}).get("stage", cfg.training.zero_stage) or 0)
    try:  # the layout check of config validation (world size, ZeRO <= 1 under a pipeline, TP splits)
        dp = check_layout(cfg.model, cfg.parallel, zero, world_size)
    except ConfigError as exc:
        raise PipelineConfigError(str(exc)) from None
    pipe = build_pipeline_model(cfg.model, cfg.sepllm, stages, model_parallel_size=tp,
                                partition_method=partition_method, seed=int(cfg.training.seed), groups=groups,
                                carries=carried_inputs(cfg.training.reset_position_ids,
                                                       cfg.training.reset_attention_mask))
    ds_config = cfg.deepspeed_config(dp, client_optimizer=True)
    optimizer = build_optimizer(pipe, cfg.optimizer, device_type=device)
    engine = build_engine(pipe, optimizer, ds_config, device)
    engine.clip_fp32_gradients = _fp32_clipper(engine)
    dp_rank, dp_size = data_parallel_coords(engine)
    return PipelineRun(engine=engine, num_stages=stages, stage_id=int(pipe.stage_id), dp_rank=dp_rank,
                       dp_size=dp_size, ds_config=ds_config)


def _fp32_clipper(engine: Any) -> Callable[[], None]:
    """The clipping DeepSpeed's pipeline engine runs for fp32 without ZeRO (``engine.clip_fp32_gradients``).

    DeepSpeed's own version counts a non-tensor-parallel parameter only on the rank with model-parallel rank 0 of
    the pipe x tensor group, i.e. on the first stage: the later stages' weights were left out of the norm, which
    clipped differently from one process (losses 1.5e-4 apart by step 3 on the tiny test model), and it logged no
    norm. This one uses the ZeRO-1 rule (every stage counts its parameters, tensor-parallel shards on every TP rank,
    replicated ones on TP rank 0, tied copies marked ``ds_pipe_replicated`` once), sums squares in fp64, clips with
    ``torch.nn.utils.clip_grad_norm_``'s coefficient and leaves the norm for ``engine.get_global_grad_norm()``.
    """

    def clip() -> None:
        grid = engine.grid
        tp_rank = grid.get_slice_parallel_rank()
        params = [p for p in engine.module.parameters() if p.grad is not None]
        device = params[0].grad.device if params else torch.device("cpu")
        total = torch.zeros((), dtype=torch.float64, device=device)
        for p in params:
            if getattr(p, "ds_pipe_replicated", False):
                continue
            if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                total += p.grad.detach().to(torch.float64).pow(2).sum()
        dist.all_reduce(total, group=grid.get_model_parallel_group())
        norm = float(total.sqrt())
        coef = float(engine.gradient_clipping()) / (norm + 1e-6)
        if coef < 1.0:
            for p in params:
                p.grad.detach().mul_(coef)
        engine._global_grad_norm = norm

    return clip


def pipeline_loop_step(engine: Any, batches: Iterator[Any]) -> tuple[Tensor, Optional[float]]:
    """The loop's ``train_step`` for a pipeline: one optimizer step over ``gas`` trainer ``Batch`` es from
    ``batches``. Returns (mean loss over micro-batches and data-parallel ranks, identical on every rank; global
    gradient norm when one was measured, i.e. ZeRO-1 / bf16 / fp16, or fp32 with clipping on, else None)."""
    loss = pipeline_train_step(engine, pipeline_data_iter(batches))
    norm = engine.get_global_grad_norm()
    return loss.detach().float(), (float(norm) if norm is not None else None)


def pipeline_loop_eval(engine: Any, batches: Iterator[Any], num_micro_batches: int) -> float:
    """Mean loss of ``num_micro_batches`` micro-batches (no gradients), identical on every rank."""
    return float(pipeline_eval_loss(engine, pipeline_data_iter(batches), num_micro_batches=num_micro_batches))


def pipeline_module_state(engine: Any) -> dict[str, Tensor]:
    """The whole model's weights in ``GPTModel`` layout (collective over the pipeline; CPU tensors)."""
    return gather_gpt_state_dict(engine.module)


@torch.no_grad()
def load_pipeline_module_state(engine: Any, state: Mapping[str, Tensor]) -> None:
    """Load ``GPTModel``-layout weights into this rank's stage; with ZeRO-1 / bf16 DeepSpeed's fp32 master copy is
    refreshed from them (as DeepSpeed's own weights-only load does), so the next step starts from these weights."""
    load_gpt_state_dict(engine.module, state)
    restore = getattr(engine.optimizer, "_restore_from_bit16_weights", None)
    if callable(restore):
        restore()


__all__ = ["PipelineRun", "build_pipeline_engine", "load_pipeline_module_state", "pipeline_loop_eval",
           "pipeline_loop_step", "pipeline_module_state"]
