"""GPTModel behaviour: parameter count, padding, ALiBi, GQA, BiPE, init methods, checkpointing, loss, FLOPs."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from megatron.config.model import ModelConfig
from megatron.config.sepllm import SepLLMConfig
from megatron.model import CausalSDPABackend, GPTModel, build_attention_backend, flops_per_token, lm_loss
from megatron.model.attention_backend import alibi_bias
from megatron.model.init import init_method_std
from megatron.model.norms import RMSNorm, ScaleNorm
from megatron.model.positional import alibi_slopes

VOCAB = 64


def tiny(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32, pos_emb="rotary",
                rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True, padded_vocab_size=VOCAB)
    base.update(kw)
    return ModelConfig(**base)


def test_pythia_160m_parameter_count() -> None:
    cfg = ModelConfig(num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=2048, pos_emb="rotary",
                      rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True, padded_vocab_size=50304,
                      norm="layernorm", activation="gelu")
    with torch.device("meta"):
        model = GPTModel(cfg)
    assert model.num_parameters() == 162_322_944


def test_tied_embeddings_share_weight_and_logits_dtype() -> None:
    model = GPTModel(tiny(no_weight_tying=False))
    assert model.output_layer is None
    n_untied = GPTModel(tiny()).num_parameters()
    assert n_untied - model.num_parameters() == VOCAB * 32
    out = model.to(torch.bfloat16)(torch.randint(0, VOCAB, (1, 8)))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 8, VOCAB)


@pytest.mark.parametrize("pos_emb", ["rotary", "learned", "alibi", "none"])
def test_left_padding_matches_unpadded_rows(pos_emb: str) -> None:
    torch.manual_seed(0)
    model = GPTModel(tiny(pos_emb=pos_emb, gpt_j_residual=False)).eval()
    ids = torch.randint(1, VOCAB, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        row0 = model(ids[:1, 3:])
        row1 = model(ids[1:])
    torch.testing.assert_close(batched[0, 3:], row0[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1], row1[0], atol=1e-5, rtol=0)
    assert torch.isfinite(batched).all()


@pytest.mark.parametrize("pos_emb", ["rotary", "alibi"])
def test_right_padding_takes_causal_path_with_same_real_logits(pos_emb: str) -> None:
    torch.manual_seed(0)
    model = GPTModel(tiny(pos_emb=pos_emb)).eval()
    ids = torch.randint(1, VOCAB, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    assert model.attention_backend.prepare(ids, ids, mask).allowed is None
    left = mask.flip(-1)
    assert model.attention_backend.prepare(ids, ids, left).allowed is not None
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        alone = model(ids[1:, :6])
    torch.testing.assert_close(batched[1, :6], alone[0], atol=1e-5, rtol=0)


def test_position_ids_reach_the_model() -> None:
    torch.manual_seed(0)
    model = GPTModel(tiny()).eval()
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        default = model(ids)
        explicit = model(ids, position_ids=torch.arange(8).unsqueeze(0))
        shifted = model(ids, position_ids=torch.arange(8).unsqueeze(0) + 5)
    torch.testing.assert_close(default, explicit)
    # rotary is relative: a constant shift leaves logits unchanged up to rounding, but a non-uniform change does not
    torch.testing.assert_close(default, shifted, atol=1e-4, rtol=0)
    with torch.no_grad():
        scrambled = model(ids, position_ids=torch.tensor([[0, 1, 2, 3, 9, 10, 11, 12]]))
    assert not torch.allclose(default[:, 4:], scrambled[:, 4:], atol=1e-4)


def test_alibi_slopes_exact() -> None:
    assert alibi_slopes(8).tolist() == [2.0 ** -(i + 1) for i in range(8)]
    expected12 = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected12))


def reference_attention(q, k, v, scale, positions, slopes=None, key_valid=None):
    """Explicit softmax attention with repeated KV heads, ALiBi and padding (written independently of SDPA)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) * scale
    if slopes is not None:
        for h in range(q.shape[1]):
            dist = positions[:, :, None].float() - positions[:, None, :].float()
            scores[:, h] = scores[:, h] - slopes[h] * dist
    allowed = torch.ones(s, s, dtype=torch.bool).tril().expand(q.shape[0], 1, s, s).clone()
    if key_valid is not None:
        allowed &= key_valid.bool()[:, None, None, :] | torch.eye(s, dtype=torch.bool)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (6, 1)])
