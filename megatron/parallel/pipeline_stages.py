"""The pipeline-stage modules: ``GPTModel``'s parts re-wrapped to take and return the tuples a pipeline sends.

Every module between the embedding and the final norm maps ``(hidden [B,S,H], input_ids [B,S] int64)`` to the same
tuple. Carrying the token ids along with the activations is how the SepLLM per-token information reaches every
stage: the attention plan, the rotary tables and the BiPE ids are pure functions of the ids, so each stage
recomputes them once per micro-batch (:class:`StageContext`) instead of shipping opaque plan objects between ranks.
The ids cost ``8 B`` per token next to ``H x 2-4 B`` of activations and need no gradient (the pipeline engine sends
gradients only for floating-point tensors).

Packed documents (``reset_position_ids`` / ``reset_attention_mask``): the stage context is told which of the batch's
``position_ids`` / ``document_ids`` a run carries (``StageContext(..., carries=...)``); the data iterator then hands
``(input_ids, *carried)`` to the first stage and every stage passes ``(hidden, input_ids, *carried)`` on, so each
stage positions and plans the micro-batch exactly as ``GPTModel.forward(position_ids=, document_ids=)`` does.

The parameter names inside each module match ``GPTModel``'s (``embed.*``, ``final_layernorm.*``, ``output_layer.*``;
a transformer layer's ``layer.*`` is ``layers.<i>.*``) so that state dicts map one-to-one (``to_gpt_name``).

No distributed logic here: these are plain ``nn.Module`` s, usable (and tested) without a process group.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.config.model import ModelConfig
from megatron.config.sepllm import SepLLMConfig
from megatron.model.attention_backend import AttentionBackend, build_attention_backend
from megatron.model.context import ModelContext
from megatron.model.norms import build_norm
from megatron.model.transformer import TransformerLayer
from megatron.errors import UserInputError

StageTuple = tuple[Tensor, ...]
CARRIABLE = ("position_ids", "document_ids")   # the per-token inputs besides the ids a pipeline can carry, in order


class PipelineInputError(UserInputError, ValueError):
    """A pipeline stage received something other than what the previous stage (or the data iterator) must send."""


def _ids_of(inputs: Union[Tensor, tuple, list], carries: tuple[str, ...] = ()) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``(input_ids, carried tensors)`` from what the data iterator hands the first stage."""
    ids = inputs if isinstance(inputs, Tensor) else (inputs[0] if len(inputs) >= 1 else None)
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
        shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise PipelineInputError(f"the first pipeline stage expects integer input_ids [batch, seq] (or a 1-tuple of "
                                 f"them) from the data iterator, got {shape}")
    extra = () if isinstance(inputs, Tensor) else tuple(inputs[1:])
    if len(extra) != len(carries) or any(not isinstance(t, Tensor) or t.shape != ids.shape for t in extra):
        raise PipelineInputError(f"the first pipeline stage expects input_ids followed by {list(carries)} [batch, "
                                 f"seq] from the data iterator, got {len(extra)} more tensors")
    return ids, extra


def _unpack(inputs: Any, who: str, carries: tuple[str, ...] = ()) -> StageTuple:
    n = 2 + len(carries)
    if not (isinstance(inputs, (tuple, list)) and len(inputs) == n and all(isinstance(t, Tensor) for t in inputs)):
        raise PipelineInputError(f"{who} expects (hidden [B,S,H], input_ids [B,S]{''.join(', ' + c for c in carries)})"
                                 f" from the previous stage, got {type(inputs).__name__}")
    return tuple(inputs)


