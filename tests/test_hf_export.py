"""GPTModel -> Hugging Face export: logits must equal transformers' GPTNeoX / Llama after a weight copy."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from megatron.config.model import ModelConfig
from megatron.model import GPTModel
from megatron.checkpoint.hf.mapping import (from_hf_gpt_neox_state_dict, from_hf_llama_state_dict, hf_gpt_neox_config,
                                            hf_llama_config, to_hf_gpt_neox_state_dict, to_hf_llama_state_dict)

VOCAB = 96


def neox_cfg(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, pos_emb="rotary",
                rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True, padded_vocab_size=VOCAB,
                norm="layernorm", activation="gelu")
    base.update(kw)
    return ModelConfig(**base)


def llama_cfg(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, seq_length=32,
                pos_emb="rotary", rotary_pct=1.0, rotary_emb_base=500000, norm="rmsnorm", rms_norm_epsilon=1e-5,
                activation="swiglu", intermediate_size=96, use_bias_in_attn_linear=False, use_bias_in_mlp=False,
                use_bias_in_norms=False, no_weight_tying=True, padded_vocab_size=VOCAB)
    base.update(kw)
    return ModelConfig(**base)


def randomise_norms(model: torch.nn.Module) -> None:
    """Norm gains start at one; perturb them so a mis-mapped norm cannot go unnoticed."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def hf_neox(cfg: ModelConfig, ours: GPTModel):
    hf = transformers.GPTNeoXForCausalLM(hf_gpt_neox_config(cfg)).eval()
    hf.load_state_dict(to_hf_gpt_neox_state_dict(ours.state_dict(), cfg))  # strict: every key on both sides
    return hf


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
def test_gpt_neox_logits_identical(parallel: bool, rotary_pct: float) -> None:
    torch.manual_seed(0)
    cfg = neox_cfg(gpt_j_residual=parallel, rotary_pct=rotary_pct)
    ours = GPTModel(cfg).eval()
    randomise_norms(ours)
    hf = hf_neox(cfg, ours)
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_bias_gelu_fusion_trains_tanh_gelu_and_exports_it() -> None:
    """GPT-NeoX's fused bias+GeLU is the tanh approximation: our MLP computes it, the export names it
    (``gelu_pytorch_tanh``) and HF logits match; HF's MLP with erf ``gelu`` would compute something else."""
    torch.manual_seed(0)
    cfg = neox_cfg(bias_gelu_fusion=True)
    ours = GPTModel(cfg).eval()
    assert hf_gpt_neox_config(cfg).hidden_act == "gelu_pytorch_tanh"
    assert hf_gpt_neox_config(neox_cfg()).hidden_act == "gelu"
    hf = hf_neox(cfg, ours)
    h = 3 * torch.randn(4, cfg.hidden_size)
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        pre = ours.layers[0].mlp.dense_h_to_4h(h)
        tanh_gelu = 0.5 * pre * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (pre + 0.044715 * pre ** 3)))
        expected = ours.layers[0].mlp.dense_4h_to_h(tanh_gelu)
        torch.testing.assert_close(ours.layers[0].mlp(h), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(hf.gpt_neox.layers[0].mlp(h), expected, atol=1e-6, rtol=1e-5)
        erf_hf = hf_neox(neox_cfg(), ours)
        assert (erf_hf.gpt_neox.layers[0].mlp(h) - expected).abs().max() > 1e-5
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_gpt_neox_tied_embeddings_and_gpt_j_tied() -> None:
    torch.manual_seed(0)
    cfg = neox_cfg(no_weight_tying=False, gpt_j_tied=True)
    ours = GPTModel(cfg).eval()
    randomise_norms(ours)
    assert not any("post_attention_layernorm" in k for k in ours.state_dict())
    hf = hf_neox(cfg, ours)
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_gpt_neox_left_padded_batch_matches_hf_and_unpadded_rows() -> None:
    torch.manual_seed(0)
    cfg = neox_cfg()
    ours = GPTModel(cfg).eval()
    hf = hf_neox(cfg, ours)
    ids = torch.randint(1, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ids[1, :5] = 0
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        ref = hf(input_ids=ids, attention_mask=mask).logits
        alone = ours(ids[1:, 5:])
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1, 5:], alone[0], atol=1e-5, rtol=0)


