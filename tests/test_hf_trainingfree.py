"""Training-free SepLLM on HF models (megatron/sepllm/hf/trainingfree.py): exactness against explicit masks built from
megatron.sepllm.attention.rules, decode over the whole history, FixLLM/StreamingLLM counts, retention, and bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from megatron.config.errors import ConfigError
from megatron.sepllm.attention import rules
from megatron.sepllm.hf.trainingfree import SepLLMRuntimeError, apply_sepllm
from megatron.sepllm.hf.compat import cache_kwargs, output_cache
from megatron.sepllm.hf.config import (TrainingFreeConfigError, load_trainingfree_config, resolve_for_model,
                                       sepllm_config_from_mapping)

VOCAB = 64
SEPS = [3, 5, 7]


def _tiny(kind: str, attn: str = "sdpa", layers: int = 2):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=1024)
        model = GPTNeoXForCausalLM(cfg)
    model.set_attn_implementation(attn)
    return model.eval()


def _cfg(**kw):
    base = dict(Layer_num=2, separator_token_ids=SEPS, prefill_local_window_size=4, generate_local_window_size=3,
                init_tok_max_idx=1, BATCH_ADAPTIVE_INIT_POS=True)
    base.update(kw)
    return sepllm_config_from_mapping(base)


def _batch(seq: int = 16, pad: int = 5):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(8, VOCAB, (2, seq), generator=g)
    ids[:, 6] = 3                       # separators inside the rows (far from the end so they matter)
    ids[0, 9] = 5
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0                   # row 1 is left padded
    ids[1, :pad] = 0
    return ids, mask


def _additive(allowed):
    """bool [B, 1, Q, K] -> additive float mask (HF eager adds the mask; SDPA accepts both)."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _reference_mask(ids, mask, window, num_initial=2):
    """Explicit [B, 1, S, S] mask from rules.allowed_mask (padding query rows keep their diagonal: no NaN)."""
    g = rules.global_key_bitmap(ids, SEPS, num_initial, rules.left_pad_counts(mask))
    allowed = rules.allowed_mask(g, window, key_valid=mask) | torch.eye(ids.shape[1], dtype=torch.bool)
    return allowed.unsqueeze(1)


@pytest.mark.parametrize("kind", ["llama", "gpt_neox"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefill_logits_match_explicit_rule_mask(kind, attn):
    model = _tiny(kind, attn)
    ids, mask = _batch()
    plain = model(input_ids=ids, attention_mask=mask).logits
    handle = apply_sepllm(model, _cfg())
    assert model.config._attn_implementation == ("sepllm_mask_" + attn)
    out = model(input_ids=ids, attention_mask=mask).logits
    handle.remove()
    assert model.config._attn_implementation == attn
    ref = model(input_ids=ids, attention_mask=_additive(_reference_mask(ids, mask, window=4))).logits
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=0)
    assert (out[valid] - plain[valid]).abs().max() > 1e-3        # the SepLLM mask really changed something


def test_prefill_backward_matches_explicit_rule_mask():
    model = _tiny("llama").train()
    ids, mask = _batch()
    ref_loss = model(input_ids=ids, attention_mask=_reference_mask(ids, mask, 4)).logits[mask.bool()].logsumexp(-1).sum()
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    with apply_sepllm(model, _cfg()):
        loss = model(input_ids=ids, attention_mask=mask).logits[mask.bool()].logsumexp(-1).sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_per_layer_windows_use_each_layers_mask():
    model = _tiny("llama", layers=3)
    ids, mask = _batch()
    windows = [2, 16, 5]
    cfg = _cfg(Layer_num=3, USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS=True, prefill_loc_win_size_list=windows)
    with apply_sepllm(model, cfg) as handle:
        out = model(input_ids=ids, attention_mask=mask).logits
        masks = handle.prefill_masks(ids, mask)
    ref_masks = [_reference_mask(ids, mask, w) for w in windows]
    for m, r in zip(masks, ref_masks):
        assert torch.equal(m | torch.eye(ids.shape[1], dtype=torch.bool), r)

    def per_layer_reference(module, q, k, v, attention_mask, dropout=0.0, scaling=None, **kw):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, q, k, v, ref_masks[module.layer_idx], dropout=dropout, scaling=scaling,
                                      is_causal=False, **kw)

    AttentionInterface.register("test_per_layer_reference", per_layer_reference)
    model.set_attn_implementation("test_per_layer_reference")
    ref = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=0)


def test_original_full_attention_is_the_unmodified_model():
    model = _tiny("llama")
    ids, mask = _batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    handle = apply_sepllm(model, _cfg(USE_ORIGINAL_FULL_ATTEN=True))
    assert "forward" not in model.__dict__ and model.config._attn_implementation == "sdpa"
    after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    assert handle.retention()["mode"] == "full"
    handle.remove()