class StageContext:
    """What every layer of a stage needs besides its weights: ``GPTModel``'s own :class:`ModelContext` (the checked,
    resolved config, positions, rotary tables, the embedding's build) plus the attention backend and its plan.

    One instance is shared by the layers of a pipeline (each rank only runs its own stage's layers). ``prepare``
    memoises on the identity of the ``input_ids`` tensor: within a stage the same tensor object flows from layer to
    layer, so the plan is built once per micro-batch per stage. The cached tensor is kept referenced, so its ``id``
    cannot be reused by another tensor while cached; a different micro-batch simply replaces the entry.
    """

    def __init__(self, model_cfg: ModelConfig, sepllm_cfg: Optional[SepLLMConfig],
                 carries: tuple[str, ...] = ()) -> None:
        unknown = [c for c in carries if c not in CARRIABLE]
        if unknown:
            raise PipelineInputError(f"a pipeline can carry {list(CARRIABLE)} besides the token ids, not {unknown}")
        self.model = ModelContext(model_cfg, sepllm_cfg)
        self.cfg = self.model.cfg
        self.backend: AttentionBackend = build_attention_backend(model_cfg, sepllm_cfg)
        self.carries = tuple(c for c in CARRIABLE if c in carries)   # fixed order: positions, then documents
        self._cached_ids: Optional[Tensor] = None
        self._cached: Any = None

    def carried(self, extra: tuple[Tensor, ...]) -> dict[str, Tensor]:
        """The carried tensors by name (``position_ids`` / ``document_ids``)."""
        return dict(zip(self.carries, extra))

    def prepare(self, input_ids: Tensor, dtype: torch.dtype,
                extra: tuple[Tensor, ...] = ()) -> tuple[Optional[tuple[Tensor, Tensor]], Any]:
        """``(rotary cos/sin or None, backend state)`` for this micro-batch (memoised, see class docstring);
        ``extra``: the carried position / document ids."""
        if self._cached_ids is input_ids and self._cached[0] == dtype:
            return self._cached[1], self._cached[2]
        named = self.carried(extra)
        rel, _ = self.model.positions(input_ids, named.get("position_ids"))
        rotary = self.model.rotary(rel, dtype)
        if "document_ids" in named:
            state = self.backend.prepare(input_ids, rel, None, document_ids=named["document_ids"])
        else:
            state = self.backend.prepare(input_ids, rel, None)
        self._cached_ids, self._cached = input_ids, (dtype, rotary, state)
        return rotary, state


class EmbeddingPipe(nn.Module):
    """First stage: ``input_ids -> (embed(ids, positions), input_ids)``.

    With tied input/output embeddings it is also built on the last stage (``with_position_table=False`` there: only
    ``word_embeddings`` is used) and :func:`tied_head_forward` reads its weight; DeepSpeed keeps the copies in sync.
    """

    def __init__(self, context: StageContext, with_position_table: bool = True) -> None:
        super().__init__()
        self.embed = context.model.build_embedding(with_position_table)
        self.context = context

    def forward(self, inputs: Union[Tensor, tuple]) -> StageTuple:
        ids, extra = _ids_of(inputs, self.context.carries)
        _, abs_pos = self.context.model.positions(ids, self.context.carried(extra).get("position_ids"))
        return (self.embed(ids, abs_pos if self.embed.uses_positions else None), ids, *extra)

    @staticmethod
    def to_gpt_name(name: str) -> str:
        return name


class TransformerLayerPipe(nn.Module):
    """One ``TransformerLayer`` on ``(hidden, input_ids)``; the stage's shared context supplies rotary and plan."""

    def __init__(self, layer_idx: int, context: StageContext) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.layer = TransformerLayer(context.cfg, layer_idx)  # the resolved config (MLP widths, GeLU form)
        self.context = context

    def forward(self, inputs: StageTuple) -> StageTuple:
        x, ids, *extra = _unpack(inputs, f"transformer layer {self.layer_idx}", self.context.carries)
        rotary, state = self.context.prepare(ids, x.dtype, tuple(extra))
        return (self.layer(x, rotary, self.context.backend, state), ids, *extra)

    def to_gpt_name(self, name: str) -> str:
        return f"layers.{self.layer_idx}." + name[len("layer."):]


class FinalNormPipe(nn.Module):
    """``(hidden, input_ids, *carried) -> final_layernorm(hidden)``: the ids are not needed past the last layer."""

    def __init__(self, model_cfg: ModelConfig, carries: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.final_layernorm = build_norm(model_cfg)
        self.carries = tuple(carries)

    def forward(self, inputs: StageTuple) -> Tensor:
        x = _unpack(inputs, "the final norm", self.carries)[0]
        return self.final_layernorm(x)

    @staticmethod
    def to_gpt_name(name: str) -> str:
        return name


class HeadPipe(nn.Module):
    """Untied output layer: ``hidden -> logits`` (``no_weight_tying: true``)."""

    def __init__(self, model_cfg: ModelConfig) -> None:
        super().__init__()
        self.output_layer = nn.Linear(model_cfg.hidden_size, model_cfg.padded_vocab_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.output_layer(x)

    @staticmethod
    def to_gpt_name(name: str) -> str:
        return name


def tied_head_forward(embedding: EmbeddingPipe, x: Tensor) -> Tensor:
    """Tied output layer: logits from the (pipeline-synchronised) word-embedding matrix, as ``GPTModel`` does."""
    return F.linear(x, embedding.embed.word_embeddings.weight)
