"""Shared helpers of the SepLLM attention tests: config builder, PG-19 batches, the one dense reference."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron.config.model import ModelConfig
from megatron.config.sepllm import SepLLMConfig
from megatron.sepllm.attention import rules

PYTHIA_SEPS = [15, 13, 32, 2, 28, 27, 209, 186, 187]


def make_sepllm_cfg(num_layers: int = 2, **kw) -> SepLLMConfig:
    """A SepLLMConfig with the derived fields set as the config system would (mode, per-layer windows)."""
    kw.setdefault("separator_token_ids", list(PYTHIA_SEPS))
    kw.setdefault("mode", "sepllm")
    window = kw.pop("window", 64)
    kw.setdefault("prefill_windows", [window] * num_layers)
    kw.setdefault("generate_windows", list(kw["prefill_windows"]))
    return SepLLMConfig(**kw)


def model_cfg(num_layers: int = 2, heads: int = 2, kv_heads: Optional[int] = None) -> ModelConfig:
    return ModelConfig(num_layers=num_layers, hidden_size=16 * heads, num_attention_heads=heads, num_kv_heads=kv_heads)


def pg19_ids(pg19_dir: Path, tokenizer_file: Path, n_tokens: int, book_index: int = 0, offset: int = 0) -> torch.Tensor:
    """``[n_tokens]`` int64 token ids of a real PG-19 book (20B tokenizer)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    books = sorted(pg19_dir.glob("*.txt"))
    text = books[book_index].read_text(encoding="utf-8", errors="replace")[offset: offset + 8 * (n_tokens + 64)]
    ids = tok.encode(text).ids[:n_tokens]
    assert len(ids) == n_tokens, "book too short for the requested length"
    return torch.tensor(ids, dtype=torch.long)


def two_density_batch(pg19_dir: Path, tokenizer_file: Path, seq_len: int) -> torch.Tensor:
    """``[2, S]``: row 0 a book as is; row 1 another passage with the separators of its first 3/4 replaced (sparse)."""
    row0 = pg19_ids(pg19_dir, tokenizer_file, seq_len, book_index=0, offset=2000)
    row1 = pg19_ids(pg19_dir, tokenizer_file, seq_len, book_index=1, offset=5000)
    cut = 3 * seq_len // 4
    head = row1[:cut]
    row1[:cut] = torch.where(torch.isin(head, torch.tensor(PYTHIA_SEPS)), torch.full_like(head, 300), head)
    return torch.stack([row0, row1])


def reference_attention(q, k, v, keep, scale, alibi_slopes=None, position_ids=None):
    """THE dense reference: float64 softmax over ``keep [B, S, S]`` (rules), GQA by head repetition, ALiBi bias."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    s = torch.matmul(q.double(), k.transpose(-1, -2)) * scale
    if alibi_slopes is not None:
        pos = position_ids.double()
        s = s - alibi_slopes.double().view(1, -1, 1, 1) * (pos[:, None, :, None] - pos[:, None, None, :])
    s = s.masked_fill(~keep[:, None], float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def reference_keep(ids: torch.Tensor, cfg: SepLLMConfig, window: int, attention_mask_2d=None,
                   interval: Optional[int] = None) -> torch.Tensor:
    """``[B, S, S]`` keep mask straight from rules.py (independent of the backend's plan code)."""
    valid = None if attention_mask_2d is None else attention_mask_2d.bool()
    pad = rules.left_pad_counts(attention_mask_2d) if (cfg.BATCH_ADAPTIVE_INIT_POS and valid is not None) else None
    seps = cfg.separator_token_ids if cfg.mode == "sepllm" else [-1]
    g = rules.global_key_bitmap(ids, seps, cfg.init_tok_max_idx + 1, pad_counts=pad, fixed_interval=interval)
    if window >= ids.shape[1]:
        g = torch.zeros_like(g)
    if valid is not None:
        g = g & valid
    return rules.padded_allowed_mask(g, min(window, ids.shape[1]), valid)


def padded_attention_inputs(pg19_dir: Path, tokenizer_file: Path, seq_len: int, heads: tuple[int, int], pad: int,
                            head_dim: int):
    """Real-text inputs of the backend tests: ``two_density_batch`` ids with row 1 left-padded by ``pad`` tokens,
    its 2-D mask (None without padding), position ids restarting after the padding, and seeded ``q, k, v``
    (``heads`` = query / key-value heads)."""
    ids = two_density_batch(pg19_dir, tokenizer_file, seq_len)
    mask2d = None
    pos = torch.arange(seq_len)[None].expand(2, -1)
    if pad:
        mask2d = torch.ones_like(ids)
        mask2d[1, :pad] = 0
        ids = ids.clone()
        ids[1, :pad] = 1
        pos = (pos - pad * torch.tensor([[0], [1]])).clamp(min=0)
    gen = torch.Generator().manual_seed(seq_len)
    qkv = [torch.randn(2, h, seq_len, head_dim, generator=gen) for h in (heads[0], heads[1], heads[1])]
    return ids, mask2d, pos, qkv


def sep_backend(impl: str, windows: list, padded: bool, hq: int, hkv: int):
    """A ``SepLLMBackend`` with per-layer ``windows`` on path ``impl`` (batch-adaptive initial tokens if padded)."""
    from megatron.sepllm.attention.backend import SepLLMBackend

    cfg = make_sepllm_cfg(num_layers=len(windows), prefill_windows=windows, sep_attention_impl=impl,
                          BATCH_ADAPTIVE_INIT_POS=padded)
    return SepLLMBackend(cfg, model_cfg(len(windows), hq, hkv))
