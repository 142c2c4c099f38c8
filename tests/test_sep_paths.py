"""dense / flex / compact agree with ONE dense reference (rules.py mask + float64 softmax) on real PG-19 text.

B = 2 rows with different separator densities, per-layer windows (H/HT-style: full layers mixed with windowed ones),
left padding with BATCH_ADAPTIVE_INIT_POS, GQA and ALiBi. Outputs within 1e-5, q/k/v gradients within 1e-4 (fp32).
FlexAttention runs forward only on CPU (torch has no CPU backward for it).
"""

from __future__ import annotations

import pytest
import torch

from megatron.sepllm.attention.backend import SepLLMBackend

from sep_helpers import make_sepllm_cfg, model_cfg, reference_attention, reference_keep, two_density_batch

CASES = {
    # name: (S, per-layer windows, heads q/kv, left pad of row 1, alibi)
    "S256_gqa_H": (256, [256, 32, 100], (4, 2), 0, False),
    "S1024_pad_alibi_HT": (1024, [2048, 64, 256], (2, 2), 77, True),
}
HEAD_DIM = 16


def _inputs(case, pg19_dir, tokenizer_file, requires_grad=True):
    seq_len, windows, (hq, hkv), pad, alibi = CASES[case]
    ids = two_density_batch(pg19_dir, tokenizer_file, seq_len)
    mask2d = None
    if pad:
        mask2d = torch.ones_like(ids)
        mask2d[1, :pad] = 0
        ids = ids.clone()
        ids[1, :pad] = 1
    gen = torch.Generator().manual_seed(seq_len)
    q = torch.randn(2, hq, seq_len, HEAD_DIM, generator=gen)
    k = torch.randn(2, hkv, seq_len, HEAD_DIM, generator=gen)
    v = torch.randn(2, hkv, seq_len, HEAD_DIM, generator=gen)
    grad = torch.randn(2, hq, seq_len, HEAD_DIM, generator=gen)
    slopes = torch.tensor([0.5, 0.125, 0.03, 0.01][:hq]) if alibi else None
    pos = torch.arange(seq_len)[None].expand(2, -1)
    if pad:
        pos = (pos - pad * torch.tensor([[0], [1]])).clamp(min=0)
    return ids, mask2d, pos, [t.requires_grad_(requires_grad) for t in (q, k, v)], grad, slopes, windows


def _cfg(impl, windows, padded):
    return make_sepllm_cfg(num_layers=len(windows), prefill_windows=windows, sep_attention_impl=impl,
                           BATCH_ADAPTIVE_INIT_POS=padded)


@pytest.fixture(scope="module")
def references(pg19_dir, neox_tokenizer_file):
    """Per case and layer: (reference output, reference grads) in float64."""
    out = {}
    for case in CASES:
        ids, mask2d, pos, (q, k, v), grad, slopes, windows = _inputs(case, pg19_dir, neox_tokenizer_file)
        cfg = _cfg("dense", windows, mask2d is not None)
        q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
        for layer, w in enumerate(windows):
            keep = reference_keep(ids, cfg, w, mask2d)
            ref = reference_attention(q, k, v, keep, HEAD_DIM ** -0.5, slopes, pos)
            grads = torch.autograd.grad(ref, (q, k, v), grad.double())
            out[case, layer] = (ref.detach(), [g.detach() for g in grads])
    return out


def _check_rows_are_different_densities(ids):
    from sep_helpers import PYTHIA_SEPS
    dens = torch.isin(ids, torch.tensor(PYTHIA_SEPS)).float().mean(-1)
    assert dens[0] > 1.5 * dens[1] > 0


