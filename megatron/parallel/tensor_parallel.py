"""Megatron-style tensor (and sequence) parallelism applied around an unmodified ``GPTModel``.

``apply_tensor_parallel(model, tp_group)`` cuts the model's weights in place (the split of every parameter is the
table in :mod:`megatron.parallel.reshard`) and swaps the linear / embedding modules for sharded ones that keep the
same parameter names, so a TP rank's ``state_dict()`` is its checkpoint shard:

* ``attention.query_key_value`` and ``mlp.dense_h_to_4h``: column-parallel (whole KV groups per rank; the attention
  reads its local head count from the projected tensor);
* ``attention.dense`` and ``mlp.dense_4h_to_h``: row-parallel (partial sums all-reduced, bias added once);
* ``embed.word_embeddings``: vocabulary-parallel; the output head (tied or ``output_layer``) is column-parallel over
  the vocabulary, so ``model(ids)`` returns this rank's ``[B, S, V / tp]`` logits. :func:`vocab_parallel_lm_loss`
  (same contract as ``megatron.model.loss.lm_loss``) computes the exact cross-entropy from them;
  :func:`gather_logits` returns full logits when needed (evaluation, generation).
* ``sequence_parallel=True``: between the blocks the residual stream is split on the sequence dim (norms, residual
  adds and hidden dropout work on ``S / tp`` tokens); column-parallel inputs are all-gathered and row-parallel
  outputs reduce-scattered instead of all-reduced. Parameters used on sequence shards (norms, row biases) get their
  gradients summed over the TP group by a gradient hook.

SepLLM needs nothing special: every TP rank holds the full ``input_ids`` (the batch is replicated over the TP group),
so the backend's per-micro-batch plan is identical on all ranks and each rank runs it on its own heads.

Why not DTensor ``parallelize_module``: DTensor parameters do not go through DeepSpeed (measured with DeepSpeed
0.19.8: ``deepspeed.initialize`` fails in ``module.to(device)`` -- "Couldn't swap Linear.weight" -- for ZeRO stage 0 and
1). Plain local shards with ``tensor_model_parallel`` / ``partition_dim`` attributes are what DeepSpeed's ZeRO and
gradient clipping understand together with an ``mpu`` (:meth:`megatron.parallel.mesh.ParallelGroups.deepspeed_mpu`).

Dropout: regions whose values differ per rank (attention probabilities of the local heads, sequence-parallel hidden
dropout) draw their masks from a generator seeded per TP rank from one seed taken off the shared generator, so ranks
keep their shared RNG in step (and activation-checkpoint recomputation reproduces the masks).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.config.layout import check_tp_split
from megatron.model.fused_loss import FusedLMLoss, VocabShard
from megatron.model.gpt import GPTModel
from megatron.model.loss import token_weights
from megatron.parallel import tp_comm
from megatron.parallel.reshard import ShardSpec, is_gated, shard_spec, shard_tensor
from megatron.errors import UserInputError


class TensorParallelError(UserInputError, ValueError):
    """A model/config that cannot be split over the given tensor-parallel group; the message names the key."""


@dataclass(frozen=True)
class TPInfo:
    """What ``apply_tensor_parallel`` did (stored as ``model.tensor_parallel``)."""

    group: Any
    rank: int
    size: int
    sequence_parallel: bool
    fp32_allreduce: bool = False  # GPT-NeoX: sums over the TP group run in fp32 (see tp_comm)

    def __deepcopy__(self, memo: dict) -> "TPInfo":
        return self  # immutable, and a ProcessGroup cannot be copied: copies of the model share the group


def resolve_tp_group(tp_mesh_or_group: Any) -> Any:
    """A ``ProcessGroup`` from a 1-D ``DeviceMesh``, a ``ParallelGroups`` or a ``ProcessGroup`` (returned as is)."""
    if hasattr(tp_mesh_or_group, "tp_group"):
        return tp_mesh_or_group.tp_group
    if hasattr(tp_mesh_or_group, "get_group") and hasattr(tp_mesh_or_group, "mesh"):
        if tp_mesh_or_group.ndim != 1:
            raise TensorParallelError(f"apply_tensor_parallel needs a 1-D tensor-parallel mesh, got a "
                                      f"{tp_mesh_or_group.ndim}-D mesh; pass mesh['tp']")
        return tp_mesh_or_group.get_group()
    return tp_mesh_or_group


# --------------------------------------------------------------------------------------------------- sharded modules
def _mark(param: nn.Parameter, spec: ShardSpec) -> nn.Parameter:
    """Megatron / DeepSpeed attributes: this parameter is a TP shard (its norm is summed over the TP group)."""
    param.tensor_model_parallel = True
    param.model_parallel = True
    param.partition_dim = spec.dim
    param.partition_stride = spec.stride
    return param


class ColumnParallelLinear(nn.Module):
    """``y_r = x W_r^T + b_r``: this rank's output features. Input enters the TP region (copy, or sequence gather)."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], spec: ShardSpec, info: TPInfo) -> None:
        super().__init__()
        self.weight = _mark(nn.Parameter(weight), spec)
        self.bias = _mark(nn.Parameter(bias), spec) if bias is not None else None
        self.tp = info
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        group, fp32 = self.tp.group, self.tp.fp32_allreduce
        x = tp_comm.gather_seq(x, group, fp32) if self.tp.sequence_parallel else tp_comm.copy_to_tp(x, group, fp32)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """``y = sum_r x_r W_r^T + b``: partial products reduced over the TP group (scattered on the sequence under SP),
    then the replicated bias is added once."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], spec: ShardSpec, info: TPInfo) -> None:
        super().__init__()
        self.weight = _mark(nn.Parameter(weight), spec)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.tp = info
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)
        group, fp32 = self.tp.group, self.tp.fp32_allreduce
        y = (tp_comm.reduce_scatter_seq(y, group, fp32) if self.tp.sequence_parallel
             else tp_comm.reduce_from_tp(y, group, fp32))
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, start + V/tp)`` of the word table; ids outside give 0 and the partial results are summed."""

    def __init__(self, weight: Tensor, spec: ShardSpec, info: TPInfo, padding_idx: Optional[int] = None) -> None:
        super().__init__()
        self.weight = _mark(nn.Parameter(weight), spec)
        self.tp = info
        self.num_embeddings_per_rank = weight.shape[0]
        self.vocab_start = info.rank * weight.shape[0]
        self.num_embeddings = weight.shape[0] * info.size
        self.embedding_dim = weight.shape[1]
        self.padding_idx = padding_idx

    def forward(self, input_ids: Tensor) -> Tensor:
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return tp_comm.reduce_from_tp(out, self.tp.group, self.tp.fp32_allreduce)


