"""The compiled kernels on a GPU equal their PyTorch references (fp32 1e-5, bf16 1e-2 relative), forward and
backward, and a tiny model trains the same with fusion on and off. Run by ``tools/gpu_check.sh``; skipped without
CUDA. With CUDA present the kernels must load (build or JIT): an unavailable kernel fails here with its reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron.config.model import ModelConfig
from megatron.kernels import kernel_status, rotary_tables
from megatron.kernels.norms import norm_backward_reference, norm_forward_reference, norm_bwd, norm_fwd
from megatron.kernels.rope import rope_op, rope_reference
from megatron.model.gpt import GPTModel
from megatron.model.norms import FusedLayerNorm, FusedRMSNorm

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
SHAPES = {"bshd": (2, 33, 4, 64), "sbhd": (33, 2, 4, 64), "bhsd": (2, 4, 33, 64)}


@pytest.fixture(autouse=True)
def cuda_kernels() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    status = kernel_status()
    assert status.available, f"fused kernels unavailable on this GPU machine: {status.reason}"


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["bshd", "sbhd", "bhsd"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot", [64, 16])
@pytest.mark.parametrize("backward", [False, True])
def test_rope_kernel_equals_reference(dtype: torch.dtype, layout: str, interleaved: bool, rot: int,
                                      backward: bool) -> None:
    torch.manual_seed(0)
    q = torch.randn(SHAPES[layout], device="cuda", dtype=dtype)
    k = torch.randn(SHAPES[layout], device="cuda", dtype=dtype)[..., :1, :] if layout != "bhsd" else \
        torch.randn(2, 1, 33, 64, device="cuda", dtype=dtype)
    pos = torch.tensor([[7], [100]], device="cuda") + torch.arange(33, device="cuda")  # per-row offsets
    cos, sin = rotary_tables(pos, rot, 10000.0, interleaved, dtype=dtype)
    out_q, out_k = rope_op(q, k, cos, sin, layout, interleaved, backward)
    close(out_q, rope_reference(q, cos, sin, layout, interleaved, backward), dtype)
    close(out_k, rope_reference(k, cos, sin, layout, interleaved, backward), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rms,with_bias", [(False, True), (False, False), (True, False)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("cols", [64, 2048, 5000])
def test_norm_kernels_equal_reference(dtype: torch.dtype, rms: bool, with_bias: bool, with_residual: bool,
                                      cols: int) -> None:
    torch.manual_seed(0)
    rows = 300
    x = torch.randn(rows, cols, device="cuda", dtype=dtype) * 2 + 0.5
    r = torch.randn(rows, cols, device="cuda", dtype=dtype) if with_residual else None
    w = torch.randn(cols, device="cuda", dtype=dtype)
    b = torch.randn(cols, device="cuda", dtype=dtype) if with_bias else None
    y, h, stats = norm_fwd(x, r, w, b, 1e-5, rms)
    y_ref, h_ref, stats_ref = norm_forward_reference(x, r, w, b, 1e-5, rms)
    close(y, y_ref, dtype)
    if with_residual:
        assert torch.equal(h, h_ref)
    torch.testing.assert_close(stats.cpu(), stats_ref.float().cpu(), rtol=1e-4, atol=1e-5)
    gy = torch.randn_like(x)
    gh = torch.randn_like(x) if with_residual else None
    saved = h if with_residual else x
    got = norm_bwd(gy, gh, saved, w, stats, rms, with_bias)
    want = norm_backward_reference(gy, gh, saved, w, stats, rms, with_bias)
    close(got[0], want[0], dtype)
    # column sums over 300 rows: compare relative to their scale
    scale = want[1].float().abs().max().item() + 1.0
    torch.testing.assert_close(got[1].float().cpu() / scale, want[1].float().cpu() / scale, rtol=TOL[dtype],
                               atol=TOL[dtype])
    if with_bias:
        scale = want[2].float().abs().max().item() + 1.0
        torch.testing.assert_close(got[2].float().cpu() / scale, want[2].float().cpu() / scale, rtol=TOL[dtype],
                                   atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm,flag,cls", [("layernorm", "layernorm_fusion", FusedLayerNorm),
                                           ("rmsnorm", "rmsnorm_fusion", FusedRMSNorm)])
def test_tiny_model_loss_and_grads_fusion_on_vs_off(dtype: torch.dtype, norm: str, flag: str, cls: type) -> None:
    base = dict(num_layers=2, hidden_size=128, num_attention_heads=4, seq_length=64, pos_emb="rotary",
                rotary_pct=0.25, padded_vocab_size=256, norm=norm)
    torch.manual_seed(0)
    off = GPTModel(ModelConfig(**base)).to("cuda", dtype)
    on = GPTModel(ModelConfig(**base, rope_fusion=True, **{flag: True})).to("cuda", dtype)
    assert isinstance(on.final_layernorm, cls) and on.layers[0].attention.rope_fused
    on.load_state_dict(off.state_dict())
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    losses = []
    for model in (off, on):
        logits = model(ids)
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        losses.append(loss.detach())
    close(losses[1], losses[0], dtype)
    for (name, p_off), p_on in zip(off.named_parameters(), on.parameters()):
        scale = p_off.grad.float().abs().max().item() + 1e-3
        tol = TOL[dtype] * (5 if dtype == torch.bfloat16 else 10)
        torch.testing.assert_close(p_on.grad.float() / scale, p_off.grad.float() / scale, rtol=tol, atol=tol,
                                   msg=name)
