"""SepLLM backend semantics: spec worked examples through the backend, modes, retention, SA softmax, config errors."""

from __future__ import annotations

import pytest
import torch

from megatron.sepllm.attention import rules
from megatron.sepllm.attention.backend import SepLLMBackend
from megatron.sepllm.attention.checks import SepAttentionConfigError
from megatron.sepllm.attention.dense import build_dense_mask
from megatron.sepllm.attention.retention import RetentionStats, pattern_counts, should_report
from megatron.sepllm.attention.sa_softmax import sa_attention

from sep_helpers import make_sepllm_cfg, model_cfg

TOKENS = "A B C , D E . F G \\n".split()
VOCAB = {t: i + 10 for i, t in enumerate(dict.fromkeys(TOKENS))}
SEPS = [VOCAB[","], VOCAB["."], VOCAB["\\n"]]


def _example_backend(impl="dense"):
    cfg = make_sepllm_cfg(num_layers=1, window=2, separator_token_ids=SEPS, init_tok_max_idx=0,
                          sep_attention_impl=impl)
    return SepLLMBackend(cfg, model_cfg(num_layers=1))


def test_worked_example_through_backend_mask_and_retention():
    backend = _example_backend("dense")
    ids = torch.tensor([[VOCAB[t] for t in TOKENS]])
    plan = backend.prepare(ids, torch.arange(10)[None], None)
    mask = plan.pattern(0).artifact[0, 0]
    assert int(mask.sum()) == 34
    assert {TOKENS[k] for k in mask[-1].nonzero().flatten().tolist()} == {"A", ",", ".", "G", "\\n"}
    stats = backend.retention.as_dict()
    assert stats["attn_map_retention/layer_00"] == pytest.approx(34 / 55)
    assert stats["kv_retention/layer_00"] == pytest.approx(5 / 10)
    assert stats["forward_calls"] == 1.0
    # accumulated over the run, not overwritten: a second identical call keeps the ratio and counts 2 calls
    backend.prepare(ids, torch.arange(10)[None], None)
    assert backend.retention.as_dict()["attn_map_retention/total"] == pytest.approx(34 / 55)
    assert backend.retention.forward_calls == 2


def test_worked_example_compact_and_dense_agree_on_values():
    torch.manual_seed(0)
    ids = torch.tensor([[VOCAB[t] for t in TOKENS]])
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    outs = []
    for impl in ("dense", "compact"):
        backend = _example_backend(impl)
        plan = backend.prepare(ids, torch.arange(10)[None], None)
        outs.append(backend(q, k, v, 0, plan, scale=0.3))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)


def test_streamingllm_keeps_a_plus_w_at_last_row():
    cfg = make_sepllm_cfg(num_layers=1, window=256, mode="streamingllm", separator_token_ids=[-1],
                          sep_attention_impl="compact")
    backend = SepLLMBackend(cfg, model_cfg(num_layers=1))
    ids = torch.randint(0, 50, (1, 700))
    ids[0, 100:200] = 15  # separator ids must not matter in StreamingLLM mode
    plan = backend.prepare(ids, torch.arange(700)[None], None)
    kv_kept, kv_total, _, _ = pattern_counts(plan.pattern(0).global_keys, 256, None)
    assert (kv_kept, kv_total) == (3 + 256, 700)
    assert backend.retention.as_dict()["kv_retention/total"] == pytest.approx(259 / 700)
    keep = build_dense_mask(plan.pattern(0).global_keys, 256, None)
    assert int(keep[0, 0, -1].sum()) == 259


def test_fixllm_count_at_length_876():
    cfg = make_sepllm_cfg(num_layers=2, window=256, mode="fixllm", USE_FIXED_SEP_INTERVALs=True,
                          fixed_sep_intervals_list=[5, 5], sep_attention_impl="dense")
    backend = SepLLMBackend(cfg, model_cfg(num_layers=2))
    ids = torch.randint(0, 50, (1, 876))
    plan = backend.prepare(ids, torch.arange(876)[None], None)
    assert plan.pattern(0) is plan.pattern(1)  # same (window, interval): one shared pattern
    mask = plan.pattern(0).artifact
    assert int(mask[0, 0, -1].sum()) == 3 + 256 + 123 == 382
    stats = backend.retention.as_dict()
    assert stats["kv_retention/layer_01"] == pytest.approx(382 / 876)
    kept_rows = mask[0, 0].sum(-1)
    assert stats["attn_map_retention/total"] == pytest.approx(float(kept_rows.sum()) / (876 * 877 / 2))


