"""Rank layout (pure) and process-group construction (2 gloo processes)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from megatron.config.errors import ConfigError
from megatron.config.layout import pipeline_stages
from megatron.parallel.mesh import ParallelLayoutError, build_parallel_groups, rank_layout
from parallel_spawn import run_distributed


def test_layout_tp2_pp2_dp2_matches_megatron_order():
    lay = rank_layout(8, tp=2, pp=2)
    assert (lay.tp_size, lay.pp_size, lay.dp_size) == (2, 2, 2)
    assert lay.tp_groups == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert lay.dp_groups == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert lay.pp_groups == ((0, 4), (1, 5), (2, 6), (3, 7))
    c = lay.coord(5)
    assert (c.pp_rank, c.dp_rank, c.tp_rank) == (1, 0, 1)
    assert all(lay.rank_of(*(lambda k: (k.pp_rank, k.dp_rank, k.tp_rank))(lay.coord(r))) == r for r in range(8))


@pytest.mark.parametrize("world,tp,pp", [(8, 2, 2), (12, 2, 3), (8, 4, 1), (6, 1, 2), (4, 2, 0)])
def test_layout_equals_deepspeed_topology(world, tp, pp):
    """Same rank order as DeepSpeed's PipeModelDataParallelTopology (what its PipelineModule / mpu expect)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    lay = rank_layout(world, tp, pp)
    topo = PipeModelDataParallelTopology(num_pp=lay.pp_size, num_mp=tp, num_dp=lay.dp_size)
    as_lists = lambda groups: [list(g) for g in groups]  # noqa: E731
    assert as_lists(lay.tp_groups) == topo.get_axis_comm_lists("model")
    assert as_lists(lay.dp_groups) == topo.get_axis_comm_lists("data")
    assert as_lists(lay.pp_groups) == topo.get_axis_comm_lists("pipe")


def test_every_rank_once_per_group_kind():
    lay = rank_layout(24, tp=2, pp=3)
    for groups, size in ((lay.tp_groups, 2), (lay.dp_groups, 4), (lay.pp_groups, 3)):
        assert sorted(r for g in groups for r in g) == list(range(24))
        assert {len(g) for g in groups} == {size}


def test_pipe_zero_means_one_stage():
    assert pipeline_stages(0) == 1 and pipeline_stages(1) == 1 and pipeline_stages(4) == 4
    assert rank_layout(4, 2, 0).dp_size == 2


@pytest.mark.parametrize("world,tp,pp,needle", [
    (6, 4, 1, "world size 6 is not divisible by model_parallel_size x pipe stages = 4 x 1 = 4"),
    (4, 2, 3, "not divisible by model_parallel_size x pipe stages = 2 x 3 = 6"),
    (4, 0, 1, "model_parallel_size = 0"),
    (4, 1, -1, "pipe_parallel_size = -1"),
])
def test_bad_layouts_name_the_keys(world, tp, pp, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        rank_layout(world, tp, pp)


def test_build_needs_initialised_process_group(monkeypatch):
    # other in-process tests may have left a 1-rank group behind: pretend there is none
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="not initialised"):
        build_parallel_groups(1, 0, 1, 1)


def _check_groups(rank: int, world: int) -> None:
    for tp in (1, 2):
        _check_groups_tp(rank, world, tp)


def _check_groups_tp(rank: int, world: int, tp: int) -> None:
    g = build_parallel_groups(world, rank, tp=tp, pp=1, device_type="cpu")
    assert (g.tp_size, g.dp_size, g.pp_size) == (tp, world // tp, 1)
    assert dist.get_world_size(g.tp_group) == tp and dist.get_world_size(g.dp_group) == world // tp
    assert dist.get_world_size(g.pp_group) == 1
    assert g.tp_mesh.get_local_rank() == g.tp_rank == rank % tp
    assert g.dp_mesh.get_local_rank() == g.dp_rank == rank // tp
    # the groups really connect the ranks the layout says: all-reduce the global rank over each group
    import torch
    for group, members in ((g.tp_group, g.layout.tp_groups), (g.dp_group, g.layout.dp_groups)):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=group)
        mine = next(m for m in members if rank in m)
        assert t.item() == float(sum(mine)), (t.item(), mine)
    if world > 1:
        with pytest.raises(ParallelLayoutError, match="disagrees"):
            build_parallel_groups(world, (rank + 1) % world, tp=tp, pp=1)
    mpu = g.deepspeed_mpu()
    assert (mpu.get_model_parallel_world_size(), mpu.get_data_parallel_world_size()) == (tp, world // tp)
    assert (mpu.get_model_parallel_rank(), mpu.get_data_parallel_rank()) == (g.tp_rank, g.dp_rank)
    assert mpu.get_model_parallel_group() is g.tp_group and mpu.get_data_parallel_group() is g.dp_group


@pytest.mark.distributed
def test_build_groups_two_processes():
    """TP=2 (one TP group, DP 1) and TP=1 (DP 2): sizes, coordinates, and collectives reach exactly the members."""
    run_distributed(_check_groups, 2, timeout=120)



def test_package_exports_resolve():
    import megatron.parallel as par

    assert all(getattr(par, name) is not None for name in par.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        par.nope  # noqa: B018
