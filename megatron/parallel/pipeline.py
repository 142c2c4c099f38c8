"""Pipeline parallelism (``pipe-parallel-size``) on DeepSpeed's pipeline engine, with GPT-NeoX's meaning.

* ``pipe_parallel_size: 0`` -- no pipeline engine: the plain ``GPTModel`` under ``deepspeed.initialize``.
* ``pipe_parallel_size: 1`` -- the pipeline engine with ONE stage (numerically identical to 0 for the same weights).
* ``pipe_parallel_size: N`` -- N stages; ``world_size / (N x model_parallel_size)`` data-parallel pipelines.

Engine choice: ``deepspeed.pipe.PipelineModule`` + ``PipelineEngine``, not ``torch.distributed.pipelining``.
``PipelineEngine`` *is* a ``DeepSpeedEngine``, so the trainer keeps one code path for ZeRO-1, bf16/fp16, gradient
clipping, DeepSpeed checkpoints and the client optimizer; its 1F1B schedule turns ``gradient_accumulation_steps``
into the pipeline's micro-batches, tied input/output embeddings across stages are kept in sync by the engine
(``TiedLayerSpec``), and it is what GPT-NeoX itself runs, so users' configs and expectations carry over (layer
partition methods, ``train_batch``). ``torch.distributed.pipelining`` would need its own ZeRO, loss scaling and
checkpoint integration next to DeepSpeed's. (ZeRO-2/3 are refused by DeepSpeed's pipeline engine, as in GPT-NeoX.)

The model code stays distribution-free: :func:`build_pipeline_model` re-wraps ``GPTModel``'s parts (embedding,
transformer layers, final norm, output layer; see :mod:`megatron.parallel.pipeline_stages`) as DeepSpeed layer
specs. Each stage sends ``(hidden, input_ids)``; every stage recomputes positions / BiPE ids / rotary tables and the
SepLLM attention plan from the ids once per micro-batch, so SepLLM configs behave exactly as without a pipeline.
The loss (:func:`pipeline_lm_loss`) runs on the last stage from ``(labels, loss_mask)`` which the engine hands to
that stage directly.

Weight initialisation is per layer (seeded by ``seed + layer index`` in a forked RNG), so the initial weights do not
depend on the number of stages; :func:`load_gpt_state_dict` / :func:`gather_gpt_state_dict` map weights to and from
the ``GPTModel`` state-dict layout (same names), for comparing, converting and exporting.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from megatron.config.layout import check_pipeline_depth
from megatron.config.model import ModelConfig
from megatron.config.sepllm import SepLLMConfig
from megatron.model.init import init_weights
from megatron.errors import UserInputError
from megatron.model.loss import lm_loss
from megatron.parallel.pipeline_stages import (EmbeddingPipe, FinalNormPipe, HeadPipe, StageContext,
                                               TransformerLayerPipe, tied_head_forward)

PARTITION_METHODS = ("uniform", "parameters", "type:<regex>")
TIED_EMBEDDING_KEY = "embed"
# Every local pipeline layer may sit in a checkpointed chunk. DeepSpeed chunks a stage's layers by
# ``activation_checkpoint_interval`` from the stage's first layer (embedding and norm included) and runs a chunk
# without checkpointing if any member is not listed; listing them all means no transformer layer is ever left out
# (non-reentrant checkpointing takes inputs without gradients, e.g. token ids). "partial" is how DeepSpeed wraps
# the tied output head (``tied_head_forward``).
CHECKPOINTABLE = ["EmbeddingPipe", "TransformerLayerPipe", "FinalNormPipe", "HeadPipe", "partial"]

logger = logging.getLogger(__name__)


class PipelineConfigError(UserInputError, ValueError):
    """A pipeline setting that cannot work (message names the key, the value and what is expected)."""


def _deepspeed_partition_method(method: str) -> str:
    """Our names -> DeepSpeed's: ``uniform`` balances transformer layers (the embedding / norm / head are free, as
    GPT-NeoX's ``type:transformer``), ``parameters`` balances parameter counts, ``type:<regex>`` passes through."""
    m = str(method).strip().lower()
    if m == "uniform":
        return "type:TransformerLayerPipe"
    if m == "parameters" or (m.startswith("type:") and len(m) > 5):
        return m
    raise PipelineConfigError(f"pipe_partition_method = {method!r}: expected one of {PARTITION_METHODS}")


