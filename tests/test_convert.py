"""Trained checkpoints leave the framework: the shared loader (``megatron.checkpoint.load_trained_model``), the
HF export / import tools (``tools/ckpts/convert_neox_to_hf.py``, ``convert_hf_to_neox.py``) and the ``sepllm`` block
read by ``apply_sepllm`` / SepCache generation.

Models are tiny Pythia- and Llama-shaped networks trained a few steps here; HF logits must equal ours to 1e-5 (fp32)
and ours -> HF -> ours must give back bit-identical weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import json
import re
import subprocess
import sys

import transformers

from megatron.checkpoint import load_trained_model, read_full_model_state
from megatron.checkpoint.format import CheckpointError
from megatron.config import ConfigError
from megatron.training import pretrain
from parallel_spawn import run_distributed
from sep_helpers import make_sepllm_cfg
from train_helpers import make_tiny_corpus, tiny_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools" / "ckpts"))
import convert_hf_to_neox  # noqa: E402
import convert_neox_to_hf  # noqa: E402

BOOK = Path(__file__).resolve().parents[1] / "megatron" / "data" / "corpora" / "pg19_sample" / "12204.txt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, neox_tokenizer_file):
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus"), BOOK, neox_tokenizer_file, chars=20_000)


@pytest.fixture(scope="module")
def pythia_run(corpus, neox_tokenizer_file, tmp_path_factory):
    """A Pythia-shaped tiny model (partial rotary, parallel residual, untied head) trained 3 steps; checkpoints at
    steps 2 and 3."""
    run = tmp_path_factory.mktemp("pythia")
    cfg = tiny_config(corpus, neox_tokenizer_file, run, train_iters=3, checkpoint__save=str(run / "ckpt"),
                      checkpoint__checkpoint_factor=2, checkpoint__extra_save_iters=[3])
    pretrain(cfg)
    return run / "ckpt"


def test_loader_reads_latest_and_a_chosen_iteration(pythia_run):
    latest = load_trained_model(pythia_run)
    assert latest.iteration == 3 and latest.checkpoint_dir == pythia_run / "global_step3"
    assert not latest.model.training and latest.config.model.padded_vocab_size == 50304
    saved = torch.load(pythia_run / "global_step3" / "model_states.pt", weights_only=True)
    state = latest.model.state_dict()
    assert sorted(state) == sorted(saved)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    older = load_trained_model(pythia_run, iteration=2)
    assert older.iteration == 2 and older.checkpoint_dir.name == "global_step2"
    assert not torch.equal(older.model.layers[0].attention.dense.weight, latest.model.layers[0].attention.dense.weight)
    direct = load_trained_model(pythia_run / "global_step2", dtype=torch.bfloat16)
    assert direct.iteration == 2 and next(direct.model.parameters()).dtype == torch.bfloat16
    assert torch.equal(direct.model.embed.word_embeddings.weight, saved_embed(pythia_run, 2).to(torch.bfloat16))


def saved_embed(ckpt: Path, step: int) -> torch.Tensor:
    return read_full_model_state(ckpt / f"global_step{step}")["embed.word_embeddings.weight"]


def test_loader_overrides_and_config_files(pythia_run, tmp_path):
    over = load_trained_model(pythia_run, overrides=["--sep_attention_impl", "dense"])
    assert over.config.sepllm.sep_attention_impl == "dense"
    yml = tmp_path / "train.yml"
    saved = (pythia_run / "global_step3" / "config.yml").read_text()
    yml.write_text(saved.replace("hidden_size: 64", "hidden_size: 128"))
    with pytest.raises(CheckpointError, match=r"does not match the configured model \(shape mismatch: "):
        load_trained_model(pythia_run, config_files=[yml])


def test_loader_bad_input_is_one_line(pythia_run, tmp_path):
    cases = [
        (tmp_path / "nowhere", {}, CheckpointError, r"checkpoint path .*nowhere does not exist"),
        (tmp_path, {}, CheckpointError, r"no checkpoint found in .*: expected a 'latest' file"),
        (pythia_run, {"iteration": 7}, CheckpointError,
         r"no complete checkpoint for iteration 7 in .* \(expected global_step7/meta.json; available iterations: "
         r"\[2, 3\]\)"),
        (pythia_run / "global_step2", {"iteration": 3}, CheckpointError,
         r"holds iteration 2, not the requested iteration 3"),
        (pythia_run, {"overrides": ["--hidden-size", "-4"]}, ConfigError, r"hidden"),
        (pythia_run, {"dtype": torch.int64}, ConfigError, r"dtype = torch.int64: expected a floating torch dtype"),
    ]
    for load_dir, kwargs, exc, pattern in cases:
        with pytest.raises(exc, match=pattern) as info:
            load_trained_model(load_dir, **kwargs)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------- export
LLAMA = {"model__norm": "rmsnorm", "model__activation": "swiglu", "model__num_kv_heads": 2, "model__rotary_pct": 1.0,
         "model__gpt_j_residual": False, "model__no_weight_tying": False, "model__use_bias_in_attn_linear": False,
         "model__use_bias_in_mlp": False, "model__use_bias_in_norms": False, "model__rms_norm_epsilon": 1e-6,
         "model__intermediate_size": 96, "model__rotary_emb_base": 500000}


@pytest.fixture(scope="module")
def llama_sepllm_run(corpus, neox_tokenizer_file, tmp_path_factory):
    """A Llama-shaped tiny model (RMSNorm, SwiGLU, GQA, tied embeddings) trained 2 steps with SepLLM attention."""
    run = tmp_path_factory.mktemp("llama")
    cfg = tiny_config(corpus, neox_tokenizer_file, run, train_iters=2, checkpoint__save=str(run / "ckpt"),
                      checkpoint__checkpoint_factor=2, **LLAMA)
    cfg.sepllm = make_sepllm_cfg(num_layers=2, window=8, init_tok_max_idx=1, prefill_local_window_size=8,
                                 generate_local_window_size=8)
    pretrain(cfg)
    return run / "ckpt"


def _ids(rows: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 50000, (rows, seq), generator=torch.Generator().manual_seed(seed))
    ids[:, ::5] = 13  # separators every few tokens
    return ids


def _export(ckpt: Path, out: Path, *extra: str) -> Path:
    assert convert_neox_to_hf.main(["--input_dir", str(ckpt), "--output_dir", str(out), *extra]) == 0
    return out


def _hf(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _assert_same_weights(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def test_pythia_export_logits_files_and_round_trip(pythia_run, tmp_path):
    hf_dir = _export(pythia_run, tmp_path / "hf")
    assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                       "tokenizer_config.json"]
    assert not list(tmp_path.glob(".hf.tmp-*"))
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForCausalLM"] and config["hidden_act"] == "gelu"
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    assert config["use_parallel_residual"] is True and config["tie_word_embeddings"] is False
    assert config["eos_token_id"] == config["pad_token_id"] == 0 and config["dtype"] == "float32"
    assert config["sepllm"]["mode"] == "full" and "sep_cache" not in config["sepllm"]
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok("Hello world").input_ids == [12092, 1533]

    ours = load_trained_model(pythia_run).model
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(_hf(hf_dir)(input_ids=ids).logits, ours(ids), atol=1e-5, rtol=0)

    assert convert_hf_to_neox.main(["--hf_dir", str(hf_dir), "--output_dir", str(tmp_path / "back")]) == 0
    back = load_trained_model(tmp_path / "back")
    _assert_same_weights(back.model.state_dict(), read_full_model_state(pythia_run / "global_step3"))
    assert back.iteration == 0 and back.config.tokenizer.vocab_file == str(tmp_path / "back" / "tokenizer.json")
    yml = (tmp_path / "back" / "model.yml").read_text()
    assert "rotary_pct: 0.25" in yml and "gpt_j_residual: true" in yml and "no_weight_tying: true" in yml


def test_precision_is_honoured_and_shards_have_an_index(pythia_run, tmp_path):
    from megatron.checkpoint.hf.export import export_to_hf

    hf_dir = _export(pythia_run, tmp_path / "bf16", "--precision", "bf16", "--no_save_tokenizer")
    assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json", "model.safetensors"]
    hf = _hf(hf_dir)
    assert hf.dtype == torch.bfloat16
    want = load_trained_model(pythia_run).model.state_dict()
    assert torch.equal(hf.state_dict()["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"],
                       want["layers.1.mlp.dense_h_to_4h.weight"].to(torch.bfloat16))
    result = export_to_hf(pythia_run, tmp_path / "sharded", save_tokenizer=False, max_shard_bytes=4_000_000)
    index = json.loads((result.output_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards == sorted(p.name for p in result.output_dir.glob("model-*.safetensors"))
    ids = _ids(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(_hf(result.output_dir)(input_ids=ids).logits,
                                   load_trained_model(pythia_run).model(ids), atol=1e-5, rtol=0)


def test_llama_sepllm_export_logits_block_and_round_trip(llama_sepllm_run, tmp_path):
    import megatron.sepllm
    from megatron.sepllm import apply_sepllm

    hf_dir = _export(llama_sepllm_run, tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["hidden_act"] == "silu"
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is True
    assert config["rms_norm_eps"] == 1e-6 and config["rope_parameters"]["rope_theta"] == 500000.0
    block = config["sepllm"]
    assert block["mode"] == "sepllm" and block["separator_token_ids"] == [15, 13, 32, 2, 28, 27, 209, 186, 187]
    assert block["init_tok_max_idx"] == 1 and block["Layer_num"] == 2
    assert block["sep_cache"] == {"init_cache_size": 2, "sep_cache_size": 64, "local_size": [8, 8],
                                  "cache_size": [82, 82]}

    trained = load_trained_model(llama_sepllm_run)
    ids = _ids()
    hf = _hf(hf_dir)
    handle = apply_sepllm(hf)  # settings from the config.json block alone
    assert handle.settings.mode == "sepllm" and handle.settings.num_initial == 2
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, trained.model(ids), atol=1e-5, rtol=0)
    handle.remove()
    # SepCache generation takes its sizes and separators from the block when none are given
    out = hf.generate(input_ids=ids[:1, :12], custom_generate=megatron.sepllm.generate, do_sample=False,
                      max_new_tokens=4, return_dict_in_generate=True, pad_token_id=0)
    cache = out.past_key_values
    assert cache.separator_token_ids == block["separator_token_ids"]
    assert [(layer.init_cache_size, layer.local_size, layer.cache_size) for layer in cache.layers] == [(2, 8, 82)] * 2

    assert convert_hf_to_neox.main(["--hf_dir", str(hf_dir), "--output_dir", str(tmp_path / "back")]) == 0
    back = load_trained_model(tmp_path / "back")
    _assert_same_weights(back.model.state_dict(), read_full_model_state(llama_sepllm_run / "global_step2"))
    assert back.config.sepllm.mode == "sepllm" and back.config.sepllm.init_tok_max_idx == 1


@pytest.mark.parametrize("exact_window", [True, False])
def test_converted_sepllm_model_decodes_like_our_generate(llama_sepllm_run, tmp_path, exact_window):
    """The same greedy tokens (and logits) through HF + SepCache on the exported model as through our own cached
    decoding (``generate.py``'s compressed cache), over enough steps for the cache to compress many times; SepCache
    sizes on the HF side come from the exported ``sepllm`` block alone."""
    import megatron.sepllm
    from megatron.inference.generator import generate_batch
    from megatron.inference.kv_cache import KVCacheSettings

    hf = _hf(_export(llama_sepllm_run, tmp_path / "hf"))
    trained = load_trained_model(llama_sepllm_run)
    prompt = _ids(rows=1, seq=7, seed=3)        # shorter than a + w: the prompt's SepLLM mask is plain causal
    new_tokens = 200                            # the caches hold at most 82 keys: several compressions
    ours = generate_batch(trained.model, [prompt[0].tolist()], max_new_tokens=new_tokens, eos_id=None,
                          cache_settings=KVCacheSettings(kind="compressed", exact_window=exact_window),
                          keep_logits=True, pad_id=0)[0]
    out = hf.generate(input_ids=prompt, custom_generate=megatron.sepllm.generate, do_sample=False,
                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, exact_window=exact_window,
                      USE_MAX_SEP_CACHE=True, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    assert max(out.cache.retention()["compressions_per_layer"]) > 1
    assert out.sequences[0, prompt.shape[1]:].tolist() == ours.tokens
    torch.testing.assert_close(torch.stack(out.logits, 1)[0, :, :50277], torch.stack(ours.step_logits)[:, :50277],
                               atol=1e-4, rtol=1e-4)


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "ckpts" / script), *args], capture_output=True,
                          text=True, timeout=120)


def test_bad_input_is_one_line_exit_2_and_leaves_nothing(pythia_run, tmp_path, capsys):
    other_shape = tmp_path / "wide.yml"
    other_shape.write_text((pythia_run / "global_step3" / "config.yml").read_text()
                           .replace("hidden_size: 64", "hidden_size: 128"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    (tmp_path / "a_file").write_text("x")
    alibi = tmp_path / "alibi.yml"
    alibi.write_text(other_shape.read_text().replace("hidden_size: 128", "hidden_size: 64")
                     .replace("pos_emb: rotary", "pos_emb: alibi"))
    out = str(tmp_path / "out")
    cases = [
        (["--input_dir", str(tmp_path / "empty"), "--output_dir", out], r"no checkpoint found in .*empty: expected a "
                                                                         r"'latest' file"),
        (["--input_dir", str(pythia_run), "--config_file", str(other_shape), "--output_dir", out],
         r"does not match the configured model \(shape mismatch: "),
        (["--input_dir", str(pythia_run), "--output_dir", out, "--architecture", "gpt2"],
         r"argument --architecture: invalid choice: 'gpt2'"),
        (["--input_dir", str(pythia_run), "--output_dir", out, "--architecture", "llama"],
         r"cannot export to HF LlamaForCausalLM: .*norm = 'layernorm'"),
        (["--input_dir", str(pythia_run), "--config_file", str(alibi), "--output_dir", out],
         r"cannot export to HF GPTNeoXForCausalLM: pos_emb = 'alibi'"),
        (["--input_dir", str(pythia_run), "--output_dir", "/proc/sepllm-export"], r"--output_dir /proc/sepllm-export: "
                                                                                  r"cannot write in /proc"),
        (["--input_dir", str(pythia_run), "--output_dir", str(tmp_path / "a_file" / "out")],
         r"cannot create parent folder .*a_file \(File exists\)"),
        (["--input_dir", str(pythia_run), "--output_dir", str(tmp_path / "taken")],
         r"exists and is not an empty folder"),
        (["--input_dir", str(pythia_run), "--output_dir", out, "--pad-token-id", "60000"],
         r"--pad-token-id 60000: outside the vocabulary \[0, 50304\)"),
    ]
    for args, pattern in cases:
        try:
            code = convert_neox_to_hf.main(args)
        except SystemExit as exc:  # argparse
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("convert_neox_to_hf: error: "), err
        assert re.search(pattern, lines[0]), (pattern, lines[0])
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*tmp-*")), args
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["x"]
    not_hf = _cli("convert_hf_to_neox.py", "--hf_dir", str(pythia_run), "--output_dir", out)
    assert not_hf.returncode == 2 and not_hf.stderr.strip().splitlines() == [
        f"convert_hf_to_neox: error: --hf_dir {pythia_run}: no config.json (expected a Hugging Face model folder)"]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- TP=2 / PP=2 checkpoints
def _train_layouts(rank: int, world_size: int, cfgs: list) -> None:
    for cfg in cfgs:  # one spawn for both layouts: process start-up dominates these tiny runs
        pretrain(cfg)


@pytest.mark.distributed
def test_tp2_and_pp2_checkpoints_export_with_equal_logits(corpus, neox_tokenizer_file, tmp_path):
    """Pythia-shaped TP=2 (sharded files) and Llama-shaped PP=2 runs: the export's HF logits equal the merged model's,
    and converting back with --tp 2 gives the same shards again."""
    cfgs = {}
    for name, extra in (("tp2", {"parallel__model_parallel_size": 2}),
                        ("pp2", {"parallel__pipe_parallel_size": 2, **LLAMA})):
        run = tmp_path / name
        cfg = tiny_config(corpus, neox_tokenizer_file, run, train_iters=2, checkpoint__save=str(run / "ckpt"),
                          checkpoint__checkpoint_factor=2, **extra)
        cfg.model.padded_vocab_size = 50432
        cfgs[name] = cfg
    run_distributed(_train_layouts, 2, list(cfgs.values()), timeout=240)
    step = tmp_path / "tp2" / "ckpt" / "global_step2"
    assert sorted(p.name for p in step.glob("*model_states.pt")) == ["mp_rank_00_model_states.pt",
                                                                    "mp_rank_01_model_states.pt"]
    ids = _ids(seed=3)
    for name, arch in (("tp2", "GPTNeoXForCausalLM"), ("pp2", "LlamaForCausalLM")):
        hf_dir = _export(tmp_path / name / "ckpt", tmp_path / f"hf-{name}")
        assert json.loads((hf_dir / "config.json").read_text())["architectures"] == [arch]
        ours = load_trained_model(tmp_path / name / "ckpt").model
        with torch.no_grad():
            torch.testing.assert_close(_hf(hf_dir)(input_ids=ids).logits, ours(ids), atol=1e-5, rtol=0)
    back = tmp_path / "back-tp2"
    assert convert_hf_to_neox.main(["--hf_dir", str(tmp_path / "hf-tp2"), "--output_dir", str(back), "--tp", "2"]) == 0
    for f in ("mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"):
        _assert_same_weights(torch.load(back / "global_step0" / f, weights_only=True),
                             torch.load(step / f, weights_only=True))
    assert "model-parallel-size: 2" in (back / "model.yml").read_text()


def test_imported_checkpoint_finetunes_like_the_original(pythia_run, corpus, neox_tokenizer_file, tmp_path):
    """convert_hf_to_neox output: model.yml describes the same model, and --finetune from it trains exactly like
    --finetune from the checkpoint it was exported from."""
    from megatron.config import load_config

    hf_dir = _export(pythia_run, tmp_path / "hf", "--no_save_tokenizer")
    assert convert_hf_to_neox.main(["--hf_dir", str(hf_dir), "--output_dir", str(tmp_path / "imported")]) == 0
    original = load_trained_model(pythia_run).config.model
    generated = load_config(tmp_path / "imported" / "model.yml").model
    import dataclasses

    from megatron.model.mlp import ffn_width

    assert ffn_width(generated) == ffn_width(original) == 256  # written explicitly, the run derived it
    assert dataclasses.replace(generated, intermediate_size=None) == original
    losses = []
    for load in (pythia_run, tmp_path / "imported"):
        run = tmp_path / f"ft-{load.name}"
        cfg = tiny_config(corpus, neox_tokenizer_file, run, train_iters=2, checkpoint__load=str(load),
                          checkpoint__finetune=True)
        losses.append(pretrain(cfg).train_losses)
    assert sorted(losses[0]) == [1, 2] and losses[0] == losses[1]
