"""SepCache against the reference SepCache's documented rules (spec §3.4, Appendix A.6), step by step.

The expected kept positions come from :class:`ReferenceSchedule`, a plain-list restatement of the reference's
``update`` written from the spec (regions ``initial [0, a) | old separators [a, sep_end) | past window
[sep_end, L - w) | local [L - w, L)``), not from our planner: a multi-token step never compresses; a decode step
compresses when ``stored + 1 >= cache_size``; without ``USE_MAX_SEP_CACHE`` the separator and cache budgets grow by the
overflow; without ``SEP_ACCUMULATION`` the old separator region is dropped at every compression after the first.
Logits are checked against a full-history forward masked to exactly the reference's kept set.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import DynamicCache  # noqa: E402

import megatron.sepllm as sepllm  # noqa: E402
from megatron.sepllm.hf.cache import SepCache  # noqa: E402
from megatron.sepllm.hf.generation import sepllm_forward  # noqa: E402
from megatron.sepllm.hf.compat import cache_kwargs  # noqa: E402
from megatron.sepllm.hf.pos_shift import rope_fn_from_model  # noqa: E402
from test_sepcache import SEPS, VOCAB, one_thread, tiny_model  # noqa: F401  (autouse fixture)

A, S, W, C = 4, 16, 32, 64          # the side-by-side setting
PROMPT, STEPS = 100, 150


class ReferenceSchedule:
    """The reference SepCache's kept token positions for batch 1 (spec §3.4 / A.6), on plain lists."""

    def __init__(self, a: int, s: int, w: int, c: int, accumulate: bool, use_max: bool):
        self.a, self.s, self.w, self.c = a, s, w, c
        self.accumulate, self.use_max = accumulate, use_max
        self.max_sep_end = a + s
        self.sep_end = 0
        self.kept: list[int] = []
        self.ids: list[int] = []
        self.compressions = 0
        self.kept_sum = self.seen_sum = 0

    def _record(self) -> None:
        self.kept_sum += len(self.kept)
        self.seen_sum += len(self.ids)

    def prefill(self, ids: list[int]) -> None:
        """A multi-token step: appended, never compressed (PREFILLING_FLAG)."""
        start = len(self.ids)
        self.ids += ids
        self.kept += list(range(start, start + len(ids)))
        self._record()

    def decode(self, token: int) -> None:
        compress = len(self.kept) + 1 >= self.c
        self.ids.append(token)
        self.kept.append(len(self.ids) - 1)
        if compress:
            self._compress()
        self._record()

    def _compress(self) -> None:
        a, w, kept = self.a, self.w, self.kept
        length = len(kept)
        if self.sep_end <= 0:
            self.sep_end = a
        assert length - w > self.sep_end
        first = self.sep_end == a
        old = kept[a:self.sep_end] if (self.accumulate and not first) else []
        new = [p for p in kept[self.sep_end:length - w] if self.ids[p] in SEPS]
        seps = old + new
        if self.use_max and len(seps) > self.s:
            seps = seps[-self.s:]
        self.sep_end = a + len(seps)
        if not self.use_max and self.sep_end > self.max_sep_end:
            grow = self.sep_end - self.max_sep_end
            self.max_sep_end += grow
            self.s += grow
            self.c += grow
        self.kept = kept[:a] + seps + kept[length - w:]
        self.compressions += 1


