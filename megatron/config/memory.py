"""Memory one GPU needs to train a config: pure arithmetic on config values (no torch, no model).

The parameter counts come from the real model (``megatron.training.size_summary`` builds ``GPTModel`` on the meta
device); this module turns counts and shapes into bytes, so the rules live in one place and can be checked by hand.

Training state (the ZeRO paper's accounting, Rajbhandari et al. 2020), per parameter held by the GPU:

* weights: 2 bytes in bf16/fp16, 4 in fp32; gradients: the same;
* optimizer: 4 bytes per fp32 moment (Adam/AdamW 2, SGD with momentum 1, plain SGD 0) plus a 4-byte fp32 master copy
  under mixed precision or any ZeRO stage (DeepSpeed's ZeRO optimizers keep an fp32 partition even for fp32
  weights): Adam in bf16 is 4 + 8 = 12 bytes;
* ZeRO 1 divides the optimizer state by the data-parallel size, ZeRO 2 also the gradients, ZeRO 3 also the weights.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", Sec. 4.1),
the tensors one layer keeps for backward, with ``T = micro_batch x seq_length`` tokens, ``e`` bytes per element
(2 in bf16/fp16, 4 in fp32), ``t`` the tensor-parallel size and ``r = t`` with sequence parallelism, else 1:

* norm inputs: ``e T h / r`` each (two per layer; one when the second norm reads the layer input, ``gpt_j_residual``);
* attention: its input ``e T h / r``, q/k/v ``e T (heads + 2 kv_heads) head_dim / t``, the output that enters the
  dense projection ``e T h / t``, the fused kernel's softmax statistics ``4 T heads / t``;
* MLP: its input ``e T h / r`` (shared with the attention's when ``gpt_j_tied``), the first projection's output
  ``e T up / t``, then ``e T down / t`` once (plain) or twice (gated: ``act(gate)`` and the product);
* a 1-byte dropout mask ``T h / r`` after attention and after the MLP when ``hidden_dropout > 0``.

For Korthikanti's GPT (4h GELU MLP, dropout, bf16, no TP) this is their ``34 s b h`` per layer. Their ``5 a s^2 b``
score term is left out: our attention runs through fused SDPA / FlexAttention / Triton kernels that recompute the
scores in backward (only the softmax statistics above are kept). The first pipeline stage also keeps the embedding
dropout mask, the last the final norm input, the output layer input (``e T h``, gathered) and fp32 log-probabilities
``4 T V / t`` for the cross-entropy. Under DeepSpeed's 1F1B pipeline schedule the first stage holds
``min(stages, gradient_accumulation_steps)`` micro-batches at once.

With ``checkpoint_activations`` a stage keeps one ``e T h / r`` input per chunk of ``checkpoint_num_layers`` layers
and recomputes one chunk at a time in backward: ``ceil(L / n) e T h / r + n x (one layer's activations)``.

Not counted: CUDA context and allocator slack, communication buckets, temporary buffers of the optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.config.derived import GATED_ACTIVATIONS, mlp_widths
from megatron.config.errors import ConfigError
from megatron.config.model import ModelConfig

#: bytes per element of weights, gradients and activations of each precision
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
#: fp32 moments kept per parameter by each optimizer type (SGD: one when momentum > 0)
ADAM_TYPES = ("adam", "adamw")


def element_bytes(precision: str) -> int:
    """Bytes per weight / gradient / activation element in ``precision``."""
    if precision not in ELEMENT_BYTES:
        raise ConfigError(f"precision {precision!r}: expected one of {', '.join(ELEMENT_BYTES)}")
    return ELEMENT_BYTES[precision]


def optimizer_bytes_per_param(precision: str, zero_stage: int, optimizer_type: str, momentum: float = 0.0) -> int:
    """Optimizer-state bytes per parameter before ZeRO partitioning: fp32 moments plus the fp32 master copy."""
    kind = optimizer_type.lower()
    moments = 2 if kind in ADAM_TYPES else (1 if momentum else 0)
    master = 1 if precision in ("bf16", "fp16") or zero_stage >= 1 else 0
    return 4 * (moments + master)


@dataclass(frozen=True)
class TrainingState:
    """Bytes of weights, gradients and optimizer state one GPU holds."""

    weights: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def _split(value: int, ranks: int) -> int:
    return -(-value // ranks)


def training_state(params: int, precision: str, zero_stage: int, data_parallel_size: int, optimizer_type: str,
                   momentum: float = 0.0) -> TrainingState:
    """Training state of a GPU that holds ``params`` parameters (after tensor / pipeline splitting), with ZeRO
    ``zero_stage`` partitioning over ``data_parallel_size`` ranks (module docstring)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage = {zero_stage}: expected 0, 1, 2 or 3")
    if data_parallel_size < 1:
        raise ConfigError(f"data-parallel size {data_parallel_size}: expected >= 1")
    e = element_bytes(precision)
    dp = data_parallel_size
    weights, grads = params * e, params * e
    optim = params * optimizer_bytes_per_param(precision, zero_stage, optimizer_type, momentum)
    return TrainingState(weights=_split(weights, dp) if zero_stage >= 3 else weights,
                         gradients=_split(grads, dp) if zero_stage >= 2 else grads,
                         optimizer=_split(optim, dp) if zero_stage >= 1 else optim)