@pytest.mark.parametrize("alibi,precompute", [(False, False), (True, False), (True, True)])
def test_causal_backend_matches_reference_forward_and_backward(hq: int, hkv: int, alibi: bool,
                                                               precompute: bool) -> None:
    torch.manual_seed(0)
    b, s, d = 2, 9, 8
    q = torch.randn(b, hq, s, d, requires_grad=True)
    k = torch.randn(b, hkv, s, d, requires_grad=True)
    v = torch.randn(b, hkv, s, d, requires_grad=True)
    ids = torch.randint(0, 50, (b, s))
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, :4] = 0
    pos = ((mask.cumsum(-1) - 1) * mask).clamp(min=0)
    slopes = alibi_slopes(hq) if alibi else None
    backend = CausalSDPABackend(alibi=precompute)
    for key_valid in (None, mask):
        state = backend.prepare(ids, pos, key_valid)
        out = backend(q, k, v, 0, state, scale=d ** -0.5, alibi_slopes=slopes)
        ref = reference_attention(q, k, v, d ** -0.5, pos, slopes, key_valid)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_alibi_bias_formula() -> None:
    slopes = torch.tensor([0.5, 0.25])
    bias = alibi_bias(slopes, torch.tensor([[0, 1, 3]]))
    assert bias.shape == (1, 2, 3, 3)
    assert bias[0, 0, 2].tolist() == [-1.5, -1.0, 0.0]
    assert bias[0, 1, 1].tolist() == [-0.25, 0.0, 0.5]


def test_gqa_model_trains() -> None:
    torch.manual_seed(0)
    model = GPTModel(tiny(num_attention_heads=4, num_kv_heads=2, norm="rmsnorm", activation="swiglu",
                          intermediate_size=96, gpt_j_residual=False, use_bias_in_attn_linear=False, use_bias_in_mlp=False))
    assert model.layers[0].attention.query_key_value.weight.shape == ((4 + 2 * 2) * 8, 32)
    ids = torch.randint(0, VOCAB, (2, 12))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("layers_per_chunk", [1, 2])
