"""``sliding_window_width`` W (GPT-NeoX, Mistral): query i attends keys i - W .. i, on every path, in the cache, in HF.

GPT-NeoX passes ``window_size=(W, -1)`` to flash-attn (keys ``[i - W, i + inf]`` under the causal mask) and cuts its
dense mask with ``triu(diagonal=-W)``: W + 1 keys counting the query. Hugging Face Mistral keeps ``q - k <
sliding_window``, so its ``sliding_window`` is W + 1. Checked here:

* the exact allowed-key sets of a worked example on every CPU path (dense, flex, compact, flex_compact; triton in
  Triton's interpreter, in a subprocess), with and without left padding, and forward + backward agreement of the
  trainable paths with a float64 reference;
* the model: a window covering the sequence is full attention, a smaller one is not;
* cached greedy decoding equals recomputation, the rolling cache holds at most W + 1 keys per layer, and a one-layer
  model's decode logits depend on exactly the last W + 1 tokens;
* export to ``MistralForCausalLM`` (logits, generate, ``sliding_window`` = W + 1; W would differ) and import of a
  Mistral folder back (bit-identical weights), and the one-line refusals.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from megatron.config import ConfigError, load_config
from megatron.config.model import ModelConfig
from megatron.config.sepllm import SepLLMConfig
from megatron.config.sepllm_settings import SLIDING_WINDOW, settings_of
from megatron.inference.generator import generate_batch
from megatron.inference.kv_cache import KVCacheError, KVCacheSettings, build_kv_cache
from megatron.model import GPTModel
from megatron.checkpoint.hf.mapping import (check_gpt_neox_compatible, check_llama_compatible, hf_mistral_config,
                                            to_hf_mistral_state_dict)
from megatron.sepllm.attention.backend import SepLLMBackend

from sep_helpers import reference_attention

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
VOCAB = 96
S, W = 16, 3          # the worked example: 16 tokens, window width 3 (4 keys per query)


def neox_allowed(seq: int, width: int) -> torch.Tensor:
    """``[S, S]`` bool, GPT-NeoX's mask: flash-attn ``window_size=(W, -1)`` with ``causal=True`` keeps keys
    ``[i - W, i]`` (its docs: ``[i + Sk - Sq - window_size[0], i + Sk - Sq + window_size[1]]``)."""
    i = torch.arange(seq).unsqueeze(1)
    j = torch.arange(seq).unsqueeze(0)
    return (j <= i) & (j >= i - width)


def model_cfg(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, seq_length=64,
                pos_emb="rotary", rotary_pct=1.0, norm="rmsnorm", rms_norm_epsilon=1e-5, activation="swiglu",
                intermediate_size=96, use_bias_in_attn_linear=False, use_bias_in_mlp=False, use_bias_in_norms=False,
                no_weight_tying=True, padded_vocab_size=VOCAB, sliding_window_width=W)
    base.update(kw)
    return ModelConfig(**base)


def backend(impl: str, width: int = W, heads: tuple[int, int] = (2, 1)) -> SepLLMBackend:
    cfg = ModelConfig(num_layers=1, hidden_size=16 * heads[0], num_attention_heads=heads[0], num_kv_heads=heads[1],
                      sliding_window_width=width)
    return SepLLMBackend(SepLLMConfig(sep_attention_impl=impl), cfg)


PAD = 5                # row 1 of the worked example is left-padded by 5


def allowed_sets(impl: str) -> torch.Tensor:
    """``[B, S, S]`` bool: the keys each query of the path attends (row 1 left-padded by ``PAD``). With ``q = 0``
    every score is equal, so with ``v`` = one-hot rows the output of query i is ``1/n`` exactly on its n allowed keys
    and 0 elsewhere."""
    be = backend(impl)
    ids = torch.randint(0, VOCAB, (2, S), generator=torch.Generator().manual_seed(0))
    mask2d = torch.ones(2, S, dtype=torch.long)
    mask2d[1, :PAD] = 0
    pos = (mask2d.cumsum(-1) - 1).clamp(min=0)
    plan = be.prepare(ids, pos, mask2d)
    assert plan.impl == impl and not plan.pattern(0).full
    q = torch.zeros(2, 2, S, S)
    k = torch.randn(2, 1, S, S, generator=torch.Generator().manual_seed(1))
    v = torch.eye(S).expand(2, 1, S, S).contiguous()
    out = be(q, k, v, 0, plan, scale=S ** -0.5)
    assert torch.equal(out[:, 0], out[:, 1])          # both query heads of the KV group
    return out[:, 0] > 1e-6


def test_settings_resolve_to_a_window_of_w_plus_1_without_global_keys():
    s = settings_of(SepLLMConfig(), 3, sliding_window_width=W)
    assert (s.mode, s.num_initial, s.separator_ids) == (SLIDING_WINDOW, 0, ())
    assert s.prefill_windows == s.generate_windows == (W + 1,) * 3 and s.fixed_intervals is None


def check_worked_example(got: torch.Tensor) -> None:
    """Row 0: GPT-NeoX's mask; row 1 (left-padded): the same windows over its real tokens, never a padding key."""
    assert torch.equal(got[0], neox_allowed(S, W))
    rows = {i: set(torch.nonzero(got[0, i]).flatten().tolist()) for i in (0, 2, 3, 9, 15)}
    assert rows == {0: {0}, 2: {0, 1, 2}, 3: {0, 1, 2, 3}, 9: {6, 7, 8, 9}, 15: {12, 13, 14, 15}}
    assert torch.equal(got[1, PAD:, PAD:], neox_allowed(S - PAD, W)) and not got[1, PAD:, :PAD].any()


