"""Size and memory of a run before it starts: parameters per block, FLOPs per token and memory per GPU.

``python -m megatron.config X.yml --summary`` prints :func:`summary_lines`; the trainer logs the same lines at
start. Parameters are counted on the real ``GPTModel`` built on the meta device (``megatron.model.size``), FLOPs per
token are the MFU numbers of ``megatron.model.flops`` and bytes follow ``megatron.config.memory`` (its docstring
states the ZeRO and activation formulas). How each parameter splits over tensor-parallel ranks is the resharding
table (``megatron.parallel.reshard.shard_spec``); pipeline stages hold ``ceil(num_layers / stages)`` layers at most,
the first also the embedding, the last the final norm and the output layer (a copy of the word embeddings when
tied). The GPU reported is the heaviest of the first and the last stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from megatron.config import derived
from megatron.config.errors import ConfigError
from megatron.config.layout import pipeline_stages
from megatron.config.memory import (ActivationShape, TrainingState, optimizer_bytes_per_param,
                                    stage_activation_bytes, training_state)
from megatron.model.size import LayerCounts, ParameterCounts, count_parameters

if TYPE_CHECKING:
    from megatron.config import ModelConfig
    from megatron.config.neox import NeoXConfig


def resolve_vocab(cfg: NeoXConfig) -> tuple[int, str]:
    """Embedding rows and where they come from: ``padded_vocab_size`` when set, else the tokenizer's vocabulary
    padded as the trainer pads it (``make_vocab_size_divisible_by`` x ``model_parallel_size``). Needs no data."""
    m = cfg.model
    if m.padded_vocab_size is not None:
        return int(m.padded_vocab_size), "padded_vocab_size"
    tok = cfg.tokenizer
    if tok.tokenizer_type != "CharLevelTokenizer" and (tok.vocab_file is None or not Path(tok.vocab_file).is_file()):
        where = "is not set" if tok.vocab_file is None else f"= {tok.vocab_file!r} does not exist"
        raise ConfigError(f"model.padded_vocab_size is not set and tokenizer.vocab_file {where}: set "
                          f"padded_vocab_size (e.g. --padded_vocab_size 50304) or a readable vocab_file to size the "
                          f"embedding")
    from megatron.tokenizer import build_tokenizer

    vocab = build_tokenizer(tok.tokenizer_type, tok.vocab_file, tok.merge_file).vocab_size
    tp = int(cfg.parallel.model_parallel_size or 1)
    padded = derived.padded_vocab_size(vocab, m.make_vocab_size_divisible_by, tp)
    return padded, (f"the tokenizer's {vocab:,} padded to a multiple of {m.make_vocab_size_divisible_by}"
                    + (f" x TP {tp}" if tp > 1 else ""))


@dataclass(frozen=True)
class GPUEstimate:
    """One GPU's share: parameters it holds, its training state and its activations (bytes)."""

    stage: str                    # "" without a pipeline, else "first stage" / "last stage"
    params: int
    state: TrainingState
    activations: int              # without activation checkpointing
    activations_checkpointed: int

    def total(self, checkpointed: bool) -> int:
        return self.state.total + (self.activations_checkpointed if checkpointed else self.activations)


@dataclass(frozen=True)
class SizeSummary:
    """Everything :func:`summary_lines` prints, as numbers."""

    counts: ParameterCounts
    vocab: int
    vocab_source: str
    matmul_params: int
    flops_per_token: float
    num_layers: int
    hidden_size: int
    seq_length: int
    micro_batch: int
    precision: str
    zero_stage: int
    data_parallel: int
    tensor_parallel: int
    pipeline_stages: int
    sequence_parallel: bool
    optimizer: str
    optimizer_bytes_per_param: int
    checkpoint_activations: bool
    checkpoint_num_layers: int
    gpu: GPUEstimate


def _stage_params(counts: ParameterCounts, cfg: NeoXConfig, stage_layers: range, first: bool, last: bool) -> int:
    """Parameters one tensor-parallel rank of a pipeline stage holds (split ones divided by TP)."""
    from megatron.parallel.reshard import is_gated, shard_spec

    tp = int(cfg.parallel.model_parallel_size or 1)
    gated = is_gated(cfg.model)
    wanted = {f"layers.{i}." for i in stage_layers}
    total = 0
    for name, n in counts.names:
        if name.startswith("layers."):
            keep = name[:name.index(".", len("layers.")) + 1] in wanted
        elif name.startswith("embed.position_embeddings."):
            keep = first
        elif name.startswith("embed.word_embeddings."):
            keep = first or (last and counts.tied)       # the tied head is a copy on the last stage
        else:                                            # final_layernorm, output_layer
            keep = last
        if keep:
            total += n // tp if shard_spec(name, gated) is not None else n
    return total