def _topology(num_stages: int, model_parallel_size: int, world_size: int) -> Any:
    """DeepSpeed's ``(pipe, data, model)`` topology: the same rank order as ``megatron.parallel.mesh``."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    if world_size % (num_stages * model_parallel_size):
        raise PipelineConfigError(
            f"world size {world_size} is not divisible by pipe_parallel_size x model_parallel_size = {num_stages} x "
            f"{model_parallel_size}; launch a multiple of {num_stages * model_parallel_size} processes")
    dp = world_size // (num_stages * model_parallel_size)
    return PipeModelDataParallelTopology(num_pp=num_stages, num_mp=model_parallel_size, num_dp=dp)


def _check_groups(topology: Any, groups: Any) -> None:
    """A ``megatron.parallel.mesh.ParallelGroups`` must describe the same layout as DeepSpeed's topology."""
    dims = {"pipe": topology.get_dim("pipe"), "data": topology.get_dim("data"), "model": topology.get_dim("model")}
    ours = {"pipe": groups.pp_size, "data": groups.dp_size, "model": groups.tp_size}
    if dims != ours:
        raise PipelineConfigError(f"the parallel groups (pp, dp, tp) = ({ours['pipe']}, {ours['data']}, "
                                  f"{ours['model']}) disagree with the pipeline topology ({dims['pipe']}, "
                                  f"{dims['data']}, {dims['model']})")
    coord = topology.get_coord(groups.rank)
    if (coord.pipe, coord.data, coord.model) != (groups.pp_rank, groups.dp_rank, groups.tp_rank):
        raise PipelineConfigError(f"rank {groups.rank}: mesh coordinates (pp, dp, tp) = ({groups.pp_rank}, "
                                  f"{groups.dp_rank}, {groups.tp_rank}) differ from DeepSpeed's {tuple(coord)}")


def pipeline_lm_loss(logits: Tensor, labels: Any, upcast: bool = True) -> Tensor:
    """The last stage's loss: ``labels`` is the ``(labels, loss_mask)`` pair of the micro-batch (see
    :func:`pipeline_micro_batch`); same formula as the non-pipeline trainer (``megatron.model.loss.lm_loss``)."""
    if isinstance(labels, Tensor):
        return lm_loss(logits, labels, upcast=upcast)
    if not isinstance(labels, (tuple, list)) or len(labels) not in (1, 2):
        raise PipelineConfigError(f"pipeline labels must be labels [B,S] or (labels, loss_mask), got "
                                  f"{type(labels).__name__}")
    return lm_loss(logits, labels[0], labels[1] if len(labels) == 2 else None, upcast=upcast)