def test_remove_restores_forward_and_attention():
    model = _tiny("gpt_neox")
    ids, mask = _batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    handle = apply_sepllm(model, _cfg())
    with pytest.raises(SepLLMRuntimeError, match="already applied"):
        apply_sepllm(model, _cfg())
    handle.remove()
    assert "forward" not in model.__dict__
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    apply_sepllm(model, _cfg()).remove()      # can be applied again after remove


@pytest.mark.parametrize("kind", ["llama", "gpt_neox"])
def test_decode_step_matches_full_forward_with_decode_mask(kind):
    model = _tiny(kind)
    ids, mask = _batch(seq=12, pad=3)
    seq = ids.shape[1]
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    nxt = torch.tensor([[5], [9]])                       # a separator in row 0 becomes a global key
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    with apply_sepllm(model, _cfg()) as handle:
        pre = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        dec = model(input_ids=nxt, attention_mask=mask2, position_ids=pos[:, -1:] + 1,
                    **cache_kwargs(model, output_cache(pre)), use_cache=True)
        stats = handle.retention()
    full = torch.cat([ids, nxt], 1)
    g = rules.global_key_bitmap(full, SEPS, 2, rules.left_pad_counts(mask))
    prefill_rows = rules.allowed_mask(g[:, :seq], 4, key_valid=mask) | torch.eye(seq, dtype=torch.bool)
    prefill_rows = torch.cat([prefill_rows, torch.zeros(2, seq, 1, dtype=torch.bool)], 2)
    decode_row = rules.decode_keep_mask(g, 3, key_valid=mask2)          # generate window 3 over the whole history
    ref_mask = torch.cat([prefill_rows, decode_row[:, None]], 1).unsqueeze(1)
    ref = model(input_ids=full, attention_mask=ref_mask, position_ids=torch.cat([pos, pos[:, -1:] + 1], 1)).logits
    torch.testing.assert_close(dec.logits[:, -1], ref[:, -1], atol=1e-5, rtol=0)
    # the final step's last row is what final-step KV retention counts (padding excluded)
    kept = int(decode_row.sum())
    assert stats["final_step_kv_retention"]["kept"] == 2 * kept
    assert stats["final_step_kv_retention"]["total"] == 2 * int(mask2.sum())


def test_generate_equals_stepwise_reference_and_tracks_history():
    model = _tiny("llama")
    ids, mask = _batch(seq=12, pad=3)
    with apply_sepllm(model, _cfg()) as handle:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert handle._history.ids.shape == (2, 12 + 3)      # the last token is never fed back
        assert torch.equal(handle._history.ids, out[:, :-1])
    seq = ids.shape[1]
    full = ids
    valid = mask
    for step in range(4):                                    # greedy decoding with explicit reference masks
        length = full.shape[1]
        g = rules.global_key_bitmap(full, SEPS, 2, rules.left_pad_counts(mask))
        rows = rules.allowed_mask(g, 4, key_valid=valid) | torch.eye(length, dtype=torch.bool)
        for q in range(seq, length):                         # decode rows use the generate window
            rows[:, q, : q + 1] = rules.decode_keep_mask(g[:, : q + 1], 3, key_valid=valid[:, : q + 1])
        pos = (valid.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=full, attention_mask=rows.unsqueeze(1), position_ids=pos).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        full = torch.cat([full, nxt], 1)
        valid = torch.cat([valid, torch.ones_like(nxt)], 1)
    assert torch.equal(out, full)


def test_fixllm_and_streamingllm_keep_expected_counts():
    model = _tiny("llama")
    ids = torch.randint(8, VOCAB, (1, 876), generator=torch.Generator().manual_seed(2))
    ids[0, ::7] = 3                                        # separators must be ignored by both modes
    fix = _cfg(USE_FIXED_SEP_INTERVALs=True, fixed_sep_intervals_list=[5, 5], init_tok_max_idx=2,
               prefill_local_window_size=256, generate_local_window_size=256)
    with apply_sepllm(model, fix) as handle:
        masks = handle.prefill_masks(ids)
        assert int(masks[0][0, 0, -1].sum()) == 3 + 256 + 123 == 382
        model(input_ids=ids)
        kv = handle.retention()["final_step_kv_retention"]
    assert (kv["kept"], kv["total"]) == (2 * 382, 2 * 876)
    stream = _cfg(streamingLLM=True, init_tok_max_idx=2, prefill_local_window_size=256,
                  generate_local_window_size=256)
    with apply_sepllm(model, stream) as handle:
        assert int(handle.prefill_masks(ids)[1][0, 0, -1].sum()) == 3 + 256