def summarize(cfg: NeoXConfig, *, data_parallel_size: Optional[int] = None, micro_batch: Optional[int] = None,
              gradient_accumulation_steps: Optional[int] = None) -> SizeSummary:
    """The numbers of :func:`summary_lines` for a resolved config. The keyword arguments replace the config's values
    (the trainer passes the launched data-parallel size and batch)."""
    from megatron.model.flops import flops_per_token, matmul_params

    vocab, source = resolve_vocab(cfg)
    model_cfg = cfg.model if cfg.model.padded_vocab_size == vocab else _with_vocab(cfg.model, vocab)
    try:
        counts = count_parameters(model_cfg, cfg.sepllm)
    except ValueError as exc:  # the model's own checks name the key
        raise ConfigError(str(exc)) from None
    t, p = cfg.training, cfg.parallel
    tp = int(p.model_parallel_size or 1)
    stages = pipeline_stages(p.pipe_parallel_size)
    dp = int(data_parallel_size or p.data_parallel_size or 1)
    micro = int(micro_batch or t.train_micro_batch_size_per_gpu or 1)
    accum = int(gradient_accumulation_steps or t.gradient_accumulation_steps or 1)
    precision, zero = str(t.precision), int(t.zero_stage)
    optimizer = str(cfg.optimizer.type)
    momentum = float(getattr(cfg.optimizer, "momentum", 0.0) or 0.0)
    shape = ActivationShape(model=model_cfg, micro_batch=micro, vocab=vocab, tensor_parallel=tp,
                            sequence_parallel=bool(p.sequence_parallel), precision=precision)
    layers = model_cfg.num_layers
    per_stage = -(-layers // stages)
    candidates = [("" if stages == 1 else "first stage", range(per_stage), True, stages == 1,
                   min(stages, accum) if stages > 1 else 1)]
    if stages > 1:
        candidates.append(("last stage", range(layers - per_stage, layers), False, True, 1))
    estimates = []
    for name, stage_layers, first, last, in_flight in candidates:
        params = _stage_params(counts, cfg, stage_layers, first, last)
        acts = [stage_activation_bytes(shape, len(stage_layers), first=first, last=last, in_flight=in_flight,
                                       checkpointed=ckpt) for ckpt in (False, True)]
        estimates.append(GPUEstimate(stage=name, params=params,
                                     state=training_state(params, precision, zero, dp, optimizer, momentum),
                                     activations=acts[0], activations_checkpointed=acts[1]))
    gpu = max(estimates, key=lambda e: e.total(model_cfg.checkpoint_activations))
    return SizeSummary(
        counts=counts, vocab=vocab, vocab_source=source, matmul_params=matmul_params(model_cfg, vocab),
        flops_per_token=flops_per_token(model_cfg, model_cfg.seq_length, vocab), num_layers=layers,
        hidden_size=model_cfg.hidden_size, seq_length=model_cfg.seq_length, micro_batch=micro, precision=precision,
        zero_stage=zero, data_parallel=dp, tensor_parallel=tp, pipeline_stages=stages,
        sequence_parallel=bool(p.sequence_parallel), optimizer=optimizer,
        optimizer_bytes_per_param=optimizer_bytes_per_param(precision, zero, optimizer, momentum),
        checkpoint_activations=bool(model_cfg.checkpoint_activations),
        checkpoint_num_layers=int(model_cfg.checkpoint_num_layers), gpu=gpu)


def _with_vocab(model_cfg: ModelConfig, vocab: int) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(model_cfg, padded_vocab_size=vocab)


def format_bytes(n: float) -> str:
    """``1536 -> '1.50 KiB'``: binary units, two decimals."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _layer_line(layers: tuple[LayerCounts, ...]) -> str:
    if not layers:
        return "0 layers"
    first = layers[0]
    head = (f"each of {len(layers)} layers {first.total:,}" if all(layer == first for layer in layers)
            else f"{len(layers)} layers {sum(layer.total for layer in layers):,} in all, the first")
    other = f", other {first.attention_other:,}" if first.attention_other else ""
    return (f"{head}: attention qkv {first.attention_qkv:,}, dense {first.attention_dense:,}{other} | "
            f"norms {first.norms:,} | mlp {first.mlp:,}")


def summary_lines(s: SizeSummary) -> list[str]:
    """The summary as a few short lines (no trailing newlines)."""
    c = s.counts
    position = f"{c.position_embeddings:,}" if c.position_embeddings else "none"
    output = "tied to the word embeddings" if c.tied else f"{c.output_layer:,}"
    gpu = s.gpu
    where = f", {gpu.stage}" if gpu.stage else ""
    sp = " + SP" if s.sequence_parallel else ""
    split = f" / DP {s.data_parallel}" if s.zero_stage >= 1 else ""
    n = s.checkpoint_num_layers
    every = f"every {n} layer{'s' if n > 1 else ''}"
    configured = "on" if s.checkpoint_activations else "off"
    other = "off" if s.checkpoint_activations else "on"
    return [
        f"model: {c.total:,} parameters, {c.non_embedding:,} without embeddings and output layer "
        f"(vocab {s.vocab:,}: {s.vocab_source})",
        f"  word embeddings {c.word_embeddings:,} | position table {position} | final norm {c.final_norm:,} | "
        f"output layer {output}",
        f"  {_layer_line(c.layers)}",
        f"FLOPs per token (fwd+bwd): {int(s.flops_per_token):,} = 6 x {s.matmul_params:,} matmul weights "
        f"+ 12 x {s.num_layers} layers x {s.hidden_size} hidden x {s.seq_length} seq",
        f"memory per GPU ({s.precision}, ZeRO {s.zero_stage}, DP {s.data_parallel}, TP {s.tensor_parallel}{sp}, "
        f"PP {s.pipeline_stages}{where}; {gpu.params:,} parameters on it):",
        f"  weights {format_bytes(gpu.state.weights)} | gradients {format_bytes(gpu.state.gradients)} | optimizer "
        f"{format_bytes(gpu.state.optimizer)} ({s.optimizer}: {s.optimizer_bytes_per_param} B/param{split})",
        f"  activations (micro batch {s.micro_batch} x {s.seq_length} tokens): {format_bytes(gpu.activations)}; "
        f"{format_bytes(gpu.activations_checkpointed)} with checkpoint_activations {every}",
        f"  total {format_bytes(gpu.total(s.checkpoint_activations))} as configured (checkpoint_activations "
        f"{configured}; {format_bytes(gpu.total(not s.checkpoint_activations))} {other}), without CUDA context and "
        f"buffers",
    ]


__all__ = ["GPUEstimate", "SizeSummary", "format_bytes", "resolve_vocab", "summarize", "summary_lines"]
