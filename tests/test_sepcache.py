"""SepCache + SepLLM generate on tiny random HF models: exactness against a full-history masked reference."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import DynamicCache, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import megatron.sepllm as sepllm  # noqa: E402
from megatron.sepllm.attention import rules  # noqa: E402
from megatron.sepllm.hf.cache import SepCache  # noqa: E402
from megatron.sepllm.hf.generation import sepllm_forward  # noqa: E402
from megatron.sepllm.hf.compat import cache_kwargs  # noqa: E402

VOCAB = 48


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny per-token models are latency bound: one intra-op thread avoids spin contention on the 2-core CI box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

SEPS = [3, 4, 5, 6, 7, 8, 9, 10]          # 1/6 of the vocab: separators show up often
A, S, W, C = 2, 8, 8, 24
NEW_TOKENS = 40


def tiny_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          rope_theta=5000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.5,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = GPTNeoXForCausalLM(cfg)
    model.set_attn_implementation("sdpa")
    return model.eval()


def prompts(batch: int, seed: int = 1):
    """Left-padded prompts of different lengths, rich in separators."""
    g = torch.Generator().manual_seed(seed)
    lengths = [30, 17, 23][:batch]
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, n in enumerate(lengths):
        row = torch.randint(11, VOCAB, (n,), generator=g)
        row[torch.randint(0, n, (n // 3,), generator=g)] = torch.tensor(SEPS)[torch.randint(0, len(SEPS), (n // 3,),
                                                                                                generator=g)]
        ids[b, width - n:] = row
        mask[b, width - n:] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------
# References: which history positions a decode query may see, computed independently of SepCache
# ---------------------------------------------------------------------------------------------------------------
def exact_window_keep(hist: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The trained SepLLM decode rule over the whole history (rules.decode_keep_mask) with the cache's separator cap:
    initial = first A real tokens, separators = the S most recent ones outside the window."""
    bsz, length = hist.shape
    pad = rules.left_pad_counts(valid)
    init = rules.initial_bitmap(bsz, length, A, pad)
    window = rules.decode_keep_mask(torch.zeros_like(init), W, key_valid=valid)
    cand = rules.separator_bitmap(hist, SEPS) & ~init & ~window & valid.bool()
    rank = cand.flip(-1).long().cumsum(-1).flip(-1)
    global_keys = init | (cand & (rank <= S))
    return rules.decode_keep_mask(global_keys, W, key_valid=valid)


class AmortizedSimulator:
    """Plain-list re-statement of the reference SepCache schedule (spec §3.4 / A.6, per row, USE_MAX_SEP_CACHE):
    never compress the prompt; compress a decode step when the stored length reaches C; keep initial ++ most recent
    S separators that left the window ++ last W tokens."""

    def __init__(self, valid_prompt: torch.Tensor):
        self.rows = []     # per row: list of (token_index, kind) with kind in {"pad", "init", "sep", "local"}
        self.count = []
        for row in valid_prompt.tolist():
            entries, n = [], 0
            for v in row:
                if v:
                    entries.append((n, "init" if n < A else "local"))
                    n += 1
                else:
                    entries.append((-1, "pad"))
            self.rows.append(entries)
            self.count.append(n)

    def append(self, hist_ids: torch.Tensor) -> None:
        for b, entries in enumerate(self.rows):
            n = self.count[b]
            entries.append((n, "init" if n < A else "local"))
            self.count[b] = n + 1

    def maybe_compress(self, hist_ids: torch.Tensor) -> None:
        if max(len(r) for r in self.rows) < C:
            return
        for b, entries in enumerate(self.rows):
            init = [e for e in entries if e[1] == "init"]
            old = [e for e in entries if e[1] == "sep"]
            local = [e for e in entries if e[1] == "local"]
            leaving, window = local[:-W], local[-W:]
            new = [(i, "sep") for i, _ in leaving if int(hist_ids[b, i]) in SEPS]
            seps = (old + new)[-S:]
            self.rows[b] = init + seps + window

    def keep(self, hist_tok_index_to_slot: list[list[int]], length: int) -> torch.Tensor:
        out = torch.zeros(len(self.rows), length, dtype=torch.bool)
        for b, entries in enumerate(self.rows):
            for i, kind in entries:
                if kind != "pad":
                    out[b, hist_tok_index_to_slot[b][i]] = True
        return out