def layer_specs(context: StageContext) -> list[Any]:
    """DeepSpeed layer specs for the whole model, in order: embedding, ``num_layers`` transformer layers, final
    norm, output layer (tied to the embedding unless ``no_weight_tying``). Only the local stage's specs are built."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    cfg = context.cfg
    specs: list[Any] = []
    if cfg.no_weight_tying:
        specs.append(LayerSpec(EmbeddingPipe, context))
    else:
        specs.append(TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingPipe, context,
                                   tied_weight_attr=["embed.word_embeddings.weight"]))
    specs.extend(LayerSpec(TransformerLayerPipe, i, context) for i in range(cfg.num_layers))
    specs.append(LayerSpec(FinalNormPipe, cfg, context.carries))
    if cfg.no_weight_tying:
        specs.append(LayerSpec(HeadPipe, cfg))
    else:
        specs.append(TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingPipe, context, with_position_table=False,
                                   forward_fn=tied_head_forward, tied_weight_attr=["embed.word_embeddings.weight"]))
    return specs


def build_pipeline_model(model_cfg: ModelConfig, sepllm_cfg: Optional[SepLLMConfig], num_stages: int, *,
                         model_parallel_size: int = 1, partition_method: str = "uniform", seed: int = 1234,
                         groups: Any = None, loss_fn: Any = pipeline_lm_loss,
                         carries: tuple[str, ...] = ()) -> nn.Module:
    """``GPTModel`` as a ``deepspeed.pipe.PipelineModule`` of ``num_stages`` stages (collective on all ranks).

    ``num_stages`` is the resolved stage count (``pipe_parallel_size`` 0 means no pipeline: do not call this).
    ``partition_method``: ``uniform`` (equal transformer-layer counts; the remainder goes to the first stages),
    ``parameters`` (balanced parameter counts, embedding/head included) or DeepSpeed's ``type:<regex>``.
    ``checkpoint_activations`` / ``checkpoint_num_layers`` in ``model_cfg`` turn on activation checkpointing: each
    stage's layers are recomputed in backward in chunks of ``checkpoint_num_layers`` pipeline layers (counted from
    the stage's first layer, so the embedding / final norm / head count as layers in their chunk; non-reentrant
    ``torch.utils.checkpoint``, RNG restored so dropout matches).
    ``groups`` (optional ``megatron.parallel.mesh.ParallelGroups``) is checked against the pipeline's topology.
    ``torch.distributed`` must be initialised. The returned module has ``attention_backend`` (this rank's
    backend, e.g. for SepLLM retention statistics) and ``stage_id`` / ``num_stages`` / ``parts`` from DeepSpeed.
    ``carries`` (``carried_inputs(reset_position_ids, reset_attention_mask)``): the per-token inputs every stage
    passes on besides the ids (the data iterator must then yield them, see :func:`pipeline_micro_batch`).
    """
    from deepspeed.pipe import PipelineModule

    if not isinstance(num_stages, int) or num_stages < 1:
        raise PipelineConfigError(f"number of pipeline stages = {num_stages!r}: expected >= 1 (pipe_parallel_size "
                                  f"0 means no pipeline engine: build GPTModel instead)")
    if model_parallel_size != 1:
        raise PipelineConfigError(f"model_parallel_size = {model_parallel_size} with pipe_parallel_size = "
                                  f"{num_stages}: pipeline stages are not tensor-parallel yet; use "
                                  f"model_parallel_size 1 with pipelines (or pipe_parallel_size 0 with TP)")
    check_pipeline_depth(model_cfg.num_layers, num_stages)
    # GPTModel's own checks and resolution, before any communication
    context = StageContext(model_cfg, sepllm_cfg, carries=tuple(carries))
    method = _deepspeed_partition_method(partition_method)
    if not dist.is_initialized():
        raise PipelineConfigError("build_pipeline_model: torch.distributed is not initialised (call "
                                  "megatron.training.distributed.init_distributed first)")
    import deepspeed

    # DeepSpeed's communication layer wraps the existing torch.distributed group (no new rendezvous)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    topology = _topology(num_stages, model_parallel_size, dist.get_world_size())
    if groups is not None:
        _check_groups(topology, groups)
    interval = model_cfg.checkpoint_num_layers if model_cfg.checkpoint_activations else 0
    if model_cfg.checkpoint_activations and model_cfg.checkpoint_num_layers < 1:
        raise PipelineConfigError(f"model config key 'checkpoint_num_layers' = {model_cfg.checkpoint_num_layers}: "
                                  f"expected >= 1")
    if model_cfg.checkpoint_activations and model_cfg.activation_checkpoint_mode != "full":
        logger.warning("activation_checkpoint_mode selective: DeepSpeed's pipeline engine checkpoints whole layers; "
                       "using full checkpointing every checkpoint_num_layers layers")
    if loss_fn is pipeline_lm_loss and model_cfg.fp16_lm_cross_entropy:
        loss_fn = functools.partial(pipeline_lm_loss, upcast=False)
    pipe = PipelineModule(layers=layer_specs(context), topology=topology, loss_fn=loss_fn,
                          partition_method=method, activation_checkpoint_interval=interval,
                          activation_checkpoint_func=functools.partial(checkpoint, use_reentrant=False),
                          checkpointable_layers=CHECKPOINTABLE)
    _init_local_weights(pipe, model_cfg, seed)
    pipe.attention_backend = context.backend
    _check_stage_has_layers(pipe, model_cfg.num_layers)
    return pipe


def _check_stage_has_layers(pipe: Any, num_layers: int) -> None:
    """Every stage must own a transformer layer (checked from the partition every rank knows, so all ranks fail
    together instead of one rank failing and the others waiting in a collective)."""
    parts = list(pipe.parts)
    for stage in range(len(parts) - 1):
        if not set(range(parts[stage], parts[stage + 1])) & set(range(1, num_layers + 1)):
            raise PipelineConfigError(f"pipeline stage {stage} received no transformer layer (partition {parts}); "
                                      f"use pipe_partition_method 'uniform' or fewer stages")


def _init_local_weights(pipe: Any, model_cfg: ModelConfig, seed: int) -> None:
    """Initialise each local layer from ``seed + spec index`` in a forked RNG (the global RNG is left untouched), so
    the initial weights are the same for any number of stages; then re-broadcast the tied embedding."""
    modules: list[tuple[int, nn.Module]] = []
    for name, child in pipe.named_children():
        if name.isdigit():
            modules.append((int(name), child))
    for key, child in pipe.tied_modules.items():
        del key
        modules.append((0, child))  # the tied embedding is spec 0 wherever it lives
    for index, module in modules:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + index)
            init_weights(module, model_cfg)
    pipe._synchronize_tied_weights()


# ---------------------------------------------------------------------------------------------------------------
# weights in GPTModel layout


def local_gpt_names(pipe: Any) -> dict[str, tuple[str, Tensor]]:
    """``{GPTModel state-dict name: (pipeline name, tensor)}`` for this rank's parameters and buffers."""
    out: dict[str, tuple[str, Tensor]] = {}
    children = [(name, child) for name, child in pipe.named_children() if name.isdigit()]
    children += [(f"tied_modules.{key}", child) for key, child in pipe.tied_modules.items()]
    for prefix, child in children:
        for local, tensor in child.state_dict(keep_vars=True).items():
            out.setdefault(child.to_gpt_name(local), (f"{prefix}.{local}", tensor))
    return out


