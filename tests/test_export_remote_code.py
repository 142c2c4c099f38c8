"""``convert_neox_to_hf.py --architecture sepllm_neox``: every model we train leaves with its own modeling code.

Tiny checkpoints (random weights, every parameter perturbed so that no norm gain is 1 and no bias 0) of the configs
the transformers classes cannot express are exported, loaded with ``trust_remote_code=True`` and compared with our
``GPTModel``: fp32 logits to 1e-5 (with and without left padding), greedy cached ``generate`` token for token (and
step logits) against our decoding (``megatron.inference.generator.generate_batch``: its KV cache, or recomputation
for the modes our decoding recomputes), SepCache generation against our compressed cache, and ``apply_sepllm``.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import transformers

import megatron.sepllm
from megatron.config import load_config
from megatron.inference.generator import generate_batch, left_pad
from megatron.inference.kv_cache import KVCacheSettings
from megatron.model import GPTModel
from megatron.checkpoint import load_trained_model
from megatron.checkpoint.hf.export import ExportError, export_to_hf
from megatron.checkpoint.hf.remote_code import REMOTE_CODE_FILES
from megatron.sepllm import apply_sepllm

VOCAB = 64
SEPS = [3, 7]
TINY = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 64, "pos_emb": "rotary",
        "rotary_pct": 0.5, "padded_vocab_size": VOCAB, "init_method_std": 0.2, "tokenizer_type": "CharLevelTokenizer",
        "train_micro_batch_size_per_gpu": 1, "device": "cpu"}
SEPLLM = {"separator_token_ids": SEPS, "prefill_local_window_size": 5, "generate_local_window_size": 5,
          "init_tok_max_idx": 1}
PER_LAYER = {"separator_token_ids": SEPS, "init_tok_max_idx": 1, "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS": True,
             "prefill_loc_win_size_list": [4, 6], "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS": True,
             "generate_win_loc_size_list": [4, 6]}
#: name -> (config keys, our decoding recomputes the sequence instead of using a KV cache)
CASES = {
    "full": ({"gpt_j_residual": True, "no_weight_tying": True}, False),
    "alibi_sepllm_gqa_layernorm_without_bias": ({"pos_emb": "alibi", "num_kv_heads": 2, "use_bias_in_norms": False,
                                                 "use_bias_in_mlp": False, "use_bias_in_attn_linear": False,
                                                 "bias_gelu_fusion": True, **SEPLLM}, False),
    "learned_scalenorm_sepllm": ({"pos_emb": "learned", "norm": "scalenorm", **SEPLLM}, False),
    "no_positions_streamingllm": ({"pos_emb": "none", "streamingLLM": True, "prefill_local_window_size": 4,
                                   "generate_local_window_size": 4, "init_tok_max_idx": 0,
                                   "norm": "non_parametric_layernorm", "use_qk_layernorm": True,
                                   "activation": "mish"}, False),
    "bipe": ({"USE_BiPE": True, "BiPE_seps": SEPS, **SEPLLM}, True),
    "bipe_alibi": ({"pos_emb": "alibi", "USE_BiPE": True, "BiPE_seps": SEPS, **SEPLLM}, True),
    "sa": ({"USE_SA_SOFTMAX": True, "SA_Numerator_Bias": 0.1, "SA_Denominator_Bias": 0.01}, True),
    "sa_no_deno_alibi_6_heads": ({"USE_SA_SOFTMAX_NO_DENO": True, "pos_emb": "alibi", "num_attention_heads": 6,
                                  "hidden_size": 48}, True),
    "sepllm_per_layer_windows": ({**PER_LAYER, "num_kv_heads": 2}, False),
    "sepllm_decode_windows_differ_qk_swiglu": ({**PER_LAYER, "prefill_loc_win_size_list": [3, 9],
                                                "generate_win_loc_size_list": [5, 2], "use_qk_layernorm": True,
                                                "activation": "swiglu", "intermediate_size": 100,
                                                "mlp_multiple_of": 8}, False),
    "fixllm": ({"USE_FIXED_SEP_INTERVALs": True, "fixed_sep_intervals_list": [4, 6], "prefill_local_window_size": 3,
                "generate_local_window_size": 3, "init_tok_max_idx": 0}, True),
    "qk_rmsnorm_reglu_multiple_of": ({"use_qk_layernorm": True, "norm": "rmsnorm", "activation": "reglu",
                                      "mlp_multiple_of": 16, "no_weight_tying": True, "gpt_j_residual": True,
                                      **SEPLLM}, False),
    "qk_scalenorm_bilinear_tied_norm": ({"use_qk_layernorm": True, "norm": "scalenorm", "activation": "bilinear",
                                         "intermediate_size": 96, "gpt_j_residual": True, "gpt_j_tied": True}, False),
    "sliding_window": ({"sliding_window_width": 5}, False),
    "sinusoidal_onnx_gelu_sepllm": ({"pos_emb": "sinusoidal", "onnx_safe": True, **SEPLLM}, False),
    "learned_opt_offset": ({"pos_emb": "learned", "max_position_embeddings": 66, "opt_pos_emb_offset": 2}, False),
}
PROMPTS = [[5, 3, 9, 12, 7, 1, 4, 3, 8, 2, 11, 7, 6], [9, 8, 7, 3, 2]]
PROMPT = [5, 3, 9, 12, 7, 1, 4, 3, 8, 2, 11, 7, 6, 3, 9, 10, 3]     # six separators


def write_checkpoint(folder: Path, keys: dict) -> Path:
    """A checkpoint laid out as the trainer writes it, with perturbed random weights."""
    cfg = load_config({**TINY, **keys})
    torch.manual_seed(0)
    model = GPTModel(cfg.model, cfg.sepllm)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    step = folder / "global_step1"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"iteration": 1}))
    (step / "config.yml").write_text(cfg.to_yaml())
    torch.save(model.state_dict(), step / "model_states.pt")
    (folder / "latest").write_text("global_step1")
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(name) -> (our trained model, HF model loaded with trust_remote_code)``, built once per case."""
    built: dict = {}

    def get(name: str):
        if name not in built:
            root = tmp_path_factory.mktemp(name)
            ckpt = write_checkpoint(root / "ckpt", CASES[name][0])
            result = export_to_hf(ckpt, root / f"hf_{name}", architecture="sepllm_neox", save_tokenizer=False)
            assert result.files == ("config.json", "configuration_sepllm_neox.py", "model.safetensors",
                                    "modeling_sepllm_neox.py")
            hf, info = transformers.AutoModelForCausalLM.from_pretrained(result.output_dir, trust_remote_code=True,
                                                                         output_loading_info=True)
            assert type(hf).__name__ == "SepLLMNeoXForCausalLM" and type(hf).__module__.startswith(
                "transformers_modules.")                                     # the copied file, not our package
            assert not info["missing_keys"] and not info["unexpected_keys"], info
            built[name] = (load_trained_model(ckpt).model, hf.eval())
        return built[name]

    return get


