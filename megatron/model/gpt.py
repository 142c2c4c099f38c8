"""The GPT-NeoX / Pythia / Llama-style decoder-only language model.

``GPTModel(model_cfg, sepllm_cfg)`` maps ``input_ids [B, S]`` to ``logits [B, S, V]``. It contains no distributed
logic: data/tensor/pipeline parallelism are applied around it. Attention goes through ``self.attention_backend``
(``CausalSDPABackend`` or the SepLLM backend), whose ``prepare`` runs once per forward.

Positions: by default ``0..S-1``; with a 2-D padding mask they count real tokens only (HF convention), so a
left-padded row sees the same positions as the unpadded sequence. With BiPE (``sepllm_cfg.USE_BiPE``) positions are
derived from the token ids (spec §1.8): a learned table indexed by the intra-segment id is added to the word
embeddings, and rotary / ALiBi use the inter-segment id.

Packed documents (GPT-NeoX ``reset_position_ids`` / ``reset_attention_mask``): the trainer passes positions restarted
per document and ``document_ids``; every attention path then keeps each query inside its own document (SepLLM's
initial tokens count from each document's start, see ``megatron.sepllm.attention.rules``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.config.model import ModelConfig
from megatron.config.sepllm import SepLLMConfig
from megatron.kernels.plan import log_fusion_choice
from megatron.model.attention_backend import AttentionBackend, build_attention_backend
from megatron.model.context import ModelContext
from megatron.model.init import init_weights
from megatron.model.norms import build_norm
from megatron.model.recompute import run_checkpointed
from megatron.model.transformer import TransformerLayer

logger = logging.getLogger(__name__)


class GPTModel(nn.Module):
    """Decoder-only LM: embedding -> ``num_layers`` x ``TransformerLayer`` -> final norm -> output head.

    ``self.context`` (:class:`megatron.model.context.ModelContext`) checks and resolves the config once and supplies
    the positions; ``self.attention_backend`` may be swapped (tests, retention statistics)."""

    def __init__(self, model_cfg: ModelConfig, sepllm_cfg: Optional[SepLLMConfig] = None) -> None:
        super().__init__()
        self.context = ModelContext(model_cfg, sepllm_cfg)
        cfg = self.cfg = self.context.cfg
        self.sepllm_cfg = sepllm_cfg
        self.embed = self.context.build_embedding()
        self.layers = nn.ModuleList(TransformerLayer(cfg, i) for i in range(cfg.num_layers))
        self.final_layernorm = build_norm(cfg)
        self.output_layer = (nn.Linear(cfg.hidden_size, cfg.padded_vocab_size, bias=False)
                             if cfg.no_weight_tying else None)
        self.attention_backend: AttentionBackend = build_attention_backend(cfg, sepllm_cfg)
        self.init_weights()
        log_fusion_choice(cfg, logger)  # one message per model for fusion keys that cannot be honoured

    def init_weights(self) -> None:
        """(Re-)initialise all parameters with the configured init methods (e.g. after building on ``meta`` and
        ``to_empty``, as FSDP-style wrappers do)."""
        init_weights(self, self.cfg)

    # ----------------------------------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, position_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, kv_cache: Any = None, logits_to_keep: int = 0,
                head_loss: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                document_ids: Optional[Tensor] = None) -> Tensor:
        """``input_ids [B, S]`` (+ optional ``position_ids [B, S]``, 2-D ``attention_mask`` 1 = real, 0 = pad)
        -> logits ``[B, S, padded_vocab_size]`` in the model's dtype. ``logits_to_keep = n > 0``: logits of the last
        ``n`` positions only (decoding needs one; the output projection is most of a small model's prompt cost).

        ``head_loss(hidden, weight)`` (training with a fused loss, ``megatron.model.fused_loss``): returns its value
        on the final-norm hidden states ``[B, S, H]`` and the output weight instead of the logits, so the loss runs
        inside the forward (where ZeRO-3 has the weight gathered) and no ``[B, S, V]`` tensor is formed.

        ``kv_cache`` (inference, see ``megatron.inference.kv_cache``): ``input_ids`` are only the new tokens of this
        step (the prompt first, then one token per step) and ``attention_mask`` their 0/1 padding mask; the cache
        supplies the positions and the attention over the stored keys.

        ``document_ids [B, S]`` (``reset_attention_mask``, from ``megatron.data.documents.document_ids``): a query
        attends only keys of its own document (not with ``kv_cache``)."""
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0 (0 = every position), got {logits_to_keep}")
        if document_ids is not None:
            if kv_cache is not None:
                raise ValueError("document_ids (reset_attention_mask) apply to whole sequences, not to KV-cache "
                                 "decoding")
            if document_ids.shape != input_ids.shape:
                raise ValueError(f"document_ids must be [batch, seq] like input_ids {tuple(input_ids.shape)}, got "
                                 f"{tuple(document_ids.shape)}")
        if kv_cache is not None:
            return self._forward_cached(input_ids, attention_mask, kv_cache, logits_to_keep)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must be 2-D [batch, seq] like input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        if position_ids is not None and position_ids.shape != input_ids.shape:
            if position_ids.dim() == 2 and position_ids.shape[0] == 1 and position_ids.shape[1] == input_ids.shape[1]:
                position_ids = position_ids.expand_as(input_ids)
            else:
                raise ValueError(f"position_ids must be [batch, seq] like input_ids {tuple(input_ids.shape)}, got "
                                 f"{tuple(position_ids.shape)}")
        rel_pos, abs_pos = self.context.positions(input_ids, position_ids, attention_mask)
        x = self.embed(input_ids, abs_pos if self.embed.uses_positions else None)
        rotary = self.context.rotary(rel_pos, x.dtype)
        if document_ids is None:
            state = self.attention_backend.prepare(input_ids, rel_pos, attention_mask)
        else:
            state = self.attention_backend.prepare(input_ids, rel_pos, attention_mask, document_ids=document_ids)
        x = self.run_layers(x, rotary, state)
        if head_loss is not None:
            return head_loss(self.final_layernorm(x), self._output_weight())
        return self._logits(x, logits_to_keep)

    def _output_weight(self) -> Tensor:
        return self.output_layer.weight if self.output_layer is not None else self.embed.word_embeddings.weight

    def _logits(self, x: Tensor, logits_to_keep: int) -> Tensor:
        """Final norm and output projection of the last ``logits_to_keep`` positions (0 = all)."""
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return F.linear(self.final_layernorm(x), self._output_weight())

    def _forward_cached(self, input_ids: Tensor, attention_mask: Optional[Tensor], kv_cache: Any,
                        logits_to_keep: int = 0) -> Tensor:
        """One decoding step through ``kv_cache`` (positions count each row's real tokens, as without a cache)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, new tokens], got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask of a cached step must be [batch, new tokens] like input_ids "
                             f"{tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
        if self.context.use_bipe:
            raise ValueError("USE_BiPE positions depend on the whole sequence: decode without a KV cache")
        positions = kv_cache.begin_step(input_ids, attention_mask)
        x = self.embed(input_ids, positions if self.embed.uses_positions else None)
        rotary = self.context.rotary(positions, x.dtype)
        state = kv_cache.prepare(self.attention_backend, input_ids, positions, attention_mask)
        for layer in self.layers:
            x = layer(x, rotary, self.attention_backend, state, kv_cache)
        kv_cache.end_step()
        return self._logits(x, logits_to_keep)

    def run_layers(self, x: Tensor, rotary: Optional[tuple[Tensor, Tensor]], state: Any) -> Tensor:
        """All layers; with activation checkpointing on, recomputed in backward as ``activation_checkpoint_mode``
        says (full: chunks of ``checkpoint_num_layers``; selective: ``megatron.model.recompute``)."""
        backend = self.attention_backend
        if not (self.cfg.checkpoint_activations and torch.is_grad_enabled()):
            for layer in self.layers:
                x = layer(x, rotary, backend, state)
            return x
        cfg = self.cfg
        return run_checkpointed(self.layers, x, functools.partial(_run_chunk, rotary=rotary, backend=backend,
                                                                  state=state),
                                cfg.activation_checkpoint_mode, cfg.checkpoint_num_layers, cfg.selective_ac_option)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (tied weights once); ``exclude_embeddings`` drops the input word/position tables."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= sum(p.numel() for p in self.embed.parameters())
        return total


def _run_chunk(chunk: nn.ModuleList, x: Tensor, rotary: Optional[tuple[Tensor, Tensor]], backend: AttentionBackend,
               state: Any) -> Tensor:
    for layer in chunk:
        x = layer(x, rotary, backend, state)
    return x
