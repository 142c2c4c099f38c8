"""FlexAttention SepLLM path: a BlockMask built from the ``[B, S]`` global-key bit-vector (never an S x S tensor).

``mask_mod = causal & (global[b, kv] | q - kv < w) & (valid[b, kv] | q == kv)`` is the rule of ``rules.py`` written
as a predicate (spec §7 item 14); with documents it also requires ``kv >= doc_start[b, q]``. One BlockMask per distinct pattern per micro-batch; ``flex_attention`` is compiled
once per ``FlexRunner`` and reused. On CPU torch has no FlexAttention backward, so inputs that require grad are
rejected with a clear error (train on CPU with ``compact`` or ``dense``).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch

from megatron.sepllm.attention.checks import SepAttentionConfigError, check_flex_available


def sep_mask_mod(global_keys: torch.Tensor, key_valid: Optional[torch.Tensor], window: int,
                 doc_start: Optional[torch.Tensor] = None) -> Callable:
    """The rule over the raw ``S x S`` layout as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` (with
    ``doc_start [B, S]``: only keys of the query's document)."""
    g = global_keys.contiguous()
    # window and validity are captured as tensors so every pattern shares one traced predicate (no recompiles)
    w = torch.tensor(int(window), device=g.device)
    valid = (torch.ones_like(g) if key_valid is None else key_valid).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return ((kv_idx <= q_idx) & (g[b, kv_idx] | (q_idx - kv_idx < w))
                & (valid[b, kv_idx] | (q_idx == kv_idx)))
    if doc_start is None:
        return mask_mod
    ds = doc_start.to(g.device).contiguous()

    def doc_mask_mod(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx) & (kv_idx >= ds[b, q_idx])
    return doc_mask_mod


def check_flex_call(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> None:
    """What FlexAttention cannot do, said in the user's terms: dropout, and a backward pass on CPU."""
    if dropout_p > 0.0:
        raise SepAttentionConfigError(
            f"attention dropout {dropout_p} is not supported by sep_attention_impl='{impl}' (FlexAttention has no "
            "dropout); set attention_dropout to 0 or use sep_attention_impl='dense'")
    if q.device.type == "cpu" and any(t.requires_grad for t in (q, k, v)):
        raise SepAttentionConfigError(
            f"sep_attention_impl='{impl}' cannot train on CPU: torch has no FlexAttention backward on CPU. "
            f"Use sep_attention_impl='compact' (fast) or 'dense' for CPU training; {impl} is forward-only here")


class FlexRunner:
    """Holds the compiled ``flex_attention`` (and optionally compiled ``create_block_mask``) of one backend."""

    def __init__(self, block_size: int = 128, compile_block_mask: bool = False, compile_kernel: bool = True):
        check_flex_available()
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self.block_size = int(block_size)
        #: the (compiled) ``flex_attention``, shared by the flex and flex_compact paths on CUDA
        self.kernel = torch.compile(flex_attention, dynamic=False) if compile_kernel else flex_attention
        self._eager_kernel = flex_attention
        #: the (optionally compiled) ``create_block_mask``
        self.create_block_mask = torch.compile(create_block_mask) if compile_block_mask else create_block_mask

    def kernel_for(self, device: torch.device) -> Callable:
        """The kernel for tensors on ``device``: the compiled one on CUDA; on CPU the eager one, because torch 2.13's
        compiled CPU flex attention returns wrong values at some sequence lengths (e.g. 40, even for a plain causal
        mask: max error 0.1 against SDPA), and CPU runs it forward-only anyway."""
        if torch.device(device).type == "cuda":
            return self.kernel
        return _quiet_eager(self._eager_kernel)

    def block_mask(self, global_keys: torch.Tensor, key_valid: Optional[torch.Tensor], window: int,
                   doc_start: Optional[torch.Tensor] = None) -> Any:
        """BlockMask of the SepLLM rule for one pattern (B per row, heads broadcast; documents when given)."""
        batch, seq_len = global_keys.shape
        return self.create_block_mask(sep_mask_mod(global_keys, key_valid, window, doc_start), B=batch, H=None,
                                      Q_LEN=seq_len,
                            KV_LEN=seq_len, device=global_keys.device, BLOCK_SIZE=self.block_size)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, *, scale: float,
                 alibi_slopes: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                 dropout_p: float = 0.0) -> torch.Tensor:
        check_flex_call("flex", q, k, v, dropout_p)
        score_mod = None
        if alibi_slopes is not None:
            slopes = alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous()
            pos = position_ids.to(device=q.device, dtype=torch.float32).contiguous()

            def score_mod(score, b, h, q_idx, kv_idx):
                return score - slopes[h] * (pos[b, q_idx] - pos[b, kv_idx])
        gqa = q.shape[1] != k.shape[1]
        return self.kernel_for(q.device)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                         enable_gqa=gqa)


def _quiet_eager(kernel: Callable) -> Callable:
    """``kernel`` without torch's "called without torch.compile" warning (chosen on purpose on CPU, see above)."""
    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*without torch.compile.*")
            return kernel(*args, **kwargs)
    return run
