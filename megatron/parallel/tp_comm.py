"""Autograd-aware collectives over one tensor-parallel process group (Megatron's conjugate pairs).

Each function is the forward of a pair whose backward is its conjugate, so that every TP rank ends up with the
gradient of the one (replicated) loss:

=====================  ==========================================  ===========================================
function               forward                                     backward
=====================  ==========================================  ===========================================
``copy_to_tp``         identity                                    all-reduce (sum)
``reduce_from_tp``     all-reduce (sum)                            identity
``gather_seq``         all-gather on the sequence dim              reduce-scatter on the sequence dim
``reduce_scatter_seq`` reduce-scatter on the sequence dim          all-gather on the sequence dim
``scatter_seq``        keep this rank's sequence chunk             all-gather on the sequence dim
``gather_last_dim``    all-gather on the last dim                  keep this rank's chunk
=====================  ==========================================  ===========================================

``fp32=True`` (GPT-NeoX's ``fp32_allreduce``) runs every sum (all-reduce, reduce-scatter) of a bf16 / fp16 tensor in
fp32 and casts the result back; gathers and chunks move values unchanged and ignore it.

The communication itself is ``torch.distributed`` (gloo on CPU, NCCL on GPU); gloo has no reduce-scatter, so there it
is an all-reduce followed by taking the local chunk (same values). The sequence dim of the model's activations is 1
(``[batch, seq, hidden]``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

SEQ_DIM = 1


def _size(group: Any) -> int:
    return dist.get_world_size(group)


def _rank(group: Any) -> int:
    return dist.get_rank(group)


def _all_reduce(x: Tensor, group: Any, fp32: bool = False) -> Tensor:
    if fp32 and x.dtype != torch.float32:
        y = x.float().contiguous()
        dist.all_reduce(y, group=group)
        return y.to(x.dtype)
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: Tensor, dim: int, group: Any) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _chunk(x: Tensor, dim: int, group: Any) -> Tensor:
    size = _size(group)
    if x.shape[dim] % size:
        raise ValueError(f"tensor parallelism: dim {dim} of a {tuple(x.shape)} tensor is not divisible by the "
                         f"tensor-parallel size {size} (with sequence_parallel the sequence length must be a multiple "
                         f"of model_parallel_size)")
    return x.chunk(size, dim=dim)[_rank(group)].contiguous()


def _reduce_scatter(x: Tensor, dim: int, group: Any, fp32: bool = False) -> Tensor:
    size = _size(group)
    if x.shape[dim] % size:
        _chunk(x, dim, group)  # raises the clear error
    if fp32 and x.dtype != torch.float32:
        return _reduce_scatter(x.float(), dim, group).to(x.dtype)
    if dist.get_backend(group) == "nccl":
        moved = x.movedim(dim, 0).contiguous()
        out = torch.empty((moved.shape[0] // size,) + tuple(moved.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, moved, group=group)
        return out.movedim(0, dim).contiguous()
    return _chunk(_all_reduce(x, group), dim, group)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: Any, fp32: bool) -> Tensor:  # type: ignore[override]
        ctx.group, ctx.fp32 = group, fp32
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _all_reduce(grad, ctx.group, ctx.fp32), None, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: Any, fp32: bool) -> Tensor:  # type: ignore[override]
        return _all_reduce(x, group, fp32)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None, None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: Any, fp32: bool) -> Tensor:  # type: ignore[override]
        ctx.group, ctx.fp32 = group, fp32
        return _all_gather(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _reduce_scatter(grad, SEQ_DIM, ctx.group, ctx.fp32), None, None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: Any, fp32: bool) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return _reduce_scatter(x, SEQ_DIM, group, fp32)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _all_gather(grad, SEQ_DIM, ctx.group), None, None


class _ScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return _chunk(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _all_gather(grad, SEQ_DIM, ctx.group), None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _chunk(grad, -1, ctx.group), None


def copy_to_tp(x: Tensor, group: Any, fp32: bool = False) -> Tensor:
    """Enter a tensor-parallel region (input of a column-parallel layer)."""
    return _CopyToTP.apply(x, group, fp32)


def reduce_from_tp(x: Tensor, group: Any, fp32: bool = False) -> Tensor:
    """Leave a tensor-parallel region by summing partial results (output of a row-parallel layer)."""
    return _ReduceFromTP.apply(x, group, fp32)


def gather_seq(x: Tensor, group: Any, fp32: bool = False) -> Tensor:
    """Sequence-parallel -> full sequence (input of a column-parallel layer under sequence parallelism)."""
    return _GatherSeq.apply(x, group, fp32)


def reduce_scatter_seq(x: Tensor, group: Any, fp32: bool = False) -> Tensor:
    """Partial sums -> this rank's summed sequence chunk (output of a row-parallel layer under sequence parallelism)."""
    return _ReduceScatterSeq.apply(x, group, fp32)


def scatter_seq(x: Tensor, group: Any) -> Tensor:
    """Replicated full sequence -> this rank's sequence chunk."""
    return _ScatterSeq.apply(x, group)


def gather_last_dim(x: Tensor, group: Any) -> Tensor:
    """Column shards -> the full last dim (e.g. vocab-sharded logits -> full logits)."""
    return _GatherLastDim.apply(x, group)