def test_retention_closed_form_matches_mask_with_padding():
    torch.manual_seed(1)
    ids = torch.randint(10, 40, (3, 300))
    valid = torch.ones(3, 300, dtype=torch.long)
    valid[1, :57] = 0
    valid[2, 280:] = 0
    g = rules.global_key_bitmap(ids, list(range(10, 16)), 3, pad_counts=rules.left_pad_counts(valid)) & valid.bool()
    kept, total = rules.row_kept_counts(g, 40, valid)
    allowed = rules.allowed_mask(g, 40, key_valid=valid)
    assert torch.equal(kept, allowed.sum(-1))
    assert torch.equal(total, (rules.causal_band(300, 300)[None] & valid.bool()[:, None, :]).sum(-1))
    kv_k, kv_t, map_k, map_t = pattern_counts(g, 40, valid.bool())
    rows = valid.bool()
    assert map_k == int((allowed.sum(-1) * rows).sum())
    assert kv_k == int(allowed[0, -1].sum() + allowed[1, -1].sum())  # row 2's last query is padding


def test_per_layer_windows_share_patterns_and_full_layers_are_causal():
    cfg = make_sepllm_cfg(num_layers=4, prefill_windows=[2048, 64, 64, 2048], sep_attention_impl="compact")
    backend = SepLLMBackend(cfg, model_cfg(num_layers=4))
    ids = torch.randint(0, 400, (2, 256))
    plan = backend.prepare(ids, torch.arange(256)[None].expand(2, -1), None)
    assert plan.pattern(0).full and plan.pattern(3).full and plan.pattern(0) is plan.pattern(3)
    assert plan.pattern(1) is plan.pattern(2) and not plan.pattern(1).full
    assert len(plan.distinct_patterns()) == 2
    stats = backend.retention.as_dict()
    assert stats["attn_map_retention/layer_00"] == 1.0 and stats["attn_map_retention/layer_01"] < 1.0
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 256, 16) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
    torch.testing.assert_close(backend(q, k, v, 0, plan, scale=0.25), expected)


def test_auto_selection_rules():
    mc = model_cfg(num_layers=1)
    assert SepLLMBackend(make_sepllm_cfg(num_layers=1), mc).resolve_impl(torch.device("cpu")) == "compact"
    assert SepLLMBackend(make_sepllm_cfg(num_layers=1), mc).resolve_impl(torch.device("cuda")) == "flex_compact"
    nokernel = make_sepllm_cfg(num_layers=1, USE_SEP_ATTN_KERNEL_ACCELERATOR=False)
    assert SepLLMBackend(nokernel, mc).resolve_impl(torch.device("cpu")) == "dense"
    explicit = make_sepllm_cfg(num_layers=1, USE_SEP_ATTN_KERNEL_ACCELERATOR=False, sep_attention_impl="compact")
    assert SepLLMBackend(explicit, mc).resolve_impl(torch.device("cuda")) == "compact"
    assert SepLLMBackend(make_sepllm_cfg(num_layers=1, mode="sa"), mc).resolve_impl(torch.device("cpu")) == "dense"


@pytest.mark.parametrize("kw, match", [
    (dict(sep_attention_impl="fast"), "sep_attention_impl"),
    (dict(mode="sa", sep_attention_impl="compact"), "dense path only"),
    (dict(separator_token_ids=[-1]), "separator_token_ids"),
    (dict(prefill_windows=[64]), "prefill_windows .* has 1 entries but num_layers is 2"),
    (dict(prefill_windows=[64, 0]), "prefill_windows .* entries must be >= 1, got 0"),
    (dict(mode="fixllm"), "fixed_sep_intervals_list"),
    (dict(mode="bogus"), "mode"),
    (dict(init_tok_max_idx=-2), "init_tok_max_idx"),
])
def test_config_errors_are_clear(kw, match):
    with pytest.raises(SepAttentionConfigError, match=match):
        SepLLMBackend(make_sepllm_cfg(num_layers=2, **kw), model_cfg(num_layers=2))


