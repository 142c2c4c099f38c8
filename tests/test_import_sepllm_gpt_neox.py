"""The SepLLM authors' HF format (``model_type: sepllm_gpt_neox``) comes in: ``convert_hf_to_neox.py`` imports the
model and its SepLLM settings; ``apply_sepllm`` and ``megatron.sepllm.generate`` read the same top-level keys.

The folders are built here from the field list of the authors' converter (spec §5.3): a GPT-NeoX config in
transformers 4.x spellings plus the SepLLM keys at the top level; weights of a tiny random ``GPTNeoXForCausalLM``
under their names (``sepllm_gpt_neox.*``, ``embed_out``) plus the buffers 4.x saved and the BiPE table.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

import megatron.sepllm
from megatron.config import load_config
from megatron.checkpoint import load_trained_model
from megatron.checkpoint.hf.import_hf import ImportHFError, import_from_hf
from megatron.sepllm import apply_sepllm
from megatron.sepllm.hf.config import TrainingFreeConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "ckpts"))
import convert_hf_to_neox  # noqa: E402

VOCAB, LAYERS, HIDDEN, POSITIONS = 96, 2, 32, 64
SEPS = [5, 7]
SEPLLM = {  # the authors' SepLLM keys (every one their converter writes), SepLLM mode with per-layer windows
    "separator_token_ids": SEPS, "PADDING_ID": 0, "prefill_local_window_size": 6, "generate_local_window_size": 6,
    "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS": True, "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS": True,
    "prefill_loc_win_size_list": [4, 9], "generate_win_loc_size_list": [5, 8], "init_tok_max_idx": 1,
    "USE_ORIGINAL_FULL_ATTEN": False, "streamingLLM": False, "PRINT_KV_RATIO": False, "print_ratio_intervals": 100,
    "EXCLUDE_DIAGONAL": True, "USE_BiPE": False, "BiPE_seps": SEPS, "USE_SA_SOFTMAX": False,
    "USE_SA_SOFTMAX_NO_DENO": False, "SA_Numerator_Bias": 0.0, "SA_Denominator_Bias": 1e-10,
    "BATCH_ADAPTIVE_INIT_POS": False,
}


def authors_config(**sepllm: object) -> dict:
    """config.json as the authors' converter writes it (GPT-NeoX fields in transformers 4.x spelling + theirs)."""
    return {
        "architectures": ["SepLLMGPTNeoXForCausalLM"], "model_type": "sepllm_gpt_neox",
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "max_position_embeddings": POSITIONS, "model_parallel_size": 1, "initializer_range": 0.02,
        "tie_word_embeddings": False, "use_cache": True, "pos_emb": "rotary", "num_layers": LAYERS,
        "mup_rp_embedding_mult": 1.0, **{**SEPLLM, **sepllm},
        "rotary_pct": 0.5, "rotary_emb_base": 10000, "use_parallel_residual": True, "layer_norm_eps": 1e-5,
        "intermediate_size": 64, "hidden_act": "gelu", "attention_bias": True, "attention_dropout": 0.0,
        "hidden_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "float32",
        "transformers_version": "4.45.0.dev0",
    }


