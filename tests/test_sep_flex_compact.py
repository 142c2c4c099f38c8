"""flex_compact: FlexAttention over [gathered global keys] ++ [S keys] computes exactly the SepLLM rule.

* the predicate's keep set, mapped back to original positions, equals ``rules.padded_allowed_mask`` with every key
  counted once (worked examples: padding, per-layer windows, window >= S, rows without separators, rows with
  different global-key counts);
* the forward (FlexAttention on CPU, compiled through the backend and eager) equals the float64 dense reference
  within 1e-5 in fp32 (ALiBi, GQA, padding, per-layer windows);
* the backward of the composition (one gather + the same predicate, dense through SDPA: torch has no FlexAttention
  backward on CPU) equals the dense path's gradients within 1e-5;
* on a real-text-like pattern the BlockMask has exactly the derived number of non-empty blocks (raw flex: all).
GPU-only checks (compiled kernel forward + backward in bf16 / fp32) are marked ``gpu``.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron.sepllm.attention import rules
from megatron.sepllm.attention.backend import SepLLMBackend
from megatron.sepllm.attention.checks import SepAttentionConfigError
from megatron.sepllm.attention.flex_compact import (build_flex_compact_layout, count_nonempty_blocks,
                                                    flex_compact_attention, flex_compact_reference, relayout_kv,
                                                    slot_capacity)

from sep_helpers import (make_sepllm_cfg, model_cfg, padded_attention_inputs, reference_attention,
                         reference_keep, sep_backend)

HEAD_DIM = 16
SLOPES = torch.tensor([0.5, 0.125, 0.03, 0.01])


# ------------------------------------------------------------------------------------------------ exact keep set
def _multiplicity(layout) -> torch.Tensor:
    """``[B, S, S]`` int: how many kept slots of the compact layout point at each original key."""
    keep = layout.dense_keep()[:, 0].to(torch.int64)                                   # [B, S, N_pad + S]
    idx = layout.kv_index[:, None, :].expand_as(keep)
    return torch.zeros(layout.batch, layout.seq_len, layout.seq_len, dtype=torch.int64).scatter_add_(2, idx, keep)


def _assert_exact(g: torch.Tensor, valid, window: int, block: int) -> None:
    layout = build_flex_compact_layout(g, valid, window, torch.arange(g.shape[1]).expand_as(g), block=block)
    want = rules.padded_allowed_mask(g & (valid if valid is not None else True), window, valid)
    got = _multiplicity(layout)
    assert int(got.max()) <= 1, "a key is counted twice"
    assert torch.equal(got.bool(), want), f"keep set differs at window {window}"
    assert layout.num_slots % block == 0 and layout.num_slots >= int(layout.global_counts.max())


TOKENS = "A B C , D E . F G \\n".split()


def test_worked_example_keep_set_is_the_rule():
    """Spec example (a = 1, w = 2, separators , . \\n): the last query keeps {A , . G \\n}, 34 entries in all."""
    g = torch.tensor([[t in (",", ".", "\\n") or i == 0 for i, t in enumerate(TOKENS)]])
    layout = build_flex_compact_layout(g, None, 2, torch.arange(10)[None], block=4)
    got = _multiplicity(layout)
    assert int(got.sum()) == 34 and int(got.max()) == 1
    assert {TOKENS[k] for k in got[0, -1].nonzero().flatten().tolist()} == {"A", ",", ".", "G", "\\n"}
    assert layout.global_counts.tolist() == [4] and layout.num_slots == 4


@pytest.mark.parametrize("block", [4, 16, 128])
def test_keep_set_exact_with_padding_windows_and_uneven_rows(block):
    torch.manual_seed(0)
    batch, seq_len = 4, 90
    g = torch.rand(batch, seq_len) < torch.tensor([[0.3], [0.05], [0.0], [0.6]])   # row 2: no separators
    g[:, :2] = True
    g[2] = False                                                                      # row 2: no global key at all
    valid = torch.ones(batch, seq_len, dtype=torch.bool)
    valid[1, :23] = False                                                             # left padding
    valid[3, :5] = False
    g[1, 23:26] = True                                                                # initial tokens after padding
    for window in (1, 2, 7, 16, 33, seq_len - 1, seq_len, 2 * seq_len):               # per-layer windows, w >= S
        _assert_exact(g, valid, window, block)
        _assert_exact(g, None, window, block)


def test_fully_padded_row_keeps_only_its_diagonal():
    g = torch.zeros(2, 12, dtype=torch.bool)
    g[0, :3] = True
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1] = False
    _assert_exact(g, valid, 4, 4)
    layout = build_flex_compact_layout(g, valid, 4, torch.arange(12).expand(2, 12), block=4)
    assert torch.equal(_multiplicity(layout)[1], torch.eye(12, dtype=torch.int64))


def test_slot_capacity_ladder_and_bad_input():
    assert [slot_capacity(n, 128) // 128 for n in (0, 1, 128, 129, 1024, 1025, 1300, 2049, 4097)] == \
        [0, 1, 1, 2, 8, 10, 12, 20, 40]
    for n in range(0, 5000, 37):
        c = slot_capacity(n, 64)
        assert c % 64 == 0 and n <= c <= max(64 * math.ceil(n / 64) * 1.25, 64)
    with pytest.raises(ValueError, match="block"):
        slot_capacity(3, 0)
    with pytest.raises(ValueError, match="window"):
        build_flex_compact_layout(torch.ones(1, 4, dtype=torch.bool), None, 0, torch.arange(4)[None])
    with pytest.raises(ValueError, match="key_valid"):
        build_flex_compact_layout(torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 5), 2, torch.arange(4)[None])


def _tiles(num: torch.Tensor, idx: torch.Tensor, nkv: int) -> torch.Tensor:
    """Dense ``[B, H, nq, nkv]`` bool from a BlockMask's sparse (counts, indices) form."""
    keep = torch.arange(idx.shape[-1]) < num.unsqueeze(-1).long()
    return torch.zeros(*idx.shape[:-1], nkv, dtype=torch.bool).scatter_(-1, idx.long(), keep)