def test_retention_on_spec_worked_example():
    tokens = "A B C , D E . F G \\n".split()
    vocab = {t: i + 10 for i, t in enumerate(dict.fromkeys(tokens))}
    ids = torch.tensor([[vocab[t] for t in tokens]])
    seps = [vocab[","], vocab["."], vocab["\\n"]]
    model = _tiny("gpt_neox")
    cfg = _cfg(separator_token_ids=seps, init_tok_max_idx=0, prefill_local_window_size=2,
               BATCH_ADAPTIVE_INIT_POS=False)
    with apply_sepllm(model, cfg) as handle:
        model(input_ids=ids)
        r = handle.retention()
        line = handle.summary()
    assert (r["final_step_kv_retention"]["kept"], r["final_step_kv_retention"]["total"]) == (2 * 5, 2 * 10)
    assert (r["prefill_attention_map_retention"]["kept"], r["prefill_attention_map_retention"]["total"]) == (68, 110)
    assert r["prefill_attention_map_retention"]["per_layer_ratio"] == [34 / 55, 34 / 55]
    assert "final-step KV retention 0.5000" in line and "\n" not in line


def test_reference_configs_load_with_layer_num_override(reference_configs_dir):
    ref = reference_configs_dir
    model_cfg = LlamaConfig(vocab_size=128256, num_hidden_layers=2)
    sep = resolve_for_model(load_trainingfree_config(ref / "llama3_sepllm_a3_n256.yml", {"Layer_num": 2}), model_cfg)
    assert sep.mode == "sepllm" and sep.separator_ids == (13, 11, 30, 0, 26, 25, 198, 220, 128000)
    assert sep.num_initial == 3 and sep.prefill_windows == (256, 256) and sep.batch_adaptive_init_pos
    stream = resolve_for_model(load_trainingfree_config(ref / "llama3_streamingllm_a3_n256.yml", {"Layer_num": 2}),
                               model_cfg)
    assert stream.mode == "streamingllm" and stream.separator_ids == () and stream.generate_windows == (256, 256)


def test_bad_input_errors(tmp_path, reference_configs_dir):
    model = _tiny("llama")
    with pytest.raises(TrainingFreeConfigError, match=r"'Layer_num' = 32 but the model has num_hidden_layers=2"):
        apply_sepllm(model, reference_configs_dir / "llama3_sepllm_a3_n256.yml")
    with pytest.raises(TrainingFreeConfigError, match=r"contains 128000, outside the model's vocabulary \[0, 64\)"):
        apply_sepllm(model, _cfg(separator_token_ids=[13, 128000]))
    bad = tmp_path / "bad.yml"
    bad.write_text("{Layer_num: 2, separator_token_id: [3]}\n")
    with pytest.raises(ConfigError, match=r"bad.yml: unknown key 'separator_token_id' "
                                          r"\(did you mean 'separator_token_ids'\?\)"):
        apply_sepllm(model, bad)
    with pytest.raises(ConfigError, match="'init_tok_max_idx': expected an integer, got 'two'"):
        sepllm_config_from_mapping({"init_tok_max_idx": "two"})
    with pytest.raises(ConfigError, match="derived"):
        sepllm_config_from_mapping({"mode": "sepllm", "streamingLLM": True})
    with pytest.raises(ConfigError, match="missing.yml: config file not found"):
        apply_sepllm(model, tmp_path / "missing.yml")
    with pytest.raises(ConfigError, match="prefill_loc_win_size_list .* has 3 entries but Layer_num is 2"):
        apply_sepllm(model, _cfg(USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS=True, prefill_loc_win_size_list=[4, 4, 4]))
    with pytest.raises(ConfigError, match="fixed_sep_intervals_list"):
        apply_sepllm(model, _cfg(USE_FIXED_SEP_INTERVALs=True))
    with pytest.raises(ConfigError, match="separator_token_ids"):
        apply_sepllm(model, _cfg(separator_token_ids=[-1]))
    with pytest.raises(ConfigError, match="USE_BiPE"):
        apply_sepllm(model, _cfg(USE_BiPE=True, BiPE_seps=SEPS))
    assert "forward" not in model.__dict__                   # failed applications leave the model untouched


def test_runtime_misuse_is_reported():
    model = _tiny("llama")
    ids, mask = _batch(seq=10, pad=2)
    with apply_sepllm(model, _cfg()):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        foreign = output_cache(_tiny("llama")(input_ids=ids[:, :5], use_cache=True))
        with pytest.raises(SepLLMRuntimeError, match="the cache holds 5 tokens but it is not the cache"):
            model(input_ids=ids[:, :1], **cache_kwargs(model, foreign))
        with pytest.raises(SepLLMRuntimeError, match="input_ids"):
            model(inputs_embeds=model.get_input_embeddings()(ids))
        with pytest.raises(SepLLMRuntimeError, match="2-D"):
            model(input_ids=ids, attention_mask=mask[:, None, None, :].bool())
        assert out.logits.shape == (2, 10, VOCAB)
        with pytest.raises(SepLLMRuntimeError, match="per-call masks"):
            model.model(input_ids=ids)                        # inner module bypasses the mask construction