# ---------------------------------------------------------------------------------------------------- dropout RNG
class _PerRankRNG:
    """Forward pre/post hooks: run a module's random ops on a generator state seeded per TP rank.

    The seed is drawn from the shared default generator (which therefore advances identically on all TP ranks) and
    offset by the TP rank; the shared state is restored afterwards.
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.saved: list[tuple[Tensor, Optional[list[Tensor]]]] = []

    def pre(self, module: nn.Module, args: Any) -> None:
        if not module.training:
            return
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.saved.append((torch.get_rng_state(), cuda))
        torch.manual_seed(seed + 7919 * (self.rank + 1))

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        if not module.training or not self.saved:
            return
        cpu, cuda = self.saved.pop()
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _per_rank_rng(module: nn.Module, rank: int) -> None:
    hooks = _PerRankRNG(rank)
    module.register_forward_pre_hook(hooks.pre)
    module.register_forward_hook(hooks.post)


# ------------------------------------------------------------------------------------------------------- apply
def _shard(name: str, param: Tensor, model: GPTModel, info: TPInfo) -> tuple[Tensor, ShardSpec]:
    spec = shard_spec(name, is_gated(model.cfg))
    if spec is None:
        raise TensorParallelError(f"internal: parameter {name!r} has no tensor-parallel split")
    return shard_tensor(param.detach(), spec, info.rank, info.size, name=name), spec


def _replace_linear(model: GPTModel, path: str, cls: type, info: TPInfo) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    old: nn.Linear = getattr(parent, attr)
    weight, spec = _shard(f"{path}.weight", old.weight, model, info)
    bias = None
    if old.bias is not None:
        bias_spec = shard_spec(f"{path}.bias", is_gated(model.cfg))
        bias = (old.bias.detach().clone() if bias_spec is None
                else shard_tensor(old.bias.detach(), bias_spec, info.rank, info.size, name=f"{path}.bias"))
    setattr(parent, attr, cls(weight, bias, spec, info))


def _allreduce_grad(info: TPInfo, grad: Tensor) -> Tensor:
    if info.fp32_allreduce and grad.dtype == torch.bfloat16:  # GPT-NeoX upcasts these for bf16 only
        summed = grad.float().contiguous()
        dist.all_reduce(summed, group=info.group)
        return summed.to(grad.dtype)
    grad = grad.contiguous().clone()
    dist.all_reduce(grad, group=info.group)
    return grad


def _ensure_param_state(info: TPInfo, sharded: dict[str, ShardSpec], sp_names: tuple[str, ...], model: nn.Module,
                        args: Any) -> None:
    """Forward pre-hook: (re-)attach what lives on the parameter objects -- the TP-shard attributes and, under
    sequence parallelism, the gradient all-reduce hooks. ``copy.deepcopy`` of a ``Parameter`` keeps neither, so a
    copied model gets them back at its first forward."""
    for name, spec in sharded.items():
        param = model.get_parameter(name)
        if not getattr(param, "tensor_model_parallel", False):
            _mark(param, spec)
    for name in sp_names:
        param = model.get_parameter(name)
        if not getattr(param, "sequence_parallel", False):  # a fresh (or deep-copied) parameter: no hook yet
            param.register_hook(functools.partial(_allreduce_grad, info))
            param.sequence_parallel = True  # used on sequence shards: partial gradient per rank


def _scatter_seq_hook(info: TPInfo, module: nn.Module, args: Any, out: Tensor) -> Tensor:
    return tp_comm.scatter_seq(out, info.group)


def _gather_seq_hook(info: TPInfo, module: nn.Module, args: Any, out: Tensor) -> Tensor:
    return tp_comm.gather_seq(out, info.group, info.fp32_allreduce)


def _copy_to_tp_hook(info: TPInfo, module: nn.Module, args: Any, out: Tensor) -> Tensor:
    return tp_comm.copy_to_tp(out, info.group, info.fp32_allreduce)


def apply_tensor_parallel(model: GPTModel, tp_mesh_or_group: Any, sequence_parallel: bool = False,
                          fp32_allreduce: bool = False) -> GPTModel:
    """Shard ``model`` (built and initialised identically on every TP rank) over the TP group, in place.

    ``tp_mesh_or_group``: the 1-D ``"tp"`` ``DeviceMesh``, a ``ParallelGroups``, or a ``ProcessGroup``. Returns the
    same model, whose forward now returns vocab-sharded logits ``[B, S, V / tp]`` (see :func:`vocab_parallel_lm_loss`,
    :func:`gather_logits`). Call it before building the optimizer / DeepSpeed engine. TP size 1 with
    ``sequence_parallel=False`` leaves the model untouched. ``fp32_allreduce`` (GPT-NeoX's key) sums activations
    and gradients over the TP group in fp32.
    """
    if not isinstance(model, GPTModel):
        raise TensorParallelError(f"apply_tensor_parallel expects a GPTModel, got {type(model).__name__}")
    if getattr(model, "tensor_parallel", None) is not None:
        raise TensorParallelError("apply_tensor_parallel: this model is already tensor-parallel")
    group = resolve_tp_group(tp_mesh_or_group)
    if not dist.is_initialized():
        raise TensorParallelError("apply_tensor_parallel: torch.distributed is not initialised")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    info = TPInfo(group=group, rank=rank, size=size, sequence_parallel=bool(sequence_parallel),
                  fp32_allreduce=bool(fp32_allreduce))
    if size == 1 and not sequence_parallel:
        return model
    check_tp_split(model.cfg, size, sequence_parallel)

    for i, layer in enumerate(model.layers):
        p = f"layers.{i}"
        _replace_linear(model, f"{p}.attention.query_key_value", ColumnParallelLinear, info)
        _replace_linear(model, f"{p}.attention.dense", RowParallelLinear, info)
        _replace_linear(model, f"{p}.mlp.dense_h_to_4h", ColumnParallelLinear, info)
        _replace_linear(model, f"{p}.mlp.dense_4h_to_h", RowParallelLinear, info)
        attention = layer.attention
        attention.head_offset = rank * (attention.num_heads // size)
        if attention.attention_dropout > 0:
            _per_rank_rng(attention, rank)
        if sequence_parallel:
            for drop in (layer.attn_dropout, layer.mlp_dropout):
                if drop.p > 0:
                    _per_rank_rng(drop, rank)

    emb = model.embed.word_embeddings
    weight, spec = _shard("embed.word_embeddings.weight", emb.weight, model, info)
    model.embed.word_embeddings = VocabParallelEmbedding(weight, spec, info, emb.padding_idx)
    if model.output_layer is not None:
        head, head_spec = _shard("output_layer.weight", model.output_layer.weight, model, info)
        model.output_layer = ColumnParallelLinear(head, None, head_spec, info)  # GPTModel uses only .weight

    # the output head is a column-parallel product with the final norm's output: enter the TP region there
    gated = is_gated(model.cfg)
    sharded = {n: spec for n, _ in model.named_parameters() if (spec := shard_spec(n, gated)) is not None}
    sp_names: tuple[str, ...] = ()
    if sequence_parallel:
        model.embed.register_forward_hook(functools.partial(_scatter_seq_hook, info))
        model.final_layernorm.register_forward_hook(functools.partial(_gather_seq_hook, info))
        sp_names = tuple(n for n, _ in model.named_parameters() if n not in sharded and not n.startswith("embed."))
    else:
        model.final_layernorm.register_forward_hook(functools.partial(_copy_to_tp_hook, info))
    model.register_forward_pre_hook(functools.partial(_ensure_param_state, info, sharded, sp_names))
    _ensure_param_state(info, sharded, sp_names, model, ())
    model.tensor_parallel = info
    return model


# ------------------------------------------------------------------------------------------------------------ loss
def vocab_parallel_cross_entropy(logits: Tensor, labels: Tensor, group: Any, upcast: bool = True) -> Tensor:
    """Per-token cross-entropy ``[...]`` from vocab-sharded ``logits [..., V / tp]`` (fp32, exact; ``upcast=False``:
    in the logits' dtype, GPT-NeoX's ``fp16_lm_cross_entropy``).

    ``log(sum_v exp(z_v)) - z_label`` with the max and the sum reduced over the TP group; labels must be in
    ``[0, V)`` (mask ignored positions yourself).
    """
    z = logits.to(torch.float32) if upcast else logits
    per_rank = z.shape[-1]
    start = dist.get_rank(group) * per_rank
    vocab = per_rank * dist.get_world_size(group)
    if labels.numel() and (int(labels.max()) >= vocab or int(labels.min()) < 0):
        raise ValueError(f"vocab_parallel_cross_entropy: labels must lie in [0, {vocab}) (the padded vocabulary), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    zmax = z.detach().amax(dim=-1, keepdim=True)
    dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
    z = z - zmax
    sum_exp = tp_comm.reduce_from_tp(z.exp().sum(dim=-1), group)
    local = labels - start
    inside = (local >= 0) & (local < per_rank)
    picked = z.gather(-1, local.clamp(0, per_rank - 1).unsqueeze(-1)).squeeze(-1)
    target = tp_comm.reduce_from_tp(picked * inside.to(z.dtype), group)
    return sum_exp.log() - target


def vocab_parallel_lm_loss(logits: Tensor, labels: Tensor, loss_mask: Optional[Tensor] = None, *,
                           group: Any, upcast: bool = True) -> Tensor:
    """``megatron.model.loss.lm_loss`` for vocab-sharded logits: mean over counted tokens (labels < 0 and
    ``loss_mask == 0`` ignored), identical on every TP rank."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"vocab_parallel_lm_loss: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
                         f"disagree")
    weights = token_weights(labels, loss_mask, "vocab_parallel_lm_loss")
    per_token = vocab_parallel_cross_entropy(logits, labels.clamp(min=0), group, upcast).to(torch.float32)
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)


