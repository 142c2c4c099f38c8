"""megatron.kernels on CPU: the reference implementations behind the fused-kernel custom ops, against independent
float64 references (every RoPE / norm option), gradchecks, op registration (fake/autograd via opcheck,
torch.compile fullgraph, activation checkpointing), the model wiring and the fusion-key rule, and the build helpers."""

from __future__ import annotations

import logging
import stat
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron.config.model import ModelConfig
from megatron.kernels import arch, build, fused_add_norm, fused_norm, fused_rope, plan, rotary_tables
from megatron.kernels.build import KernelStatus
from megatron.kernels.norms import norm_bwd, norm_fwd
from megatron.kernels.rope import rope_op
from megatron.model.gpt import GPTModel
from megatron.model.norms import FusedLayerNorm, FusedRMSNorm, RMSNorm
from megatron.model.positional import apply_rotary, default_position_ids, rotary_cos_sin

LAYOUT_SHAPE = {"bshd": lambda b, s, h, d: (b, s, h, d), "sbhd": lambda b, s, h, d: (s, b, h, d),
                "bhsd": lambda b, s, h, d: (b, h, s, d)}
LOGICAL = {"bshd": (0, 1, 2, 3), "sbhd": (1, 0, 2, 3), "bhsd": (0, 2, 1, 3)}


