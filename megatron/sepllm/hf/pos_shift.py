"""Positional re-encoding of cached keys (spec §3.3, §3.4 item 4; fixes of §7 item 7).

Keys are cached without their rotary embedding. Every step the kept keys are rotated again with their index among the
row's valid cached keys (``0..n-1``), and the query with the index the current token has at the end of that range.
The cos/sin tables come from the model's own rotary module, so ``rope_theta``, RoPE scaling (llama3, linear, dynamic,
yarn attention factor) and partial rotary (GPT-NeoX ``rotary_pct``) are exactly the model's — nothing is hard-coded.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

RopeFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def find_rotary_module(model: nn.Module) -> nn.Module:
    """The model's rotary-embedding module (``LlamaRotaryEmbedding``, ``GPTNeoXRotaryEmbedding``, ...)."""
    for name, module in model.named_modules():
        if name.endswith("rotary_emb") and hasattr(module, "inv_freq"):
            return module
    raise ValueError(f"APPLY_PE_SHIFT needs a rotary model: no '*rotary_emb' module with inv_freq found in "
                     f"{type(model).__name__}")


def rope_fn_from_model(model: nn.Module) -> RopeFn:
    """``fn(x, position_ids[B, L]) -> (cos, sin)`` each ``[B, L, rotary_dim]`` using the model's rotary module."""
    rotary = find_rotary_module(model)

    def fn(x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary(x, position_ids=position_ids)

    return fn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x [B, H, L, D]`` (``cos/sin [B, L, r]``); the rest pass through."""
    r = cos.shape[-1]
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    rot, rest = x[..., :r], x[..., r:]
    out = rot * cos + _rotate_half(rot) * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def unapply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_rotary` for the same ``cos/sin`` (also exact when they carry an attention factor)."""
    r = cos.shape[-1]
    norm = (cos * cos + sin * sin)
    # rotate_half pairs dim i with i+r/2: both halves share cos/sin values, so the inverse is a rotation by -theta
    cos_i, sin_i = (cos / norm).unsqueeze(1).to(x.dtype), (sin / norm).unsqueeze(1).to(x.dtype)
    rot, rest = x[..., :r], x[..., r:]
    out = rot * cos_i - _rotate_half(rot) * sin_i
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out