def reference_generate(model, ids, mask, mode: str, steps: int):
    """Greedy decoding with a full DynamicCache and an explicit 4-D mask per step; returns tokens, per-step logits
    and the per-step kept sets (as token indices per row)."""
    bsz, width = ids.shape
    valid = mask.bool()
    hist = ids.clone()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    causal = rules.causal_band(width, width).unsqueeze(0) & valid.unsqueeze(1)
    causal = causal | torch.eye(width, dtype=torch.bool).unsqueeze(0)       # fully padded rows see themselves
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=_float_mask(causal), position_ids=positions, use_cache=True,
                **cache_kwargs(model, cache))
    sim = AmortizedSimulator(valid) if mode == "amortized" else None   # the prompt is never compressed
    logits, kept_sets = [], []
    count = mask.sum(-1)
    for step in range(steps):
        step_logits = out.logits[:, -1].float()
        logits.append(step_logits)
        nxt = step_logits.argmax(-1)
        if step == steps - 1:
            break
        hist = torch.cat([hist, nxt[:, None]], dim=-1)
        valid = torch.cat([valid, torch.ones(bsz, 1, dtype=torch.bool)], dim=-1)
        if sim is None:
            keep = exact_window_keep(hist, valid)
        else:
            sim.append(hist)
            sim.maybe_compress(_token_indexed(hist, valid))
            slot_of = [torch.nonzero(v).flatten().tolist() for v in valid]
            keep = sim.keep(slot_of, hist.shape[1])
        kept_sets.append([torch.nonzero(keep[b] & valid[b]).flatten() - (~valid[b]).sum() for b in range(bsz)])
        out = model(input_ids=nxt[:, None], attention_mask=_float_mask(keep[:, None, :]),
                    position_ids=count[:, None].clone(), use_cache=True, **cache_kwargs(model, cache))
        count = count + 1
    return hist[:, width:], torch.stack(logits, 1), kept_sets