@pytest.mark.parametrize("impl", ["dense", "compact"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_match_reference(impl, case, references, pg19_dir, neox_tokenizer_file):
    ids, mask2d, pos, (q, k, v), grad, slopes, windows = _inputs(case, pg19_dir, neox_tokenizer_file)
    _check_rows_are_different_densities(ids)
    backend = SepLLMBackend(_cfg(impl, windows, mask2d is not None), model_cfg(len(windows), q.shape[1], k.shape[1]))
    plan = backend.prepare(ids, pos, mask2d)
    assert plan.impl == impl
    for layer in range(len(windows)):
        out = backend(q, k, v, layer, plan, scale=HEAD_DIM ** -0.5, alibi_slopes=slopes)
        ref, ref_grads = references[case, layer]
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        for name, g, rg in zip("qkv", grads, ref_grads):
            torch.testing.assert_close(g.double(), rg, atol=1e-4, rtol=0, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_compact_generic_engine_matches_reference(case, references, pg19_dir, neox_tokenizer_file):
    """The device-agnostic compact engine (used on GPU) on the same inputs, forward and backward."""
    ids, mask2d, pos, (q, k, v), grad, slopes, windows = _inputs(case, pg19_dir, neox_tokenizer_file)
    backend = SepLLMBackend(_cfg("compact", windows, mask2d is not None),
                            model_cfg(len(windows), q.shape[1], k.shape[1]), compact_engine="generic")
    plan = backend.prepare(ids, pos, mask2d)
    layer = 1
    out = backend(q, k, v, layer, plan, scale=HEAD_DIM ** -0.5, alibi_slopes=slopes)
    ref, ref_grads = references[case, layer]
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    for g, rg in zip(torch.autograd.grad(out, (q, k, v), grad), ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_flex_forward_matches_reference(case, references, pg19_dir, neox_tokenizer_file):
    ids, mask2d, pos, (q, k, v), grad, slopes, windows = _inputs(case, pg19_dir, neox_tokenizer_file,
                                                                 requires_grad=False)
    backend = SepLLMBackend(_cfg("flex", windows, mask2d is not None), model_cfg(len(windows), q.shape[1], k.shape[1]))
    plan = backend.prepare(ids, pos, mask2d)
    assert plan.impl == "flex"
    for layer in range(len(windows)):
        out = backend(q, k, v, layer, plan, scale=HEAD_DIM ** -0.5, alibi_slopes=slopes)
        torch.testing.assert_close(out.double(), references[case, layer][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode_kw", [
    dict(mode="streamingllm", separator_token_ids=[-1]),
    dict(mode="fixllm", USE_FIXED_SEP_INTERVALs=True, fixed_sep_intervals_list=[5, 3]),
])
def test_compact_other_modes_match_reference(mode_kw, pg19_dir, neox_tokenizer_file):
    """StreamingLLM (initial + window) and FixLLM (per-layer intervals) through the compact path, fwd + bwd."""
    ids = two_density_batch(pg19_dir, neox_tokenizer_file, 320)
    cfg = make_sepllm_cfg(num_layers=2, prefill_windows=[48, 80], sep_attention_impl="compact", **mode_kw)
    backend = SepLLMBackend(cfg, model_cfg(2, 2))
    plan = backend.prepare(ids, torch.arange(320)[None].expand(2, -1), None)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 320, HEAD_DIM, generator=gen, requires_grad=True) for _ in range(3))
    for layer, w in enumerate([48, 80]):
        interval = cfg.fixed_sep_intervals_list[layer] if cfg.mode == "fixllm" else None
        keep = reference_keep(ids, cfg, w, interval=interval)
        ref = reference_attention(q, k, v, keep, 0.25)
        out = backend(q, k, v, layer, plan, scale=0.25)
        torch.testing.assert_close(out.double(), ref.detach(), atol=1e-5, rtol=0)
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g.double())):
            torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=0)