def test_flex_refuses_cpu_training_with_clear_error():
    backend = SepLLMBackend(make_sepllm_cfg(num_layers=1, sep_attention_impl="flex"), model_cfg(num_layers=1))
    ids = torch.randint(0, 400, (1, 128))
    q, k, v = (torch.randn(1, 2, 128, 16, requires_grad=True) for _ in range(3))
    plan = backend.prepare(ids, torch.arange(128)[None], None)
    with pytest.raises(SepAttentionConfigError, match="use sep_attention_impl='compact'|Use sep_attention_impl='compact'"):
        backend(q, k, v, 0, plan, scale=0.25)


def test_compact_rejects_dropout_but_auto_falls_back_to_dense():
    torch.manual_seed(0)
    ids = torch.randint(0, 400, (1, 64))
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    explicit = SepLLMBackend(make_sepllm_cfg(num_layers=1, sep_attention_impl="compact", window=16), model_cfg(1))
    with pytest.raises(SepAttentionConfigError, match="dropout"):
        explicit(q, k, v, 0, explicit.prepare(ids, torch.arange(64)[None], None), scale=0.25, dropout_p=0.1)
    auto = SepLLMBackend(make_sepllm_cfg(num_layers=1, window=16), model_cfg(1))
    out = auto(q, k, v, 0, auto.prepare(ids, torch.arange(64)[None], None), scale=0.25, dropout_p=0.5)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_retention_stats_formatting_and_reporting():
    stats = RetentionStats(2)
    stats.update(0, 5, 10, 34, 55)
    stats.update(1, 10, 10, 55, 55)
    stats.count_forward()
    d = stats.as_dict()
    assert d["kv_retention/total"] == pytest.approx(15 / 20) and d["attn_map_retention/total"] == pytest.approx(89 / 110)
    assert "kv_retention/total=0.7500" in stats.format_line()
    assert [should_report(n, 4) for n in (0, 3, 4, 8)] == [False, False, True, True]


# ------------------------------------------------------------------------------------------------ SA softmax
def _sa_reference(q, k, v, eps_n, eps_d, no_deno):
    """The fixed SA formula written out row by row in float64 (causal, min/max over causal entries only)."""
    b, h, s, d = q.shape
    out = torch.zeros(b, h, s, d, dtype=torch.float64)
    for i in range(s):
        scores = (q[:, :, i:i + 1].double() @ k[:, :, : i + 1].double().transpose(-1, -2)) / d ** 0.5  # [b,h,1,i+1]
        p = torch.softmax(scores, dim=-1)
        if no_deno:
            adj = p * scores
        else:
            lo = torch.clamp(scores.min(dim=-1, keepdim=True).values, max=0.0)
            hi = torch.clamp(scores.max(dim=-1, keepdim=True).values, min=0.0) + eps_d
            adj = p * (scores - lo + eps_n) / (hi - lo)
        out[:, :, i] = (adj @ v[:, :, : i + 1].double())[:, :, 0]
    return out


@pytest.mark.parametrize("mode", ["sa", "sa_no_deno"])
def test_sa_softmax_matches_fixed_formula(mode):
    torch.manual_seed(0)
    cfg = make_sepllm_cfg(num_layers=1, mode=mode, window=4096, separator_token_ids=[-1],
                          SA_Numerator_Bias=1e-3, SA_Denominator_Bias=1e-2)
    backend = SepLLMBackend(cfg, model_cfg(num_layers=1))
    q, k, v = (torch.randn(2, 2, 24, 8) for _ in range(3))
    plan = backend.prepare(torch.randint(0, 50, (2, 24)), torch.arange(24)[None].expand(2, -1), None)
    out = backend(q, k, v, 0, plan, scale=8 ** -0.5)
    ref = _sa_reference(q, k, v, 1e-3, 1e-2, mode == "sa_no_deno")
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_sa_softmax_bf16_stays_bf16_and_is_finite():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 8, dtype=torch.bfloat16) for _ in range(3))
    keep = torch.ones(32, 32, dtype=torch.bool).tril()[None, None]
    out = sa_attention(q, k, v, keep, scale=8 ** -0.5)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = sa_attention(q.float(), k.float(), v.float(), keep, scale=8 ** -0.5)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