@pytest.mark.parametrize("impl", ["dense", "flex", "compact", "flex_compact"])
def test_worked_example_allowed_keys_on_every_cpu_path(impl):
    check_worked_example(allowed_sets(impl))


def _random_qkv(seq: int, heads: tuple[int, int], seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads[0], seq, 16, generator=gen)
    k = torch.randn(2, heads[1], seq, 16, generator=gen)
    v = torch.randn(2, heads[1], seq, 16, generator=gen)
    return q, k, v, torch.randn(q.shape, generator=gen)


@pytest.mark.parametrize("alibi", [False, True])
def test_trainable_paths_agree_with_float64_reference_forward_and_backward(alibi):
    """dense and compact (the CPU training paths; flex / flex_compact have no CPU backward and are checked exactly by
    the worked example) against GPT-NeoX's mask in float64, GQA, with and without ALiBi."""
    seq, width, heads = 64, 9, (4, 2)
    q, k, v, grad = _random_qkv(seq, heads, seed=2)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625]) if alibi else None
    pos = torch.arange(seq).unsqueeze(0).expand(2, -1)
    ids = torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(3))
    keep = neox_allowed(seq, width).expand(2, seq, seq)
    xs64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*xs64, keep, 0.25, slopes, pos)
    ref_grads = torch.autograd.grad(ref, xs64, grad.double())
    for impl in ("dense", "compact"):
        be = backend(impl, width, heads)
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = be(*xs, 0, be.prepare(ids, pos, None), scale=0.25, alibi_slopes=slopes)
        torch.testing.assert_close(out.double(), ref.detach(), atol=1e-5, rtol=0, msg=lambda m: f"{impl}: {m}")
        for name, g, rg in zip("qkv", torch.autograd.grad(out, xs, grad), ref_grads):
            torch.testing.assert_close(g.double(), rg, atol=1e-4, rtol=0, msg=lambda m: f"{impl} d{name}: {m}")


@pytest.mark.skipif(not INTERPRETED, reason="runs in test_triton_path_under_the_interpreter (a subprocess)")
def test_triton_path_keys_and_gradients():
    pytest.importorskip("triton")
    check_worked_example(allowed_sets("triton"))
    seq, width, heads = 48, 7, (2, 1)
    q, k, v, grad = _random_qkv(seq, heads, seed=4)
    pos = torch.arange(seq).unsqueeze(0).expand(2, -1)
    ids = torch.zeros(2, seq, dtype=torch.long)
    outs = {}
    for impl in ("dense", "triton"):
        be = backend(impl, width, heads)
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = be(*xs, 0, be.prepare(ids, pos, None), scale=0.25)
        outs[impl] = (out, torch.autograd.grad(out, xs, grad))
    torch.testing.assert_close(outs["triton"][0], outs["dense"][0], atol=1e-5, rtol=0)
    for g, want in zip(outs["triton"][1], outs["dense"][1]):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=0)


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter run")
def test_triton_path_under_the_interpreter():
    pytest.importorskip("triton")
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p",
                          "no:cacheprovider", "-k", "triton_path_keys"], cwd=repo, capture_output=True, text=True,
                         env=dict(os.environ, TRITON_INTERPRET="1"), timeout=600)
    assert run.returncode == 0 and re.search(r"\b1 passed", run.stdout), run.stdout[-4000:] + run.stderr[-2000:]


# ------------------------------------------------------------------------------------------------------------ model
def test_model_window_covering_the_sequence_is_full_attention_and_a_smaller_one_is_not():
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 24))
    full = GPTModel(model_cfg(sliding_window_width=None)).eval()
    outs = {}
    for width in (23, 5):
        model = GPTModel(model_cfg(sliding_window_width=width)).eval()
        model.load_state_dict(full.state_dict())
        with torch.no_grad():
            outs[width] = model(ids)
    with torch.no_grad():
        ref = full(ids)
    torch.testing.assert_close(outs[23], ref, atol=1e-6, rtol=0)
    first = 5 + 1                                     # queries 0..W see every earlier key either way
    torch.testing.assert_close(outs[5][:, :first], ref[:, :first], atol=1e-6, rtol=0)
    assert (outs[5][:, first:] - ref[:, first:]).abs().max() > 1e-3