@torch.no_grad()
def load_gpt_state_dict(pipe: Any, state_dict: Mapping[str, Tensor]) -> None:
    """Copy this stage's weights from a full ``GPTModel`` state dict (every rank calls it with the same dict)."""
    for gpt_name, (pipe_name, tensor) in local_gpt_names(pipe).items():
        if gpt_name not in state_dict:
            raise KeyError(f"load_gpt_state_dict: {gpt_name!r} (pipeline parameter {pipe_name!r}) is missing from "
                           f"the GPTModel state dict")
        src = state_dict[gpt_name]
        if tuple(src.shape) != tuple(tensor.shape):
            raise ValueError(f"load_gpt_state_dict: {gpt_name!r} has shape {tuple(src.shape)}, the pipeline expects "
                             f"{tuple(tensor.shape)}")
        tensor.copy_(src.to(dtype=tensor.dtype, device=tensor.device))


@torch.no_grad()
def gather_gpt_state_dict(pipe: Any) -> dict[str, Tensor]:
    """The full model's weights in ``GPTModel`` layout, on every rank of this rank's pipeline (collective over the
    pipeline group; CPU copies). Tied weights are taken from the first stage holding them."""
    mine = {name: tensor.detach().cpu().clone() for name, (_, tensor) in local_gpt_names(pipe).items()}
    grid = pipe._grid
    stages: list[Optional[dict[str, Tensor]]] = [None] * grid.get_pipe_parallel_world_size()
    dist.all_gather_object(stages, mine, group=grid.get_pipe_parallel_group())
    merged: dict[str, Tensor] = {}
    for stage in stages:
        for name, tensor in (stage or {}).items():
            merged.setdefault(name, tensor)
    return merged