def loss_fn_for(model: GPTModel, upcast: bool = True) -> Callable[..., Tensor]:
    """The loss the trainer should call for ``model``: ``lm_loss`` for a plain model, the vocab-parallel loss over
    its TP group for a tensor-parallel one. Signature ``(logits, labels, loss_mask=None)``."""
    info: Optional[TPInfo] = getattr(model, "tensor_parallel", None)
    if info is None:
        from megatron.model.loss import lm_loss

        return functools.partial(lm_loss, upcast=upcast)
    return functools.partial(vocab_parallel_lm_loss, group=info.group, upcast=upcast)


def fused_loss_for(model: GPTModel, chunk_tokens: int) -> FusedLMLoss:
    """The fused chunked loss (``megatron.model.fused_loss``) for ``model``: over the whole vocabulary for a plain
    model; for a tensor-parallel one over this rank's vocabulary rows, with the per-token max and the sums of
    ``exp`` and of the target logit reduced over the TP group chunk by chunk (fp32, exact)."""
    info: Optional[TPInfo] = getattr(model, "tensor_parallel", None)
    if info is None or info.size == 1:
        return FusedLMLoss(chunk_tokens)
    rows = model.cfg.padded_vocab_size // info.size
    shard = VocabShard(start=info.rank * rows,
                       all_max=functools.partial(dist.all_reduce, op=dist.ReduceOp.MAX, group=info.group),
                       all_sum=functools.partial(dist.all_reduce, op=dist.ReduceOp.SUM, group=info.group))
    return FusedLMLoss(chunk_tokens, shard)


