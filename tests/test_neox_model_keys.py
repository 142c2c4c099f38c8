"""GPT-NeoX model keys compute what GPT-NeoX computes: activations, query/key norm, sinusoidal positions, the OPT
offset, attention_config expansion, precision spellings, the older releases' spellings, and one-line refusals of the
features that are not built (each named in megatron/config/_loading/unsupported.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron.config import ConfigError, load_config
from megatron.config.model import ModelConfig
from megatron.config._loading.unsupported import UNBUILT_FEATURES
from megatron.model.gpt import GPTModel

VOCAB = 64
TINY = {"num_layers": 2, "hidden_size": 48, "num_attention_heads": 4, "seq_length": 16, "pos_emb": "rotary"}


def _model(**changes) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(ModelConfig(**{**TINY, "padded_vocab_size": VOCAB, **changes})).eval()


# GPT-NeoX's activation functions written out from their definitions (megatron/model/activations.py): gated ones
# apply the function to the second half (the gate) and multiply the first half.
NEOX_FUNCTIONS = {
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "relu": lambda x: x.clamp(min=0),
    "silu": lambda x: x * torch.sigmoid(x),
    "swish": lambda x: x * torch.sigmoid(x),
    "mish": lambda x: x * torch.tanh(torch.log1p(torch.exp(x))),
    "softsign": lambda x: x / (1 + x.abs()),
    "geglu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "reglu": lambda x: x.clamp(min=0),
    "swiglu": lambda x: x * torch.sigmoid(x),
    "glu": torch.sigmoid,
    "bilinear": lambda x: x,
}
GATED = {"geglu", "reglu", "swiglu", "glu", "bilinear"}


@pytest.mark.parametrize("activation", sorted(NEOX_FUNCTIONS))
def test_every_neox_activation(activation: str) -> None:
    model = _model(activation=activation)
    mlp = model.layers[0].mlp
    up, down = mlp.dense_h_to_4h.out_features, mlp.dense_4h_to_h.in_features
    # base 4 x 48 = 192; gated: int(192 * 2 / 3) = 128 features, halves of 64 (GPT-NeoX ParallelMLP)
    assert (up, down) == ((128, 64) if activation in GATED else (192, 192))
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    mlp = mlp.double()
    h = x @ mlp.dense_h_to_4h.weight.T + mlp.dense_h_to_4h.bias
    fn = NEOX_FUNCTIONS[activation]
    if activation in GATED:
        value, gate = h.chunk(2, dim=-1)
        h = value * fn(gate)
    else:
        h = fn(h)
    want = h @ mlp.dense_4h_to_h.weight.T + mlp.dense_4h_to_h.bias
    torch.testing.assert_close(mlp(x), want, rtol=1e-12, atol=1e-12)


def test_onnx_safe_gelu_uses_gpt_neox_constant() -> None:
    mlp = _model(activation="gelu", onnx_safe=True).layers[0].mlp.double()
    x = torch.randn(3, 48, dtype=torch.float64) * 3
    h = x @ mlp.dense_h_to_4h.weight.T + mlp.dense_h_to_4h.bias
    want = (h * 0.5 * (torch.erf(h / 1.41421) + 1)) @ mlp.dense_4h_to_h.weight.T + mlp.dense_4h_to_h.bias
    torch.testing.assert_close(mlp(x), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ConfigError, match="onnx_safe and bias_gelu_fusion"):
        load_config({**TINY, "onnx_safe": True, "bias_gelu_fusion": True})


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "scalenorm", "non_parametric_layernorm"])
def test_qk_layernorm_is_one_norm_over_heads_and_head_dim(norm: str) -> None:
    """GPT-NeoX builds ONE norm for the shape [heads, head_dim] and applies it to queries and keys before RoPE:
    LayerNorm normalises each token's [heads, head_dim] block as a whole, RMSNorm / ScaleNorm each head."""
    model = _model(use_qk_layernorm=True, norm=norm, pos_emb="none")
    attn = model.layers[0].attention
    with torch.no_grad():
        for p in attn.qk_layernorm.parameters():
            p.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, 48)
    q, k, _ = attn.split_qkv(x)                          # [B, H, S, D]
    tokens = q.transpose(1, 2)                           # [B, S, H, D] as GPT-NeoX holds them
    params = dict(attn.qk_layernorm.norm.named_parameters())
    if norm in ("layernorm", "non_parametric_layernorm"):
        want = F.layer_norm(tokens, (4, 12), params.get("weight"), params.get("bias"), eps=1e-5)
    elif norm == "rmsnorm":
        want = params["weight"] * tokens * torch.rsqrt(tokens.pow(2).mean(-1, keepdim=True) + 1e-8)
    else:
        want = params["g"] * tokens / tokens.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(attn.qk_layernorm(q), want.transpose(1, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn.qk_layernorm(k), attn.qk_layernorm(k))  # the same module normalises keys
    n_params = sum(p.numel() for p in attn.qk_layernorm.parameters())
    assert n_params == {"layernorm": 2 * 48, "rmsnorm": 48, "scalenorm": 1, "non_parametric_layernorm": 0}[norm]
    model(torch.randint(0, VOCAB, (2, 8))).sum().backward()


def test_qk_layernorm_changes_the_output_and_refuses_gqa_and_tp() -> None:
    ids = torch.randint(0, VOCAB, (1, 8))
    assert not torch.allclose(_model()(ids), _model(use_qk_layernorm=True)(ids))
    with pytest.raises(ConfigError, match="grouped-query"):
        load_config({**TINY, "use_qk_layernorm": True, "num_kv_heads": 2})
    with pytest.raises(ConfigError, match="use_qk_layernorm"):
        load_config({**TINY, "use_qk_layernorm": True, "model_parallel_size": 2})


def test_sinusoidal_positions_match_gpt_neox_table() -> None:
    model = _model(pos_emb="sinusoidal")
    ids = torch.randint(0, VOCAB, (2, 10))
    dim = 48
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.arange(10).float()[:, None] * inv_freq[None]
    table = torch.cat((angles.sin(), angles.cos()), dim=-1)  # sines first, then cosines
    got = model.embed(ids, torch.arange(10).expand(2, 10))
    torch.testing.assert_close(got, model.embed.word_embeddings(ids) + table)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in _model(pos_emb="none").parameters())
    assert load_config({**TINY, "pos_emb": "sinusoidal"}).model.pos_emb == "sinusoidal"


