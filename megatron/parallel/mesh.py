"""DP x PP x TP rank layout and the process groups built from it, passed around explicitly (no global groups).

Rank order is Megatron's / DeepSpeed's ``PipeModelDataParallelTopology`` order ``(pipe, data, model)``: tensor-
parallel ranks are adjacent (so they share a node), then data-parallel, then pipeline stages::

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

:func:`rank_layout` is a pure function of ``(world_size, tp, pp)`` (unit-testable without processes);
:func:`build_parallel_groups` turns it into a ``torch.distributed.DeviceMesh`` with dims ``("pp", "dp", "tp")`` and
returns the groups of *this* rank in a :class:`ParallelGroups`, to be handed to whoever needs them.

``pp`` follows GPT-NeoX's ``pipe-parallel-size``: 0 (no pipeline engine) and 1 (one stage) both mean one stage here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.config.layout import check_world_size, pipeline_stages
from megatron.errors import UserInputError

MESH_DIM_NAMES = ("pp", "dp", "tp")


class ParallelLayoutError(UserInputError, ValueError):
    """World size / TP / PP that cannot form a layout; the message names the keys and values involved."""


@dataclass(frozen=True)
class RankCoord:
    """Where one rank sits in the 3-D layout."""

    pp_rank: int
    dp_rank: int
    tp_rank: int


@dataclass(frozen=True)
class RankLayout:
    """All groups of a layout as lists of global ranks (every rank appears exactly once per kind of group)."""

    world_size: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_groups: tuple[tuple[int, ...], ...]
    dp_groups: tuple[tuple[int, ...], ...]
    pp_groups: tuple[tuple[int, ...], ...]

    def coord(self, rank: int) -> RankCoord:
        """``(pp_rank, dp_rank, tp_rank)`` of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ParallelLayoutError(f"rank {rank} is outside world size {self.world_size}")
        tp_rank = rank % self.tp_size
        dp_rank = (rank // self.tp_size) % self.dp_size
        pp_rank = rank // (self.tp_size * self.dp_size)
        return RankCoord(pp_rank=pp_rank, dp_rank=dp_rank, tp_rank=tp_rank)

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        """Inverse of :meth:`coord`."""
        return (pp_rank * self.dp_size + dp_rank) * self.tp_size + tp_rank

    def mesh_tensor(self) -> torch.Tensor:
        """``[pp, dp, tp]`` int tensor of global ranks (what ``DeviceMesh`` takes)."""
        return torch.arange(self.world_size).view(self.pp_size, self.dp_size, self.tp_size)


def rank_layout(world_size: int, tp: int, pp: int) -> RankLayout:
    """The layout of ``world_size`` ranks into ``pp`` stages x ``dp`` replicas x ``tp`` tensor shards.

    Raises ``ConfigError`` (``config/layout.check_world_size``) when ``world_size`` is not a multiple of ``tp x pp``.
    """
    stages = pipeline_stages(pp)
    dp = check_world_size(world_size, tp, stages)
    grid = torch.arange(world_size).view(stages, dp, tp)
    tp_groups = tuple(tuple(int(r) for r in grid[p, d, :]) for p in range(stages) for d in range(dp))
    dp_groups = tuple(tuple(int(r) for r in grid[p, :, t]) for p in range(stages) for t in range(tp))
    pp_groups = tuple(tuple(int(r) for r in grid[:, d, t]) for d in range(dp) for t in range(tp))
    return RankLayout(world_size=world_size, tp_size=tp, pp_size=stages, dp_size=dp, tp_groups=tp_groups,
                      dp_groups=dp_groups, pp_groups=pp_groups)


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's process groups and coordinates; passed explicitly to model wrappers, engines and data loaders.

    ``mesh`` is the 3-D ``DeviceMesh`` (dims ``pp, dp, tp``); ``tp_mesh`` / ``dp_mesh`` / ``pp_mesh`` its 1-D slices
    (what ``parallelize_module`` / FSDP take). The ``*_group`` fields are the matching ``ProcessGroup`` objects (what
    DeepSpeed's ``mpu`` / collectives take).
    """

    layout: RankLayout
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    mesh: Any
    tp_mesh: Any
    pp_mesh: Any
    dp_mesh: Any

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def dp_mesh_2d(self) -> Any:
        """The ``("dp", "tp")`` 2-D sub-mesh of this pipeline stage (FSDP2 + TP composition)."""
        return self.mesh["dp", "tp"]

    def deepspeed_mpu(self) -> "DeepSpeedMPU":
        """The ``mpu`` object ``deepspeed.initialize(..., mpu=...)`` takes: DeepSpeed then all-reduces gradients and
        partitions ZeRO states over the data-parallel group only, and sums gradient norms of TP-sharded parameters
        over the tensor-parallel group."""
        return DeepSpeedMPU(self)


class DeepSpeedMPU:
    """Megatron-style ``mpu`` accessors over a :class:`ParallelGroups` (what DeepSpeed queries; holds no state of
    its own)."""

    def __init__(self, groups: ParallelGroups) -> None:
        self.groups = groups

    def get_model_parallel_rank(self) -> int:
        return self.groups.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.groups.tp_size

    def get_model_parallel_group(self) -> Any:
        return self.groups.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.groups.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.groups.dp_size

    def get_data_parallel_group(self) -> Any:
        return self.groups.dp_group

    def get_pipe_parallel_rank(self) -> int:
        return self.groups.pp_rank

    def get_pipe_parallel_world_size(self) -> int:
        return self.groups.pp_size

    def get_pipe_parallel_group(self) -> Any:
        return self.groups.pp_group


def build_parallel_groups(world_size: int, rank: int, tp: int, pp: int,
                          device_type: Optional[str] = None) -> ParallelGroups:
    """Create the DP x PP x TP groups (collective: every rank must call it with the same arguments).

    ``torch.distributed`` must already be initialised with ``world_size`` ranks; ``device_type`` defaults to
    ``"cuda"`` when CUDA is available else ``"cpu"``.
    """
    layout = rank_layout(world_size, tp, pp)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("build_parallel_groups: torch.distributed is not initialised; call "
                           "megatron.training.distributed.init_distributed (or init_process_group) first")
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ParallelLayoutError(f"build_parallel_groups(world_size={world_size}, rank={rank}) disagrees with the "
                                  f"initialised process group (world size {dist.get_world_size()}, rank "
                                  f"{dist.get_rank()})")
    from torch.distributed.device_mesh import DeviceMesh

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = DeviceMesh(device_type, layout.mesh_tensor(), mesh_dim_names=MESH_DIM_NAMES)
    coord = layout.coord(rank)
    return ParallelGroups(layout=layout, rank=rank, tp_rank=coord.tp_rank, pp_rank=coord.pp_rank,
                          dp_rank=coord.dp_rank, tp_size=layout.tp_size, pp_size=layout.pp_size,
                          dp_size=layout.dp_size, tp_group=mesh.get_group("tp"), pp_group=mesh.get_group("pp"),
                          dp_group=mesh.get_group("dp"), mesh=mesh, tp_mesh=mesh["tp"], pp_mesh=mesh["pp"],
                          dp_mesh=mesh["dp"])