def _ids(rows: int = 2, seq: int = 40) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(1))
    ids[:, 2::5] = SEPS[0]
    return ids


@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_ours_with_and_without_left_padding(exported, name):
    ours, hf = exported(name)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids), atol=1e-5, rtol=0)
        got = hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
        want = ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


def test_the_comparison_sees_the_attention_rule(exported):
    """A SepLLM model's logits differ from the same weights under full attention (so equality above is not
    trivial) and the exported config carries the resolved rule."""
    ours, hf = exported("sepllm_decode_windows_differ_qk_swiglu")
    config = hf.config
    assert (config.sepllm_mode, config.separator_ids, config.num_initial_tokens) == ("sepllm", SEPS, 2)
    assert (config.prefill_windows, config.generate_windows) == ([3, 9], [5, 2])
    assert config.sepllm["mode"] == "sepllm"           # the block apply_sepllm and SepCache read
    ids = _ids()
    with torch.no_grad():
        sparse = hf(input_ids=ids).logits
        config.sepllm_mode = "full"
        try:
            dense = hf(input_ids=ids).logits
        finally:
            config.sepllm_mode = "sepllm"
    assert (sparse - dense).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["full", "alibi_sepllm_gqa_layernorm_without_bias", "learned_scalenorm_sepllm",
                                  "no_positions_streamingllm", "bipe", "sa", "sepllm_per_layer_windows", "fixllm",
                                  "sliding_window"])
def test_cached_generate_equals_our_greedy_decoding(exported, name):
    """HF ``generate`` (its DynamicCache) on a left-padded batch gives our tokens and step logits: our KV cache for
    full / SepLLM / StreamingLLM models, our recomputation for the others."""
    ours, hf = exported(name)
    recompute = CASES[name][1]
    want = generate_batch(ours, PROMPTS, max_new_tokens=8, eos_id=None, recompute=recompute, keep_logits=True,
                          pad_id=0)
    ids, mask = left_pad(PROMPTS, 0)
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8, min_new_tokens=8,
                      pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    assert out.sequences[:, ids.shape[1]:].tolist() == [row.tokens for row in want]
    for row in range(len(PROMPTS)):
        torch.testing.assert_close(torch.stack(out.logits, 1)[row], torch.stack(want[row].step_logits), atol=1e-5,
                                   rtol=0)


