"""The two greedy decoders of an exported SepLLM model agree by default: ``generate.py``'s compressed cache
(``megatron.inference.generator.generate_batch`` with the default ``KVCacheSettings``) and Hugging Face
``model.generate(custom_generate=megatron.sepllm.generate)`` with no SepCache argument, both reading the rule the model
was trained with (exact decode window, capped separators, the prompt under the SepLLM mask with the prefill window).
Also: ``apply_sepllm(model)`` followed by SepCache generation (docs/export.md) works and leaves the handle active.

The model's prefill window (6) differs from its decode window (4), so a decoder that used the wrong one for either
phase would give other logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import megatron.sepllm
from megatron.inference.generator import generate_batch
from megatron.inference.kv_cache import KVCacheSettings
from megatron.checkpoint import load_trained_model
from megatron.checkpoint.hf.export import export_to_hf
from megatron.training import pretrain
from sep_helpers import make_sepllm_cfg, pg19_ids
from train_helpers import make_tiny_corpus, tiny_config

NEW_TOKENS = 24
REAL_VOCAB = 50277          # rows past the tokenizer are padding rows of the embedding


@pytest.fixture(scope="module")
def exported(tmp_path_factory, neox_tokenizer_file, pg19_books):
    """A tiny Pythia-shaped SepLLM model (a = 2, prefill window 6, decode window 4) trained one step, and its HF
    export."""
    run = tmp_path_factory.mktemp("decoders")
    corpus = make_tiny_corpus(run / "data", pg19_books[0], neox_tokenizer_file, chars=20_000)
    cfg = tiny_config(corpus, neox_tokenizer_file, run, train_iters=1, seq=64, checkpoint__save=str(run / "ckpt"))
    cfg.sepllm = make_sepllm_cfg(num_layers=2, init_tok_max_idx=1, prefill_windows=[6, 6],
                                 generate_windows=[4, 4], prefill_local_window_size=6, generate_local_window_size=4)
    pretrain(cfg)
    export_to_hf(run / "ckpt", run / "hf")
    # the weights get the permissions of every other exported file (safetensors alone wrote them 0600)
    assert {(f.stat().st_mode & 0o777) for f in (run / "hf").iterdir()} == {(run / "hf" / "config.json").stat().st_mode
                                                                          & 0o777}
    return run / "ckpt", run / "hf"


@pytest.fixture(scope="module")
def prompts(pg19_dir, neox_tokenizer_file) -> list[list[int]]:
    """Three prompts of real text: shorter than a + w, and two longer ones with separators inside."""
    text = pg19_ids(pg19_dir, neox_tokenizer_file, 80, book_index=1, offset=2000).tolist()
    return [text[:5], text[5:35], text[40:70]]


@pytest.fixture(scope="module")
def ours(exported):
    """Our model read from the checkpoint, as generate.py reads it."""
    return load_trained_model(exported[0]).model


def _ours(model, prompt: list[int], **settings) -> tuple[list[int], torch.Tensor]:
    out = generate_batch(model, [prompt], max_new_tokens=NEW_TOKENS, eos_id=None,
                         cache_settings=KVCacheSettings(**settings), keep_logits=True, pad_id=0)[0]
    return out.tokens, torch.stack(out.step_logits)[:, :REAL_VOCAB]


def _hf_generate(model, prompt: list[int], **kwargs) -> tuple[list[int], torch.Tensor]:
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, custom_generate=megatron.sepllm.generate, do_sample=False,
                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, return_dict_in_generate=True,
                         output_logits=True, pad_token_id=0, **kwargs)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.stack(out.logits, 1)[0, :, :REAL_VOCAB]


def _hf(hf_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()


@pytest.mark.parametrize("sizes", [{}, {"sep_cache_size": 3}], ids=["defaults", "separator-cap-3"])
def test_both_decoders_give_the_same_greedy_tokens_by_default(exported, ours, prompts, sizes):
    hf = _hf(exported[1])
    for prompt in prompts:
        ours_tokens, ours_logits = _ours(ours, prompt, **sizes)
        tokens, logits = _hf_generate(hf, prompt, **sizes)
        assert tokens == ours_tokens, len(prompt)
        torch.testing.assert_close(logits, ours_logits, atol=1e-4, rtol=1e-4)


def test_the_reference_timing_is_a_different_decoder(exported, ours, prompts):
    """The default matters: the reference SepCache's timing and full-attention prompt give other logits."""
    hf = _hf(exported[1])
    prompt = prompts[1]
    _, ours_logits = _ours(ours, prompt)
    _, reference_timing = _hf_generate(hf, prompt, exact_window=False)
    assert not torch.allclose(reference_timing, ours_logits, atol=1e-3)
    _, full_prompt = _hf_generate(hf, prompt, prefill_attention="full")
    assert not torch.allclose(full_prompt[0], ours_logits[0], atol=1e-3)   # the first token already differs
    # generate.py with the reference timing is that decoder too
    _, ours_reference = _ours(ours, prompt, exact_window=False)
    torch.testing.assert_close(ours_reference, reference_timing,
                               atol=1e-4, rtol=1e-4)


def test_apply_sepllm_then_sepcache_generation(exported, ours, prompts):
    """docs/export.md: ``apply_sepllm(model)`` then ``generate(custom_generate=megatron.sepllm.generate)``; the
    handle steps aside for the call (same tokens as without it) and masks the model's own forward afterwards."""
    plain = _hf(exported[1])
    hf = _hf(exported[1])
    handle = megatron.sepllm.apply_sepllm(hf)
    impl = hf.config._attn_implementation
    for prompt in prompts:
        tokens, logits = _hf_generate(hf, prompt)
        want_tokens, want_logits = _hf_generate(plain, prompt)
        assert tokens == want_tokens
        torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)
    assert hf.config._attn_implementation == impl and not handle.is_suspended
    ids = torch.tensor([prompts[1] + prompts[2]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids), atol=1e-5, rtol=0)
        assert not torch.allclose(plain(input_ids=ids).logits, ours(ids), atol=1e-3)
    handle.remove()
