"""What one model build derives from its config, once, shared by ``GPTModel`` and the pipeline stages.

``ModelContext(model_cfg, sepllm_cfg)`` is the single place where a model config is checked and resolved for
building (``megatron.config.model.resolve_model_config`` fills the per-layer attention types, MLP widths and GeLU
form that the layers read), and the one definition of what every layer needs besides its weights: the BiPE
separators, the rotary width, the input embedding and the positions of a batch. ``GPTModel`` holds one; a pipeline
holds one per rank and each stage module reads it, so a pipeline builds and positions exactly as ``GPTModel`` does.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from megatron.config.derived import FULL_ATTENTION_TYPES, POS_EMBS
from megatron.config.errors import ConfigError
from megatron.config.model import ModelConfig, resolve_model_config
from megatron.config.sepllm import SepLLMConfig
from megatron.model.attention import head_dim
from megatron.model.embeddings import Embedding
from megatron.model.positional import default_position_ids, rotary_cos_sin, rotary_ndims
from megatron.sepllm.attention.rules import bipe_position_ids, left_pad_counts


def bipe_separator_ids(sepllm_cfg: SepLLMConfig) -> list[int]:
    """BiPE separators: ``BiPE_seps``, else the SepLLM ``separator_token_ids``; loud error if neither is set."""
    seps = sepllm_cfg.BiPE_seps if sepllm_cfg.BiPE_seps is not None else sepllm_cfg.separator_token_ids
    if not seps:
        raise ValueError("SepLLM config key 'USE_BiPE' = True needs 'BiPE_seps' (or 'separator_token_ids') to list "
                         "the separator token ids")
    return [int(s) for s in seps]


def check_model_config(cfg: ModelConfig, sepllm_cfg: Optional[SepLLMConfig] = None) -> ModelConfig:
    """A resolved copy of ``cfg`` (the caller's config is left as given, so it can still be edited and built again),
    after refusing what no model can be built from, naming the key. Config validation catches all of this for loaded
    configs; configs made in code meet it here, before any module exists."""
    cfg = dataclasses.replace(cfg)
    try:
        resolve_model_config(cfg)
    except ConfigError as exc:  # the model's own errors are ValueErrors naming the model config
        raise ValueError(f"model config key {exc}") from None
    unsupported = sorted({t for t in cfg.attention_config if t not in FULL_ATTENTION_TYPES})
    if unsupported:
        raise ValueError(f"model config key 'attention_config' = {unsupported}: only {FULL_ATTENTION_TYPES} are "
                         f"supported (SepLLM sparsity is configured by the SepLLM keys instead)")
    if cfg.padded_vocab_size is None:
        raise ValueError("model config 'padded_vocab_size' is None: set it from the tokenizer (vocab size rounded "
                         "up to make_vocab_size_divisible_by) before building GPTModel")
    if cfg.pos_emb not in POS_EMBS:
        raise ValueError(f"model config key 'pos_emb' = {cfg.pos_emb!r}: expected one of {POS_EMBS}")
    if cfg.checkpoint_num_layers < 1:
        raise ValueError(f"model config key 'checkpoint_num_layers' = {cfg.checkpoint_num_layers}: expected >= 1")
    if cfg.output_layer_parallelism != "column":
        raise ValueError(f"model config key 'output_layer_parallelism' = {cfg.output_layer_parallelism!r}: only "
                         f"'column' is supported")
    if sepllm_cfg is not None and sepllm_cfg.USE_BiPE and cfg.pos_emb == "sinusoidal":
        raise ValueError("USE_BiPE reads a learned intra-segment position table; it cannot be combined with "
                         "pos_emb 'sinusoidal'")
    return cfg


class ModelContext:
    """The resolved config and the per-model values every layer shares (see the module docstring)."""

    def __init__(self, model_cfg: ModelConfig, sepllm_cfg: Optional[SepLLMConfig] = None) -> None:
        cfg = self.cfg = check_model_config(model_cfg, sepllm_cfg)
        self.sepllm_cfg = sepllm_cfg
        self.use_bipe = bool(sepllm_cfg is not None and sepllm_cfg.USE_BiPE)
        self.bipe_seps = bipe_separator_ids(sepllm_cfg) if self.use_bipe else []
        self.head_dim = head_dim(cfg)
        self.rotary_ndims = rotary_ndims(self.head_dim, cfg.rotary_pct) if cfg.pos_emb == "rotary" else 0
        self.max_positions = cfg.max_position_embeddings or cfg.seq_length

    def build_embedding(self, with_position_table: bool = True) -> Embedding:
        """The input embedding: a learned table for ``pos_emb: learned`` and for BiPE (indexed by intra-segment
        ids), GPT-NeoX's fixed sinusoidal table, OPT's offset. ``with_position_table=False``: word embeddings only
        (the tied output head on a pipeline's last stage)."""
        cfg = self.cfg
        learned = (cfg.pos_emb == "learned" or self.use_bipe) and with_position_table
        return Embedding(cfg.padded_vocab_size, cfg.hidden_size, self.max_positions if learned else None,
                         cfg.hidden_dropout, sinusoidal=cfg.pos_emb == "sinusoidal" and with_position_table,
                         position_offset=cfg.opt_pos_emb_offset)

    def positions(self, input_ids: Tensor, position_ids: Optional[Tensor] = None,
                  attention_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``(relative, absolute)`` position ids: the ones rotary / ALiBi use and the ones a position table reads.

        Without BiPE both are ``position_ids``, else ``0..S-1`` counting real tokens only (HF convention, so a
        left-padded row sees the unpadded row's positions). Given ``position_ids`` (e.g. restarted per document by
        ``reset_position_ids``) are used as they are. With BiPE they are (inter-segment, intra-segment) ids from the
        separator tokens; left padding is excluded from the first segment; given ``position_ids`` must count from
        each document start (``reset_position_ids``; ``0..S-1`` changes nothing) and only say where documents start:
        both BiPE ids restart there."""
        if not self.use_bipe:
            pos = position_ids if position_ids is not None else default_position_ids(input_ids, attention_mask)
            return pos, pos
        ids = input_ids
        if attention_mask is not None:
            ids = input_ids.masked_fill(~attention_mask.to(torch.bool), -1)  # padding is never a separator
        doc_start = None
        if position_ids is not None:
            if not _restarts_per_document(position_ids):
                raise ValueError("USE_BiPE computes position ids from the token ids; given position_ids may only "
                                 "restart them per document (reset_position_ids: 0 at each document start, +1 per "
                                 "token), else pass position_ids=None")
            doc_start = _restart_positions(position_ids)
        intra, inter = bipe_position_ids(ids, self.bipe_seps, doc_start)
        if attention_mask is not None:
            pad = left_pad_counts(attention_mask).unsqueeze(1)
            intra = torch.where(inter == 0, intra - pad, intra).clamp(min=0)
            intra = intra * attention_mask.to(intra.dtype)
        return inter, intra

    def rotary(self, positions: Tensor, dtype: torch.dtype) -> Optional[tuple[Tensor, Tensor]]:
        """Rotary ``(cos, sin)`` tables for ``positions``, or None without rotary positions."""
        if not self.rotary_ndims:
            return None
        return rotary_cos_sin(positions, self.rotary_ndims, self.cfg.rotary_emb_base, dtype)


def _restarts_per_document(position_ids: Tensor) -> bool:
    """Whether ``position_ids [B, S]`` count 0, 1, 2, ... from each document start (``document_positions``)."""
    if position_ids.shape[-1] == 0:
        return True
    step = position_ids[:, 1:]
    return bool((position_ids[:, 0] == 0).all() and ((step == 0) | (step == position_ids[:, :-1] + 1)).all())


def _restart_positions(position_ids: Tensor) -> Tensor:
    """``[B, S]``: for each token the last position at or before it whose position id is 0 (a document start)."""
    pos = torch.arange(position_ids.shape[-1], device=position_ids.device).expand_as(position_ids)
    return torch.cummax(torch.where(position_ids == 0, pos, torch.zeros_like(pos)), dim=-1).values


__all__ = ["ModelContext", "bipe_separator_ids", "check_model_config"]