def hf_model(config: dict) -> transformers.GPTNeoXForCausalLM:
    """A transformers GPT-NeoX whose config carries the authors' top-level keys; random weights, perturbed norms."""
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version",
                                                            "torch_dtype")}
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def write_folder(path: Path, config: dict, model: torch.nn.Module, extra: dict | None = None) -> Path:
    """The authors' folder: config.json and model.safetensors under their weight names."""
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace("gpt_neox.", "sepllm_gpt_neox.", 1).replace("lm_head.", "embed_out.", 1)
        state[key] = value.clone()
    for i in range(LAYERS):  # buffers transformers 4.x saved beside the weights
        state[f"sepllm_gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.rand(4)
    state.update(extra or {})
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    save_file(state, str(path / "model.safetensors"))
    return path


def ids(rows: int = 2, seq: int = 40) -> torch.Tensor:
    x = torch.randint(10, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(3))
    x[:, 3::7] = SEPS[0]
    x[:, 5::11] = SEPS[1]
    return x


def test_full_attention_logits_equal_hf_gpt_neox(tmp_path):
    config = authors_config(USE_ORIGINAL_FULL_ATTEN=True)
    hf = hf_model(config)
    src = write_folder(tmp_path / "authors", config, hf)
    assert convert_hf_to_neox.main(["--hf_dir", str(src), "--output_dir", str(tmp_path / "ours")]) == 0
    trained = load_trained_model(tmp_path / "ours")
    assert trained.config.sepllm.mode == "full" and trained.config.model.pos_emb == "rotary"
    assert trained.config.model.rotary_pct == 0.5 and trained.config.model.gpt_j_residual
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(trained.model(x), hf(input_ids=x).logits, atol=1e-5, rtol=0)
    assert apply_sepllm(hf).settings.mode == "full"      # full attention: the HF model is left as it is


def test_sepllm_settings_come_in_and_logits_equal_hf_with_apply_sepllm(tmp_path):
    config = authors_config(EXCLUDE_DIAGONAL=False, BATCH_ADAPTIVE_INIT_POS=True, PRINT_KV_RATIO=True, PADDING_ID=1)
    del config["print_ratio_intervals"]                # a key the folder lacks takes the authors' fallback (100)
    hf = hf_model(config)
    src = write_folder(tmp_path / "authors", config, hf)
    result = import_from_hf(src, tmp_path / "ours")
    sep = load_config(result.yaml_file).sepllm
    for key, value in {**SEPLLM, "EXCLUDE_DIAGONAL": False, "BATCH_ADAPTIVE_INIT_POS": True,
                       "PRINT_KV_RATIO": True, "PADDING_ID": 1}.items():
        assert getattr(sep, key) == value, key
    assert sep.mode == "sepllm" and sep.prefill_windows == [4, 9] and sep.generate_windows == [5, 8]
    trained = load_trained_model(tmp_path / "ours")
    assert trained.config.sepllm.mode == "sepllm"

    x = ids()
    with torch.no_grad():
        full = hf(input_ids=x).logits
        handle = apply_sepllm(hf)                        # settings from the top-level keys alone
        assert handle.settings.mode == "sepllm" and handle.settings.separator_ids == tuple(SEPS)
        assert handle.settings.num_initial == 2 and handle.settings.prefill_windows == (5, 10)  # EXCLUDE_DIAGONAL
        assert handle.settings.generate_windows == (5, 8) and handle.settings.batch_adaptive_init_pos
        sep_hf = hf(input_ids=x).logits
        handle.remove()
        ours = trained.model(x)
    assert (sep_hf - full).abs().max() > 1e-2            # the settings change the function ...
    torch.testing.assert_close(ours, sep_hf, atol=1e-5, rtol=0)   # ... and both sides read the same ones


def test_self_adjusting_softmax_settings_come_in(tmp_path):
    """The released SA model's keys (spec §1.9): no separators, full-length windows, both biases."""
    config = authors_config(USE_SA_SOFTMAX=True, separator_token_ids=[-1], SA_Numerator_Bias=1e-10,
                            SA_Denominator_Bias=1e-7, USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS=False,
                            USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS=False, prefill_local_window_size=POSITIONS,
                            generate_local_window_size=POSITIONS)
    hf = hf_model(config)
    result = import_from_hf(write_folder(tmp_path / "authors", config, hf), tmp_path / "ours")
    sep = load_config(result.yaml_file).sepllm
    assert (sep.mode, sep.USE_SA_SOFTMAX, sep.SA_Numerator_Bias, sep.SA_Denominator_Bias) == ("sa", True, 1e-10, 1e-7)
    with pytest.raises(TrainingFreeConfigError, match="'USE_SA_SOFTMAX' = True"):
        apply_sepllm(hf)


@pytest.mark.parametrize("mode", ["sepllm", "streamingllm"])
def test_generate_takes_sep_cache_sizes_from_top_level_keys(mode):
    config = authors_config(streamingLLM=mode == "streamingllm")
    hf = hf_model(config)
    out = hf.generate(input_ids=ids(1, 12), custom_generate=megatron.sepllm.generate, do_sample=False,
                      max_new_tokens=3, return_dict_in_generate=True, pad_token_id=0)
    cache = out.past_key_values
    seps, s = (SEPS, 64) if mode == "sepllm" else ([-1], 0)
    assert cache.separator_token_ids == seps
    assert [(layer.init_cache_size, layer.sep_cache_size, layer.local_size, layer.cache_size)
            for layer in cache.layers] == [(2, s, 5, 2 + s + 10), (2, s, 8, 2 + s + 16)]


def test_sepllm_block_wins_over_top_level_keys(tmp_path):
    block = {"mode": "streamingllm", **{k: SEPLLM[k] for k in ("PADDING_ID", "init_tok_max_idx")},
             "separator_token_ids": [-1], "streamingLLM": True, "prefill_local_window_size": 3,
             "generate_local_window_size": 3, "Layer_num": LAYERS}
    config = {**authors_config(), "sepllm": block}
    hf = hf_model(config)
    assert apply_sepllm(hf).settings.mode == "streamingllm"
    result = import_from_hf(write_folder(tmp_path / "authors", config, hf), tmp_path / "ours")
    sep = load_config(result.yaml_file).sepllm
    assert sep.mode == "streamingllm" and sep.prefill_windows == [3, 3]


@pytest.mark.parametrize("pos_emb", ["rotary", "alibi"])
def test_bipe_and_alibi_weights_and_settings_come_in(tmp_path, pos_emb):
    config = authors_config(USE_BiPE=True, BiPE_seps=[7], pos_emb=pos_emb)
    hf = hf_model(config)
    table = torch.randn(POSITIONS, HIDDEN)
    src = write_folder(tmp_path / "authors", config, hf, {"sepllm_gpt_neox.position_embeddings.weight": table})
    import_from_hf(src, tmp_path / "ours")
    trained = load_trained_model(tmp_path / "ours")
    cfg, state = trained.config, trained.model.state_dict()
    assert cfg.model.pos_emb == pos_emb and cfg.sepllm.USE_BiPE and cfg.sepllm.BiPE_seps == [7]
    assert torch.equal(state["embed.position_embeddings.weight"], table)
    want = hf.state_dict()
    assert torch.equal(state["layers.1.attention.query_key_value.weight"],
                       want["gpt_neox.layers.1.attention.query_key_value.weight"])
    assert torch.equal(state["output_layer.weight"], want["lm_head.weight"])
    x = ids()
    with torch.no_grad():
        before = trained.model(x)
        trained.model.embed.position_embeddings.weight.mul_(2.0)
        assert (trained.model(x) - before).abs().max() > 1e-3     # the BiPE table is wired into the model
    with pytest.raises(TrainingFreeConfigError, match="'USE_BiPE' = True"):
        apply_sepllm(hf)                                 # HF attention has no BiPE positions: refused, not ignored


@pytest.mark.parametrize("change, extra, match", [
    ({"pos_emb": "learned"}, None, r"pos_emb = 'learned': SepLLMGPTNeoXForCausalLM computes rotary or alibi"),
    ({"mup_rp_embedding_mult": 2.0}, None, r"mup_rp_embedding_mult = 2.0"),
    ({"num_layers": 12}, None, r"num_layers = 12 but num_hidden_layers = 2"),
    ({"prefill_loc_win_size_list": [4, 4, 4]}, None, r"prefill_loc_win_size_list .*3 entries"),
    ({"USE_SA_SOFTMAX": True}, None, r"USE_SA_SOFTMAX=True .*separator_token_ids"),
    ({"USE_BiPE": True}, None, r"missing sepllm_gpt_neox.position_embeddings.weight .*USE_BiPE = True"),
    ({}, {"sepllm_gpt_neox.position_embeddings.weight": torch.zeros(POSITIONS, HIDDEN)},
     r"unexpected sepllm_gpt_neox.position_embeddings.weight .*USE_BiPE is not True"),
])
def test_refusals_are_one_line_naming_the_key(tmp_path, capsys, change, extra, match):
    config = authors_config(**change)
    src = write_folder(tmp_path / "authors", config, hf_model(authors_config()), extra)
    assert convert_hf_to_neox.main(["--hf_dir", str(src), "--output_dir", str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("convert_hf_to_neox: error: ")
    assert re.search(match, err), err
    assert not (tmp_path / "ours").exists() and not list(tmp_path.glob(".ours.tmp-*"))


def test_transformers_4_gpt_neox_head_name_comes_in(tmp_path):
    """Plain GPT-NeoX folders saved by transformers 4.x (Pythia on the Hub) name the head ``embed_out``."""
    config = {k: v for k, v in authors_config().items() if k not in SEPLLM and k not in ("pos_emb", "num_layers")}
    config.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    hf = hf_model(config)
    src = tmp_path / "pythia"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    save_file({k.replace("lm_head.", "embed_out.", 1): v.clone() for k, v in hf.state_dict().items()},
              str(src / "model.safetensors"))
    import_from_hf(src, tmp_path / "ours")
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(load_trained_model(tmp_path / "ours").model(x), hf(input_ids=x).logits,
                                   atol=1e-5, rtol=0)


def test_import_error_class_for_library_callers(tmp_path):
    src = write_folder(tmp_path / "authors", authors_config(pos_emb="none"), hf_model(authors_config()))
    with pytest.raises(ImportHFError, match="pos_emb = 'none'"):
        import_from_hf(src, tmp_path / "ours")


def test_imported_sepllm_bipe_alibi_model_continues_training(tmp_path, neox_tokenizer_file):
    """model.yml + checkpoint drive a fine-tune: it starts from the imported weights, with the imported attention."""
    from megatron.data.corpus_registry import SHIPPED_DIR
    from train_helpers import make_tiny_corpus, pretrain_with_weights, tiny_sepllm_keys

    config = authors_config(USE_BiPE=True, BiPE_seps=SEPS, pos_emb="alibi", separator_token_ids=[15, 13, 187])
    config["vocab_size"] = 50304                         # the bundled 20B tokenizer's ids
    hf = hf_model(config)
    table = torch.randn(POSITIONS, HIDDEN)
    src = write_folder(tmp_path / "authors", config, hf, {"sepllm_gpt_neox.position_embeddings.weight": table})
    result = import_from_hf(src, tmp_path / "ours")
    corpus = make_tiny_corpus(tmp_path / "corpus", SHIPPED_DIR / "pg19_sample" / "12204.txt", neox_tokenizer_file,
                              chars=20_000)
    run = tmp_path / "run"
    train_keys = tiny_sepllm_keys(corpus, neox_tokenizer_file, run, **{"train-iters": 2, "min_lr": 0.0})
    train_keys["optimizer"]["params"]["lr"] = 1e-12    # steps too small to move the weights: they stay the imported ones
    cfg = load_config(train_keys, result.yaml_file, {"load": str(tmp_path / "ours"), "finetune": True})
    assert (cfg.model.pos_emb, cfg.sepllm.mode, cfg.sepllm.USE_BiPE) == ("alibi", "sepllm", True)
    assert cfg.sepllm.prefill_windows == [4, 9] and cfg.sepllm.separator_token_ids == [15, 13, 187]
    trained, _, final = pretrain_with_weights(cfg)
    assert sorted(trained.train_losses) == [1, 2] and all(v == v for v in trained.train_losses.values())
    torch.testing.assert_close(final["embed.position_embeddings.weight"], table, atol=1e-9, rtol=0)
    torch.testing.assert_close(final["layers.0.mlp.dense_h_to_4h.weight"],
                               hf.state_dict()["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"], atol=1e-9, rtol=0)