def test_config_refuses_sepllm_modes_with_a_sliding_window():
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=2, seq_length=64, sliding_window_width=7)
    assert load_config(base).sepllm.mode == "full"
    for extra in ({"streamingLLM": True}, {"separator_token_ids": [13]}, {"USE_SA_SOFTMAX": True},
                  {"USE_FIXED_SEP_INTERVALs": True, "fixed_sep_intervals_list": [4]}):
        with pytest.raises(ConfigError, match=r"sliding_window_width=7 .*cannot be combined with SepLLM mode") as e:
            load_config({**base, **extra})
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------------- decoding
def _prompts():
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (3, 13)]


@pytest.mark.parametrize("pos_emb", ["rotary", "alibi"])
def test_cached_greedy_decoding_equals_recompute(pos_emb):
    torch.manual_seed(0)
    model = GPTModel(model_cfg(pos_emb=pos_emb)).eval()
    cached = generate_batch(model, _prompts(), max_new_tokens=16, eos_id=None, keep_logits=True)
    again = generate_batch(model, _prompts(), max_new_tokens=16, eos_id=None, keep_logits=True, recompute=True)
    for a, b in zip(cached, again):
        assert a.tokens == b.tokens and len(a.tokens) == 16
        for x, y in zip(a.step_logits, b.step_logits):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_rolling_cache_attends_and_keeps_the_last_w_plus_1_keys_per_layer():
    torch.manual_seed(0)
    model = GPTModel(model_cfg()).eval()
    cache = build_kv_cache(model)
    assert cache.sizes == {"init_cache_size": 0, "sep_cache_size": 0, "local_size": [W + 1] * 2,
                           "cache_size": [2 * (W + 1)] * 2}
    masks = []
    step_mask = cache.planner.step_attention_mask
    cache.planner.step_attention_mask = lambda layer: masks.append(step_mask(layer)) or masks[-1]
    ids = torch.randint(0, VOCAB, (1, 10))
    sizes = []
    with torch.no_grad():
        model(ids, kv_cache=cache)
        for step in range(12):
            model(torch.tensor([[step % VOCAB]]), kv_cache=cache)
            seen = 10 + step + 1
            for layer in range(2):
                # a decode step attends its whole storage (no mask), which is the query and the W keys before it
                assert masks.pop(0) is None
                _, kind, index = cache.layer_contents(layer)
                assert sorted(index[kind > 0].tolist()) == list(range(seen - W - 1, seen))
            sizes.append(cache.kv_bytes())
    assert len(set(sizes)) == 1                             # flat memory


def test_one_layer_decode_sees_exactly_the_last_w_plus_1_tokens():
    """A one-layer model: token ``t - W - 1`` cannot reach position t's logits, token ``t - W`` does."""
    torch.manual_seed(0)
    model = GPTModel(model_cfg(num_layers=1)).eval()
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(6))

    def decode_logits(seq: torch.Tensor) -> torch.Tensor:
        cache = build_kv_cache(model)
        with torch.no_grad():
            model(seq[:, :8], kv_cache=cache)
            for t in range(8, seq.shape[1]):
                out = model(seq[:, t:t + 1], kv_cache=cache)
        return out[0, -1]

    base = decode_logits(ids)
    last = ids.shape[1] - 1
    for offset, changes in ((W + 1, False), (W + 2, False), (W, True), (0, True)):
        other = ids.clone()
        other[0, last - offset] = (other[0, last - offset] + 1) % VOCAB
        moved = (decode_logits(other) - base).abs().max().item()
        assert (moved > 1e-4) == changes, (offset, moved)


def test_cache_refusals_are_one_line():
    model = GPTModel(model_cfg()).eval()
    with pytest.raises(KVCacheError, match=r"kv_cache = 'plain' on a model with sliding_window_width = 3"):
        build_kv_cache(model, KVCacheSettings(kind="plain"))
    with pytest.raises(KVCacheError, match=r"sep_cache_exact_window = False on a model with sliding_window_width"):
        build_kv_cache(model, KVCacheSettings(exact_window=False))