def test_activation_checkpointing_identical_loss_and_grads(layers_per_chunk: int) -> None:
    cfg = tiny(num_layers=3, hidden_dropout=0.1, attention_dropout=0.1, pos_emb="alibi")
    torch.manual_seed(0)
    plain = GPTModel(cfg).train()
    ckpt = GPTModel(dataclasses.replace(cfg, checkpoint_activations=True, checkpoint_num_layers=layers_per_chunk))
    ckpt.load_state_dict(plain.state_dict())
    ckpt.train()
    ids = torch.randint(0, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(123)
        loss = lm_loss(model(ids[:, :-1], attention_mask=mask[:, :-1]), ids[:, 1:], mask[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    model = GPTModel(tiny(hidden_dropout=0.3))
    ids = torch.randint(0, VOCAB, (1, 8))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(ids), model(ids))


@pytest.mark.parametrize("method", ["normal", "scaled_normal", "wang_init", "small_init",
                                    "single_residual_scaled_normal"])
def test_normal_init_stds(method: str) -> None:
    cfg = tiny(num_layers=4, hidden_size=128, num_attention_heads=4, init_method=method,
               output_layer_init_method=method, init_method_std=0.02)
    torch.manual_seed(0)
    model = GPTModel(cfg)
    expected = {"normal": 0.02, "scaled_normal": 0.02 / math.sqrt(8), "wang_init": 2 / 4 / math.sqrt(128),
                "small_init": math.sqrt(2 / (5 * 128)), "single_residual_scaled_normal": 0.02 / 2}[method]
    assert init_method_std(method, cfg) == pytest.approx(expected)
    w = model.layers[0].mlp.dense_h_to_4h.weight
    assert w.std().item() == pytest.approx(expected, rel=0.05)
    assert w.mean().abs().item() < expected * 0.05
    assert torch.count_nonzero(model.layers[0].mlp.dense_h_to_4h.bias) == 0


def test_output_layer_init_applies_to_residual_projections() -> None:
    cfg = tiny(num_layers=8, hidden_size=128, init_method="normal", output_layer_init_method="scaled_normal",
               init_method_std=0.02)
    torch.manual_seed(0)
    model = GPTModel(cfg)
    scaled = 0.02 / math.sqrt(16)
    layer = model.layers[0]
    assert layer.attention.dense.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert layer.mlp.dense_4h_to_h.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert layer.attention.query_key_value.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.embed.word_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.output_layer.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(layer.input_layernorm.weight, torch.ones(128))


def test_orthogonal_and_xavier_inits() -> None:
    torch.manual_seed(0)
    model = GPTModel(tiny(hidden_size=64, init_method="orthogonal", output_layer_init_method="scaled_orthogonal"))
    w = model.layers[0].attention.query_key_value.weight  # [192, 64]: orthonormal columns scaled by sqrt(2)
    torch.testing.assert_close(w.T @ w, 2.0 * torch.eye(64), atol=1e-4, rtol=0)
    d = model.layers[0].attention.dense.weight  # square: gain sqrt(2 / L) = 1 for L = 2
    torch.testing.assert_close(d @ d.T, torch.eye(64), atol=1e-4, rtol=0)
    model = GPTModel(tiny(hidden_size=64, init_method="xavier_uniform", output_layer_init_method="xavier_normal"))
    w = model.layers[0].mlp.dense_h_to_4h.weight  # fan_in 64, fan_out 256
    bound = math.sqrt(6 / (64 + 256))
    assert w.abs().max().item() <= bound and w.std().item() == pytest.approx(math.sqrt(2 / 320), rel=0.05)
    assert model.layers[0].mlp.dense_4h_to_h.weight.std().item() == pytest.approx(math.sqrt(2 / 320), rel=0.05)


def test_rmsnorm_and_scalenorm_formulas() -> None:
    x = torch.randn(3, 16)
    rms = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        rms.weight.normal_()
    torch.testing.assert_close(rms(x), F.rms_norm(x, (16,), rms.weight, eps=1e-6))
    sn = ScaleNorm(16, eps=1e-5)
    with torch.no_grad():
        sn.g.fill_(3.0)
    torch.testing.assert_close(sn(x), 3.0 * x / x.norm(dim=-1, keepdim=True))
    model = GPTModel(tiny(norm="scalenorm"))
    assert torch.isfinite(model(torch.randint(0, VOCAB, (1, 5)))).all()


# ------------------------------------------------------------------------------------------------------------- BiPE
SEP = 7


def test_bipe_positions_spec_examples() -> None:
    model = GPTModel(tiny(), SepLLMConfig(USE_BiPE=True, BiPE_seps=[SEP]))
    ids = torch.tensor([[SEP, 5, 5, 5, SEP, SEP, 6], [5, 6, SEP, 7 + 1, 8 + 1, SEP, 9]])
    inter, intra = model.context.positions(ids, None, None)
    assert intra.tolist() == [[0, 0, 1, 2, 3, 0, 0], [0, 1, 2, 0, 1, 2, 0]]
    assert inter.tolist() == [[0, 1, 1, 1, 1, 2, 3], [0, 0, 0, 1, 1, 1, 2]]
    # left padding: the padded row gets the unpadded row's ids
    padded = torch.tensor([[0, 0, 5, 6, SEP, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    inter_p, intra_p = model.context.positions(padded, None, mask)
    inter_u, intra_u = model.context.positions(padded[:, 2:], None, None)
    assert inter_p[0, 2:].tolist() == inter_u[0].tolist() and intra_p[0, 2:].tolist() == intra_u[0].tolist()
    with pytest.raises(ValueError, match="position_ids=None"):
        model(ids, position_ids=torch.ones_like(ids))
    # positions restarted per document (reset_position_ids) restart both BiPE ids there
    restart = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]])
    inter_r, intra_r = model.context.positions(ids, restart, None)
    inter_d, intra_d = model.context.positions(ids[:1, 3:], None, None)
    assert inter_r[0, 3:].tolist() == inter_d[0].tolist() and intra_r[0, 3:].tolist() == intra_d[0].tolist()
    assert inter_r[1].tolist() == inter[1].tolist() and intra_r[1].tolist() == intra[1].tolist()


def _copy_common(dst: GPTModel, src: GPTModel) -> None:
    """Copy a BiPE model's weights into a plain one: everything but BiPE's intra-position table must match."""
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert (missing, unexpected) == ([], ["embed.position_embeddings.weight"])


@pytest.mark.parametrize("pos_emb", ["rotary", "alibi"])
def test_bipe_inter_ids_drive_rotary_and_alibi(pos_emb: str) -> None:
    """BiPE model with a zeroed intra table == plain model fed position_ids = inter."""
    torch.manual_seed(0)
    bipe = GPTModel(tiny(pos_emb=pos_emb, rotary_pct=1.0), SepLLMConfig(USE_BiPE=True, BiPE_seps=[SEP])).eval()
    with torch.no_grad():
        bipe.embed.position_embeddings.weight.zero_()
    plain = GPTModel(tiny(pos_emb=pos_emb, rotary_pct=1.0)).eval()
    _copy_common(plain, bipe)
    ids = torch.tensor([[3, 4, SEP, 5, 6, 8, SEP, SEP, 9, 10, 11, 12]])
    inter, _ = bipe.context.positions(ids, None, None)
    with torch.no_grad():
        torch.testing.assert_close(bipe(ids), plain(ids, position_ids=inter), atol=1e-5, rtol=0)
        # and it is not the same as ordinary positions (the test could fail)
        assert not torch.allclose(bipe(ids)[:, 3:], plain(ids)[:, 3:], atol=1e-4)
        # changing which token is a separator changes the positions seen by later tokens
        other = ids.clone()
        other[0, 2] = 2
        changed = bipe(other)
    assert not torch.allclose(changed[:, 4:], bipe(ids)[:, 4:], atol=1e-4)


def test_bipe_intra_ids_index_learned_table() -> None:
    """BiPE with pos_emb none == a learned-position model fed position_ids = intra."""
    torch.manual_seed(0)
    bipe = GPTModel(tiny(pos_emb="none"), SepLLMConfig(USE_BiPE=True, BiPE_seps=[SEP])).eval()
    learned = GPTModel(tiny(pos_emb="learned")).eval()
    learned.load_state_dict(bipe.state_dict())
    ids = torch.tensor([[3, 4, SEP, 5, 6, 8, SEP, 9]])
    _, intra = bipe.context.positions(ids, None, None)
    with torch.no_grad():
        torch.testing.assert_close(bipe(ids), learned(ids, position_ids=intra), atol=1e-6, rtol=0)
    assert bipe.embed.position_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.1)


# ------------------------------------------------------------------------------------------------------- interface
def test_backend_factory_and_exposure() -> None:
    assert isinstance(build_attention_backend(tiny(), None), CausalSDPABackend)
    assert isinstance(build_attention_backend(tiny(), SepLLMConfig(mode="full")), CausalSDPABackend)
    model = GPTModel(tiny())
    assert isinstance(model.attention_backend, CausalSDPABackend) and not model.attention_backend.alibi
    assert GPTModel(tiny(pos_emb="alibi")).attention_backend.alibi


def test_backend_factory_sepllm_mode_uses_sepllm_backend() -> None:
    from megatron.sepllm.attention.backend import SepLLMBackend

    cfg = SepLLMConfig(separator_token_ids=[SEP], mode="sepllm", prefill_windows=[4, 4], generate_windows=[4, 4])
    backend = build_attention_backend(tiny(), cfg)
    assert type(backend) is SepLLMBackend


def test_fusion_flags_fall_back_with_one_log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron.kernels import KernelStatus, plan

    monkeypatch.setattr(plan, "kernel_status", lambda: KernelStatus(False, "no kernels (test)"))
    with caplog.at_level(logging.INFO, logger="megatron.model.gpt"):
        GPTModel(tiny(rope_fusion=True, bias_gelu_fusion=True, layernorm_fusion=True))
    records = [r for r in caplog.records if "fused kernels requested" in r.getMessage()]
    assert len(records) == 1 and "rope_fusion" in records[0].getMessage()


@pytest.mark.parametrize("change,match", [
    (dict(padded_vocab_size=None), "padded_vocab_size"),
    (dict(pos_emb="rpe"), "pos_emb"),
    (dict(norm="batchnorm"), "norm"),
    (dict(activation="tanh"), "activation"),
    (dict(init_method="kaiming"), "init_method"),
    (dict(output_layer_init_method="zeros"), "output_layer_init_method"),
    (dict(attention_config=[[["local"], 2]]), "attention_config"),
    (dict(attention_config=[[["global"], 3]]), "attention_config"),
    (dict(gpt_j_tied=True, gpt_j_residual=False), "gpt_j_tied"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(hidden_size=30), "hidden_size"),
    (dict(rotary_pct=0.2), "rotary_pct"),
])
def test_bad_config_raises_clear_error(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GPTModel(dataclasses.replace(tiny(), **change))


def test_attention_config_accepts_neox_forms() -> None:
    """GPT-NeoX's ``[[pattern, count]]`` form and per-layer lists expand to one type per layer; global and flash are
    both dense causal attention, so the model computes exactly what it computes without the key."""
    from megatron.model.context import check_model_config

    forms = [
        (None, ["global", "global"]),
        ([[["global"], 2]], ["global", "global"]),
        (["flash", "global"], ["flash", "global"]),
        ([[["flash", "global"], 1]], ["flash", "global"]),     # GPT-NeoX: the pattern is appended `count` times
        ([[["flash"], "all"]], ["flash", "flash"]),
        ([[["global"], 1], [["flash"], 1]], ["global", "flash"]),
    ]
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    want = GPTModel(tiny()).eval()(ids)
    for spec, types in forms:
        assert check_model_config(tiny(attention_config=spec)).attention_config == types, spec
        torch.manual_seed(0)
        torch.testing.assert_close(GPTModel(tiny(attention_config=spec)).eval()(ids), want, rtol=0, atol=0)


def test_bipe_without_separators_raises() -> None:
    with pytest.raises(ValueError, match="BiPE_seps"):
        GPTModel(tiny(), SepLLMConfig(USE_BiPE=True, BiPE_seps=None, separator_token_ids=None))


def test_learned_positions_out_of_range_raises() -> None:
    model = GPTModel(tiny(pos_emb="learned", seq_length=8))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 9, dtype=torch.long))


