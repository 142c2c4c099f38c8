"""How the training loop applies tensor / pipeline / data parallelism from the config (one place, no globals).

``plan_parallel`` turns ``model-parallel-size``, ``pipe-parallel-size`` and ``sequence_parallel`` plus the launched
world size into a :class:`ParallelPlan`: this rank's process groups (``megatron.parallel.mesh``), its DATA-parallel
coordinates (what data loaders slice by), and the small functions the loop calls around the model -- shard it
(``apply_tensor_parallel``), the loss for it (vocab-parallel under TP), the DeepSpeed ``mpu``, and which
checkpoint files this rank writes and reads.

``pipe-parallel-size`` keeps GPT-NeoX's values, with one documented choice: 0 and 1 both run the plain DeepSpeed
engine (a one-stage pipeline computes the same numbers, while DeepSpeed's pipeline engine would cap ZeRO at stage 1
and drop the loop's per-forward hooks), and N >= 2 runs DeepSpeed's ``PipelineEngine`` with N stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import functools
import logging

import torch

from megatron.checkpoint.format import CheckpointLayout
from megatron.config.layout import pipeline_engine_stages
from megatron.model.loss import lm_loss

if TYPE_CHECKING:
    from megatron.config.neox import NeoXConfig
    from megatron.training.distributed import DistInfo

logger = logging.getLogger(__name__)


@dataclass
class ParallelPlan:
    """This rank's place in the (pipe, data, model) layout and the hooks the loop needs."""

    tp_size: int
    pp_stages: int  # 0: plain engine; >= 2: pipeline engine with that many stages
    sequence_parallel: bool
    dp_rank: int
    dp_size: int
    groups: Any = None  # megatron.parallel.mesh.ParallelGroups when TP or PP is on
    fp32_allreduce: bool = False  # GPT-NeoX: TP sums in fp32
    fp16_lm_cross_entropy: bool = False  # GPT-NeoX: the loss in the logits' dtype instead of fp32
    fused_cross_entropy_chunk: int = 0  # > 0: model.fused_cross_entropy, tokens per chunk (plain / TP engines)

    @property
    def pipeline(self) -> bool:
        return self.pp_stages >= 2

    @property
    def tensor_parallel(self) -> bool:
        return self.tp_size > 1 or self.sequence_parallel

    def describe(self) -> str:
        return (f"tp {self.tp_size}{' + sp' if self.sequence_parallel else ''} x pp "
                f"{self.pp_stages if self.pipeline else '1 (no pipeline engine)'} x dp {self.dp_size}")

    def shard_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Split ``model`` over the TP group in place (identity without TP)."""
        if not self.tensor_parallel:
            return model
        from megatron.parallel.tensor_parallel import apply_tensor_parallel

        return apply_tensor_parallel(model, self.groups.tp_group, sequence_parallel=self.sequence_parallel,
                                     fp32_allreduce=self.fp32_allreduce)

    def mpu(self) -> Any:
        """DeepSpeed's ``mpu`` (gradient all-reduce / ZeRO over the data-parallel group only), None without TP."""
        return self.groups.deepspeed_mpu() if self.groups is not None else None

    def loss_fn(self, engine: Any) -> Callable[..., torch.Tensor]:
        """``(logits, labels, loss_mask)`` -> loss; with ``fused_cross_entropy`` a ``FusedLMLoss``, which the
        stepper hands to the model's forward instead (see ``steppers.forward_loss``)."""
        if self.fused_cross_entropy_chunk and not self.pipeline:
            from megatron.parallel.tensor_parallel import fused_loss_for

            return fused_loss_for(engine.module, self.fused_cross_entropy_chunk)
        upcast = not self.fp16_lm_cross_entropy
        if self.pipeline or getattr(engine.module, "tensor_parallel", None) is None:
            return lm_loss if upcast else functools.partial(lm_loss, upcast=False)
        from megatron.parallel.tensor_parallel import loss_fn_for

        return loss_fn_for(engine.module, upcast)

    def checkpoint_layout(self) -> CheckpointLayout:
        if self.groups is None:
            return CheckpointLayout()
        g = self.groups
        dp_ranks = next(group for group in g.layout.dp_groups if g.rank in group)
        return CheckpointLayout(tp_rank=g.tp_rank, tp_size=g.tp_size, pp_size=max(self.pp_stages, 1),
                                pp_rank=g.pp_rank, writes_model=g.dp_rank == 0 and g.pp_rank == 0,
                                dp_group_ranks=tuple(dp_ranks))

    def module_state(self, engine: Any) -> Optional[dict[str, torch.Tensor]]:
        """GPTModel-layout weights for the checkpoint (collective under a pipeline), None = the module's own."""
        if not self.pipeline:
            return None
        from megatron.training.pipeline_training import pipeline_module_state

        return pipeline_module_state(engine)

    def module_loader(self, engine: Any) -> Optional[Callable[[dict[str, torch.Tensor]], None]]:
        if not self.pipeline:
            return None
        from megatron.training.pipeline_training import load_pipeline_module_state

        return lambda state: load_pipeline_module_state(engine, state)


def plan_parallel(cfg: NeoXConfig, info: DistInfo, device: str) -> ParallelPlan:
    """Build this rank's plan (collective when TP or PP is on: every rank creates the same groups).

    Raises ``megatron.parallel.mesh.ParallelLayoutError`` when the world size is not a multiple of TP x PP.
    """
    from megatron.parallel.mesh import build_parallel_groups, rank_layout

    p = cfg.parallel
    tp = int(p.model_parallel_size or 1)
    stages = pipeline_engine_stages(p.pipe_parallel_size)
    sp = bool(p.sequence_parallel)
    layout = rank_layout(info.world_size, tp, stages)
    if tp == 1 and stages == 0 and not sp:
        return ParallelPlan(tp_size=1, pp_stages=0, sequence_parallel=False, dp_rank=info.rank,
                            dp_size=info.world_size, fp16_lm_cross_entropy=cfg.model.fp16_lm_cross_entropy,
                            fused_cross_entropy_chunk=_fused_chunk(cfg, pipeline=False))
    groups = build_parallel_groups(info.world_size, info.rank, tp, stages, device_type=device)
    return ParallelPlan(tp_size=tp, pp_stages=stages, sequence_parallel=sp, dp_rank=groups.dp_rank,
                        dp_size=layout.dp_size, groups=groups, fp32_allreduce=bool(cfg.training.fp32_allreduce),
                        fp16_lm_cross_entropy=cfg.model.fp16_lm_cross_entropy,
                        fused_cross_entropy_chunk=_fused_chunk(cfg, pipeline=stages >= 2))


def _fused_chunk(cfg: NeoXConfig, pipeline: bool) -> int:
    """Tokens per chunk of the fused loss, 0 = the plain loss (the pipeline engine's last stage computes its loss
    from logits: one warning)."""
    if not cfg.model.fused_cross_entropy:
        return 0
    if pipeline:
        logger.warning("fused_cross_entropy: the pipeline engine's last stage computes the plain loss from logits "
                       "(pipe_parallel_size >= 2); training continues without the fused loss")
        return 0
    return int(cfg.model.fused_cross_entropy_chunk)


__all__ = ["ParallelPlan", "plan_parallel"]
