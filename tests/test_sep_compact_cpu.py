"""The CPU compact engine (band + compact parts merged by log-sum-exp) against the float64 reference, on layouts
small enough to have many query blocks and several compact calls, plus the edge cases of its structure:
windows not a multiple of the block, S not a multiple of the block, ``w >= S``, left padding, ALiBi, rows with
no separators next to rows with many, bf16. Forward within 1e-5, gradients within 1e-4 (fp32).
"""

from __future__ import annotations

import pytest
import torch

from megatron.sepllm.attention import rules
from megatron.sepllm.attention.compact import build_compact_layout, compact_attention

from sep_helpers import reference_attention

D = 16


def _global_keys(seq_len: int, pad: int, sep_every: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """``[2, S]``: random separators (row 0 dense, row 1 sparse or none), 3 initial tokens after the padding."""
    rows = []
    for row, every in enumerate(sep_every):
        g = torch.zeros(seq_len, dtype=torch.bool) if every == 0 else torch.rand(seq_len, generator=gen) < 1 / every
        start = pad if row == 1 else 0
        g[start: start + 3] = True
        rows.append(g)
    return torch.stack(rows)


def _run(seq_len: int, window: int, block: int, super_block: int, pad: int = 0, alibi: bool = False,
         sep_every: tuple[int, int] = (4, 40), dtype: torch.dtype = torch.float32, heads: int = 3):
    gen = torch.Generator().manual_seed(seq_len * 7 + window)
    g = _global_keys(seq_len, pad, sep_every, gen)
    valid = None
    pos = torch.arange(seq_len)[None].expand(2, -1)
    if pad:
        valid = torch.ones(2, seq_len, dtype=torch.bool)
        valid[1, :pad] = False
        g = g & valid
        pos = (pos - pad * torch.tensor([[0], [1]])).clamp(min=0)
    lay = build_compact_layout(g, valid, window, pos, block=block, super_block=super_block)
    q, k, v, grad = (torch.randn(2, heads, seq_len, D, generator=gen) for _ in range(4))
    slopes = torch.tensor([0.5, 0.1, 0.02][:heads]) if alibi else None
    keep = rules.padded_allowed_mask(g, window, valid)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(qr, kr, vr, keep, 0.25, slopes, pos)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), grad.double())
    qc, kc, vc = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out = compact_attention(qc, kc, vc, lay, scale=0.25, alibi_slopes=slopes, engine="flash_cpu")
    grads = torch.autograd.grad(out, (qc, kc, vc), grad.to(dtype))
    return lay, out, grads, ref, ref_grads


CASES = {
    # name: (S, w, block, super_block, pad, alibi, separator density per row)
    "many_calls": (640, 64, 32, 128, 0, False, (4, 40)),
    "w_not_multiple_of_block": (600, 50, 32, 96, 0, False, (5, 30)),
    "S_not_multiple_of_block": (613, 64, 32, 64, 0, False, (4, 40)),
    "left_pad_alibi": (512, 48, 16, 64, 37, True, (4, 25)),
    "row_without_separators": (448, 32, 32, 128, 0, False, (3, 0)),
    "single_call": (384, 64, 64, 4096, 0, False, (4, 40)),
    "window_at_least_S": (200, 256, 64, 128, 0, False, (4, 40)),
    "block_larger_than_window": (500, 20, 64, 128, 11, True, (6, 50)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_flash_cpu_matches_reference(case):
    seq_len, window, block, super_block, pad, alibi, every = CASES[case]
    lay, out, grads, ref, ref_grads = _run(seq_len, window, block, super_block, pad, alibi, every)
    if case == "many_calls":
        assert len(lay.super_calls()) >= 3
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    for name, g, rg in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=1e-4, rtol=0, msg=lambda m: f"grad {name}: {m}")


def test_flash_cpu_bf16_close_to_reference():
    _, out, grads, ref, ref_grads = _run(512, 64, 32, 128, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=0)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=6e-2, rtol=0)