# ------------------------------------------------------------------------------------------------------ loss, flops
def test_lm_loss_matches_cross_entropy_and_masks() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    torch.testing.assert_close(lm_loss(logits, labels), F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1)))
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 1]])
    sel = mask.bool()
    torch.testing.assert_close(lm_loss(logits, labels, mask), F.cross_entropy(logits[sel], labels[sel]))
    ignored = labels.masked_fill(~sel, -100)
    torch.testing.assert_close(lm_loss(logits, ignored), F.cross_entropy(logits[sel], labels[sel]))
    half = lm_loss(logits.to(torch.bfloat16), labels)
    assert half.dtype == torch.float32
    assert lm_loss(logits, labels, torch.zeros_like(mask)).item() == 0.0


def test_flops_per_token_formula() -> None:
    cfg = ModelConfig(num_layers=12, hidden_size=768, num_attention_heads=12, padded_vocab_size=50304)
    h, L, S, V = 768, 12, 2048, 50304
    n = L * (3 * h * h + h * h + 8 * h * h) + h * V
    assert flops_per_token(cfg, S, V) == 6 * n + 12 * L * h * S
    assert flops_per_token(cfg, S, V, backward=False) == 2 * n + 4 * L * h * S
    gqa = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=8, num_kv_heads=2, activation="swiglu",
                      intermediate_size=150)   # gated: int(150 * 2/3) = 100 features, halves of 50
    assert flops_per_token(gqa, 16, 10, backward=False) == 2 * (64 * (8 + 4) * 8 + 64 * 64 + 3 * 64 * 50 + 640) \
        + 4 * 64 * 16


@pytest.mark.gpu
def test_cuda_matches_cpu_and_runs_bf16() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    cfg = tiny(pos_emb="alibi", num_kv_heads=2)
    model = GPTModel(cfg).eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        cpu = model(ids, attention_mask=mask)
        gpu = model.cuda()(ids.cuda(), attention_mask=mask.cuda()).cpu()
        torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)
        half = model.to(torch.bfloat16)(ids.cuda())
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
