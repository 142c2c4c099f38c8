"""generate_batch's stop check (StopStrings), per-row token limits, SepKVCache prompt retention counts, and the
model's ``logits_to_keep`` that decoding uses."""

from __future__ import annotations

import pytest
import torch

from megatron.config import load_config
from megatron.inference.generator import GenerationError, generate_batch
from megatron.inference.kv_cache import KVCacheSettings, build_kv_cache
from megatron.inference.stopping import StopStrings
from megatron.model.gpt import GPTModel
from megatron.sepllm.attention.retention import RetentionStats

TINY = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 64, "pos_emb": "rotary",
        "rotary_pct": 0.5, "padded_vocab_size": 32, "init_method_std": 0.1}
SEPLLM = {"separator_token_ids": [1, 2, 3], "prefill_local_window_size": 5, "generate_local_window_size": 4,
          "init_tok_max_idx": 1}
PROMPTS = [[4, 9, 1, 12, 7, 2, 8, 8, 30], [5, 6, 7], [11, 1, 10, 13, 2, 9]]


def _model(**keys) -> GPTModel:
    torch.manual_seed(0)
    cfg = load_config({**TINY, **keys})
    return GPTModel(cfg.model, cfg.sepllm).eval()


def _letters(tokens: list) -> str:
    """A toy detokenizer: every id becomes two characters, so a stop string can span two tokens."""
    return "".join(f"{chr(97 + t % 26)}{t % 3}" for t in tokens)


def _first_stop(tokens: list, stop: str) -> int:
    """Smallest number of tokens whose text contains ``stop``."""
    return next(k for k in range(1, len(tokens) + 1) if stop in _letters(tokens[:k]))


@pytest.mark.parametrize("keys", [{"USE_ORIGINAL_FULL_ATTEN": True}, SEPLLM], ids=["full", "sepllm"])
def test_stop_strings_end_a_row_at_the_token_that_completes_them(keys):
    model = _model(**keys)
    free = generate_batch(model, PROMPTS, max_new_tokens=20, eos_id=None)
    assert all(len(r.tokens) == 20 for r in free)
    # row 0: a string spanning the 3rd token's second character and the 4th token's first one
    stop0 = _letters(free[0].tokens[2:4])[1:3]
    # row 2: two candidates; the one that appears first wins
    stop2 = [_letters(free[2].tokens[5:6]), _letters(free[2].tokens[9:10])]
    stops = StopStrings(_letters, [[stop0], [], ["", *stop2]])
    out = generate_batch(model, PROMPTS, max_new_tokens=20, eos_id=None, stop=stops)
    k0 = _first_stop(free[0].tokens, stop0)
    k2 = min(_first_stop(free[2].tokens, s) for s in stop2)
    assert k0 <= 4 and k2 <= 6
    assert out[0].tokens == free[0].tokens[:k0] and out[0].stopped and not out[0].finished
    assert out[1].tokens == free[1].tokens and not out[1].stopped
    assert out[2].tokens == free[2].tokens[:k2] and out[2].stopped


def test_per_row_token_limits():
    model = _model(**SEPLLM)
    free = generate_batch(model, PROMPTS, max_new_tokens=7, eos_id=None)
    out = generate_batch(model, PROMPTS, max_new_tokens=[3, 7, 1], eos_id=None)
    assert [r.tokens for r in out] == [free[0].tokens[:3], free[1].tokens, free[2].tokens[:1]]
    assert not any(r.stopped or r.finished for r in out)
    with pytest.raises(GenerationError, match=r"max_new_tokens has 2 limits for 3 prompts"):
        generate_batch(model, PROMPTS, max_new_tokens=[3, 7], eos_id=None)
    with pytest.raises(GenerationError, match=r"max_new_tokens must be >= 1 for every prompt"):
        generate_batch(model, PROMPTS, max_new_tokens=[3, 0, 1], eos_id=None)


def test_sep_cache_counts_prompts_into_the_given_retention_tracker():
    """Ragged left-padded prompts add exactly the counts of the model's own forward over each prompt alone."""
    model = _model(**SEPLLM)
    tracker = RetentionStats(2)
    cache = build_kv_cache(model, KVCacheSettings(kind="uncapped"), retention=tracker)
    generate_batch(model, PROMPTS, max_new_tokens=3, eos_id=None, cache=cache)
    generate_batch(model, PROMPTS[:1], max_new_tokens=2, eos_id=None, cache=cache)   # the reused cache counts on
    got = tracker.counts()
    model.attention_backend.retention = RetentionStats(2)
    with torch.no_grad():
        for p in PROMPTS + PROMPTS[:1]:
            model(torch.tensor([p]))
    want = model.attention_backend.retention.counts()
    assert got["kv"] == want["kv"] and got["attn_map"] == want["attn_map"]
    assert got["kv"][0][1] == sum(len(p) for p in PROMPTS + PROMPTS[:1])   # last-row totals: one per real key
    assert got["forward_calls"] == 2


@pytest.mark.parametrize("keys", [{"USE_ORIGINAL_FULL_ATTEN": True}, SEPLLM], ids=["full", "sepllm"])
def test_logits_to_keep_gives_the_last_positions_logits(keys):
    model = _model(**keys)
    ids = torch.tensor([[0, 0] + PROMPTS[1], PROMPTS[0][:5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        torch.testing.assert_close(model(ids, attention_mask=mask, logits_to_keep=2), full[:, -2:], atol=1e-6,
                                   rtol=0)
        cached = build_kv_cache(model)
        whole = model(ids, attention_mask=mask, kv_cache=cached)
        cached.reset()
        torch.testing.assert_close(model(ids, attention_mask=mask, kv_cache=cached, logits_to_keep=1),
                                   whole[:, -1:], atol=1e-6, rtol=0)
        with pytest.raises(ValueError, match=r"logits_to_keep must be >= 0 \(0 = every position\), got -1"):
            model(ids, logits_to_keep=-1)
