"""``SepLLMBackend``: the SepLLM implementation of the model's ``AttentionBackend`` protocol.

``prepare`` evaluates the rule once per micro-batch (``plan.build_plan``), builds what the chosen execution path
needs for each distinct pattern (dense mask, FlexAttention BlockMask or compact gather layout) and updates the
retention counters; ``__call__`` runs one layer. Execution paths (``sep_attention_impl``):

* ``dense``   -- boolean mask into SDPA (reference "NOkernel" semantics, supports dropout and SA softmax);
* ``flex``    -- FlexAttention BlockMask from the ``[B, S]`` bit-vector (GPU training; CPU forward only);
* ``compact`` -- gathered global keys + banded window in one exact softmax (work ~ kept keys; CPU/GPU training);
* ``flex_compact`` -- FlexAttention over ``[gathered global keys] ++ [S keys]``: the BlockMask is a staircase plus a
  band, so the work scales with the kept keys (GPU training; CPU forward only);
* ``triton``  -- the same key layout through our own Triton kernels, forward and backward, which walk the non-empty
  tiles in closed form (CUDA; needs the ``triton`` package);
* ``auto``    -- ``USE_SEP_ATTN_KERNEL_ACCELERATOR: False`` => dense. Otherwise the measured table
  (``megatron.sepllm.attention.auto_table``, written by ``benchmarks/sep_attention.py --write-auto-table``) for this device
  type, sequence length and window; where it has no entry, the written rule: compact on CPU, flex_compact on CUDA
  (the CUDA table stays empty until a GPU run fills it).

Layers whose window covers the sequence (H/HT layers, ``mode: full``) run plain causal SDPA on the fast path (with
padding or documents: SDPA with the dense padded / document-causal mask).
A full-attention model with ``sliding_window_width`` W (Mistral) runs here too, as mode ``sliding_window``: no
initial tokens, no separators and a ``W + 1`` window (``settings_of``), on whichever path ``sep_attention_impl`` picks.

Documents (``reset_attention_mask``, ``prepare(..., document_ids=)``): every path keeps each query inside its own
document (``k >= doc_start[q]``, see ``rules.py``); initial tokens are the first ``a`` tokens of every document.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Optional

import torch

from megatron.config.model import ModelConfig
from megatron.config.sepllm import SepLLMConfig
from megatron.sepllm.attention import auto_table, checks
from megatron.sepllm.attention.compact import build_compact_layout, compact_attention
from megatron.sepllm.attention.dense import alibi_bias, build_dense_mask, causal_attention, masked_sdpa
from megatron.sepllm.attention.flex_compact import build_flex_compact_layout, flex_compact_attention
from megatron.sepllm.attention.plan import PatternPlan, SepPlan, build_plan
from megatron.sepllm.attention.retention import RetentionStats, pattern_counts
from megatron.sepllm.attention.sa_softmax import sa_attention

logger = logging.getLogger(__name__)


def _expand_kv(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """Grouped-query attention: repeat each KV head for its ``Hq / Hkv`` query heads."""
    hkv = x.shape[1]
    if hkv == num_q_heads:
        return x
    if num_q_heads % hkv:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of key/value heads ({hkv})")
    return x.repeat_interleave(num_q_heads // hkv, dim=1)


class SepLLMBackend:
    """SepLLM / StreamingLLM / FixLLM / SA / sliding-window attention for ``GPTModel`` (see module docstring)."""

    def __init__(self, sepllm_cfg: SepLLMConfig, model_cfg: ModelConfig, *, compact_block_size: Optional[int] = None,
                 compact_engine: str = "auto"):
        self.cfg = sepllm_cfg        # the user's config, kept for inspection; the backend reads only ``settings``
        self.num_layers = int(model_cfg.num_layers)
        self.settings = checks.check_backend_config(sepllm_cfg, self.num_layers,
                                                    sliding_window_width=model_cfg.sliding_window_width)
        self.layer_windows = list(self.settings.prefill_windows)
        self.layer_intervals: list[Optional[int]] = (list(self.settings.fixed_intervals)
                                                     if self.settings.fixed_intervals is not None
                                                     else [None] * self.num_layers)
        self.separator_ids = list(self.settings.separator_ids) or None
        self.num_initial = self.settings.num_initial
        self.compact_block_size = compact_block_size
        self.compact_engine = compact_engine
        self.retention = RetentionStats(self.num_layers)
        self._flex_runner = None
        self._logged: set = set()
        if self.settings.recompile_kernel and self.settings.impl in ("dense", "compact", "flex_compact", "triton"):
            logger.warning("RECOMPILE_SEP_ATTN_KERNEL=True has no effect with sep_attention_impl=%r (flex only)",
                           self.settings.impl)

    # ------------------------------------------------------------------------------------------- path selection
    def resolve_impl(self, device: torch.device, seq_len: Optional[int] = None) -> str:
        """The execution path for ``device``: explicit ``sep_attention_impl`` wins, else ``auto``: the measured
        table at ``seq_len`` (see ``auto_table``), else the written rule."""
        chosen = self.settings.impl
        if self.settings.mode in checks.DENSE_ONLY_MODES:
            impl = "dense"
        elif chosen != "auto":
            impl = chosen
        elif not self.settings.use_accelerator:
            impl = "dense"
        else:
            dev_type = torch.device(device).type
            sparse = [w for w in self.layer_windows if seq_len is None or w < seq_len]
            impl = auto_table.lookup(dev_type, seq_len, min(sparse)) if sparse else None
            if impl == "triton" and importlib.util.find_spec("triton") is None:
                impl = None                     # measured fastest, but not installed here: the written rule
            if impl is None:
                impl = "flex_compact" if dev_type == "cuda" else "compact"
        key = (impl, torch.device(device).type)
        if key not in self._logged:
            self._logged.add(key)
            logger.info("SepLLM attention: mode=%s, sep_attention_impl=%s -> %s path on %s", self.settings.mode,
                        chosen, impl, key[1])
        return impl

    def _flex(self):
        if self._flex_runner is None:
            from megatron.sepllm.attention.flex import FlexRunner

            self._flex_runner = FlexRunner(block_size=self.settings.sparse_block_size,
                                           compile_block_mask=self.settings.recompile_kernel)
        return self._flex_runner

    # ------------------------------------------------------------------------------------------- protocol
    def prepare(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask_2d: Optional[torch.Tensor], document_ids: Optional[torch.Tensor] = None) -> SepPlan:
        """Build the micro-batch plan shared by all layers and add its counts to ``self.retention``
        (``document_ids [B, S]``: attention stays inside each document)."""
        impl = self.resolve_impl(input_ids.device, int(input_ids.shape[-1]))
        plan = build_plan(input_ids, position_ids, attention_mask_2d, impl=impl, mode=self.settings.mode,
                          layer_windows=self.layer_windows, layer_intervals=self.layer_intervals,
                          separator_ids=self.separator_ids, num_initial=self.num_initial,
                          batch_adaptive_init=self.settings.batch_adaptive_init_pos, document_ids=document_ids)
        counts = {}
        for pattern in plan.distinct_patterns():
            counts[id(pattern)] = pattern_counts(pattern.global_keys, pattern.window, plan.key_valid, plan.doc_start)
            if not pattern.full:
                pattern.artifact = self._build_artifact(plan, pattern)
        for layer, pattern in enumerate(plan.layer_patterns):
            self.retention.update(layer, *counts[id(pattern)])
        self.retention.count_forward()
        return plan

    def _build_artifact(self, plan: SepPlan, pattern: PatternPlan) -> Any:
        ds = plan.doc_start
        if plan.impl == "dense":
            return build_dense_mask(pattern.global_keys, pattern.window, plan.key_valid, ds)
        if plan.impl == "flex":
            return self._flex().block_mask(pattern.global_keys, plan.key_valid, pattern.window, ds)
        if plan.impl == "triton":
            from megatron.sepllm.attention import triton_compact

            triton_compact.check_triton_ready(plan.position_ids.device)
            layout = build_flex_compact_layout(pattern.global_keys, plan.key_valid, pattern.window, plan.position_ids,
                                               block=triton_compact.LAYOUT_BLOCK, doc_start=ds)
            return triton_compact.build_triton_layout(layout)
        if plan.impl == "flex_compact":
            runner = self._flex()
            layout = build_flex_compact_layout(pattern.global_keys, plan.key_valid, pattern.window,
                                               plan.position_ids, block=runner.block_size, doc_start=ds)
            layout.attach_block_mask()          # closed form from the layout's tiles (no S x (N_pad + S) mask)
            return layout
        return build_compact_layout(pattern.global_keys, plan.key_valid, pattern.window, plan.position_ids,
                                    block=self.compact_block_size, doc_start=ds)

    def _padded_causal(self, plan: SepPlan) -> Optional[torch.Tensor]:
        """The mask of full-attention layers: None (plain ``is_causal``) unless the batch has padding or
        documents, then the dense padded / document-causal mask (built once per plan)."""
        if plan.key_valid is None and plan.doc_start is None:
            return None
        if "padded_causal" not in plan.extras:
            zeros = torch.zeros(plan.batch, plan.seq_len, dtype=torch.bool, device=plan.position_ids.device)
            plan.extras["padded_causal"] = build_dense_mask(zeros, plan.seq_len, plan.key_valid, plan.doc_start)
        return plan.extras["padded_causal"]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int, state: Any, *,
                 scale: float, dropout_p: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None) -> torch.Tensor:
        plan: SepPlan = state
        if not isinstance(plan, SepPlan):
            raise TypeError("SepLLMBackend expects the state returned by its own prepare()")
        if q.dim() != 4 or q.shape[-2] != plan.seq_len or k.shape[-2] != plan.seq_len:
            raise ValueError(f"q/k/v must be [B, H, S, D] with S = {plan.seq_len} (from prepare); got q "
                             f"{tuple(q.shape)}, k {tuple(k.shape)}")
        pattern = plan.pattern(layer_idx)
        pos = plan.position_ids
        if plan.mode in checks.DENSE_ONLY_MODES:
            keep = self._padded_causal(plan)
            if keep is None:
                keep = torch.ones(plan.seq_len, plan.seq_len, dtype=torch.bool, device=q.device).tril_()[None, None]
            bias = alibi_bias(alibi_slopes, pos) if alibi_slopes is not None else None
            return sa_attention(q, _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1]), keep, scale=scale,
                                no_denominator=plan.mode == "sa_no_deno",
                                numerator_bias=self.settings.sa_numerator_bias,
                                denominator_bias=self.settings.sa_denominator_bias, additive_bias=bias,
                                dropout_p=dropout_p, training=dropout_p > 0)
        if pattern.full:
            return causal_attention(q, _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1]), scale=scale,
                                    dropout_p=dropout_p, keep=self._padded_causal(plan), alibi_slopes=alibi_slopes,
                                    position_ids=pos)
        impl = plan.impl
        if impl == "flex":
            return self._flex()(q, k, v, pattern.artifact, scale=scale, alibi_slopes=alibi_slopes, position_ids=pos,
                                dropout_p=dropout_p)
        auto_dropout = dropout_p > 0.0 and self.settings.impl == "auto"   # auto may fall back to a dense call
        if impl == "flex_compact" and not auto_dropout:
            return flex_compact_attention(self._flex().kernel_for(q.device), q, k, v, pattern.artifact, scale=scale,
                                          alibi_slopes=alibi_slopes, dropout_p=dropout_p)
        if impl == "triton" and not auto_dropout:
            from megatron.sepllm.attention.triton_compact import triton_compact_attention

            return triton_compact_attention(q, k, v, pattern.artifact, scale=scale, alibi_slopes=alibi_slopes,
                                            dropout_p=dropout_p)
        k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        if impl in ("compact", "flex_compact", "triton"):
            if dropout_p > 0.0:
                if self.settings.impl == "compact":
                    raise checks.SepAttentionConfigError(
                        f"attention dropout {dropout_p} is not supported by sep_attention_impl='compact'; set "
                        "attention_dropout to 0 or use sep_attention_impl='dense'")
                # auto chose a path without dropout: this call runs on the dense mask instead
                keep = build_dense_mask(pattern.global_keys, pattern.window, plan.key_valid, plan.doc_start)
                return masked_sdpa(q, k, v, keep, scale=scale, dropout_p=dropout_p, alibi_slopes=alibi_slopes,
                                   position_ids=pos)
            return compact_attention(q, k, v, pattern.artifact, scale=scale, alibi_slopes=alibi_slopes,
                                     engine=self.compact_engine)
        return masked_sdpa(q, k, v, pattern.artifact, scale=scale, dropout_p=dropout_p, alibi_slopes=alibi_slopes,
                           position_ids=pos)
