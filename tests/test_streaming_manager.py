"""Streaming KV manager: the spec §3.2 worked trace, Appendix B invariants, and agreement with SepCache."""

from __future__ import annotations

import pytest
import torch

from megatron.sepllm.attention import rules
from megatron.sepllm.hf.cache import SepCache
from megatron.sepllm.hf.streaming import StreamingKVManager

STREAM = "ab,cd.ef,gh.ij,kl.mn,op.qr,st"


def _ids(text: str) -> list[int]:
    return [ord(ch) for ch in text]


def _text(ids: torch.Tensor) -> str:
    return "".join(chr(int(i)) for i in ids)


def test_spec_trace_sepllm():
    """a=2, s=3, w=4, c=12, separators '.' ','; the contents after each compression (spec §3.2)."""
    mgr = StreamingKVManager(init_cache_size=2, sep_cache_size=3, local_size=4, cache_size=12,
                             separator_token_ids=_ids(".,"))
    snapshots, lengths = [], []
    for step, tok in enumerate(_ids(STREAM)):
        mgr.update_past_tok_ids(torch.tensor([[tok]]))
        before = len(mgr)
        mgr.evict_except_for_sep(None, SEP_ACCUMULATION=True, USE_MAX_SEP_CACHE=True)
        if len(mgr) < before:
            snapshots.append((step + 1, _text(mgr.past_tok_ids[0])))
        lengths.append(len(mgr))
    assert snapshots[0] == (13, "ab,.,gh.i")
    assert [s for _, s in snapshots] == ["ab,.,gh.i", "ab.,.j,kl", "ab,.,.mn,", "ab,.,op.q", "ab.,.r,st"]
    assert max(lengths) <= 12


def test_sepllm_without_accumulation_and_growing_budget():
    mgr = StreamingKVManager(2, 3, 4, 12, separator_token_ids=_ids(".,"))
    for tok in _ids(STREAM):
        mgr.update_past_tok_ids(torch.tensor([[tok]]))
        mgr.evict_except_for_sep(None, SEP_ACCUMULATION=False, USE_MAX_SEP_CACHE=True)
    assert _text(mgr.past_tok_ids[0]).startswith("ab")
    grow = StreamingKVManager(2, 3, 4, 12, separator_token_ids=_ids(".,"))
    for tok in _ids(STREAM * 3):
        grow.update_past_tok_ids(torch.tensor([[tok]]))
        grow.evict_except_for_sep(None, SEP_ACCUMULATION=True, USE_MAX_SEP_CACHE=False)
    assert grow.sep_cache_size > 3 and grow.cache_size - grow.sep_cache_size == 12 - 3   # grew together


@pytest.mark.parametrize("a,w", [(3, 256), (3, 380), (3, 448), (2, 5)])
def test_streamingllm_keeps_exactly_a_plus_w(a, w):
    """Appendix B item 2: with separators disabled the kept set is exactly a + w, the first a and the last w."""
    mgr = StreamingKVManager(init_cache_size=a, sep_cache_size=0, local_size=w, cache_size=a + w, mode="streamingllm")
    n = a + w + 37
    for t in range(n):
        mgr.update_past_tok_ids(torch.tensor([[1000 + t]]))
        mgr.evict_nonlocal_and_noninitial(None)
        assert len(mgr) == min(t + 1, a + w)
    kept = (mgr.past_tok_ids[0] - 1000).tolist()
    assert kept == list(range(a)) + list(range(n - w, n))
    # the same set is the decode mask of the next query (window w + 1 including itself) over the whole history
    hist = torch.arange(n + 1).unsqueeze(0) + 1000
    mask = rules.decode_keep_mask(rules.global_key_bitmap(hist, rules.NO_SEPARATORS, a), w + 1)[0]
    assert torch.nonzero(mask).flatten().tolist()[:-1] == kept and int(mask.sum()) == a + w + 1


def test_check_args_errors():
    with pytest.raises(ValueError, match="StreamingLLM needs"):
        StreamingKVManager(4, 0, 100, 200, mode="streamingllm")
    with pytest.raises(ValueError, match="SepLLM needs"):
        StreamingKVManager(4, 32, 224, 260, separator_token_ids=[1])


@pytest.mark.parametrize("accumulate,use_max", [(True, True), (False, True), (True, False), (False, False)])
def test_manager_on_dynamic_cache_and_sepcache_after_step_agree(accumulate, use_max):
    """The manager (global indices, after the forward) and SepCache with eviction_timing='after_step' keep the same
    token positions on the same stream (batch 1), and the manager cuts every layer's KV consistently."""
    from transformers import DynamicCache

    ids = torch.tensor([_ids(STREAM * 3)])
    seps = _ids(".,")
    mgr = StreamingKVManager(2, 3, 4, 12, separator_token_ids=seps)
    cache = SepCache(init_cache_size=2, sep_cache_size=3, local_size=4, cache_size=12, USE_MAX_SEP_CACHE=use_max,
                     SEP_ACCUMULATION=accumulate, separator_token_ids=seps, layer_num=2, eviction_timing="after_step")
    kv = DynamicCache()
    for t in range(ids.shape[1]):
        tok = ids[:, t:t + 1]
        # KV rows hold the token position so we can see which survived
        fake = torch.full((1, 1, 1, 2), float(t))
        kv.update(fake, fake, 0)
        kv.update(fake, fake, 1)
        mgr.update_past_tok_ids(tok)
        cache.set_step_tokens(tok)
        for layer_idx in range(2):
            keys, _ = cache.update(fake, fake, layer_idx)
        seen_by_query = keys[0, 0, :, 0].long().tolist()
        assert seen_by_query == kv.layers[0].keys[0, 0, :, 0].long().tolist()   # manager: before its eviction
        cache.finish_step()
        mgr.evict_except_for_sep(kv, SEP_ACCUMULATION=accumulate, USE_MAX_SEP_CACHE=use_max)
        assert kv.layers[0].keys[0, 0, :, 0].long().tolist() == kv.layers[1].keys[0, 0, :, 0].long().tolist()
        assert len(seen_by_query) <= mgr.cache_size + 1
    assert cache.layers[0].cache_size == mgr.cache_size and cache.layers[0].sep_cache_size == mgr.sep_cache_size
    if not use_max and accumulate:
        assert mgr.cache_size > 12          # the budget grew, identically in both