def test_compact_bf16_keeps_dtype_and_matches_fp32(pg19_dir, neox_tokenizer_file):
    ids = two_density_batch(pg19_dir, neox_tokenizer_file, 256)
    backend = SepLLMBackend(make_sepllm_cfg(num_layers=1, window=64, sep_attention_impl="compact"), model_cfg(1, 2))
    plan = backend.prepare(ids, torch.arange(256)[None].expand(2, -1), None)
    gen = torch.Generator().manual_seed(5)
    q32, k32, v32 = (torch.randn(2, 2, 256, HEAD_DIM, generator=gen) for _ in range(3))
    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in (q32, k32, v32))
    out = backend(q, k, v, 0, plan, scale=0.25)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()
    ref = reference_attention(q.detach().float(), k.detach().float(), v.detach().float(),
                              reference_keep(ids, backend.cfg, 64), 0.25)
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["flex", "compact"])
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_training_paths_match_reference(impl, case, references, pg19_dir, neox_tokenizer_file):
    """On CUDA flex trains too (forward and backward); compact uses its generic engine. fp32 with TF32 off."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        ids, mask2d, pos, (q, k, v), grad, slopes, windows = _inputs(case, pg19_dir, neox_tokenizer_file)
        dev = torch.device("cuda")
        qc, kc, vc = (t.detach().to(dev).requires_grad_() for t in (q, k, v))
        backend = SepLLMBackend(_cfg(impl, windows, mask2d is not None),
                                model_cfg(len(windows), q.shape[1], k.shape[1]))
        plan = backend.prepare(ids.to(dev), pos.to(dev), None if mask2d is None else mask2d.to(dev))
        for layer in range(len(windows)):
            out = backend(qc, kc, vc, layer, plan, scale=HEAD_DIM ** -0.5,
                          alibi_slopes=None if slopes is None else slopes.to(dev))
            ref, ref_grads = references[case, layer]
            torch.testing.assert_close(out.double().cpu(), ref, atol=1e-4, rtol=0)
            grads = torch.autograd.grad(out, (qc, kc, vc), grad.to(dev))
            for g, rg in zip(grads, ref_grads):
                torch.testing.assert_close(g.double().cpu(), rg, atol=1e-3, rtol=0)
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.slow
def test_flex_with_compiled_block_mask_matches_reference(references, pg19_dir, neox_tokenizer_file):
    """RECOMPILE_SEP_ATTN_KERNEL=True builds the BlockMask through torch.compile(create_block_mask): same result."""
    case = "S256_gqa_H"
    ids, mask2d, pos, (q, k, v), grad, slopes, windows = _inputs(case, pg19_dir, neox_tokenizer_file,
                                                                 requires_grad=False)
    cfg = _cfg("flex", windows, False)
    cfg.RECOMPILE_SEP_ATTN_KERNEL = True
    backend = SepLLMBackend(cfg, model_cfg(len(windows), q.shape[1], k.shape[1]))
    plan = backend.prepare(ids, pos, mask2d)
    out = backend(q, k, v, 1, plan, scale=HEAD_DIM ** -0.5)
    torch.testing.assert_close(out.double(), references[case, 1][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("seq_len", [24, 40])
def test_flex_on_cpu_matches_dense_at_lengths_compiled_cpu_flex_gets_wrong(seq_len: int) -> None:
    """torch 2.13's compiled CPU flex attention is wrong at some lengths (0.1 off at 40); CPU runs eager flex."""
    from megatron.config import load_config
    from megatron.model.gpt import GPTModel

    keys = {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "seq_length": 64, "pos_emb": "rotary",
            "padded_vocab_size": 64, "separator_token_ids": [3, 7], "prefill_local_window_size": 8,
            "generate_local_window_size": 8, "init_tok_max_idx": 1}
    ids = torch.randint(0, 64, (2, seq_len), generator=torch.Generator().manual_seed(0))
    logits = {}
    for impl in ("dense", "flex"):
        cfg = load_config({**keys, "sep_attention_impl": impl})
        torch.manual_seed(0)
        with torch.no_grad():
            logits[impl] = GPTModel(cfg.model, cfg.sepllm).eval()(ids)
    torch.testing.assert_close(logits["flex"], logits["dense"], rtol=0, atol=1e-5)