# ------------------------------------------------------------------------------------------------ RoPE references
def rope_float64(x: torch.Tensor, positions: torch.Tensor, ndims: int, base: float, layout: str,
                 interleaved: bool) -> torch.Tensor:
    """Independent reference: explicit 2-D rotation of each dim pair by ``pos * base^(-2j/ndims)`` in float64."""
    xl = x.permute(LOGICAL[layout]).to(torch.float64)  # [B, S, H, D]
    out = xl.clone()
    for j in range(ndims // 2):
        a, b = (2 * j, 2 * j + 1) if interleaved else (j, j + ndims // 2)
        theta = positions.to(torch.float64) * base ** (-2.0 * j / ndims)  # [B, S]
        c, s = theta.cos()[:, :, None], theta.sin()[:, :, None]
        out[..., a] = xl[..., a] * c - xl[..., b] * s
        out[..., b] = xl[..., b] * c + xl[..., a] * s
    return out.permute(LOGICAL[layout])


def tables_float64(positions: torch.Tensor, ndims: int, base: float, interleaved: bool) -> tuple:
    inv = base ** (-torch.arange(0, ndims, 2, dtype=torch.float64) / ndims)
    f = positions.to(torch.float64)[..., None] * inv
    emb = f.repeat_interleave(2, -1) if interleaved else torch.cat((f, f), -1)
    return emb.cos(), emb.sin()


def positions_for(kind: str, b: int, s: int) -> torch.Tensor:
    if kind == "plain":
        return torch.arange(s).expand(b, s)
    if kind == "decode_offset":  # KV-cache decode: this step's tokens start after different cache lengths
        return torch.tensor([[37], [5]]).expand(b, 1)[:, :1] + torch.arange(s)
    mask = torch.ones(b, s, dtype=torch.long)  # left padding
    mask[0, :3] = 0
    return default_position_ids(torch.zeros(b, s, dtype=torch.long), mask)


@pytest.mark.parametrize("layout", ["bshd", "sbhd", "bhsd"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_pct,base", [(1.0, 10000.0), (0.25, 10000.0), (0.5, 500000.0)])
@pytest.mark.parametrize("pos_kind", ["plain", "decode_offset", "left_pad"])
def test_rope_matches_float64_rotation(layout: str, interleaved: bool, rotary_pct: float, base: float,
                                       pos_kind: str) -> None:
    torch.manual_seed(0)
    b, s, hq, hk, d = 2, 6, 4, 2, 16  # GQA: k has fewer heads
    nd = int(d * rotary_pct)
    pos = positions_for(pos_kind, b, s)
    q = torch.randn(LAYOUT_SHAPE[layout](b, s, hq, d), dtype=torch.float64)
    k = torch.randn(LAYOUT_SHAPE[layout](b, s, hk, d), dtype=torch.float64)
    cos, sin = tables_float64(pos, nd, base, interleaved)
    out_q, out_k = fused_rope(q, k, cos, sin, layout=layout, interleaved=interleaved)
    torch.testing.assert_close(out_q, rope_float64(q, pos, nd, base, layout, interleaved), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_k, rope_float64(k, pos, nd, base, layout, interleaved), rtol=1e-12, atol=1e-12)
    assert out_q.is_contiguous() and out_q.shape == q.shape
    # float32 inputs with the float32 tables of rotary_tables: float32 angles, one rounding of the output
    c32, s32 = rotary_tables(pos, nd, base, interleaved)
    o32, _ = fused_rope(q.float(), k.float(), c32, s32, layout=layout, interleaved=interleaved)
    torch.testing.assert_close(o32.double(), out_q, rtol=0, atol=2e-5)


def test_rope_rotate_half_tables_and_result_equal_the_model_path() -> None:
    torch.manual_seed(0)
    pos = positions_for("left_pad", 2, 7)
    cos, sin = rotary_cos_sin(pos, 8, 10000.0, torch.float32)  # the model's [B, 1, S, nd]
    c2, s2 = rotary_tables(pos, 8, 10000.0)
    assert torch.equal(cos[:, 0], c2) and torch.equal(sin[:, 0], s2)
    q, k = torch.randn(2, 4, 7, 32), torch.randn(2, 2, 7, 32)
    fq, fk = fused_rope(q, k, cos, sin, layout="bhsd")
    torch.testing.assert_close(fq, apply_rotary(q, cos, sin), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fk, apply_rotary(k, cos, sin), rtol=1e-6, atol=1e-6)


def test_rope_bf16_rounds_once_from_float32_math() -> None:
    torch.manual_seed(0)
    pos = positions_for("plain", 2, 5)
    q, k = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 8)
    cos, sin = rotary_tables(pos, 8, 10000.0)
    ref_q, _ = fused_rope(q.bfloat16().float(), k.bfloat16().float(), cos, sin, layout="bshd")
    out_q, _ = fused_rope(q.bfloat16(), k.bfloat16(), cos, sin, layout="bshd")
    assert out_q.dtype == torch.bfloat16 and torch.equal(out_q, ref_q.bfloat16())


@pytest.mark.parametrize("layout", ["bshd", "sbhd", "bhsd"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_gradcheck_and_gradgradcheck(layout: str, interleaved: bool) -> None:
    torch.manual_seed(0)
    pos = positions_for("decode_offset", 2, 3)
    cos, sin = tables_float64(pos, 4, 10000.0, interleaved)
    q = torch.randn(LAYOUT_SHAPE[layout](2, 3, 2, 6), dtype=torch.float64, requires_grad=True)
    k = torch.randn(LAYOUT_SHAPE[layout](2, 3, 1, 6), dtype=torch.float64, requires_grad=True)

    def fn(a: torch.Tensor, b: torch.Tensor) -> tuple:
        return fused_rope(a, b, cos, sin, layout=layout, interleaved=interleaved)

    assert torch.autograd.gradcheck(fn, (q, k))
    assert torch.autograd.gradgradcheck(fn, (q, k))


def test_rope_strided_input_view_of_a_fused_projection() -> None:
    """The model hands q/k as non-contiguous [B, H, S, D] views of its QKV projection."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 5, 3, 3, 8)  # [B, S, heads, (q, k, v), D]
    q, k = qkv[:, :, :, 0].transpose(1, 2), qkv[:, :, :, 1].transpose(1, 2)
    assert not q.is_contiguous()
    cos, sin = rotary_cos_sin(positions_for("plain", 2, 5), 8, 10000.0, torch.float32)
    fq, fk = fused_rope(q, k, cos, sin)
    torch.testing.assert_close(fq, apply_rotary(q.contiguous(), cos, sin), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fk, apply_rotary(k.contiguous(), cos, sin), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (dict(layout="bsdh"), "layout 'bsdh' is not one of"),
    (dict(cos=torch.zeros(2, 4, 5)), "rotated dims 5 must be even"),
    (dict(cos=torch.zeros(2, 9, 4)), r"cos \(2, 9, 4\) does not match q"),
    (dict(cos=torch.zeros(2, 4, 4, requires_grad=True)), "must not require grad"),
    (dict(k=torch.zeros(2, 2, 3, 8)), "differ in batch or sequence"),
])
def test_rope_bad_arguments_name_the_problem(bad: dict, match: str) -> None:
    args = dict(q=torch.zeros(2, 2, 4, 8), k=torch.zeros(2, 1, 4, 8), cos=torch.zeros(2, 4, 4),
                sin=torch.zeros(2, 4, 4), layout="bhsd")
    if "cos" in bad:
        args["sin"] = torch.zeros(bad["cos"].shape)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        fused_rope(args.pop("q"), args.pop("k"), args.pop("cos"), args.pop("sin"), **args)


# ----------------------------------------------------------------------------------------------- norm references
def norm_float64(h: torch.Tensor, w: torch.Tensor, b, eps: float, rms: bool) -> torch.Tensor:
    h = h.double()
    if rms:
        return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    return F.layer_norm(h, (h.shape[-1],), w.double(), None if b is None else b.double(), eps)


@pytest.mark.parametrize("rms,with_bias", [(False, True), (False, False), (True, False)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_norm_matches_float64(rms: bool, with_bias: bool, with_residual: bool, dtype: torch.dtype,
                              tol: float) -> None:
    torch.manual_seed(0)
    x, r = torch.randn(3, 5, 24, dtype=dtype) * 3 + 1, torch.randn(3, 5, 24, dtype=dtype)
    w, b = torch.randn(24, dtype=dtype), (torch.randn(24, dtype=dtype) if with_bias else None)
    if with_residual:
        y, h = fused_add_norm(x, r, w, b, 1e-5, rms)
        assert torch.equal(h, x + r)  # the returned residual stream is the unfused sum, same rounding
    else:
        y, h = fused_norm(x, w, b, 1e-5, rms), x
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), norm_float64(h, w, b, 1e-5, rms), rtol=tol, atol=tol)


@pytest.mark.parametrize("rms,with_bias", [(False, True), (False, False), (True, False)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_gradcheck(rms: bool, with_bias: bool, with_residual: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    if with_residual:
        def fn(x, r, w, b):  # both outputs carry gradient: the norm and the summed residual stream
            return fused_add_norm(x, r, w, b if with_bias else None, 1e-5, rms)
    else:
        def fn(x, r, w, b):
            return fused_norm(x, w, b if with_bias else None, 1e-5, rms)
    assert torch.autograd.gradcheck(fn, (x, r, w, b))


def test_norm_backward_matches_autograd_of_the_float64_reference() -> None:
    torch.manual_seed(0)
    x, r = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    gy, gh = torch.randn(4, 16), torch.randn(4, 16)
    y, h = fused_add_norm(x, r, w, b, 1e-5, False)
    fused = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), (x, r, w, b))
    xd, rd, wd, bd = (t.detach().double().requires_grad_() for t in (x, r, w, b))
    hd = xd + rd
    yd = F.layer_norm(hd, (16,), wd, bd, 1e-5)
    ref = torch.autograd.grad((yd * gy.double()).sum() + (hd * gh.double()).sum(), (xd, rd, wd, bd))
    for got, want in zip(fused, ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- op registration / compile paths
def test_opcheck_fake_and_autograd_registrations() -> None:
    torch.manual_seed(0)
    cos, sin = tables_float64(positions_for("plain", 2, 3), 4, 10000.0, False)
    q = torch.randn(2, 2, 3, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 3, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(rope_op, (q, k, cos, sin, "bhsd", False, False))
    x, r = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    torch.library.opcheck(norm_fwd, (x, r, w, b, 1e-5, False))
    torch.library.opcheck(norm_fwd, (x, None, w, None, 1e-6, True))
    y, h, stats = norm_fwd(x.detach(), r.detach(), w.detach(), b.detach(), 1e-5, False)
    torch.library.opcheck(norm_bwd, (torch.randn(6, 8), torch.randn(6, 8), h, w.detach(), stats, False, True))


def _block(q, k, cos, sin, x, r, w, b):
    q2, k2 = fused_rope(q, k, cos, sin)
    y, h = fused_add_norm(x, r, w, b, 1e-5, False)
    return (q2 * k2.sum(1, keepdim=True)).sum() + (y * h).sum() + fused_norm(h, w, None, 1e-6, True).sum()


def _block_inputs() -> tuple:
    torch.manual_seed(0)
    cos, sin = rotary_cos_sin(positions_for("plain", 2, 5), 4, 10000.0, torch.float32)
    return (torch.randn(2, 2, 5, 8, requires_grad=True), torch.randn(2, 1, 5, 8, requires_grad=True), cos, sin,
            torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8, requires_grad=True),
            torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True))


def _grads(fn, inputs: tuple) -> list:
    out = fn(*inputs)
    leaves = [t for t in inputs if t.requires_grad]
    return [out.detach()] + list(torch.autograd.grad(out, leaves))


def test_torch_compile_fullgraph_and_activation_checkpointing_match_eager() -> None:
    eager = _grads(_block, _block_inputs())
    compiled = _grads(torch.compile(_block, backend="aot_eager", fullgraph=True), _block_inputs())
    ckpt = _grads(lambda *a: checkpoint(_block, *a, use_reentrant=False), _block_inputs())
    for a, b, c in zip(eager, compiled, ckpt):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=0, atol=0)


# ------------------------------------------------------------------------------------- model wiring and the rule
def tiny(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, pos_emb="rotary",
                rotary_pct=0.25, padded_vocab_size=64)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def kernels_available(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the compiled kernels loaded: the model takes its fused path, whose ops run their references on CPU."""
    monkeypatch.setattr(plan, "kernel_status", lambda: KernelStatus(True, "test"))


@pytest.mark.parametrize("norm,flag,cls", [("layernorm", "layernorm_fusion", FusedLayerNorm),
                                           ("rmsnorm", "rmsnorm_fusion", FusedRMSNorm)])
@pytest.mark.parametrize("parallel", [False, True])
def test_model_fusion_on_equals_off(kernels_available: None, norm: str, flag: str, cls: type,
                                    parallel: bool) -> None:
    torch.manual_seed(0)
    off = GPTModel(tiny(norm=norm, gpt_j_residual=parallel))
    on = GPTModel(tiny(norm=norm, gpt_j_residual=parallel, rope_fusion=True, **{flag: True}))
    assert isinstance(on.final_layernorm, cls) and type(off.final_layernorm) in (torch.nn.LayerNorm, RMSNorm)
    assert all(layer.attention.rope_fused for layer in on.layers)
    assert list(on.state_dict()) == list(off.state_dict())
    on.load_state_dict(off.state_dict())
    ids = torch.randint(0, 64, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: per-row positions reach the fused rotary
    losses = []
    for model in (off, on):
        logits = model(ids, attention_mask=mask)
        loss = F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for (name, p_off), p_on in zip(off.named_parameters(), on.parameters()):
        torch.testing.assert_close(p_on.grad, p_off.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU-machine answer of the real probe, also on a GPU machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(plan, "kernel_status", build.kernel_status.__wrapped__)


def test_unavailable_kernels_one_warning_and_the_plain_model(no_cuda: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        model = GPTModel(tiny(rope_fusion=True, layernorm_fusion=True, rmsnorm_fusion=True, bias_gelu_fusion=True))
    records = [r for r in caplog.records if "fused kernels requested" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    msg = records[0].getMessage()
    assert "rope_fusion: no CUDA device" in msg and "layernorm_fusion: no CUDA device" in msg
    assert "rmsnorm_fusion: norm is 'layernorm', not 'rmsnorm'" in msg and "bias_gelu_fusion" in msg
    assert type(model.final_layernorm) is torch.nn.LayerNorm and not model.layers[0].attention.rope_fused


def test_hint_only_keys_log_at_info(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        GPTModel(tiny(bias_gelu_fusion=True, scaled_masked_softmax_fusion=True))
    records = [r for r in caplog.records if "fused kernels requested" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.INFO


def test_rmsnorm_fusion_is_a_config_key() -> None:
    from megatron.config import load_config

    cfg = load_config({"rmsnorm-fusion": True, "norm": "rmsnorm", "layernorm_fusion": True})
    assert cfg.model.rmsnorm_fusion is True and cfg.model.layernorm_fusion is True
    assert ModelConfig().rmsnorm_fusion is False


# --------------------------------------------------------------------------------------------------- build helpers
def test_arch_list_from_nvcc_keeps_only_supported_wanted_archs(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho sm_70\necho sm_75 sm_80 sm_86\necho sm_90 sm_103\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert arch.arch_list(str(fake)) == "8.0;8.6;9.0+PTX"
    assert arch.gencode_flags("8.0;9.0+PTX") == ["-gencode=arch=compute_80,code=sm_80",
                                                 "-gencode=arch=compute_90,code=sm_90",
                                                 "-gencode=arch=compute_90,code=compute_90"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert arch.arch_list(str(fake)) == "9.0"
    fake.write_text("#!/bin/sh\necho sm_70\n")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    with pytest.raises(RuntimeError, match="supports none of the architectures"):
        arch.arch_list(str(fake))


def test_build_lock_times_out_instead_of_hanging_and_is_released(tmp_path: Path) -> None:
    lock = tmp_path / "x.flock"
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with build.build_lock(lock, 5):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="held the kernel build lock"):
        with build.build_lock(lock, 0.6):
            pass
    assert time.monotonic() - start < 5
    release.set()
    thread.join()
    with build.build_lock(lock, 1):  # a lock whose holder is gone is free again (no stale lock file problem)
        pass


def test_status_without_cuda_names_the_reason(no_cuda: None) -> None:
    status = build.kernel_status.__wrapped__()
    assert status.available is False and status.reason.startswith("no CUDA device") and status.module is None
    assert build.build_tag("8.0") != build.build_tag("9.0") and len(build.build_tag("8.0")) == 16