@pytest.mark.parametrize("seq_len, block", [(90, 16), (96, 16), (200, 32), (300, 128)])
def test_closed_form_block_mask_equals_create_block_mask(seq_len, block):
    """The BlockMask built from the layout's tiles (what prepare uses) has exactly create_block_mask's partial and
    full tiles, with padding, rows of different counts, a row without global keys and partial last tiles."""
    from torch.nn.attention.flex_attention import create_block_mask

    torch.manual_seed(seq_len)
    g = torch.rand(4, seq_len) < torch.tensor([[0.3], [0.08], [0.0], [0.7]])
    g[:, :3] = True
    g[2] = False
    valid = torch.ones(4, seq_len, dtype=torch.bool)
    valid[1, : seq_len // 3] = False
    valid[3, :7] = False
    full_tiles = partial_tiles = 0
    for window in (1, 5, block - 1, block, block + 1, 3 * block // 2, 2 * block, seq_len + 3):
        for kv in (valid, None):
            layout = build_flex_compact_layout(g, kv, window, torch.arange(seq_len).expand(4, -1), block=block)
            ours = layout.attach_block_mask()
            ref = create_block_mask(layout.mask_mod(), B=4, H=None, Q_LEN=seq_len, KV_LEN=layout.kv_len,
                                    device="cpu", BLOCK_SIZE=block)
            nkv = -(-layout.kv_len // block)
            for a, b in ((ours.kv_num_blocks, ref.kv_num_blocks), (ours.full_kv_num_blocks, ref.full_kv_num_blocks)):
                assert torch.equal(a, b), f"tile counts differ at window {window}"
            assert torch.equal(_tiles(ours.kv_num_blocks, ours.kv_indices, nkv),
                               _tiles(ref.kv_num_blocks, ref.kv_indices, nkv))
            assert torch.equal(_tiles(ours.full_kv_num_blocks, ours.full_kv_indices, nkv),
                               _tiles(ref.full_kv_num_blocks, ref.full_kv_indices, nkv))
            full_tiles += int(ref.full_kv_num_blocks.sum())
            partial_tiles += int(ref.kv_num_blocks.sum())
    assert full_tiles > 0 and partial_tiles > 0                 # both tile classes were exercised


# ------------------------------------------------------------------------------------------------ values
CASES = {
    # name: (S, per-layer windows, heads q/kv, left pad of row 1, alibi)
    "S256_gqa_pad_alibi_H": (256, [256, 32, 100], (4, 2), 37, True),
    "S320_plain": (320, [48, 400], (2, 2), 0, False),
}


def _inputs(case, pg19_dir, tokenizer_file, requires_grad=False):
    seq_len, windows, heads, pad, alibi = CASES[case]
    ids, mask2d, pos, qkv = padded_attention_inputs(pg19_dir, tokenizer_file, seq_len, heads, pad, HEAD_DIM)
    slopes = SLOPES[:heads[0]] if alibi else None
    return ids, mask2d, pos, [t.requires_grad_(requires_grad) for t in qkv], slopes, windows


_backend = sep_backend


@pytest.mark.parametrize("case", list(CASES))
def test_forward_through_backend_matches_float64_reference(case, pg19_dir, neox_tokenizer_file):
    ids, mask2d, pos, (q, k, v), slopes, windows = _inputs(case, pg19_dir, neox_tokenizer_file)
    backend = _backend("flex_compact", windows, mask2d is not None, q.shape[1], k.shape[1])
    plan = backend.prepare(ids, pos, mask2d)
    assert plan.impl == "flex_compact"
    sparse = [p for p in plan.distinct_patterns() if not p.full]
    assert sparse and all(p.artifact.block_mask is not None for p in sparse)      # built once in prepare
    for layer, w in enumerate(windows):
        out = backend(q, k, v, layer, plan, scale=HEAD_DIM ** -0.5, alibi_slopes=slopes)
        ref = reference_attention(q, k, v, reference_keep(ids, backend.cfg, w, mask2d), HEAD_DIM ** -0.5, slopes,
                                  pos)
        assert out.dtype == torch.float32 and out.shape == q.shape
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_eager_flex_and_dense_route_match_reference(pg19_dir, neox_tokenizer_file):
    """Eager FlexAttention (unfused) and the dense debug route over the same layout; fp32, bf16 and fp16."""
    from torch.nn.attention.flex_attention import flex_attention

    ids, mask2d, pos, (q, k, v), slopes, windows = _inputs("S256_gqa_pad_alibi_H", pg19_dir, neox_tokenizer_file)
    backend = _backend("flex_compact", windows, True, q.shape[1], k.shape[1])
    plan = backend.prepare(ids, pos, mask2d)
    layout = plan.pattern(1).artifact
    ref = reference_attention(q, k, v, reference_keep(ids, backend.cfg, windows[1], mask2d), 0.25, slopes, pos)
    eager = flex_compact_attention(flex_attention, q, k, v, layout, scale=0.25, alibi_slopes=slopes)
    torch.testing.assert_close(eager.double(), ref, atol=1e-5, rtol=0)
    dense = flex_compact_reference(q, k, v, layout, scale=0.25, alibi_slopes=slopes)
    torch.testing.assert_close(dense.double(), ref, atol=1e-5, rtol=0)
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
        low = flex_compact_attention(flex_attention, *(t.to(dtype) for t in (q, k, v)), layout, scale=0.25,
                                     alibi_slopes=slopes)
        assert low.dtype == dtype
        torch.testing.assert_close(low.double(), ref, atol=tol, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_backward_of_composition_matches_dense_path(case, pg19_dir, neox_tokenizer_file):
    """Gradients through the gather (scatter-add backward) + the predicate equal the dense path's (fp32, 1e-5)."""
    ids, mask2d, pos, (q, k, v), slopes, windows = _inputs(case, pg19_dir, neox_tokenizer_file, requires_grad=True)
    compact = _backend("flex_compact", windows, mask2d is not None, q.shape[1], k.shape[1])
    dense = _backend("dense", windows, mask2d is not None, q.shape[1], k.shape[1])
    plan_c, plan_d = compact.prepare(ids, pos, mask2d), dense.prepare(ids, pos, mask2d)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    for layer in range(len(windows)):
        if plan_c.pattern(layer).full:
            continue
        out = flex_compact_reference(q, k, v, plan_c.pattern(layer).artifact, scale=0.25, alibi_slopes=slopes)
        want = dense(q, k, v, layer, plan_d, scale=0.25, alibi_slopes=slopes)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
        for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), grad),
                              torch.autograd.grad(want, (q, k, v), grad)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda m: f"grad {name}: {m}")


def test_relayout_is_one_gather_of_original_positions():
    torch.manual_seed(0)
    g = torch.zeros(2, 10, dtype=torch.bool)
    g[0, [0, 4, 7]] = True
    g[1, [0]] = True
    layout = build_flex_compact_layout(g, None, 3, torch.arange(10).expand(2, 10), block=2)
    assert layout.num_slots == 4 and layout.kv_index[0, :3].tolist() == [0, 4, 7]
    assert layout.kv_keep[:, :4].tolist() == [[True, True, True, False], [True, False, False, False]]
    x = torch.randn(2, 3, 10, 5, requires_grad=True)
    y = relayout_kv(x, layout)
    assert y.shape == (2, 3, 14, 5) and torch.equal(y[:, :, 4:], x) and torch.equal(y[0, :, 1], x[0, :, 4])
    (gx,) = torch.autograd.grad(y.sum(), x)
    # global keys receive from both copies; the empty slot of row 0 reads position 0 (masked in attention)
    assert gx[0, 0, :, 0].tolist() == [3, 1, 1, 1, 2, 1, 1, 2, 1, 1]
    with pytest.raises(ValueError, match="S = 10"):
        relayout_kv(torch.randn(2, 3, 11, 5), layout)


# ------------------------------------------------------------------------------------------------ block counts
def _expected_compact_blocks(positions: list[int], seq_len: int, window: int, block: int) -> int:
    """Non-empty blocks of the compact layout derived by hand: per query block, the band key blocks within reach
    of the window plus the slot blocks whose first (smallest) position lies before some query's window."""
    nq = math.ceil(seq_len / block)
    total = 0
    for i in range(nq):
        q_lo, q_hi = i * block, min((i + 1) * block, seq_len) - 1
        total += sum(1 for j in range(nq) if j * block <= q_hi and q_lo - min((j + 1) * block - 1, q_hi) < window)
        visible = sum(1 for p in positions if p <= q_hi - window)
        total += math.ceil(visible / block)
    return total


def _non_empty(block_mask) -> int:
    return int(block_mask.kv_num_blocks.sum()) + int(block_mask.full_kv_num_blocks.sum())


def test_real_text_like_pattern_has_far_fewer_blocks_than_raw_flex():
    """A separator every 7 tokens (and a = 3), S = 2048, w = 256, 128 x 128 blocks: raw flex keeps every causal
    block (136); the compact layout keeps 45 band + 23 staircase blocks."""
    from megatron.sepllm.attention.flex import FlexRunner, sep_mask_mod

    seq_len, window, block = 2048, 256, 128
    g = torch.zeros(1, seq_len, dtype=torch.bool)
    g[0, 6::7] = True
    g[0, :3] = True
    positions = g[0].nonzero().flatten().tolist()
    raw = FlexRunner(block_size=block, compile_kernel=False).block_mask(g, None, window)
    assert _non_empty(raw) == 16 * 17 // 2 == 136
    layout = build_flex_compact_layout(g, None, window, torch.arange(seq_len)[None], block=block)
    layout.attach_block_mask()
    assert layout.num_slots == 384 and len(positions) == 295
    expected = _expected_compact_blocks(positions, seq_len, window, block)
    assert expected == 45 + 23
    assert _non_empty(layout.block_mask) == expected
    # the chunked counter of the benchmark's table agrees with the one-shot BlockMasks
    assert count_nonempty_blocks(layout.mask_mod(), 1, seq_len, layout.kv_len, block, q_chunk=512).tolist() == [68]
    assert count_nonempty_blocks(sep_mask_mod(g, None, window), 1, seq_len, seq_len, block, 384).tolist() == [136]


# ------------------------------------------------------------------------------------------------ config / errors
def test_dropout_and_cpu_training_are_rejected_clearly():
    backend = _backend("flex_compact", [16], False, 2, 2)
    ids = torch.randint(0, 400, (1, 64))
    plan = backend.prepare(ids, torch.arange(64)[None], None)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    with pytest.raises(SepAttentionConfigError, match="dropout"):
        backend(q, k, v, 0, plan, scale=0.25, dropout_p=0.1)
    with pytest.raises(SepAttentionConfigError, match="cannot train on CPU"):
        backend(q.requires_grad_(), k, v, 0, plan, scale=0.25)


def test_auto_falls_back_to_flex_compact_on_cuda_and_sa_modes_reject_it():
    mc = model_cfg(num_layers=1)
    assert SepLLMBackend(make_sepllm_cfg(num_layers=1), mc).resolve_impl(torch.device("cuda")) == "flex_compact"
    with pytest.raises(SepAttentionConfigError, match="dense path only"):
        SepLLMBackend(make_sepllm_cfg(num_layers=1, mode="sa", sep_attention_impl="flex_compact"), mc)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_gpu_compiled_forward_backward_match_dense_bf16(pg19_dir, neox_tokenizer_file):
    """On CUDA the compiled kernel trains in bf16: output and q/k/v gradients equal the fp32 dense path on the same
    (bf16-rounded) inputs within 3e-2 / 6e-2 (GQA, padding, ALiBi, per-layer windows; one compiled shape)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dev, dtype = torch.device("cuda"), torch.bfloat16
    ids, mask2d, pos, (q, k, v), slopes, windows = _inputs("S256_gqa_pad_alibi_H", pg19_dir, neox_tokenizer_file)
    ids, pos, mask2d, slopes = ids.to(dev), pos.to(dev), mask2d.to(dev), slopes.to(dev)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dev, dtype)
    compact = _backend("flex_compact", windows, True, q.shape[1], k.shape[1])
    dense = _backend("dense", windows, True, q.shape[1], k.shape[1])
    plan_c, plan_d = compact.prepare(ids, pos, mask2d), dense.prepare(ids, pos, mask2d)
    assert plan_c.impl == "flex_compact"
    for layer in range(len(windows)):
        xs = [t.detach().to(dev, dtype).requires_grad_() for t in (q, k, v)]
        ref = [t.detach().float().requires_grad_() for t in xs]
        out = compact(*xs, layer, plan_c, scale=0.25, alibi_slopes=slopes)
        want = dense(*ref, layer, plan_d, scale=0.25, alibi_slopes=slopes)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=0)
        for a, b in zip(torch.autograd.grad(out, xs, grad), torch.autograd.grad(want, ref, grad.float())):
            assert a.dtype == dtype
            torch.testing.assert_close(a.float(), b, atol=6e-2, rtol=0)