# ---------------------------------------------------------------------------------------------------------------
# training / evaluation with the engine


def carried_inputs(reset_position_ids: bool, reset_attention_mask: bool) -> tuple[str, ...]:
    """The batch inputs a pipeline carries besides the token ids (``build_pipeline_model(carries=...)``)."""
    return tuple(name for name, on in (("position_ids", reset_position_ids), ("document_ids", reset_attention_mask))
                 if on)


def pipeline_micro_batch(batch: Any) -> tuple[Any, tuple[Tensor, Tensor]]:
    """A trainer ``Batch`` (tokens, labels, loss_mask) as the pipeline engine's ``(inputs, labels)`` pair: the first
    stage reads ``tokens`` (with restarted positions and / or document ids: ``(tokens, position_ids,
    document_ids)``, those present, in that order), the last stage ``(labels, loss_mask)``."""
    carried = tuple(t for t in (getattr(batch, "position_ids", None), getattr(batch, "document_ids", None))
                    if t is not None)
    return ((batch.tokens, *carried) if carried else batch.tokens), (batch.labels, batch.loss_mask)


def pipeline_data_iter(batches: Iterable[Any]) -> Iterator[tuple[Tensor, tuple[Tensor, Tensor]]]:
    """Adapt an iterator of trainer ``Batch`` es for ``engine.train_batch`` / ``engine.eval_batch``."""
    for batch in batches:
        yield pipeline_micro_batch(batch)


def pipeline_train_step(engine: Any, data_iter: Iterator[Any]) -> Tensor:
    """One optimizer step: ``gradient_accumulation_steps`` micro-batches through the 1F1B schedule, then the
    optimizer step. ``data_iter`` yields ``(tokens, (labels, loss_mask))`` (see :func:`pipeline_data_iter`) and is
    read only on the first and last stage. Returns the mean loss over the micro-batches and data-parallel ranks,
    on every rank."""
    return engine.train_batch(data_iter=data_iter)


def pipeline_eval_loss(engine: Any, data_iter: Iterator[Any], num_micro_batches: Optional[int] = None) -> Tensor:
    """Mean loss of ``num_micro_batches`` (default: the engine's accumulation steps) micro-batches, no gradients,
    on every rank (averaged over data-parallel ranks)."""
    return engine.eval_batch(data_iter, return_logits=False, compute_loss=True, reduce_output="avg",
                             bcast_loss=True, num_micro_batches=num_micro_batches)


def data_parallel_coords(engine: Any) -> tuple[int, int]:
    """``(dp_rank, dp_size)`` for data loading under a pipeline: both stages of one pipeline read the same
    samples, so loaders are sliced by data-parallel rank, not by global rank."""
    grid = engine.grid
    return grid.get_data_parallel_rank(), grid.get_data_parallel_world_size()


__all__ = ["PARTITION_METHODS", "PipelineConfigError", "build_pipeline_model", "carried_inputs",
           "data_parallel_coords", "gather_gpt_state_dict", "layer_specs", "load_gpt_state_dict",
           "pipeline_data_iter", "pipeline_eval_loss", "pipeline_lm_loss", "pipeline_micro_batch",
           "pipeline_train_step"]