def test_opt_position_offset_reads_the_table_further_on() -> None:
    model = _model(pos_emb="learned", max_position_embeddings=18, opt_pos_emb_offset=2)
    ids = torch.randint(0, VOCAB, (1, 16))
    pos = torch.arange(16)[None]
    want = model.embed.word_embeddings(ids) + model.embed.position_embeddings(pos + 2)
    torch.testing.assert_close(model.embed(ids, pos), want)
    with pytest.raises(ConfigError, match="opt_pos_emb_offset"):
        load_config({**TINY, "pos_emb": "learned", "max-position-embeddings": 16, "opt_pos_emb_offset": 2})


def test_precision_spellings_and_attention_config_all() -> None:
    assert load_config({**TINY, "precision": "bfloat16"}).training.precision == "bf16"
    assert load_config({**TINY, "precision": "bfloat16"}).training.bf16 == {"enabled": True}
    assert load_config({**TINY, "precision": "fp16"}).model.precision == "fp16"
    with pytest.raises(ConfigError, match="bfloat16"):
        load_config({**TINY, "precision": "fp8"})
    cfg = load_config({**TINY, "attention_config": [[["flash"], "all"]]})
    assert len(cfg.model.attention_config) == 2  # flash = global: dense causal attention on every layer
    with pytest.raises(ConfigError, match="describes 4 layers"):
        load_config({**TINY, "attention_config": [[["flash", "global"], 2]]})  # GPT-NeoX: the pattern twice


def test_older_release_spellings() -> None:
    old = load_config({**TINY, "save-interval": 500, "gas": 4, "train_micro_batch_size_per_gpu": 2})
    assert old.checkpoint.checkpoint_factor == 500 and old.training.gradient_accumulation_steps == 4
    llemma = load_config({**TINY, "optimizer": {"type": "Adam", "params": {"lr": 3e-4}}, "decay_lr_to": 0.1,
                          "attention_type": "groupedquery", "num_kv_heads": 2})
    assert llemma.lr_schedule.min_lr == pytest.approx(3e-5) and llemma.model.num_kv_heads == 2
    assert load_config({**TINY, "attention_type": "multiquery"}).model.num_kv_heads == 1
    with pytest.raises(ConfigError, match="disagrees with num_kv_heads"):
        load_config({**TINY, "attention_type": "multihead", "num_kv_heads": 2})
    with pytest.raises(ConfigError, match="both set the floor"):
        load_config({**TINY, "decay_lr_to": 0.1, "min_lr": 1e-5})
    assert load_config({**TINY, "peak_theoretical_tflops": 989}).logging.peak_flops == pytest.approx(989e12)


def test_keys_gpt_neox_derives_or_only_uses_for_kernels_are_accepted() -> None:
    cfg = load_config({**TINY, "optimizer_type": "adam", "zero_reduce_bucket_size": 5e8, "is_pipe_parallel": True,
                       "use_flashattn_swiglu": True, "bias_dropout_fusion": True, "attention_softmax_in_fp32": True,
                       "deepspeed": True, "pipe_partition_method": "type:transformer|mlp",
                       "apply_query_key_layer_scaling": True, "use_cpu_initialization": True})
    assert cfg == load_config(TINY)
    with pytest.raises(ConfigError, match="always runs on DeepSpeed"):
        load_config({**TINY, "deepspeed": False})


