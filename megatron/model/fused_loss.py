"""Fused, chunked output layer + cross-entropy: the training loss without the ``[batch, seq, vocab]`` logits.

At a 50k vocabulary the output projection and its fp32 logits are the largest single cost of a small model's step:
the plain path keeps ``[B, S, V]`` logits, their fp32 copy and the softmax for backward. Here the logits of
``chunk_tokens`` tokens at a time are computed, turned into the loss and, in the same pass, into the gradients of
the hidden states and of the output weight; nothing of size ``[tokens, V]`` outlives its chunk. Backward only scales
the stored gradients by the incoming one. The result equals ``lm_loss(F.linear(hidden, weight), labels, mask)`` to
fp32 rounding, with the same masking rules (``labels < 0`` and ``loss_mask == 0`` ignored, mean over counted tokens).

A vocabulary split over tensor-parallel ranks is described by a :class:`VocabShard`: where this rank's rows start
and how to reduce per-token max / sums over the shards (the callables come from ``megatron.parallel``; this module
holds no distributed code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from megatron.model.loss import token_weights


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the vocabulary: rows ``[start, start + weight rows)``; ``all_max`` / ``all_sum`` reduce a
    tensor in place over the ranks that hold the other slices."""

    start: int
    all_max: Callable[[Tensor], None]
    all_sum: Callable[[Tensor], None]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in one chunked forward pass; backward scales them."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, weights: Tensor,  # type: ignore[override]
                chunk: int, shard: Optional[VocabShard], with_grad: bool) -> Tensor:
        shape = hidden.shape
        h = hidden.reshape(-1, shape[-1])
        lab = labels.reshape(-1)
        tok_w = weights.reshape(-1)
        denom = tok_w.sum().clamp(min=1.0)
        local_vocab = weight.shape[0]
        start = shard.start if shard is not None else 0
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if with_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grad else None
        for lo in range(0, h.shape[0], chunk):
            hc = h[lo:lo + chunk]
            z = (hc @ weight.t()).to(torch.float32)                       # [c, V_local], the only big buffer
            zmax = z.amax(dim=-1)
            if shard is not None:
                shard.all_max(zmax)
            local = lab[lo:lo + chunk] - start
            inside = (local >= 0) & (local < local_vocab)
            idx = local.clamp(0, local_vocab - 1).unsqueeze(-1)
            picked = z.gather(-1, idx).squeeze(-1) - zmax
            z.sub_(zmax.unsqueeze(-1)).exp_()                              # z now holds exp(z - max)
            sums = torch.stack([z.sum(dim=-1), picked * inside.to(z.dtype)])
            if shard is not None:
                shard.all_sum(sums)
            sum_exp, target = sums[0], sums[1]
            w = tok_w[lo:lo + chunk]
            loss_sum += ((sum_exp.log() - target) * w).sum()
            if not with_grad:
                continue
            # d loss / d z = w / denom * (softmax - one_hot(label)), formed in place in the chunk's buffer
            z.mul_((w / denom / sum_exp).unsqueeze(-1))
            z.scatter_add_(-1, idx, -(w / denom * inside.to(z.dtype)).unsqueeze(-1))
            g = z.to(h.dtype)
            grad_h[lo:lo + chunk] = g @ weight
            grad_w.addmm_(g.t().to(torch.float32) if g.dtype != torch.float32 else g.t(),
                          hc.to(torch.float32) if hc.dtype != torch.float32 else hc)
        if with_grad:
            ctx.save_for_backward(grad_h.reshape(shape), grad_w.to(weight.dtype))
        return loss_sum / denom

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None, None, None, None


def fused_lm_loss(hidden: Tensor, weight: Tensor, labels: Tensor, loss_mask: Optional[Tensor] = None, *,
                  chunk_tokens: int = 1024, shard: Optional[VocabShard] = None) -> Tensor:
    """``lm_loss(F.linear(hidden, weight), labels, loss_mask)`` computed ``chunk_tokens`` tokens at a time.

    ``hidden [B, S, H]`` are the final-norm outputs, ``weight [V, H]`` the output layer (this rank's rows under a
    ``shard``), ``labels [B, S]`` aligned targets. The logits are formed in ``hidden``'s dtype and the softmax in
    fp32, as the plain path does with ``upcast``. Gradients are computed during the forward when autograd needs them.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"fused_lm_loss: hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree")
    if chunk_tokens < 1:
        raise ValueError(f"fused_lm_loss: chunk_tokens must be >= 1, got {chunk_tokens}")
    vocab = weight.shape[0] if shard is None else None
    if vocab is not None and labels.numel() and int(labels.max()) >= vocab:
        raise ValueError(f"fused_lm_loss: labels must lie below the vocabulary size {vocab}, got {int(labels.max())}")
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    weights = token_weights(labels, loss_mask, "fused_lm_loss")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, weights, int(chunk_tokens), shard, with_grad)


@dataclass(frozen=True)
class FusedLMLoss:
    """The trainer's fused loss: ``model(tokens, head_loss=...)`` hands it the final hidden states and the output
    weight inside the model's forward (where ZeRO-3 has the weight gathered)."""

    chunk_tokens: int = 1024
    shard: Optional[VocabShard] = None

    def __call__(self, hidden: Tensor, weight: Tensor, labels: Tensor, loss_mask: Optional[Tensor] = None) -> Tensor:
        return fused_lm_loss(hidden, weight, labels, loss_mask, chunk_tokens=self.chunk_tokens, shard=self.shard)


__all__ = ["FusedLMLoss", "VocabShard", "fused_lm_loss"]