def test_decode_steps_use_the_decode_windows(exported):
    """With decode windows unlike the prefill windows, cached generation follows our KV cache (decode windows),
    which differs from recomputing the sequence with the training windows."""
    ours, hf = exported("sepllm_decode_windows_differ_qk_swiglu")
    cached = generate_batch(ours, [PROMPT], max_new_tokens=10, eos_id=None, keep_logits=True)[0]
    recomputed = generate_batch(ours, [PROMPT], max_new_tokens=10, eos_id=None, recompute=True, keep_logits=True)[0]
    assert (torch.stack(cached.step_logits) - torch.stack(recomputed.step_logits)).abs().max() > 1e-3
    out = hf.generate(input_ids=torch.tensor([PROMPT]), do_sample=False, max_new_tokens=10, min_new_tokens=10,
                      pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], torch.stack(cached.step_logits), atol=1e-5, rtol=0)
    no_cache = hf.generate(input_ids=torch.tensor([PROMPT]), do_sample=False, max_new_tokens=10, min_new_tokens=10,
                           pad_token_id=0, use_cache=False, return_dict_in_generate=True, output_logits=True)
    torch.testing.assert_close(torch.stack(no_cache.logits, 1)[0], torch.stack(recomputed.step_logits), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("name", ["sepllm_per_layer_windows", "alibi_sepllm_gqa_layernorm_without_bias"])
def test_sepcache_generation_matches_our_compressed_cache(exported, name):
    """``custom_generate=megatron.sepllm.generate`` with the trained decode rule (exact window, separator cap,
    SepLLM prompt mask) gives the tokens and logits of our compressed cache, with a cap that binds and without."""
    ours, hf = exported(name)
    windows = hf.config.generate_windows
    logits = {}
    for sep_size in (2, 64):
        want = generate_batch(ours, [PROMPT], max_new_tokens=24, eos_id=None, keep_logits=True,
                              cache_settings=KVCacheSettings(kind="compressed", sep_cache_size=sep_size))[0]
        out = hf.generate(input_ids=torch.tensor([PROMPT]), custom_generate=megatron.sepllm.generate,
                          do_sample=False, max_new_tokens=24, min_new_tokens=24, exact_window=True,
                          USE_MAX_SEP_CACHE=True, prefill_attention="sepllm", sep_cache_size=sep_size,
                          cache_size=[2 + sep_size + 2 * w for w in windows], return_dict_in_generate=True,
                          output_logits=True, pad_token_id=0)
        assert min(out.cache.retention()["compressions_per_layer"]) > 10
        assert out.sequences[0, len(PROMPT):].tolist() == want.tokens
        logits[sep_size] = torch.stack(out.logits, 1)[0]
        torch.testing.assert_close(logits[sep_size], torch.stack(want.step_logits), atol=1e-5, rtol=0)
    assert (logits[2] - logits[64]).abs().max() > 1e-3      # the cap of two separators changed the computation


@pytest.mark.parametrize("name", ["sepllm_decode_windows_differ_qk_swiglu", "alibi_sepllm_gqa_layernorm_without_bias"])
def test_apply_sepllm_reproduces_the_trained_attention(exported, name):
    """``apply_sepllm(model)`` reads the ``sepllm`` block and masks the model's attention with the rule it already
    computes: same logits, same cached generation; ``remove()`` restores the model's own attention."""
    ours, hf = exported(name)
    ids = _ids()
    want = generate_batch(ours, [PROMPT], max_new_tokens=10, eos_id=None)[0].tokens
    handle = apply_sepllm(hf)
    try:
        assert hf.config._attn_implementation == handle.attn_name != "sdpa"
        with torch.no_grad():
            torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids), atol=1e-5, rtol=0)
        out = hf.generate(input_ids=torch.tensor([PROMPT]), do_sample=False, max_new_tokens=10, min_new_tokens=10,
                          pad_token_id=0)
        assert out[0, len(PROMPT):].tolist() == want
    finally:
        handle.remove()
    assert hf.config._attn_implementation == "sdpa"


def test_beam_search_keeps_the_token_record_in_step(exported):
    """Beam search reorders the cache rows; the model's record of their tokens follows (``_reorder_cache``), so
    cached beam search equals beam search that recomputes every step."""
    _, hf = exported("sepllm_per_layer_windows")
    kwargs = dict(input_ids=torch.tensor([PROMPT]), do_sample=False, num_beams=3, max_new_tokens=8,
                  min_new_tokens=8, pad_token_id=0)
    assert hf.generate(**kwargs).tolist() == hf.generate(**kwargs, use_cache=False).tolist()