def test_print_kv_ratio_prints_every_interval(capsys):
    model = _tiny("llama")
    ids, mask = _batch()
    with apply_sepllm(model, _cfg(PRINT_KV_RATIO=True, print_ratio_intervals=2)):
        for _ in range(5):
            model(input_ids=ids, attention_mask=mask)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("SepLLM[sepllm]")]
    assert len(lines) == 2                                   # at the 2nd and 4th prefill
    assert "| 2 sequences, 2 forwards" in lines[0] and "| 4 sequences, 4 forwards" in lines[1]


def test_cache_reorder_and_crop_are_followed():
    """Beam search reorders the cache rows and assisted decoding crops it: the tracked ids must follow."""
    model = _tiny("llama")
    ids, mask = _batch(seq=12, pad=3)
    nxt = torch.tensor([[5], [9]])
    ones = torch.ones(2, 1, dtype=mask.dtype)
    with apply_sepllm(model, _cfg()) as handle:
        cache = output_cache(model(input_ids=ids, attention_mask=mask, use_cache=True))
        cache.reorder_cache(torch.tensor([1, 0]))
        assert torch.equal(handle._history.ids, ids.flip(0))
        reordered = model(input_ids=nxt, attention_mask=torch.cat([mask.flip(0), ones], 1),
                          **cache_kwargs(model, cache))
        fresh = output_cache(model(input_ids=ids.flip(0), attention_mask=mask.flip(0), use_cache=True))
        expected = model(input_ids=nxt, attention_mask=torch.cat([mask.flip(0), ones], 1),
                         **cache_kwargs(model, fresh))
        torch.testing.assert_close(reordered.logits, expected.logits, atol=1e-6, rtol=0)

        cache = output_cache(model(input_ids=ids, attention_mask=mask, use_cache=True))
        cache.crop(-2)
        cropped = model(input_ids=nxt, attention_mask=torch.cat([mask[:, :-2], ones], 1),
                        **cache_kwargs(model, cache))
        assert handle._history.ids.shape == (2, 11)
        fresh = output_cache(model(input_ids=ids[:, :-2], attention_mask=mask[:, :-2], use_cache=True))
        expected = model(input_ids=nxt, attention_mask=torch.cat([mask[:, :-2], ones], 1),
                         **cache_kwargs(model, fresh))
        torch.testing.assert_close(cropped.logits, expected.logits, atol=1e-6, rtol=0)

        beams = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False,
                               pad_token_id=0)
        assert beams.shape == (2, 15)


def test_exclude_diagonal_false_widens_prefill_only():
    """EXCLUDE_DIAGONAL=False: a prefill window holds w+1 tokens; a decode query still sees exactly the last w keys
    (itself included) — the reference's decode rule never reads the flag."""
    model = _tiny("llama")
    ids, mask = _batch(seq=12, pad=3)
    seq = ids.shape[1]
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    nxt = torch.tensor([[9], [9]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    with apply_sepllm(model, _cfg(EXCLUDE_DIAGONAL=False)) as handle:
        pre = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        dec = model(input_ids=nxt, attention_mask=mask2, position_ids=pos[:, -1:] + 1,
                    **cache_kwargs(model, output_cache(pre)), use_cache=True)
        assert handle.settings.prefill_windows == (5, 5) and handle.settings.generate_windows == (3, 3)
    full = torch.cat([ids, nxt], 1)
    g = rules.global_key_bitmap(full, SEPS, 2, rules.left_pad_counts(mask))
    valid2 = mask2.bool()
    prefill_rows = rules.allowed_mask(g[:, :seq], 5, key_valid=mask) | torch.eye(seq, dtype=torch.bool)
    prefill_rows = torch.cat([prefill_rows, torch.zeros(2, seq, 1, dtype=torch.bool)], 2)
    # decode row written out: valid AND (global OR one of the last 3 positions)
    last3 = torch.zeros(seq + 1, dtype=torch.bool)
    last3[-3:] = True
    decode_row = valid2 & (g | last3)
    ref_mask = torch.cat([prefill_rows, decode_row[:, None]], 1).unsqueeze(1)
    ref = model(input_ids=full, attention_mask=ref_mask, position_ids=torch.cat([pos, pos[:, -1:] + 1], 1)).logits
    torch.testing.assert_close(pre.logits, ref[:, :seq], atol=1e-5, rtol=0)
    torch.testing.assert_close(dec.logits[:, -1], ref[:, -1], atol=1e-5, rtol=0)
    wider = last3.clone()
    wider[-4] = True
    assert bool((valid2 & (g | wider) != decode_row).any())      # one more key would have changed the row
