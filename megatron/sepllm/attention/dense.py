"""Dense SepLLM attention: a boolean ``[B, 1, S, S]`` mask into SDPA (the reference's "NOkernel" semantics).

Cost is that of full attention (the mask only removes probabilities); it is the semantic baseline the faster paths
are checked against, and the only path that supports attention dropout.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron.sepllm.attention import rules


def build_dense_mask(global_keys: torch.Tensor, window: int, key_valid: Optional[torch.Tensor],
                     doc_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, 1, S, S]`` bool, True = attend (rule + padding + documents; a padded query keeps its own diagonal)."""
    return rules.padded_allowed_mask(global_keys, window, key_valid, doc_start).unsqueeze(1)


def alibi_bias(slopes: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, S]`` float32 ALiBi bias ``-slope_h * (pos_q - pos_k)`` from ``position_ids [B, S]``."""
    pos = position_ids.to(torch.float32)
    diff = pos[:, None, :, None] - pos[:, None, None, :]
    return -slopes.to(device=pos.device, dtype=torch.float32).view(1, -1, 1, 1) * diff


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, *, scale: float,
                dropout_p: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SDPA on 4-D inputs with a boolean keep-mask (and ALiBi as an additive float mask)."""
    if alibi_slopes is None:
        mask = keep
    else:
        mask = alibi_bias(alibi_slopes, position_ids).masked_fill(~keep, float("-inf")).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, dropout_p: float = 0.0,
                     keep: Optional[torch.Tensor] = None, alibi_slopes: Optional[torch.Tensor] = None,
                     position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain causal attention (layers whose window covers the sequence). ``is_causal`` fast path when possible;
    ``keep`` is the padded causal mask when the batch has padding."""
    if keep is None and alibi_slopes is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale)
    if keep is None:
        s = q.shape[-2]
        keep = torch.ones(s, s, dtype=torch.bool, device=q.device).tril_()[None, None]
    return masked_sdpa(q, k, v, keep, scale=scale, dropout_p=dropout_p, alibi_slopes=alibi_slopes,
                       position_ids=position_ids)