@pytest.mark.parametrize("feature", sorted(UNBUILT_FEATURES))
def test_unbuilt_features_are_refused_in_one_line(feature: str) -> None:
    keys = UNBUILT_FEATURES[feature]
    key, default = next(iter(keys.items()))
    assert load_config({**TINY, key: default}) == load_config(TINY)  # spelled-out defaults are fine
    bad = 7 if isinstance(default, (int, float)) and not isinstance(default, bool) else (
        not default if isinstance(default, bool) else "something")
    with pytest.raises(ConfigError) as info:
        load_config({**TINY, key: bad})
    assert feature in str(info.value) and key in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("spec, feature", [
    ({"attention_config": [[["mamba"], "all"]]}, "Mamba"), ({"attention_config": [[["rwkv"], 2]]}, "RWKV"),
    ({"attention_config": [[["gmlp", "amlp"], 1]]}, "gMLP"),
    ({"attention_config": [[["local", "global"], 1]]}, "block-sparse attention"),
    ({"norm": "te_rmsnorm"}, "Transformer Engine"), ({"pos_emb": "rpe"}, "T5 relative position"),
])
def test_unbuilt_attention_types_and_norms_name_the_feature(spec: dict, feature: str) -> None:
    with pytest.raises(ConfigError, match=feature):
        load_config({**TINY, **spec})


def test_fp16_lm_cross_entropy_keeps_the_logits_dtype() -> None:
    """GPT-NeoX's fp16_lm_cross_entropy computes the loss on the half-precision logits; the default upcasts."""
    from megatron.model.loss import lm_loss
    from megatron.training.parallel_setup import ParallelPlan

    torch.manual_seed(0)
    logits = (torch.randn(2, 5, 11) * 4).to(torch.bfloat16)
    labels = torch.randint(0, 11, (2, 5))
    # GPT-NeoX: per-token losses in the half dtype, summed against the fp32 loss mask
    half = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), reduction="none").float().mean()
    full = F.cross_entropy(logits.reshape(-1, 11).float(), labels.reshape(-1))
    torch.testing.assert_close(lm_loss(logits, labels, upcast=False), half, rtol=1e-6, atol=0)
    torch.testing.assert_close(lm_loss(logits, labels), full, rtol=1e-6, atol=0)
    assert abs(float(half) - float(full)) > 1e-4
    plan = ParallelPlan(tp_size=1, pp_stages=0, sequence_parallel=False, dp_rank=0, dp_size=1,
                        fp16_lm_cross_entropy=True)
    engine = type("Engine", (), {"module": torch.nn.Linear(1, 1)})()
    torch.testing.assert_close(plan.loss_fn(engine)(logits, labels), half, rtol=1e-6, atol=0)
    assert load_config({**TINY, "fp16_lm_cross_entropy": True}).model.fp16_lm_cross_entropy


@pytest.mark.parametrize("activation", ["silu", "swish", "mish", "relu"])
def test_plain_activations_export_to_hf_gpt_neox(activation: str) -> None:
    """HF GPT-NeoX's MLP computes any ACT2FN function ungated: our plain activations leave as a weight copy."""
    import transformers

    from megatron.checkpoint.hf import mapping as hf

    model = _model(activation=activation)
    cfg = model.cfg
    theirs = transformers.GPTNeoXForCausalLM(hf.hf_gpt_neox_config(cfg)).eval()
    theirs.load_state_dict(hf.to_hf_gpt_neox_state_dict(model.state_dict(), cfg))
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, model(ids), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="query/key norm"):
        hf.check_gpt_neox_compatible(_model(use_qk_layernorm=True).cfg)


def test_config_folder_sweep_reports_loads_and_refusals(tmp_path, capsys) -> None:
    """tools/dev/check_neox_configs.py: every file of a GPT-NeoX configs/ folder loads (with its parameter count)
    or is refused with its one-line reason."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "check_neox_configs", Path(__file__).parents[1] / "tools" / "dev" / "check_neox_configs.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    (tmp_path / "sub").mkdir()
    (tmp_path / "small.yml").write_text('{"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,\n'
                                        ' "seq_length": 32, "pos_emb": "rotary", "padded_vocab_size": 128,}\n')
    (tmp_path / "sub" / "moe.yml").write_text('{"num_layers": 2, "moe_num_experts": 8}\n')
    assert tool.main([str(tmp_path), "--markdown", str(tmp_path / "t.md")]) == 0
    out = capsys.readouterr().out
    # 2 layers x (qkv 4h^2+4h... ) counted on the meta device: embeddings 128 x 64 + 2 layers + final norm
    h = 64
    layer = (3 * h * h + 3 * h) + (h * h + h) + (4 * h * h + 4 * h) + (4 * h * h + h) + 4 * h
    assert f"{128 * h + 2 * layer + 2 * h:,} parameters" in out
    assert "mixture of experts (MoE) is not built" in out and "1 load, 1 refused, of 2" in out
    assert "| `sub/moe.yml` | refused |" in (tmp_path / "t.md").read_text()
