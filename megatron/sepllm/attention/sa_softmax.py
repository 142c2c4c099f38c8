"""Self-adjusting softmax (SA, spec §1.9), dense causal path only.

With raw scaled scores ``s`` and the masked softmax ``p`` over the allowed (causal, non-padding) entries:

* ``sa``:          ``p' = p * (s - lo + eps_n) / (hi - lo)``, ``lo = min(0, min_row s)``, ``hi = max(0, max_row s) + eps_d``
* ``sa_no_deno``:  ``p' = p * s``

with ``p' = 0`` outside the allowed entries and no renormalisation. Deliberate fixes relative to the reference
(spec §7 item 8): the bias values are actually used (the reference crashes with ``AttributeError``); the result is
computed in fp32 and cast back to the input dtype (the reference hard-casts to fp16, breaking bf16); the row min/max
run over the allowed (causal) entries only (the reference's ``tril`` lets the zeroed upper triangle join the min/max);
the denominator bias is added once (the reference adds it twice when the row max is positive).
"""

from __future__ import annotations

from typing import Optional

import torch


def sa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, *, scale: float,
                 no_denominator: bool = False, numerator_bias: float = 0.0, denominator_bias: float = 1e-10,
                 additive_bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                 training: bool = False) -> torch.Tensor:
    """SA attention for ``q [B,H,S,D]``, ``k, v [B,H,S,D]``, ``keep [B or 1, 1, S, S]`` bool; returns q's dtype.

    ``additive_bias`` (ALiBi) is added to the raw scores before both the softmax and the adjustment.
    """
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if additive_bias is not None:
        s = s + additive_bias.float()
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
    if no_denominator:
        adj = p * s
    else:
        lo = torch.clamp(s.masked_fill(~keep, float("inf")).amin(dim=-1, keepdim=True), max=0.0)
        hi = torch.clamp(s.masked_fill(~keep, float("-inf")).amax(dim=-1, keepdim=True), min=0.0) + denominator_bias
        adj = p * (s - lo + numerator_bias) / (hi - lo)
    adj = adj.masked_fill(~keep, 0.0)
    if dropout_p > 0.0 and training:
        adj = torch.nn.functional.dropout(adj, p=dropout_p)
    return torch.matmul(adj, v.float()).to(q.dtype)
