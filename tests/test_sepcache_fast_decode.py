"""The batch-1 decode fast path of SepCache (``_plan_decode_fast``) must leave exactly the state the general planner
leaves: same stored ids/kinds/positions, same keys/values, same returned KV and mask, same counters, every step."""

from __future__ import annotations

import pytest
import torch

from megatron.sepllm.hf.cache import SepCache

SEPS = [5, 6, 7]


def _drive(cache: SepCache, prompt: torch.Tensor, steps: list, kv: list, general: bool) -> list:
    if general:
        cache.planner._plan_decode_fast = lambda *a, **k: False      # force the general planner
    seen = []
    for t, ids in enumerate([prompt] + steps):
        pos = cache.set_step_tokens(ids, None, followed_by_decode=t == 0)
        out = []
        for layer_idx in range(len(cache.layers)):
            k, v = kv[t][layer_idx]
            k_att, v_att = cache.update(k, v, layer_idx)
            mask = cache.step_attention_mask(layer_idx)
            out.append((k_att.clone(), v_att.clone(), None if mask is None else mask.clone(),
                        *(x.clone() for x in cache.layer_contents(layer_idx))))
        cache.finish_step()
        seen.append((pos.clone(), out, cache.retention(), [(l.cache_size, l.sep_cache_size) for l in cache.layers]))
    return seen


@pytest.mark.parametrize("exact_window,use_max,accumulate", [
    (True, True, True), (True, False, True), (True, True, False), (False, True, True), (False, False, True)])
def test_fast_decode_path_equals_general_planner(exact_window, use_max, accumulate):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    prompt_len, n_steps = 10, 60
    # separators dense enough that the separator cap is hit and the oldest separators are dropped
    all_ids = torch.randint(0, 12, (1, prompt_len + n_steps), generator=gen)
    prompt, steps = all_ids[:, :prompt_len], [all_ids[:, prompt_len + i:prompt_len + i + 1] for i in range(n_steps)]
    kv = [[(torch.randn(1, 2, n, 4, generator=gen), torch.randn(1, 2, n, 4, generator=gen)) for _ in range(3)]
          for n in [prompt_len] + [1] * n_steps]
    # layers 0 and 2 share sizes (one shared plan), layer 1 differs
    sizes = dict(init_cache_size=[2, 3, 2], sep_cache_size=[3, 2, 3], local_size=[4, 5, 4], cache_size=[12, 14, 12])

    def make() -> SepCache:
        return SepCache(**sizes, SEP_ACCUMULATION=accumulate, USE_MAX_SEP_CACHE=use_max, separator_token_ids=SEPS,
                        PADDING_ID=0, layer_num=3, exact_window=exact_window)

    fast_cache = make()
    hits = []
    planner = fast_cache.planner._plan_decode_fast
    fast_cache.planner._plan_decode_fast = lambda *a, **k: hits.append(planner(*a, **k)) or hits[-1]
    fast = _drive(fast_cache, prompt, steps, kv, general=False)
    slow = _drive(make(), prompt, steps, kv, general=True)
    for step, (a, b) in enumerate(zip(fast, slow)):
        assert torch.equal(a[0], b[0]), step
        for layer_a, layer_b in zip(a[1], b[1]):
            for x, y in zip(layer_a, layer_b):
                assert (x is None and y is None) or torch.equal(x, y), step
        assert a[2] == b[2] and a[3] == b[3], step
    # the fast path was taken on most steps where it applies (exact window without accumulation never does:
    # earlier separators are dropped then); with the exact window it compressed on those steps
    assert len(hits) == n_steps
    if exact_window and not accumulate:
        assert not any(hits[10:])     # only the append-only steps before the window is full
    else:
        if exact_window:
            assert sum(hits) >= n_steps - 10, hits
            assert fast[-1][2]["compressions_per_layer"][0] >= n_steps - 10
        else:      # small budgets: a general-path compression every few steps, append-only steps in between
            assert sum(hits) >= n_steps // 3, hits