def test_what_a_registered_attention_cannot_serve_is_refused(exported):
    _, bipe = exported("bipe")
    with pytest.raises(ValueError, match="BiPE positions depend on the whole token sequence"):
        bipe.generate(input_ids=torch.tensor([PROMPT]), custom_generate=megatron.sepllm.generate, do_sample=False,
                      max_new_tokens=2, pad_token_id=0)
    _, sa = exported("sa")
    assert sa.config.sepllm["USE_SA_SOFTMAX"] is True
    with pytest.raises(ValueError, match="USE_SA_SOFTMAX"):
        apply_sepllm(sa)
    with pytest.raises(ValueError, match="self-adjusting softmax is computed by this model only"):
        sa.generate(input_ids=torch.tensor([PROMPT]), custom_generate=megatron.sepllm.generate, do_sample=False,
                    max_new_tokens=2, pad_token_id=0, separator_token_ids=SEPS, init_cache_size=1,
                    sep_cache_size=2, local_size=4, cache_size=12)
    _, full = exported("full")
    with pytest.raises(ValueError, match="attention_mask must be 2-D"):
        full(input_ids=_ids(), attention_mask=torch.ones(2, 1, 40, 40, dtype=torch.bool))


def test_standard_exports_suggest_the_remote_code_export(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", {"pos_emb": "alibi", **SEPLLM})
    with pytest.raises(ExportError) as info:
        export_to_hf(ckpt, tmp_path / "hf", save_tokenizer=False)
    message = str(info.value)
    assert "pos_emb = 'alibi'" in message and "--architecture sepllm_neox" in message and "\n" not in message
    assert not (tmp_path / "hf").exists()


def test_remote_code_imports_only_torch_and_transformers():
    """The copied files must run without our package: their imports are torch, transformers, the standard library
    and each other."""
    import sys

    folder = Path(__file__).resolve().parents[1] / "megatron" / "checkpoint" / "hf" / "remote_code"
    for name in REMOTE_CODE_FILES:
        tree = ast.parse((folder / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module == "configuration_sepllm_neox", (name, node.module)
                continue
            modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module] if isinstance(node, ast.ImportFrom) else [])
            for module in modules:
                top = module.split(".")[0]
                assert top in ("torch", "transformers") or top in sys.stdlib_module_names, (name, module)


@pytest.mark.parametrize("name", ["sepllm_decode_windows_differ_qk_swiglu", "alibi_sepllm_gqa_layernorm_without_bias"])
def test_sepcache_with_the_block_defaults_decodes_like_generate_py(exported, name):
    """No SepCache argument: sizes, separators and the decode rule come from the exported ``sepllm`` block, and a
    left-padded batch decodes as ``generate.py`` does by default (its compressed cache)."""
    ours, hf = exported(name)
    want = generate_batch(ours, PROMPTS, max_new_tokens=8, eos_id=None, keep_logits=True, pad_id=0)
    ids, mask = left_pad(PROMPTS, 0)
    out = hf.generate(input_ids=ids, attention_mask=mask, custom_generate=megatron.sepllm.generate, do_sample=False,
                      max_new_tokens=8, min_new_tokens=8, return_dict_in_generate=True, output_logits=True,
                      pad_token_id=0)
    assert out.sequences[:, ids.shape[1]:].tolist() == [row.tokens for row in want]
    for row in range(len(PROMPTS)):
        torch.testing.assert_close(torch.stack(out.logits, 1)[row], torch.stack(want[row].step_logits), atol=1e-5,
                                   rtol=0)


def test_labels_hidden_states_and_embeddings_input(exported):
    """The usual HF surface: ``labels`` give the next-token cross-entropy of our logits, ``output_hidden_states`` the
    embedding output and every layer's, ``inputs_embeds`` the same logits as the ids (full attention needs no ids)."""
    ours, hf = exported("full")
    ids = _ids()
    with torch.no_grad():
        out = hf(input_ids=ids, labels=ids, output_hidden_states=True)
        want = ours(ids)
        expected = torch.nn.functional.cross_entropy(want[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)
        assert len(out.hidden_states) == 1 + hf.config.num_hidden_layers
        from_embeddings = hf(inputs_embeds=hf.get_input_embeddings()(ids)).logits
    torch.testing.assert_close(from_embeddings, want, atol=1e-5, rtol=0)
    _, sepllm = exported("sepllm_per_layer_windows")
    with pytest.raises(ValueError, match="pass input_ids, not inputs_embeds"):
        sepllm(inputs_embeds=sepllm.get_input_embeddings()(ids))


def test_bf16_export_equals_our_dense_path_bit_for_bit(tmp_path):
    """In bf16 the exported model computes what our dense attention path computes, bit for bit (our compact path
    sums in another order: bf16 rounding apart)."""
    ckpt = write_checkpoint(tmp_path / "ckpt", {"pos_emb": "alibi", **SEPLLM})
    result = export_to_hf(ckpt, tmp_path / "hf_bf16", architecture="sepllm_neox", save_tokenizer=False,
                          precision="bf16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(result.output_dir, trust_remote_code=True)
    assert hf.dtype == torch.bfloat16
    ours = load_trained_model(ckpt, dtype=torch.bfloat16, overrides=["--sep_attention_impl", "dense"]).model
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, ours(ids))
