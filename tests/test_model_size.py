"""Model size before the run: parameter counts of the real model (built on the meta device) against published totals,
GPT-NeoX's MLP width rule on worked examples, and the ``--summary`` numbers (FLOPs, memory) against hand counts."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from megatron.config import ConfigError, load_config
from megatron.config import memory
from megatron.config.__main__ import main as config_main
from megatron.config.derived import mlp_widths
from megatron.model.size import count_parameters
from megatron.training.size_summary import format_bytes, resolve_vocab, summarize, summary_lines

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "tests" / "fixtures" / "neox_shapes"
TOKENIZER = REPO / "megatron" / "tokenizer" / "assets" / "20B_tokenizer.json"

# fixture: (published total, published non-embedding count or None, padded vocabulary)
PUBLISHED = {
    "pythia-70m": (70_426_624, 18_915_328, 50_304),
    "pythia-160m": (162_322_944, 85_056_000, 50_304),
    "pythia-410m": (405_334_016, 302_311_424, 50_304),
    "pythia-1b": (1_011_781_632, 805_736_448, 50_304),
    "pythia-1.4b": (1_414_647_808, 1_208_602_624, 50_304),
    "pythia-2.8b": (2_775_208_960, 2_517_652_480, 50_304),
    "pythia-6.9b": (6_857_302_016, 6_444_163_072, 50_432),
    "pythia-12b": (11_846_072_320, 11_327_027_200, 50_688),
    "llama2-7b": (6_738_415_616, None, 32_000),
    "llama2-13b": (13_015_864_320, None, 32_000),
    "llama2-70b": (68_976_648_192, None, 32_000),
    "mistral-7b": (7_241_732_096, None, 32_000),
}


@pytest.fixture(autouse=True)
def _one_tokenizer_load(monkeypatch):
    """Pythia fixtures size their vocabulary from the bundled tokenizer: read it once for the module."""
    import megatron.tokenizer

    monkeypatch.setattr(megatron.tokenizer, "build_tokenizer", _cached_tokenizer)


@functools.lru_cache(maxsize=None)
def _cached_tokenizer(*args):
    from megatron.tokenizer.factory import build_tokenizer

    return build_tokenizer(*args)


def _load(name: str, *overrides: str):
    path = SHAPES / f"{name}.yml"
    extra = ["--vocab_file", str(TOKENIZER)] if name.startswith("pythia") else []
    return load_config(path, overrides=[*extra, *overrides])


def test_every_published_shape_has_a_fixture():
    assert sorted(p.stem for p in SHAPES.glob("*.yml")) == sorted(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_equals_the_published_total(name):
    total, non_embedding, vocab = PUBLISHED[name]
    cfg = _load(name)
    padded, _ = resolve_vocab(cfg)   # Pythia: the bundled GPT-NeoX-20B tokenizer, padded as the trainer pads it
    assert padded == vocab
    cfg.model.padded_vocab_size = padded
    counts = count_parameters(cfg.model, cfg.sepllm)
    assert counts.total == total
    if non_embedding is not None:    # Pythia's table leaves out the input and output embeddings
        assert counts.non_embedding == non_embedding


def test_per_block_counts_of_pythia_70m_by_hand():
    cfg = _load("pythia-70m", "--padded_vocab_size", "50304")
    c = count_parameters(cfg.model)
    h, v = 512, 50_304
    assert c.word_embeddings == c.output_layer == v * h
    assert c.position_embeddings == 0 and not c.tied
    layer = c.layers[0]
    assert len(c.layers) == 6 and all(x == layer for x in c.layers)
    assert layer.attention_qkv == h * 3 * h + 3 * h
    assert layer.attention_dense == h * h + h
    assert layer.norms == 2 * 2 * h
    assert layer.mlp == (h * 4 * h + 4 * h) + (4 * h * h + h)
    assert c.final_norm == 2 * h
    assert c.total == 70_426_624


@pytest.mark.parametrize("hidden, activation, intermediate, factor, multiple, widths", [
    (4096, "swiglu", 32768, None, 256, (22016, 11008)),     # Llama-2-7B (GPT-NeoX llama2/7B.yml keys)
    (5120, "swiglu", 41472, None, 256, (27648, 13824)),     # Llama-2-13B
    (8192, "swiglu", 86016, None, 256, (57344, 28672)),     # Llama-2-70B
    (4096, "swiglu", 43008, None, 1, (28672, 14336)),       # Mistral-7B: 3 x its HF width
    (4096, "swiglu", None, None, 1, (10922, 5461)),         # no width: base 4h, int(2/3 x 16384) = 10922
    (4096, "swiglu", None, None, 256, (11264, 5632)),       # ... rounded up to 2 x 256 and 256
    (128, "geglu", 1000, None, 16, (672, 336)),       # int(666.7) = 666 -> 672; 333 -> 336
    (64, "swiglu", None, 3.0, 1, (128, 64)),                # expansion_factor: base 192 -> 128 / 64
    (64, "gelu", None, 2.5, 1, (160, 160)),                 # plain: base 160 both ways
    (64, "gelu", None, None, 1, (256, 256)),                # plain default 4h
    (100, "gelu", None, None, 8, (400, 400)),               # 400 is a multiple of 16 and of 8
])
def test_gated_mlp_width_rule_worked_examples(hidden, activation, intermediate, factor, multiple, widths):
    assert mlp_widths(hidden, activation, intermediate, factor, multiple) == widths


@pytest.mark.parametrize("args, match", [
    ((4096, "swiglu", 14336, None, 1), "9558 features and a second of 4778"),   # GPT-NeoX mistral/7B.yml's width
    ((100, "gelu", None, None, 32), "448 features and a second of 416"),        # 400 rounds differently to 64, 32
    ((64, "gelu", 256, 2.0, 1), "give one of them"),
    ((64, "gelu", None, None, 0), "mlp_multiple_of must be >= 1"),
])
def test_mlp_width_rule_refuses_shapes_gpt_neox_cannot_run(args, match):
    with pytest.raises(ConfigError, match=match):
        mlp_widths(*args)


# ---------------------------------------------------------------------------------------------------------------
# --summary numbers on a tiny config, every value counted by hand below

TINY = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
        "max_position_embeddings": 32, "pos_emb": "learned", "no_weight_tying": True, "padded_vocab_size": 128,
        "train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
        "world_size": 2, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}
# h = 64, 4 heads, V = 128, s = 32, gelu MLP 256 wide, biases and LayerNorm: per layer qkv 64*192+192, dense
# 64*64+64, norms 2*128, mlp (64*256+256) + (256*64+64)
TINY_LAYER = 12_480 + 4_160 + 256 + 33_088                      # 49,984
TINY_TOTAL = 128 * 64 + 32 * 64 + 2 * TINY_LAYER + 128 + 128 * 64  # 118,528
# 6 x matmul weights (2 x (64*192 + 64*64 + 2*64*256) + 64*128 = 106,496) + 12 x 2 x 64 x 32
TINY_FLOPS = 6 * 106_496 + 12 * 2 * 64 * 32                      # 688,128
# bf16 activations, T = 2 x 32 tokens: 4 residual-sized tensors (2 norm inputs, attention and MLP inputs)
# 4*2*64*64, q/k/v 2*64*192, dense input 2*64*64, softmax statistics 4*64*4, MLP 2*64*(256+256)
TINY_LAYER_ACTS = 32_768 + 24_576 + 8_192 + 1_024 + 65_536      # 132,096
TINY_HEAD_ACTS = 2 * 64 * 64 + 2 * 64 * 64 + 4 * 64 * 128       # final norm input, head input, fp32 log-probs


def test_summary_numbers_of_a_tiny_config_by_hand(capsys, tmp_path):
    cfg = load_config(TINY)
    s = summarize(cfg)
    # without the word embeddings, the position table and the output layer
    assert (s.counts.total, s.counts.non_embedding) == (TINY_TOTAL, TINY_TOTAL - 128 * 64 - 32 * 64 - 128 * 64)
    assert s.counts.layers[0].total == TINY_LAYER
    assert int(s.flops_per_token) == TINY_FLOPS
    assert (s.data_parallel, s.zero_stage, s.precision) == (2, 1, "bf16")
    gpu = s.gpu
    assert gpu.params == TINY_TOTAL
    # weights and gradients 2 B each; Adam under bf16: fp32 master + 2 moments = 12 B, over 2 ZeRO-1 ranks
    assert (gpu.state.weights, gpu.state.gradients, gpu.state.optimizer) == (2 * TINY_TOTAL, 2 * TINY_TOTAL,
                                                                             12 * TINY_TOTAL // 2)
    assert gpu.activations == 2 * TINY_LAYER_ACTS + TINY_HEAD_ACTS                       # 313,344
    assert gpu.activations_checkpointed == 2 * 2 * 64 * 64 + TINY_LAYER_ACTS + TINY_HEAD_ACTS  # 197,632

    assert config_main([str(_write(tmp_path / "tiny.yml", TINY)), "--summary", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == summary_lines(s)
    assert out[0].startswith("model: 118,528 parameters, 100,096 without embeddings and output layer")
    assert out[2] == ("  each of 2 layers 49,984: attention qkv 12,480, dense 4,160 | norms 256 | mlp 33,088")
    assert out[3].startswith("FLOPs per token (fwd+bwd): 688,128 = 6 x 106,496 matmul weights")
    assert out[5] == "  weights 231.50 KiB | gradients 231.50 KiB | optimizer 694.50 KiB (Adam: 12 B/param / DP 2)"
    assert out[6] == ("  activations (micro batch 2 x 32 tokens): 306.00 KiB; 193.00 KiB with checkpoint_activations "
                      "every 1 layer")
    assert out[7].startswith("  total 1.43 MiB as configured (checkpoint_activations off; 1.32 MiB on)")


def _write(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_tensor_parallel_splits_the_sharded_weights_only():
    s = summarize(load_config({**TINY, "model_parallel_size": 2}))
    # split over 2 ranks: qkv, dense and MLP weights, the column biases, word embeddings and output layer;
    # replicated: norms, row biases (dense, dense_4h_to_h), the position table, the final norm
    split = 2 * (12_480 + 4_096 + 16_640 + 16_384) + 2 * 128 * 64
    replicated = 2 * (64 + 256 + 64) + 32 * 64 + 128
    assert split + replicated == TINY_TOTAL
    assert s.gpu.params == split // 2 + replicated
    assert s.data_parallel == 1


def test_pipeline_reports_the_heavier_stage():
    cfg = load_config({**TINY, "num_layers": 4, "pipe_parallel_size": 2, "gradient_accumulation_steps": 4})
    s = summarize(cfg)
    first = 128 * 64 + 32 * 64 + 2 * TINY_LAYER          # embedding + 2 layers
    assert (s.gpu.stage, s.gpu.params, s.pipeline_stages) == ("first stage", first, 2)
    # 1F1B: the first stage holds min(stages, accumulation) = 2 micro-batches
    assert s.gpu.activations == 2 * 2 * TINY_LAYER_ACTS


def test_pipeline_with_tied_embeddings_keeps_a_copy_on_the_last_stage():
    cfg = load_config({**TINY, "num_layers": 4, "pipe_parallel_size": 2, "no_weight_tying": False,
                       "padded_vocab_size": 4096})
    s = summarize(cfg)
    assert s.counts.tied and s.counts.total == 4096 * 64 + 32 * 64 + 4 * TINY_LAYER + 128
    # the last stage: 2 layers, the final norm and its copy of the word embeddings (the first has the position
    # table as well, but the last also keeps the fp32 log-probabilities of a 4096-token vocabulary)
    assert (s.gpu.stage, s.gpu.params) == ("last stage", 2 * TINY_LAYER + 128 + 4096 * 64)


def test_korthikanti_34sbh_for_their_gpt_shape():
    """4h GELU MLP, dropout, full heads, 16-bit: 34 s b h per layer (plus the fused kernel's softmax statistics), and
    s b h (10 + 24 / t) with tensor parallelism, 34 s b h / t with sequence parallelism too."""
    from megatron.config.model import ModelConfig

    s, b, h, a = 128, 2, 256, 8
    m = ModelConfig(num_layers=1, hidden_size=h, num_attention_heads=a, seq_length=s, hidden_dropout=0.1)
    stats = 4 * s * b * a
    assert memory.layer_activation_bytes(memory.ActivationShape(m, b, 512)) == 34 * s * b * h + stats
    tp = memory.ActivationShape(m, b, 512, tensor_parallel=4)
    assert memory.layer_activation_bytes(tp) == s * b * h * 10 + s * b * h * 24 // 4 + stats // 4
    sp = memory.ActivationShape(m, b, 512, tensor_parallel=4, sequence_parallel=True)
    assert memory.layer_activation_bytes(sp) == 34 * s * b * h // 4 + stats // 4


@pytest.mark.parametrize("precision, zero, optimizer, per_param, split", [
    ("bf16", 0, "Adam", (2, 2, 12), (1, 1, 1)),
    ("bf16", 1, "AdamW", (2, 2, 12), (1, 1, 8)),
    ("fp16", 2, "Adam", (2, 2, 12), (1, 8, 8)),
    ("bf16", 3, "Adam", (2, 2, 12), (8, 8, 8)),
    ("fp32", 0, "Adam", (4, 4, 8), (1, 1, 1)),      # no master copy: the weights are fp32 already
    ("fp32", 1, "Adam", (4, 4, 12), (1, 1, 8)),     # ZeRO keeps an fp32 partition of its own
    ("fp32", 0, "SGD", (4, 4, 0), (1, 1, 1)),
])
def test_training_state_under_zero(precision, zero, optimizer, per_param, split):
    n, dp = 1_000_000, 8
    state = memory.training_state(n, precision, zero, dp, optimizer)
    assert (state.weights, state.gradients, state.optimizer) == tuple(n * b // d for b, d in zip(per_param, split))


def test_summary_without_vocab_is_one_error_line(capsys, tmp_path):
    path = _write(tmp_path / "novocab.yml", {k: v for k, v in TINY.items() if k != "padded_vocab_size"})
    assert config_main([str(path), "--summary", "--quiet", "--vocab_file", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "padded_vocab_size" in err[0] and "missing.json" in err[0]


def test_format_bytes():
    assert [format_bytes(x) for x in (512, 1536, 3 << 20, 5 << 30)] == ["512 B", "1.50 KiB", "3.00 MiB", "5.00 GiB"]
