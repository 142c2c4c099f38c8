"""prefill_attention="stream": a multi-token step equals feeding the tokens one at a time (same cache, same logits)."""

from __future__ import annotations

import pytest
import torch

from megatron.sepllm.hf.cache import SepCache
from megatron.sepllm.hf.generation import sepllm_forward
from test_sepcache import SEPS, one_thread, prompts, tiny_model  # noqa: F401  (autouse fixture)


@pytest.mark.parametrize("arch,timing,exact,pe_shift", [
    ("llama", "in_update", False, False),
    ("llama", "after_step", True, False),
    ("gpt_neox", "after_step", False, True),
    ("llama", "in_update", False, True),
])
def test_chunked_stream_equals_token_by_token(arch, timing, exact, pe_shift):
    model = tiny_model(arch)
    ids, mask = prompts(3)
    g = torch.Generator().manual_seed(5)
    cont = torch.randint(3, 48, (3, 150), generator=g)
    kw = dict(init_cache_size=2, sep_cache_size=8, local_size=8, cache_size=24, USE_MAX_SEP_CACHE=True,
              separator_token_ids=SEPS, model=model, eviction_timing=timing, exact_window=exact,
              APPLY_PE_SHIFT=pe_shift)
    one, chunked = SepCache(**kw), SepCache(prefill_attention="stream", **kw)
    # token by token (the left-padded prompt too: pads are single invalid steps)
    ref = [sepllm_forward(model, one, ids[:, i:i + 1], mask[:, i:i + 1]).logits for i in range(ids.shape[1])]
    ref += [sepllm_forward(model, one, cont[:, i:i + 1]).logits for i in range(cont.shape[1])]
    ref = torch.cat(ref, 1)
    got = [sepllm_forward(model, chunked, ids, mask).logits]
    got += [sepllm_forward(model, chunked, cont[:, s:s + 41]).logits for s in range(0, cont.shape[1], 41)]
    got = torch.cat(got, 1)
    valid = torch.cat([mask, torch.ones_like(cont)], 1).bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=2e-5, rtol=1e-5)
    for layer in range(2):
        for a, b in zip(one.layer_contents(layer), chunked.layer_contents(layer)):
            assert torch.equal(a, b)
    assert one.retention()["compressions_per_layer"] == chunked.retention()["compressions_per_layer"]
    assert min(one.retention()["compressions_per_layer"]) > 5