def gather_logits(logits: Tensor, model_or_group: Any) -> Tensor:
    """Full ``[..., V]`` logits from this rank's vocab shard (differentiable); identity for a plain model."""
    info = getattr(model_or_group, "tensor_parallel", None)
    if isinstance(model_or_group, nn.Module):
        if info is None:
            return logits
        group = info.group
    else:
        group = resolve_tp_group(model_or_group)
    return tp_comm.gather_last_dim(logits, group)


# ----------------------------------------------------------------------------------------------- gradient norm
def tp_grad_norm(model: nn.Module) -> Tensor:
    """Global L2 norm of the gradients of a tensor-parallel model, identical on every TP rank.

    Sharded parameters (``tensor_model_parallel``) contribute their squared norms summed over the TP group;
    replicated ones (complete, equal gradients on every TP rank) count once. For a plain model this is
    ``torch.nn.utils.get_total_norm`` of its gradients. Use it where the trainer measures / clips the norm itself
    (DeepSpeed ZeRO computes the same thing internally when given the ``mpu``).
    """
    info: Optional[TPInfo] = getattr(model, "tensor_parallel", None)
    device = next(model.parameters()).device
    # summed on the gradients' device (one host sync at the end, not one per parameter), in fp64 like DeepSpeed's
    # ZeRO norm: an fp32 sum over millions of entries is off by ~1e-4 on CPU
    sharded = torch.zeros((), dtype=torch.float64, device=device)
    replicated = torch.zeros((), dtype=torch.float64, device=device)
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad.detach().to(torch.float64)
        sq = torch.dot(g.flatten(), g.flatten()).to(device)
        if getattr(p, "tensor_model_parallel", False):
            sharded += sq
        else:
            replicated += sq
    if info is not None and info.size > 1:
        dist.all_reduce(sharded, group=info.group)
    return (sharded + replicated).sqrt().to(torch.float32).cpu()


def clip_tp_grad_norm_(model: nn.Module, max_norm: float) -> float:
    """Scale all gradients so that :func:`tp_grad_norm` is at most ``max_norm`` (same rule as
    ``torch.nn.utils.clip_grad_norm_``: coefficient ``max_norm / (norm + 1e-6)``, capped at 1); returns the norm
    before clipping."""
    norm = float(tp_grad_norm(model))
    coef = max_norm / (norm + 1e-6)
    if max_norm > 0 and coef < 1.0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.detach().mul_(coef)
    return norm
