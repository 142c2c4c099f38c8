"""The reference SepCache's call options that concern layout, positional tables and carried-over state.

Users come with calls written for the authors' hub ``SepCache`` (``transformers-community/sep_cache``); those calls
must run unchanged. This module gives each such option its meaning here (or refuses it with one clear line):

* ``APPLY_PES_INSIDE`` with ``base`` / ``pe_dim`` / ``pe_scaling_factor`` / ``max_position_embeddings`` /
  ``partial_rotation_size``: with any of the frequency parameters given, the cache builds its own plain RoPE tables
  from them (the reference's inside tables); otherwise it uses the model's rotary module — what the reference gets
  from its caller with ``APPLY_PES_INSIDE=False`` and what fixes spec §7 item 7 (the reference's default
  ``base=10000`` is wrong for Llama-3).
* ``_rope_unsqueeze_dim``, ``_rope_seq_dim``, ``k_seq_dim``, ``v_seq_dim``: tensor layout. transformers 5.x hands the
  cache ``[B, H, L, D]`` keys and this cache builds ``[B, L, r]`` tables, which is what the defaults describe; any
  other layout is refused.
* ``past_tok_ids``, ``key_cache``, ``value_cache``, ``_seen_tokens``, ``_kept_kv_ratio``, ``_shifted_position_ids``:
  state inherited from another reference cache. Accepted when empty (their defaults); a non-empty state is refused
  (its slots carry no validity or kind information; continue a cache of ours with ``sepllm_forward`` instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, MutableMapping, Optional

import torch

from megatron.sepllm.hf.pos_shift import RopeFn

#: reference constructor defaults of the frequency parameters (used for the ones left out when others are given)
REFERENCE_BASE, REFERENCE_PE_DIM, REFERENCE_SCALING, REFERENCE_MAX_POSITIONS = 10000.0, 128, 1.0, 8192
#: the layout every option above must describe (``[B, H, L, D]`` keys/values, ``[B, L, r]`` cos/sin)
LAYOUT = {"_rope_unsqueeze_dim": 1, "_rope_seq_dim": 1, "k_seq_dim": 2, "v_seq_dim": 2}
#: reference state arguments: accepted only empty
STATE_ARGS = ("past_tok_ids", "key_cache", "value_cache", "_seen_tokens", "_kept_kv_ratio", "_shifted_position_ids")


def check_layout(**given: int) -> None:
    """Refuse layout options that do not describe transformers 5.x's ``[B, H, L, D]`` cache tensors."""
    for name, value in given.items():
        if int(value) != LAYOUT[name]:
            raise ValueError(f"SepCache: {name}={value} is not supported: transformers 5.x hands the cache keys and "
                             f"values as [batch, heads, seq, head_dim] (expected {name}={LAYOUT[name]})")


def check_reference_state(kwargs: MutableMapping[str, Any]) -> None:
    """Remove the reference's state arguments from ``kwargs``; raise if any carries state."""
    for name in STATE_ARGS:
        if name not in kwargs:
            continue
        value = kwargs.pop(name)
        empty = value is None or (name == "_seen_tokens" and int(value) == 0) or (
            isinstance(value, (list, tuple)) and len(value) == 0)
        if not empty:
            raise ValueError(f"SepCache: {name} carries state from another cache; starting from a reference cache's "
                             "state is not supported (its slots have no padding or kind information): start from "
                             "an empty SepCache and continue it with megatron.sepllm.hf.generation.sepllm_forward")


@dataclass(frozen=True)
class RopeParams:
    """The reference's positional-table parameters (all None = use the model's rotary module)."""

    base: Optional[float]
    pe_dim: Optional[int]
    pe_scaling_factor: Optional[float]
    max_position_embeddings: Optional[int]
    partial_rotation_size: Optional[int]

    @classmethod
    def from_args(cls, **kw: Any) -> "RopeParams":
        p = cls(**kw)
        for name in ("pe_dim", "max_position_embeddings", "partial_rotation_size"):
            v = getattr(p, name)
            if v is not None and int(v) < 1:
                raise ValueError(f"SepCache: {name} must be >= 1, got {v}")
        for name in ("base", "pe_scaling_factor"):
            v = getattr(p, name)
            if v is not None and not float(v) > 0:
                raise ValueError(f"SepCache: {name} must be > 0, got {v}")
        if p.partial_rotation_size is not None and int(p.partial_rotation_size) % 2:
            raise ValueError(f"SepCache: partial_rotation_size must be even, got {p.partial_rotation_size}")
        if p.explicit and p.pe_dim is not None and p.partial_rotation_size is not None and \
                int(p.pe_dim) != int(p.partial_rotation_size):
            raise ValueError(f"SepCache: pe_dim={p.pe_dim} and partial_rotation_size={p.partial_rotation_size} "
                             "disagree: the rotary tables are partial_rotation_size wide")
        if p.explicit and p.pe_dim is not None and int(p.pe_dim) % 2:
            raise ValueError(f"SepCache: pe_dim must be even, got {p.pe_dim}")
        return p

    @property
    def explicit(self) -> bool:
        """True when the caller gave the frequencies (the cache then builds its own tables, like the reference)."""
        return any(v is not None for v in (self.base, self.pe_dim, self.pe_scaling_factor))

    def rope_fn(self) -> RopeFn:
        """Plain RoPE ``fn(x, position_ids [B, L]) -> (cos, sin) [B, L, r]`` from the given parameters
        (``inv_freq = 1 / base^(2i / r)``, positions divided by ``pe_scaling_factor``)."""
        base = REFERENCE_BASE if self.base is None else float(self.base)
        dim = int(self.partial_rotation_size or self.pe_dim or REFERENCE_PE_DIM)
        scale = REFERENCE_SCALING if self.pe_scaling_factor is None else float(self.pe_scaling_factor)
        limit = REFERENCE_MAX_POSITIONS if self.max_position_embeddings is None else int(self.max_position_embeddings)
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))

        def fn(x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if position_ids.numel() and int(position_ids.max()) >= limit:
                raise ValueError(f"SepCache: position {int(position_ids.max())} is beyond max_position_embeddings="
                                 f"{limit} of the cache's rotary tables")
            if x.shape[-1] < dim:
                raise ValueError(f"SepCache: rotary width {dim} (pe_dim / partial_rotation_size) exceeds the head "
                                 f"dim {x.shape[-1]}")
            freqs = (position_ids.to(torch.float64) / scale).unsqueeze(-1) * inv_freq.to(x.device)
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(torch.float32), emb.sin().to(torch.float32)

        return fn

    def check_against(self, model_rope: RopeFn, model: Any) -> None:
        """With the model's own tables, a given ``partial_rotation_size`` must be the model's rotary width."""
        if self.partial_rotation_size is None:
            return
        probe = torch.zeros(1, 1, 1, 1)
        cos, _ = model_rope(probe, torch.zeros(1, 1, dtype=torch.long))
        if int(cos.shape[-1]) != int(self.partial_rotation_size):
            raise ValueError(f"SepCache: partial_rotation_size={self.partial_rotation_size} but "
                             f"{type(model).__name__} rotates {int(cos.shape[-1])} dims per head")