def _token_indexed(hist: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` ids indexed by each row's real-token index (padding removed, right-filled with 0)."""
    rows = [row[v].tolist() for row, v in zip(hist, valid)]
    return torch.tensor([r + [0] * (hist.shape[1] - len(r)) for r in rows])


def _float_mask(allowed: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(allowed.shape, dtype=torch.float32)
    return m.masked_fill(~allowed, torch.finfo(torch.float32).min).unsqueeze(1)


def sepcache_decode(model, ids, mask, mode: str, steps: int):
    """Greedy decoding through sepllm_forward (same loop as generate), checking the cache invariants every step."""
    cache = SepCache(init_cache_size=A, sep_cache_size=S, local_size=W, cache_size=C, USE_MAX_SEP_CACHE=True,
                     separator_token_ids=SEPS, PADDING_ID=0, exact_window=(mode == "exact"), model=model)
    out = sepllm_forward(model, cache, ids, mask)
    logits, kept_sets, promoted = [], [], 0
    for step in range(steps):
        logits.append(out.logits[:, -1].float())
        nxt = out.logits[:, -1].argmax(-1)
        if step == steps - 1:
            break
        out = sepllm_forward(model, cache, nxt[:, None])
        for layer_idx in range(len(cache.layers)):
            ids_c, kind, pos = cache.layer_contents(layer_idx)
            assert ids_c.shape[1] <= C, "stored cache exceeds cache_size"
            for b in range(ids.shape[0]):
                k = kind[b][kind[b] > 0]
                assert torch.all(k[1:] >= k[:-1]), f"order initial->separators->local violated: {k.tolist()}"
                p = pos[b][kind[b] > 0]
                assert torch.all(p[1:] > p[:-1]), "kept tokens are not in text order"
                assert int((k == 1).sum()) <= A and int((k == 2).sum()) <= S
                assert torch.all(torch.isin(ids_c[b][kind[b] == 2], torch.tensor(SEPS)))
        _, kind0, pos0 = cache.layer_contents(0)
        promoted += int((kind0 == 2).sum())
        kept_sets.append([pos0[b][kind0[b] > 0] for b in range(ids.shape[0])])
    return cache, torch.stack(logits, 1), kept_sets, promoted


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", ["exact", "amortized"])
def test_sepcache_matches_masked_full_cache(arch, batch, mode):
    model = tiny_model(arch)
    ids, mask = prompts(batch)
    ref_tokens, ref_logits, ref_kept = reference_generate(model, ids, mask, mode, NEW_TOKENS)
    cache, logits, kept, promoted = sepcache_decode(model, ids, mask, mode, NEW_TOKENS)
    assert sum(cache.retention()["compressions_per_layer"]) > 0
    assert promoted > 0, "no separator was ever promoted: the test would not exercise the separator region"
    for step, (ref_rows, rows) in enumerate(zip(ref_kept, kept)):
        for b, (r, k) in enumerate(zip(ref_rows, rows)):
            assert r.tolist() == k.tolist(), f"step {step} row {b}: kept {k.tolist()} != reference {r.tolist()}"
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    # and through model.generate(custom_generate=...) the tokens and logits are the same
    gen = model.generate(input_ids=ids, attention_mask=mask, custom_generate=sepllm.generate,
                         init_cache_size=A, sep_cache_size=S, local_size=W, cache_size=C, USE_MAX_SEP_CACHE=True,
                         separator_token_ids=SEPS, PADDING_ID=0, exact_window=(mode == "exact"), do_sample=False,
                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, return_dict_in_generate=True,
                         output_logits=True, pad_token_id=0)
    assert isinstance(gen.cache, SepCache) and gen.past_key_values is gen.cache   # both 5.x spellings
    assert torch.equal(gen.sequences[:, ids.shape[1]:], ref_logits.argmax(-1))
    torch.testing.assert_close(torch.stack(gen.logits, 1), ref_logits, atol=1e-5, rtol=1e-5)


def test_decode_query_sees_at_most_cache_size_minus_one_keys():
    """The reference's bound: a decode step compresses when the stored length reaches cache_size, so its query
    attends at most cache_size - 1 keys (checked on what update returns), and the prompt is stored whole."""
    model = tiny_model("llama")
    ids, mask = prompts(3)
    cache = SepCache(init_cache_size=A, sep_cache_size=S, local_size=W, cache_size=C, USE_MAX_SEP_CACHE=True,
                     separator_token_ids=SEPS, model=model)
    seen = []
    orig_update = cache.update

    def spy(k, v, layer_idx, *args, **kwargs):
        keys, values = orig_update(k, v, layer_idx, *args, **kwargs)
        if k.shape[-2] == 1:
            mask4 = cache.step_attention_mask(layer_idx)
            visible = keys.shape[-2] if mask4 is None else int(mask4.sum(-1).max())
            seen.append(visible)
        return keys, values

    cache.update = spy
    out = sepllm_forward(model, cache, ids, mask)
    assert cache.get_seq_length() == ids.shape[1] > C          # the reference never compresses a prompt
    lengths = []
    for _ in range(60):
        out = sepllm_forward(model, cache, out.logits[:, -1].argmax(-1)[:, None])
        lengths.append(cache.get_seq_length())
    assert len(seen) == 60 * 2 and max(seen) == C - 1
    assert max(lengths) == C - 1 and lengths[0] < C - 1       # the first decode step compressed the prompt


def test_sampling_is_seed_reproducible_and_eos_stops():
    model = tiny_model("llama")
    ids, mask = prompts(3)
    kw = dict(custom_generate=sepllm.generate, init_cache_size=A, sep_cache_size=S, local_size=W, cache_size=C,
              USE_MAX_SEP_CACHE=True, separator_token_ids=SEPS, PADDING_ID=0, do_sample=True, temperature=0.8,
              top_k=20, top_p=0.9, max_new_tokens=30, pad_token_id=0)
    torch.manual_seed(123)
    a = model.generate(input_ids=ids, attention_mask=mask, **kw)
    torch.manual_seed(123)
    b = model.generate(input_ids=ids, attention_mask=mask, **kw)
    torch.manual_seed(7)
    c = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # eos: stop on the first generated token of row 0 under greedy decoding
    greedy = model.generate(input_ids=ids, attention_mask=mask, custom_generate=sepllm.generate,
                            init_cache_size=A, sep_cache_size=S, local_size=W, cache_size=C, separator_token_ids=SEPS,
                            do_sample=False, max_new_tokens=20, pad_token_id=0)
    eos = int(greedy[0, ids.shape[1] + 2])
    stopped = model.generate(input_ids=ids, attention_mask=mask, custom_generate=sepllm.generate,
                             init_cache_size=A, sep_cache_size=S, local_size=W, cache_size=C, separator_token_ids=SEPS,
                             do_sample=False, max_new_tokens=20, pad_token_id=0, eos_token_id=eos)
    row0 = stopped[0, ids.shape[1]:].tolist()
    first = row0.index(eos)
    assert all(t == 0 for t in row0[first + 1:])
    assert stopped.shape[1] <= greedy.shape[1]


def _rope_at(x: torch.Tensor, positions: torch.Tensor, theta: float, rotary_dim: int) -> torch.Tensor:
    """Textbook GPT-NeoX rotary embedding (half-split pairs, first ``rotary_dim`` dims) of ``x [H, L, D]`` at
    ``positions [L]``; negative positions undo it. Written here so the reference shares nothing with pos_shift.py."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    angle = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angle.cos(), angle.sin()
    half = rotary_dim // 2
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


@torch.no_grad()
def test_pe_shift_uses_model_rotary_and_matches_manual_reencoding():
    """APPLY_PE_SHIFT: every decode step's logits equal a plain HF forward over a DynamicCache holding the kept
    tokens' keys rotated to their slot index 0..n-2 (their un-rotated keys and values recorded by this reference's
    own earlier steps) and the new token at position n-1. Before any compression slot == text position, so the
    logits also equal the un-shifted cache's; after compression they differ from them."""
    model = tiny_model("gpt_neox")
    config = model.config
    theta = float(config.rope_parameters["rope_theta"])
    head_dim = config.hidden_size // config.num_attention_heads
    rotary_dim = int(head_dim * config.rope_parameters["partial_rotary_factor"])
    layers = config.num_hidden_layers
    ids, _ = prompts(1)
    base = SepCache(init_cache_size=A, sep_cache_size=S, local_size=W, cache_size=C, separator_token_ids=SEPS,
                    model=model)
    shifted = SepCache(init_cache_size=A, sep_cache_size=S, local_size=W, cache_size=C, separator_token_ids=SEPS,
                       APPLY_PE_SHIFT=True, model=model)
    short = ids[:, :12]
    got = sepllm_forward(model, shifted, short).logits
    torch.testing.assert_close(got, sepllm_forward(model, base, short).logits, atol=1e-5, rtol=1e-5)

    # reference prefill: a plain forward; record every token's keys without rotary ([H, t, D]) and values
    ref_cache = DynamicCache(config=config)
    ref = model(input_ids=short, use_cache=True, **cache_kwargs(model, ref_cache)).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    positions = torch.arange(short.shape[1])
    keys = [_rope_at(ref_cache.layers[i].keys[0], -positions, theta, rotary_dim) for i in range(layers)]
    values = [ref_cache.layers[i].values[0] for i in range(layers)]

    tok = short[:, -1:]
    shifted_slots = differs = 0
    for _ in range(30):
        got = sepllm_forward(model, shifted, tok).logits
        plain = sepllm_forward(model, base, tok).logits
        t = keys[0].shape[1]                                   # text position of the new token
        ref_cache = DynamicCache(config=config)
        for i in range(layers):
            kept = shifted.layers[i].pos[0]                    # text positions of the attended keys, new one last
            assert kept[-1] == t and bool((kept[:-1] >= 0).all()) and bool((kept[:-1] < t).all())
            slots = torch.arange(len(kept) - 1)
            ref_cache.update(_rope_at(keys[i][:, kept[:-1]], slots, theta, rotary_dim)[None],
                             values[i][:, kept[:-1]][None], i)
        n = len(shifted.layers[0].pos[0])
        ref = model(input_ids=tok, position_ids=torch.tensor([[n - 1]]), use_cache=True,
                    **cache_kwargs(model, ref_cache)).logits
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        for i in range(layers):                                # the new token's key, un-rotated from slot n-1
            new_key = _rope_at(ref_cache.layers[i].keys[0, :, -1:], torch.tensor([-(n - 1)]), theta, rotary_dim)
            keys[i] = torch.cat([keys[i], new_key], dim=1)
            values[i] = torch.cat([values[i], ref_cache.layers[i].values[0, :, -1:]], dim=1)
        if shifted.layers[0].num_compressions == 0:
            torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
        else:
            shifted_slots += n - 1 < t
            differs += not torch.allclose(got, plain, atol=1e-4)
        tok = got[:, -1].argmax(-1)[:, None]
    assert shifted_slots > 10 and differs > 0   # compressions happened, re-encoding moved keys, and it mattered


def test_pe_shift_reads_rope_theta_from_model():
    from megatron.sepllm.hf.pos_shift import rope_fn_from_model

    m1, m2 = tiny_model("llama"), tiny_model("llama")
    m2.model.rotary_emb.inv_freq = m2.model.rotary_emb.inv_freq * 0.5
    x = torch.zeros(1, 4, 3, 8)
    pos = torch.arange(3)[None]
    assert not torch.allclose(rope_fn_from_model(m1)(x, pos)[0], rope_fn_from_model(m2)(x, pos)[0])


def test_presets_and_errors():
    cache = SepCache(layer_num=2, model_type="llama")
    assert cache.PADDING_ID == 128009 and 128000 in cache.separator_token_ids
    assert SepCache(layer_num=2, model_type="gpt_neox").separator_token_ids[:3] == [15, 13, 32]
    with pytest.raises(ValueError, match="separator_token_ids"):
        SepCache(layer_num=2)
    for c in (19, 20):    # the reference requires a + s + w < c strictly
        with pytest.raises(ValueError, match=rf"cache_size={c} must be > init_cache_size \+ sep_cache_size"):
            SepCache(layer_num=2, separator_token_ids=SEPS, init_cache_size=4, sep_cache_size=8, local_size=8,
                     cache_size=c)
    assert SepCache(layer_num=2, separator_token_ids=SEPS, init_cache_size=4, sep_cache_size=8, local_size=8,
                    cache_size=21).layers[0].cache_size == 21
    with pytest.raises(ValueError, match="eviction_timing"):
        SepCache(layer_num=2, separator_token_ids=SEPS, eviction_timing="later")
    with pytest.raises(ValueError, match="local_size has 3 entries"):
        SepCache(layer_num=2, separator_token_ids=SEPS, local_size=[8, 8, 8])
    per_layer = SepCache(separator_token_ids=SEPS, init_cache_size=2, sep_cache_size=[4, 8], local_size=[4, 8],
                         cache_size=[12, 24])
    assert [layer.cache_size for layer in per_layer.layers] == [12, 24]


def test_per_layer_sizes_give_per_layer_contents_and_left_padding_only():
    model = tiny_model("llama")
    ids, mask = prompts(3)
    cache = SepCache(init_cache_size=A, sep_cache_size=[4, 8], local_size=[4, 8], cache_size=[12, 24],
                     USE_MAX_SEP_CACHE=True, separator_token_ids=SEPS, model=model)
    out = sepllm_forward(model, cache, ids, mask)
    for _ in range(20):
        out = sepllm_forward(model, cache, out.logits[:, -1].argmax(-1)[:, None])
    assert cache.get_seq_length(0) <= 12 and cache.get_seq_length(1) <= 24
    assert cache.get_seq_length(0) != cache.get_seq_length(1)
    bad = mask.clone()
    bad[0, -1] = 0
    with pytest.raises(ValueError, match="left padding"):
        sepllm_forward(model, SepCache(layer_num=2, separator_token_ids=SEPS, init_cache_size=A, sep_cache_size=S,
                                       local_size=W, cache_size=C, model=model), ids, bad)


def test_retention_is_time_averaged_kept_over_seen():
    model = tiny_model("llama")
    ids, _ = prompts(1)
    cache = SepCache(init_cache_size=A, sep_cache_size=S, local_size=W, cache_size=C, USE_MAX_SEP_CACHE=True,
                     separator_token_ids=SEPS, model=model)
    kept, seen = [], []
    out = sepllm_forward(model, cache, ids)
    kept.append(cache.get_seq_length())
    seen.append(ids.shape[1])
    for _ in range(50):
        out = sepllm_forward(model, cache, out.logits[:, -1].argmax(-1)[:, None])
        kept.append(cache.get_seq_length())
        seen.append(seen[-1] + 1)
    r = cache.retention()
    assert r["current_kept_over_seen"] == pytest.approx(kept[-1] / seen[-1])
    assert r["time_averaged_kept_over_seen"] == pytest.approx(sum(kept) / sum(seen))   # same ratio in every layer
    assert r["seen_tokens_per_row"] == [seen[-1]] and r["kept_tokens_per_layer"] == [kept[-1]] * 2
    assert 0 < r["time_averaged_kept_over_seen"] < 1


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_prefill_attention_sepllm_matches_rule_mask(arch):
    """prefill_attention='sepllm': the prompt's queries use the SepLLM rule (rules.allowed_mask, left-pad aware
    initial tokens, padding never attended) — equal to a plain forward with that explicit 4-D mask."""
    model = tiny_model(arch)
    ids, mask = prompts(3)
    valid = mask.bool()
    glob = rules.global_key_bitmap(ids, SEPS, A, pad_counts=rules.left_pad_counts(mask))
    allowed = rules.allowed_mask(glob, W, key_valid=valid) | torch.eye(ids.shape[1], dtype=torch.bool)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    ref = model(input_ids=ids, attention_mask=_float_mask(allowed), position_ids=positions).logits
    cache = SepCache(init_cache_size=A, sep_cache_size=S, local_size=W, cache_size=C, separator_token_ids=SEPS,
                     prefill_attention="sepllm", model=model)
    got = sepllm_forward(model, cache, ids, mask).logits
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=1e-5)
    full = sepllm_forward(model, SepCache(init_cache_size=A, sep_cache_size=S, local_size=W, cache_size=C,
                                          separator_token_ids=SEPS, model=model), ids, mask).logits
    assert not torch.allclose(full[valid], ref[valid], atol=1e-3)      # the rule really changed the prefill
    assert cache.get_seq_length() == ids.shape[1]                      # a prompt is stored whole (reference)
    sepllm_forward(model, cache, got[:, -1].argmax(-1)[:, None])
    assert cache.get_seq_length() < C                                  # the first decode step compresses it


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 500000.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
])
def test_pe_shift_is_identity_before_compression_for_any_rope(rope):
    """With no compression the cache index of every key is its text position, so PE shift must not change the
    logits — true only if un-rotation/re-rotation use exactly the model's rotary tables (theta, scaling, yarn's
    attention factor). A left-padded batch checks that positions count real tokens only."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_parameters=rope)
    model = LlamaForCausalLM(cfg).eval()
    ids, mask = prompts(3)
    kw = dict(init_cache_size=A, sep_cache_size=S, local_size=W, cache_size=64, separator_token_ids=SEPS,
              model=model)
    plain, shifted = SepCache(**kw), SepCache(APPLY_PE_SHIFT=True, **kw)
    a = sepllm_forward(model, plain, ids, mask).logits
    b = sepllm_forward(model, shifted, ids, mask).logits
    valid = mask.bool()
    torch.testing.assert_close(b[valid], a[valid], atol=1e-5, rtol=1e-5)
    tok = a[:, -1].argmax(-1)[:, None]
    for _ in range(5):
        a = sepllm_forward(model, plain, tok).logits
        b = sepllm_forward(model, shifted, tok).logits
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        tok = a[:, -1].argmax(-1)[:, None]


def test_generate_with_pe_shift_and_presets_on_gpt_neox():
    """generate() builds the cache from the model (layer count, model_type preset, rotary) and runs PE shift."""
    model = tiny_model("gpt_neox")
    ids, mask = prompts(3)
    out = model.generate(input_ids=ids, attention_mask=mask, custom_generate=sepllm.generate, init_cache_size=A,
                         sep_cache_size=S, local_size=W, cache_size=C, APPLY_PE_SHIFT=True, USE_MAX_SEP_CACHE=True,
                         separator_token_ids=SEPS, do_sample=False, max_new_tokens=30, min_new_tokens=30,
                         pad_token_id=0, return_dict_in_generate=True, eviction_timing="after_step")
    cache = out.past_key_values
    assert cache.APPLY_PE_SHIFT and cache.rope_fn is not None and cache.eviction_timing == "after_step"
    assert out.sequences.shape == (3, ids.shape[1] + 30)
    assert max(cache.retention()["compressions_per_layer"]) > 0
    preset = SepCache(layer_num=2, model=model)
    assert preset.separator_token_ids[:9] == [15, 13, 32, 2, 28, 27, 209, 186, 187] and preset.PADDING_ID == 0
    with pytest.raises(ValueError, match="fresh SepCache"):
        model.generate(input_ids=ids, attention_mask=mask, custom_generate=sepllm.generate,
                       **cache_kwargs(model, cache), max_new_tokens=2, pad_token_id=0)


def test_generate_uses_a_fresh_user_cache():
    model = tiny_model("llama")
    ids, mask = prompts(3)
    kw = dict(init_cache_size=A, sep_cache_size=S, local_size=W, cache_size=C, separator_token_ids=SEPS,
              USE_MAX_SEP_CACHE=True)
    cache = SepCache(model=model, **kw)
    out = model.generate(input_ids=ids, attention_mask=mask, custom_generate=sepllm.generate,
                         **cache_kwargs(model, cache), max_new_tokens=12, pad_token_id=0, do_sample=False, return_dict_in_generate=True)
    assert out.past_key_values is cache and cache.get_seq_length() > 0
    same = model.generate(input_ids=ids, attention_mask=mask, custom_generate=sepllm.generate, max_new_tokens=12,
                          pad_token_id=0, do_sample=False, **kw)
    assert torch.equal(out.sequences, same)


def test_step_planner_returns_budgets_instead_of_writing_them():
    """No-max-sep mode grows the separator and cache budgets by the excess; the planner only returns the new budget
    (``set_step_tokens`` commits it), so planning twice from one state gives the same answer."""
    cache = SepCache(init_cache_size=1, sep_cache_size=1, local_size=2, cache_size=5, layer_num=1,
                     USE_MAX_SEP_CACHE=False, separator_token_ids=[3], PADDING_ID=0)
    layer = cache.layers[0]
    ids = torch.tensor([[1, 3, 9, 3, 9, 9]])
    kind = torch.tensor([[1, 3, 3, 3, 3, 3]], dtype=torch.int8)      # initial, then five local slots
    before = layer.budget
    plans = [cache.planner.rule.compress(ids, kind, before, layer.local_size) for _ in range(2)]
    assert layer.budget == before                                     # nothing written
    for idx, kind_new, budget in plans:
        assert idx.tolist() == [[0, 1, 3, 4, 5]]                      # initial, both leaving separators, window 2
        assert kind_new.tolist() == [[1, 2, 2, 3, 3]]
        assert (budget.sep_cache_size, budget.cache_size, budget.num_compressions) == (2, 6, 1)