# ---------------------------------------------------------------------------------------------------- Hugging Face
def _ours_and_mistral(**kw):
    torch.manual_seed(0)
    cfg = model_cfg(**kw)
    ours = GPTModel(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "layernorm" in name:
                p.add_(0.1 * torch.randn(p.shape))
    hf = transformers.MistralForCausalLM(hf_mistral_config(cfg)).eval()
    hf.load_state_dict(to_hf_mistral_state_dict(ours.state_dict(), cfg))   # strict
    return cfg, ours, hf


@pytest.mark.parametrize("tied", [False, True])
def test_mistral_export_logits_identical_and_w_would_differ(tied):
    cfg, ours, hf = _ours_and_mistral(no_weight_tying=not tied)
    assert hf.config.sliding_window == W + 1
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = ours(ids)
        torch.testing.assert_close(hf(input_ids=ids).logits, got, atol=1e-5, rtol=0)
        hf.config.sliding_window = W                   # HF's count taken as GPT-NeoX's: a different model
        assert (hf(input_ids=ids).logits - got).abs().max() > 1e-3


@pytest.mark.parametrize("activation", ["geglu", "reglu", "glu", "bilinear"])
def test_mistral_export_computes_every_gated_activation(activation):
    """The gate function reaches HF as the ``hidden_act`` our MLP applies (gelu, relu, sigmoid, identity)."""
    cfg, ours, hf = _ours_and_mistral(activation=activation)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids), atol=1e-5, rtol=0)


def test_mistral_generate_equals_our_cached_decoding():
    cfg, ours, hf = _ours_and_mistral()
    prompt = _prompts()[1]
    mine = generate_batch(ours, [prompt], max_new_tokens=12, eos_id=None, keep_logits=True)[0]
    out = hf.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False, output_logits=True,
                      return_dict_in_generate=True, pad_token_id=0)
    assert out.sequences[0, len(prompt):].tolist() == mine.tokens
    for theirs, ours_step in zip(out.logits, mine.step_logits):
        torch.testing.assert_close(theirs[0], ours_step, atol=1e-5, rtol=0)


def test_standard_exports_refuse_a_sliding_window_in_one_line():
    from megatron.checkpoint.hf.export import default_architecture

    cfg = model_cfg()
    assert default_architecture(cfg) == "mistral" and default_architecture(model_cfg(sliding_window_width=None)) == \
        "llama"
    with pytest.raises(ValueError, match=r"LlamaForCausalLM: sliding_window_width = 3 .*--architecture mistral"):
        check_llama_compatible(cfg)
    neox = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, pos_emb="rotary", padded_vocab_size=VOCAB,
                       sliding_window_width=3)
    assert default_architecture(neox) == "neox"
    with pytest.raises(ValueError, match=r"GPTNeoXForCausalLM: sliding_window_width = 3 "):
        check_gpt_neox_compatible(neox)
    with pytest.raises(ValueError, match=r"MistralForCausalLM: use_bias_in_attn_linear = True"):
        hf_mistral_config(model_cfg(use_bias_in_attn_linear=True))
    with pytest.raises(ValueError, match=r"use_qk_layernorm = True \(Llama has no query/key norm\)"):
        hf_mistral_config(model_cfg(use_qk_layernorm=True, num_kv_heads=None))


def test_mistral_folder_imports_and_exports_back_bit_identical(tmp_path):
    from megatron.checkpoint import load_trained_model
    from megatron.checkpoint.hf.export import export_to_hf
    from megatron.checkpoint.hf.import_hf import import_from_hf
    from safetensors.torch import load_file

    hf_cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        sliding_window=6, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(1)
    hf = transformers.MistralForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    import_from_hf(tmp_path / "hf", tmp_path / "ours")
    assert "sliding_window_width: 5" in (tmp_path / "ours" / "model.yml").read_text()
    trained = load_trained_model(tmp_path / "ours")
    assert trained.config.model.sliding_window_width == 5 and trained.config.model.intermediate_size == 144
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(trained.model(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=0)

    result = export_to_hf(tmp_path / "ours", tmp_path / "back", save_tokenizer=False)
    assert result.architecture == "mistral"
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["sliding_window"] == 6
    assert config["intermediate_size"] == 48 and config["sepllm"]["mode"] == "full"
    want, got = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(result.output_dir /
                                                                                      "model.safetensors"))
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("change,match", [
    ({"sliding_window": 1}, r"sliding_window = 1: expected null or an integer >= 2"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, r"layer_types = .*one attention pattern"),
])
def test_mistral_import_refuses_what_it_cannot_build(tmp_path, change, match):
    from megatron.checkpoint.hf.import_hf import ImportHFError, model_keys_from_hf

    raw = {"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
           "intermediate_size": 48, "hidden_act": "silu", "sliding_window": 6, **change}
    with pytest.raises(ImportHFError, match=match):
        model_keys_from_hf(raw, tmp_path / "config.json")
    arch, keys = model_keys_from_hf({**raw, "sliding_window": None, "layer_types": None}, tmp_path / "config.json")
    assert arch == "mistral" and keys["sliding_window_width"] is None