def _ids(n: int, g: torch.Generator, with_seps: bool) -> list[int]:
    row = torch.randint(11, VOCAB, (n,), generator=g)
    if with_seps:
        where = torch.randint(0, n, (n // 4,), generator=g)
        row[where] = torch.tensor(SEPS)[torch.randint(0, len(SEPS), (n // 4,), generator=g)]
    return row.tolist()


SCENARIOS = {   # name: (SEP_ACCUMULATION, USE_MAX_SEP_CACHE, separators in the prompt)
    "max_sep": (True, True, True),
    "no_max_sep": (True, False, True),
    "no_accumulation": (False, True, True),
    "decode_time_separators": (True, True, False),
}


def _masked_logits(model, cache: DynamicCache, token: int, position: int, keep: list[int], length: int):
    allowed = torch.zeros(1, 1, 1, length, dtype=torch.bool)
    allowed[..., keep] = True
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return model(input_ids=torch.tensor([[token]]), attention_mask=mask, position_ids=torch.tensor([[position]]),
                 use_cache=True, **cache_kwargs(model, cache)).logits[0, -1]


@pytest.mark.parametrize("early", [False, True], ids=["plain", "followed_by_decode"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_kept_positions_and_logits_follow_the_reference_every_step(scenario, early):
    accumulate, use_max, prompt_seps = SCENARIOS[scenario]
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(7)
    prompt = _ids(PROMPT, g, prompt_seps)
    cont = _ids(STEPS, g, True)                 # teacher-forced continuation: separators arrive at decode time
    ref = ReferenceSchedule(A, S, W, C, accumulate, use_max)
    ours = SepCache(init_cache_size=A, sep_cache_size=S, local_size=W, cache_size=C, SEP_ACCUMULATION=accumulate,
                    USE_MAX_SEP_CACHE=use_max, separator_token_ids=SEPS, model=model)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        ref.prefill(prompt)
        sepllm_forward(model, ours, torch.tensor([prompt]), followed_by_decode=early)
        model(input_ids=torch.tensor([prompt]), use_cache=True, **cache_kwargs(model, full))
        _, kind, pos = ours.layer_contents(0)
        if not early:
            assert pos[0][kind[0] > 0].tolist() == list(range(PROMPT))      # the prompt is stored whole
        else:   # already what the first decode step keeps, less that step's own token
            ahead = copy.deepcopy(ref)
            ahead.decode(cont[0])
            assert ahead.compressions == 1 and pos[0][kind[0] > 0].tolist() == ahead.kept[:-1]
        promoted_at_decode = longest = 0
        for step, token in enumerate(cont):
            ref.decode(token)
            longest = max(longest, len(ref.kept))
            got = sepllm_forward(model, ours, torch.tensor([[token]])).logits[0, -1]
            want = _masked_logits(model, full, token, PROMPT + step, ref.kept, PROMPT + step + 1)
            for layer in range(2):
                _, kind, pos = ours.layer_contents(layer)
                assert pos[0][kind[0] > 0].tolist() == ref.kept, f"step {step} layer {layer}"
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"logits differ at step {step}")
            promoted_at_decode = max(promoted_at_decode, sum(p >= PROMPT for p in ref.kept[A:ref.sep_end]))
    assert ref.compressions >= 4
    assert longest == ref.c - 1 if use_max else longest <= ref.c - 1   # the bound is reached, never passed
    assert [layer.cache_size for layer in ours.layers] == [ref.c, ref.c]
    assert [layer.sep_cache_size for layer in ours.layers] == [ref.s, ref.s]
    r = ours.retention()
    assert r["time_averaged_kept_over_seen"] == pytest.approx(ref.kept_sum / ref.seen_sum, rel=1e-12)
    assert r["compressions_per_layer"] == [ref.compressions, ref.compressions]
    if scenario == "no_max_sep":
        assert ref.c > C, "the budget never grew: the scenario would not test USE_MAX_SEP_CACHE=False"
    if scenario == "decode_time_separators":
        assert promoted_at_decode > 0
    if scenario == "no_accumulation":   # the mode really differs from accumulating
        acc = ReferenceSchedule(A, S, W, C, True, True)
        acc.prefill(prompt)
        for token in cont:
            acc.decode(token)
        assert acc.kept != ref.kept


def test_generate_matches_the_reference_schedule():
    """Through model.generate(custom_generate=...): greedy tokens and logits equal a masked full-history decode over
    the reference's kept sets (the prompt is longer than cache_size, so the first decode step compresses)."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    prompt = _ids(PROMPT, g, True)
    steps = 80
    out = model.generate(input_ids=torch.tensor([prompt]), custom_generate=sepllm.generate, init_cache_size=A,
                         sep_cache_size=S, local_size=W, cache_size=C, USE_MAX_SEP_CACHE=True,
                         separator_token_ids=SEPS, PADDING_ID=0, do_sample=False, max_new_tokens=steps,
                         min_new_tokens=steps, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    ref = ReferenceSchedule(A, S, W, C, True, True)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        ref.prefill(prompt)
        logits = [model(input_ids=torch.tensor([prompt]), use_cache=True,
                        **cache_kwargs(model, full)).logits[0, -1]]
        for step in range(steps - 1):
            token = int(logits[-1].argmax())
            ref.decode(token)
            logits.append(_masked_logits(model, full, token, PROMPT + step, ref.kept, PROMPT + step + 1))
    want = torch.stack(logits)
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], want, atol=1e-5, rtol=1e-5)
    assert out.sequences[0, PROMPT:].tolist() == want.argmax(-1).tolist()
    _, kind, pos = out.cache.layer_contents(0)
    assert pos[0][kind[0] > 0].tolist() == ref.kept
    assert out.cache.retention()["time_averaged_kept_over_seen"] == pytest.approx(ref.kept_sum / ref.seen_sum,
                                                                                   rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# The reference's own call, with all its keyword arguments, through custom_generate=megatron.sepllm.generate
# ---------------------------------------------------------------------------------------------------------------
def reference_call(**overrides):
    """The hub generate's keyword arguments (transformers-community/sep_cache), every one spelled out."""
    kw = dict(init_cache_size=A, sep_cache_size=S, local_size=W, cache_size=C, SEP_ACCUMULATION=True,
              USE_MAX_SEP_CACHE=True, SEP_PADDING_IN_BATCH=False, separator_token_ids=SEPS, PADDING_ID=0,
              past_tok_ids=None, key_cache=None, value_cache=None, PRINT_KV_RATIO_INSIDE=False,
              print_KV_inside_per_steps=1000, _seen_tokens=0, _kept_kv_ratio=None, APPLY_PE_SHIFT=True,
              APPLY_PES_INSIDE=True, _shifted_position_ids=None, _rope_unsqueeze_dim=1, _rope_seq_dim=1,
              pe_scaling_factor=1.0, pe_dim=8, max_position_embeddings=8192, base=5000.0, k_seq_dim=2,
              v_seq_dim=2, layer_num=2, model_type="llama")
    kw.update(overrides)
    return kw


def _prompts(batch: int, length: int = 90):
    g = torch.Generator().manual_seed(11)
    ids = torch.tensor([_ids(length, g, True) for _ in range(batch)])
    mask = torch.ones_like(ids)
    for b in range(1, batch):          # left padding of different lengths
        mask[b, :7 * b] = 0
        ids[b, :7 * b] = 0
    return ids, mask


def _generate(model, ids, mask, steps, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, custom_generate=sepllm.generate, do_sample=False,
                          max_new_tokens=steps, min_new_tokens=steps, return_dict_in_generate=True,
                          output_logits=True, pad_token_id=0, **kw)


def test_reference_call_runs_unchanged_and_each_option_keeps_its_meaning(capsys):
    model = tiny_model("llama")        # head_dim 8, rope_theta 5000: the reference's tables with these equal ours
    ids, mask = _prompts(3)
    steps = 60
    inside = _generate(model, ids, mask, steps, **reference_call(PRINT_KV_RATIO_INSIDE=True,
                                                                 print_KV_inside_per_steps=20))
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("SepCache step")]
    assert [line.split(":")[0] for line in printed] == ["SepCache step 20", "SepCache step 40", "SepCache step 60"]
    final = inside.cache.retention()["time_averaged_kept_over_seen"]
    assert printed[-1].split("= ")[1].split(",")[0] == f"{final:.4f}"
    # APPLY_PES_INSIDE=False: the caller's (the model's own) rotary tables; identical to the inside tables here
    model_tables = _generate(model, ids, mask, steps, **reference_call(APPLY_PES_INSIDE=False))
    assert torch.equal(inside.sequences, model_tables.sequences)
    torch.testing.assert_close(torch.stack(inside.logits), torch.stack(model_tables.logits), atol=1e-5, rtol=1e-5)
    assert capsys.readouterr().out == ""                      # PRINT_KV_RATIO_INSIDE=False prints nothing
    # the inside tables really come from base/pe_dim: the reference's default base (10000) changes the logits
    other_base = _generate(model, ids, mask, 3, **reference_call(base=10000.0))
    x, pos = torch.zeros(1, 1, 1, 8), torch.arange(C).unsqueeze(0)
    theirs, ours = other_base.cache.rope_fn(x, pos), inside.cache.rope_fn(x, pos)
    model_cos, model_sin = rope_fn_from_model(model)(x, pos)
    torch.testing.assert_close(ours[0], model_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[1], model_sin, atol=1e-6, rtol=0)
    assert (theirs[1] - model_sin).abs().max() > 0.1
    assert (torch.stack(other_base.logits) - torch.stack(inside.logits[:3])).abs().max() > 5e-5   # > the 1e-5 above
    # SEP_PADDING_IN_BATCH: accepted, said once, no effect (rows keep their own separators)
    with pytest.warns(UserWarning, match="SEP_PADDING_IN_BATCH has no effect"):
        padded = _generate(model, ids, mask, steps, **reference_call(SEP_PADDING_IN_BATCH=True))
    assert torch.equal(padded.sequences, inside.sequences)
    assert sum(inside.cache.retention()["compressions_per_layer"]) > 0


def test_reference_call_partial_rotation_on_gpt_neox():
    model = tiny_model("gpt_neox")     # head_dim 8, rotary_pct 0.5: 4 rotated dims, rope theta 10000
    ids, mask = _prompts(2)
    kw = reference_call(model_type="gpt_neox", pe_dim=4, partial_rotation_size=4, base=10000.0)
    inside = _generate(model, ids, mask, 40, **kw)
    outside = _generate(model, ids, mask, 40, **{**kw, "APPLY_PES_INSIDE": False})
    assert torch.equal(inside.sequences, outside.sequences)
    torch.testing.assert_close(torch.stack(inside.logits), torch.stack(outside.logits), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="partial_rotation_size=8 but GPTNeoXForCausalLM rotates 4 dims"):
        _generate(model, ids, mask, 2, **{**kw, "APPLY_PES_INSIDE": False, "partial_rotation_size": 8,
                                          "pe_dim": None})


@pytest.mark.parametrize("override,message", [
    ({"_rope_seq_dim": 2}, r"_rope_seq_dim=2 is not supported.*expected _rope_seq_dim=1"),
    ({"k_seq_dim": 1}, r"k_seq_dim=1 is not supported"),
    ({"past_tok_ids": [torch.zeros(1, 3, dtype=torch.long)]}, r"past_tok_ids carries state from another cache"),
    ({"_seen_tokens": 5}, r"_seen_tokens carries state"),
    ({"layer_num": 3}, r"layer_num=3 but the model has 2 layers"),
    ({"cache_size": A + S + W}, rf"cache_size={A + S + W} must be > init_cache_size"),
    ({"pe_dim": 6, "partial_rotation_size": 4}, r"pe_dim=6 and partial_rotation_size=4 disagree"),
    ({"print_KV_inside_per_steps": 0}, r"print_KV_inside_per_steps must be >= 1"),
])
def test_reference_options_refused_with_one_clear_message(override, message):
    model = tiny_model("llama")
    ids, mask = _prompts(1)
    with pytest.raises(ValueError, match=message):
        _generate(model, ids, mask, 2, **reference_call(**override))


def test_generate_defaults_are_the_hub_generate_defaults():
    model = tiny_model("llama")
    ids, mask = _prompts(1, length=10)
    out = _generate(model, ids, mask, 2, separator_token_ids=SEPS)
    assert [(layer.init_cache_size, layer.sep_cache_size, layer.local_size, layer.cache_size)
            for layer in out.cache.layers] == [(4, 128, 256, 512)] * 2