def test_llama_gqa_logits_identical() -> None:
    torch.manual_seed(0)
    cfg = llama_cfg()
    ours = GPTModel(cfg).eval()
    randomise_norms(ours)
    hf = transformers.LlamaForCausalLM(hf_llama_config(cfg)).eval()
    hf.load_state_dict(to_hf_llama_state_dict(ours.state_dict(), cfg))  # strict: every key on both sides
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_llama_with_biases_tied_and_default_width() -> None:
    torch.manual_seed(0)
    cfg = llama_cfg(use_bias_in_attn_linear=True, use_bias_in_mlp=True, no_weight_tying=False,
                    intermediate_size=None, num_kv_heads=1)
    ours = GPTModel(cfg).eval()
    assert ours.layers[0].mlp.ffn == 85  # GPT-NeoX: base 4 x 64 = 256, gated int(256 * 2/3) = 170 -> halves of 85
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    hf = transformers.LlamaForCausalLM(hf_llama_config(cfg)).eval()
    hf.load_state_dict(to_hf_llama_state_dict(ours.state_dict(), cfg))
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_round_trip_from_hf_and_wrapper_prefixes() -> None:
    torch.manual_seed(0)
    cfg = neox_cfg()
    ours = GPTModel(cfg)
    wrapped = {"module." + k: v for k, v in ours.state_dict().items()}  # DDP / DeepSpeed style
    hf_state = to_hf_gpt_neox_state_dict(wrapped, cfg)
    back = from_hf_gpt_neox_state_dict(hf_state, cfg)
    reference = ours.state_dict()
    assert set(back) == set(reference)
    for k, v in reference.items():
        assert torch.equal(back[k], v), k


def test_llama_round_trip_from_hf_with_gqa_biases_and_padded_vocab() -> None:
    torch.manual_seed(0)
    cfg = llama_cfg(use_bias_in_attn_linear=True, use_bias_in_mlp=True, num_kv_heads=2)
    hf = transformers.LlamaForCausalLM(hf_llama_config(cfg, vocab_size=90)).eval()
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(from_hf_llama_state_dict(hf.state_dict(), cfg))
    ids = torch.randint(0, 90, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[..., :90], hf(input_ids=ids).logits, atol=1e-5, rtol=0)
    back = to_hf_llama_state_dict(ours.state_dict(), cfg, vocab_size=90)
    for k, v in hf.state_dict().items():
        if "rotary" not in k:
            assert torch.equal(back[k], v), k


def test_vocab_trim() -> None:
    cfg = neox_cfg()
    ours = GPTModel(cfg)
    sd = to_hf_gpt_neox_state_dict(ours.state_dict(), cfg, vocab_size=90)
    assert sd["gpt_neox.embed_in.weight"].shape[0] == 90 and sd["lm_head.weight"].shape[0] == 90
    assert hf_gpt_neox_config(cfg, vocab_size=90).vocab_size == 90
    with pytest.raises(ValueError, match="vocab_size"):
        to_hf_gpt_neox_state_dict(ours.state_dict(), cfg, vocab_size=VOCAB + 1)


@pytest.mark.parametrize("change,match", [
    (dict(pos_emb="alibi"), "pos_emb"),
    (dict(norm="rmsnorm"), "norm"),
    (dict(activation="swiglu"), "activation"),
    (dict(num_kv_heads=2), "num_kv_heads"),
])
def test_gpt_neox_export_refuses_unrepresentable(change: dict, match: str) -> None:
    cfg = dataclasses.replace(neox_cfg(), **change)
    with pytest.raises(ValueError, match=match):
        hf_gpt_neox_config(cfg)
    with pytest.raises(ValueError, match=match):
        to_hf_gpt_neox_state_dict({}, cfg)


def test_llama_export_refuses_unrepresentable() -> None:
    with pytest.raises(ValueError, match="rotary_pct"):
        hf_llama_config(llama_cfg(rotary_pct=0.5))
    with pytest.raises(ValueError, match="gpt_j_residual"):
        to_hf_llama_state_dict({}, llama_cfg(gpt_j_residual=True))


def test_bipe_position_table_needs_opt_in() -> None:
    from megatron.config.sepllm import SepLLMConfig

    cfg = neox_cfg()
    model = GPTModel(cfg, SepLLMConfig(USE_BiPE=True, BiPE_seps=[5, 7]))
    with pytest.raises(ValueError, match="keep_bipe_embeddings"):
        to_hf_gpt_neox_state_dict(model.state_dict(), cfg)
    sd = to_hf_gpt_neox_state_dict(model.state_dict(), cfg, keep_bipe_embeddings=True)
    assert sd["gpt_neox.position_embeddings.weight"].shape == (cfg.seq_length, cfg.hidden_size)


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_round_trip(tmp_path, tied: bool) -> None:
    """The exported weights survive ``save_pretrained`` (safetensors, shared tied tensors) and reload identically."""
    torch.manual_seed(0)
    cfg = neox_cfg(no_weight_tying=not tied)
    ours = GPTModel(cfg).eval()
    hf = hf_neox(cfg, ours)
    hf.save_pretrained(tmp_path)
    reloaded = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, ours(ids), atol=1e-5, rtol=0)