@dataclass(frozen=True)
class ActivationShape:
    """What the activation count needs: the model, the micro-batch and the tensor-parallel layout."""

    model: ModelConfig
    micro_batch: int
    vocab: int
    tensor_parallel: int = 1
    sequence_parallel: bool = False
    precision: str = "bf16"

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.model.seq_length


def layer_activation_bytes(shape: ActivationShape) -> int:
    """Bytes one transformer layer keeps for backward (module docstring)."""
    m, t = shape.model, shape.tensor_parallel
    r = t if shape.sequence_parallel else 1
    e, tokens, h = element_bytes(shape.precision), shape.tokens, m.hidden_size
    heads = m.num_attention_heads
    kv = m.num_kv_heads if m.num_kv_heads is not None else heads
    head_dim = h // heads
    up, down = mlp_widths(h, m.activation, m.intermediate_size, m.expansion_factor, m.mlp_multiple_of)
    residual = e * tokens * h
    norm_inputs = 1 if m.gpt_j_residual else 2
    normed = 1 if m.gpt_j_tied else 2                       # attention input, MLP input
    replicated = (norm_inputs + normed) * residual
    attention = e * tokens * (heads + 2 * kv) * head_dim + e * tokens * h + 4 * tokens * heads
    mlp = e * tokens * (up + (2 if m.activation in GATED_ACTIVATIONS else 1) * down)
    masks = 2 * tokens * h if m.hidden_dropout > 0 else 0
    return replicated // r + (attention + mlp) // t + masks // r


def _layers_bytes(shape: ActivationShape, layers: int, in_flight: int, checkpointed: bool) -> int:
    per_layer = layer_activation_bytes(shape)
    if not checkpointed:
        return in_flight * layers * per_layer
    r = shape.tensor_parallel if shape.sequence_parallel else 1
    n = min(shape.model.checkpoint_num_layers, layers)
    chunk_inputs = -(-layers // n) * element_bytes(shape.precision) * shape.tokens * shape.model.hidden_size // r
    return in_flight * chunk_inputs + n * per_layer


def first_stage_extra_bytes(shape: ActivationShape) -> int:
    """The embedding's dropout mask (1 byte per element, when ``hidden_dropout > 0``)."""
    r = shape.tensor_parallel if shape.sequence_parallel else 1
    return shape.tokens * shape.model.hidden_size // r if shape.model.hidden_dropout > 0 else 0


def last_stage_extra_bytes(shape: ActivationShape) -> int:
    """Final norm input, output-layer input and the fp32 log-probabilities of the cross-entropy."""
    r = shape.tensor_parallel if shape.sequence_parallel else 1
    e, tokens, h = element_bytes(shape.precision), shape.tokens, shape.model.hidden_size
    return e * tokens * h // r + e * tokens * h + 4 * tokens * shape.vocab // shape.tensor_parallel


def stage_activation_bytes(shape: ActivationShape, layers: int, *, first: bool, last: bool, in_flight: int = 1,
                           checkpointed: Optional[bool] = None) -> int:
    """Activations of a pipeline stage with ``layers`` transformer layers and ``in_flight`` micro-batches alive
    (``checkpointed``: with activation checkpointing; None = as the model config says)."""
    ckpt = shape.model.checkpoint_activations if checkpointed is None else checkpointed
    total = _layers_bytes(shape, layers, in_flight, ckpt)
    if first:
        total += in_flight * first_stage_extra_bytes(shape)
    if last:
        total += last_stage_extra_bytes(shape)
    return total


__all__ = ["ActivationShape", "ELEMENT_BYTES", "TrainingState", "element_bytes", "first_stage_extra_bytes",
           "last_stage_extra_bytes", "layer_activation_bytes", "optimizer_bytes_per_param", "stage_activation_bytes",
           "training_state"]
