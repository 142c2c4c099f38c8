"""Cached decoding of our own GPTModel and generate.py.

References: (1) the model run over the whole sequence at every step (``recompute``) and (2) for the compressed
SepLLM cache, the whole sequence recomputed every step under an explicit decode mask whose rows come from an
independent list-based simulation of SepCache's eviction (not from the cache code).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megatron.config import load_config
from megatron.inference.cli import interactive, load_session, run_generation
from megatron.inference.generator import generate_batch
from megatron.inference.kv_cache import KVCacheSettings, PlainKVCache, SepKVCache, build_kv_cache
from megatron.inference.sampling import SamplingSettings, filter_logits, next_tokens
from megatron.model.attention_backend import CausalState
from megatron.model.gpt import GPTModel
from megatron.sepllm.attention import rules

REPO = Path(__file__).resolve().parents[1]
SEPS = [1, 2, 3]
TINY = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 64, "pos_emb": "rotary",
        "rotary_pct": 0.5, "padded_vocab_size": 32, "init_method_std": 0.1}
SEPLLM = {"separator_token_ids": SEPS, "prefill_local_window_size": 5, "generate_local_window_size": 5,
          "init_tok_max_idx": 1}
FULL = {"USE_ORIGINAL_FULL_ATTEN": True}
# a prompt with a separator every few tokens, so prompt compression has more separators than the cap
PROMPT = [4, 9, 1, 12, 7, 2, 8, 8, 30, 3, 5, 6, 7, 11, 1, 10, 13, 2, 9, 20, 3, 17]


def tiny_model(**keys) -> GPTModel:
    torch.manual_seed(0)
    cfg = load_config({**TINY, **keys})
    return GPTModel(cfg.model, cfg.sepllm).eval()


def assert_same_run(got, want, atol=1e-5):
    assert [r.tokens for r in got] == [r.tokens for r in want]
    for a, b in zip(got, want):
        assert len(a.step_logits) == len(b.step_logits) > 0
        for x, y in zip(a.step_logits, b.step_logits):
            torch.testing.assert_close(x, y, atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------- vs recompute
@pytest.mark.parametrize("keys", [{"pos_emb": "rotary", "num_kv_heads": 2}, {"pos_emb": "alibi"},
                                  {"pos_emb": "learned"}], ids=["rotary-gqa", "alibi", "learned"])
def test_plain_cache_greedy_equals_recompute(keys):
    model = tiny_model(**FULL, **keys)
    cached = generate_batch(model, [PROMPT], max_new_tokens=30, eos_id=None, keep_logits=True)
    full = generate_batch(model, [PROMPT], max_new_tokens=30, eos_id=None, keep_logits=True, recompute=True)
    assert len(cached[0].tokens) == 30
    assert_same_run(cached, full)


@pytest.mark.parametrize("keys,kind", [(SEPLLM, "uncapped"), ({**SEPLLM, "streamingLLM": True}, "compressed")],
                         ids=["sepllm-uncapped", "streamingllm"])
def test_training_rule_cache_greedy_equals_recompute(keys, kind):
    """Every separator kept (or none, StreamingLLM) + exact window = the training rule: equal to running the model's
    own SepLLM attention over the whole sequence each step."""
    model = tiny_model(**keys)
    cached = generate_batch(model, [PROMPT], max_new_tokens=30, eos_id=None, keep_logits=True,
                            cache_settings=KVCacheSettings(kind=kind))
    full = generate_batch(model, [PROMPT], max_new_tokens=30, eos_id=None, keep_logits=True, recompute=True)
    assert_same_run(cached, full)


def simulate_visible(ids, prompt_len, a, s, w, c, exact):
    """Independent SepCache eviction on a list of (token index, kind): visible key set of every decode query.
    The prompt is never compressed (reference); a decode step compresses when the stored length reaches c (or, with
    the exact window, when more than w local tokens are held)."""
    def needs(kept):
        return sum(k == "L" for _, k in kept) > w if exact else len(kept) >= c

    def compress(kept):
        local = [i for i, k in kept if k == "L"]
        window = set(local[-w:])
        cands = [i for i, k in kept if k == "S" or (k == "L" and i not in window and ids[i] in SEPS)]
        keep_s = set(cands[-s:]) if s else set()
        return [(i, "I" if k == "I" else "S" if i in keep_s else "L") for i, k in kept
                if k == "I" or i in keep_s or i in window]

    kept = [(i, "I" if i < a else "L") for i in range(prompt_len)]
    rows = {}
    for t in range(prompt_len, len(ids)):
        kept.append((t, "L"))
        if needs(kept):
            kept = compress(kept)
        rows[t] = {i for i, _ in kept}
    return rows


class ExplicitMask:
    """Attention backend of the reference: causal SDPA under a given [S, S] mask."""

    def __init__(self, allowed):
        self.allowed = allowed

    def prepare(self, input_ids, position_ids, attention_mask_2d):
        n = input_ids.shape[1]
        return CausalState(positions=position_ids, allowed=self.allowed[:n, :n][None, None])

    def __call__(self, q, k, v, layer_idx, state, **kw):
        from megatron.model.attention_backend import CausalSDPABackend

        return CausalSDPABackend()(q, k, v, layer_idx, state, **kw)


def decode_mask(ids, prompt_len, a, s, w, c, exact, prefill_window):
    n = len(ids)
    global_keys = rules.global_key_bitmap(torch.tensor([ids]), SEPS, a)
    allowed = rules.allowed_mask(global_keys, prefill_window)[0]
    for t, visible in simulate_visible(ids, prompt_len, a, s, w, c, exact).items():
        allowed[t] = torch.zeros(n, dtype=torch.bool)
        allowed[t, sorted(visible)] = True
    return allowed


def reference_logits(model, ids, allowed):
    """Whole sequence recomputed under the decode mask: logits of every position."""
    saved = model.attention_backend
    model.attention_backend = ExplicitMask(allowed)
    try:
        with torch.no_grad():
            return model(torch.tensor([ids]))[0]
    finally:
        model.attention_backend = saved


@pytest.mark.parametrize("exact", [True, False], ids=["exact-window", "reference-timing"])
def test_compressed_cache_equals_recompute_under_decode_mask(exact):
    a, s, w = 2, 3, 5
    c = a + s + w + 3
    model = tiny_model(**SEPLLM)
    settings = KVCacheSettings(kind="compressed", sep_cache_size=s, cache_size=c, exact_window=exact)
    # greedy generation: tokens exact, logits 1e-5 against the whole sequence recomputed each step
    out = generate_batch(model, [PROMPT], max_new_tokens=25, eos_id=None, keep_logits=True, cache_settings=settings)[0]
    ids = PROMPT + out.tokens
    allowed = decode_mask(ids, len(PROMPT), a, s, w, c, exact, prefill_window=5)
    for step, logits in enumerate(out.step_logits):
        n = len(PROMPT) + step
        ref = reference_logits(model, ids[:n], allowed)[-1]
        assert int(ref.argmax()) == ids[n]
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    # teacher-forced stream full of separators: the cap and the window evict on every step
    forced = PROMPT + [5, 1, 6, 2, 7, 7, 3, 8, 1, 9, 9, 9, 2, 4, 3, 1, 5, 6, 2, 8]
    allowed = decode_mask(forced, len(PROMPT), a, s, w, c, exact, prefill_window=5)
    ref = reference_logits(model, forced, allowed)
    cache = build_kv_cache(model, settings)
    with torch.no_grad():
        got = [model(torch.tensor([PROMPT]), kv_cache=cache)[0, -1]]
        got += [model(torch.tensor([[t]]), kv_cache=cache)[0, -1] for t in forced[len(PROMPT):-1]]
    torch.testing.assert_close(torch.stack(got), ref[len(PROMPT) - 1:-1], atol=1e-5, rtol=0)
    ids_kept, kind, index = cache.layer_contents(0)
    assert sorted(index[0][kind[0] != 0].tolist()) == sorted(
        simulate_visible(forced[:-1], len(PROMPT), a, s, w, c, exact)[len(forced) - 2])


# ---------------------------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("keys,settings", [(FULL, KVCacheSettings()),
                                           (SEPLLM, KVCacheSettings(sep_cache_size=2)),
                                           (SEPLLM, KVCacheSettings(kind="uncapped"))],
                         ids=["full", "sepllm-compressed", "sepllm-uncapped"])
def test_ragged_batch_equals_one_by_one(keys, settings):
    model = tiny_model(**keys)
    prompts = [PROMPT, PROMPT[3:9], PROMPT[:1] + [7, 3, 5, 1, 9, 9, 2, 11, 12, 13, 14, 2, 6]]
    batch = generate_batch(model, prompts, max_new_tokens=20, eos_id=None, keep_logits=True, cache_settings=settings)
    single = [generate_batch(model, [p], max_new_tokens=20, eos_id=None, keep_logits=True,
                             cache_settings=settings)[0] for p in prompts]
    assert_same_run(batch, single)


def test_eos_stops_a_row_and_cache_resets_per_batch():
    model = tiny_model(**FULL)
    free = generate_batch(model, [PROMPT], max_new_tokens=12, eos_id=None)[0].tokens
    eos = free[4]
    first = free.index(eos)
    cache = PlainKVCache(len(model.layers))
    out = generate_batch(model, [PROMPT, PROMPT[:5]], max_new_tokens=12, eos_id=eos, cache=cache)
    assert out[0].tokens == free[:first] and out[0].finished
    again = generate_batch(model, [PROMPT], max_new_tokens=12, eos_id=eos, cache=cache)[0]
    assert again.tokens == free[:first] and cache.seen.tolist() == [len(PROMPT) + first]


# ---------------------------------------------------------------------------------------------------- memory
def test_sepllm_kv_memory_flat_over_long_generation():
    model = tiny_model(**{**SEPLLM, "num_layers": 1, "hidden_size": 16})
    settings = KVCacheSettings(sep_cache_size=4)
    cache = build_kv_cache(model, settings)
    held, peak = {}, []

    def record(row, token):
        n = cache.planner.tokens_seen - len(PROMPT) + 1   # tokens generated so far
        peak.append(cache.kv_bytes())
        if n in (1024, 4096):
            held[n] = cache.kv_bytes()

    generate_batch(model, [PROMPT], max_new_tokens=4096, eos_id=None, cache=cache, on_token=record)
    a, s, w = 2, 4, 5
    slot_bytes = 2 * model.cfg.num_attention_heads * (16 // model.cfg.num_attention_heads) * 4   # K and V, fp32
    assert held[1024] == held[4096] == (a + s + w) * slot_bytes
    assert max(peak) == (a + s + w) * slot_bytes


def test_uncapped_cache_keeps_every_separator():
    model = tiny_model(**SEPLLM)
    cache = build_kv_cache(model, KVCacheSettings(kind="uncapped"))
    stream = PROMPT + [1, 5, 2, 6, 3, 7, 8, 9]
    with torch.no_grad():
        model(torch.tensor([PROMPT]), kv_cache=cache)
        for t in stream[len(PROMPT):]:
            model(torch.tensor([[t]]), kv_cache=cache)
    _, kind, index = cache.layer_contents(1)
    kept = sorted(index[0][kind[0] != 0].tolist())
    n = len(stream)
    want = sorted({0, 1} | {i for i in range(n) if stream[i] in SEPS} | set(range(n - 5, n)))
    assert kept == want


def test_sepllm_cache_decodes_without_transformers():
    """SepCache's planner is torch only: importing it and the KV cache, and decoding with a compressed cache, never
    imports transformers (a fresh interpreter, so other tests' imports do not count)."""
    code = f"""
import sys
import megatron.sepllm.cache.eviction, megatron.sepllm.cache.planner, megatron.sepllm.cache.storage
from megatron.config import load_config
from megatron.inference.generator import generate_batch
from megatron.inference.kv_cache import KVCacheSettings, SepKVCache, build_kv_cache
from megatron.model.gpt import GPTModel
cfg = load_config({{**{TINY!r}, **{SEPLLM!r}, "num_layers": 1}})
model = GPTModel(cfg.model, cfg.sepllm).eval()
cache = build_kv_cache(model, KVCacheSettings(sep_cache_size=2))
assert isinstance(cache, SepKVCache)
out = generate_batch(model, [{PROMPT!r}], max_new_tokens=12, eos_id=None, cache=cache)
assert len(out[0].tokens) == 12 and min(cache.retention()["compressions_per_layer"]) > 0
print(sorted(name for name in sys.modules if name.split(".")[0] == "transformers"))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_cache_refusals_name_the_fix():
    with pytest.raises(ValueError, match="recompute: true"):
        build_kv_cache(tiny_model(**SEPLLM, USE_BiPE=True, BiPE_seps=SEPS))
    with pytest.raises(ValueError, match="kv_cache = 'plain' on a model trained with SepLLM"):
        build_kv_cache(tiny_model(**SEPLLM), KVCacheSettings(kind="plain"))
    with pytest.raises(ValueError, match="needs a SepLLM- or StreamingLLM-trained model"):
        build_kv_cache(tiny_model(**FULL), KVCacheSettings(kind="compressed"))
    with pytest.raises(ValueError, match="cache_size = 8 is smaller than"):
        build_kv_cache(tiny_model(**SEPLLM), KVCacheSettings(sep_cache_size=4, cache_size=8))


# ---------------------------------------------------------------------------------------------------- sampling
def test_sampling_filters_and_greedy():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]])
    assert filter_logits(logits, 2, 0.0).isfinite().tolist() == [[False, True, True, False, False]]
    p = logits.softmax(-1)[0]          # 0.64, 0.23, 0.09, ... for tokens 1, 2, 3
    top_p = float(p[1] + p[2]) - 1e-4  # needs tokens 1 and 2
    assert filter_logits(logits, 0, top_p).isfinite().tolist() == [[False, True, True, False, False]]
    assert next_tokens(logits, SamplingSettings()).tolist() == [1]
    assert next_tokens(logits, SamplingSettings(), vocab_size=1).tolist() == [0]
    gen = torch.Generator().manual_seed(0)
    draws = {int(next_tokens(logits, SamplingSettings(top_k=1), generator=gen)) for _ in range(20)}
    assert draws == {1}


# ---------------------------------------------------------------------------------------------------- generate.py
def write_run(tmp_path: Path, **gen_keys) -> Path:
    """A checkpoint written the way the trainer lays it out, and a config pointing at it (char tokenizer)."""
    keys = {**TINY, **SEPLLM, "separator_token_ids": [10, 44, 46], "padded_vocab_size": 512,
            "tokenizer_type": "CharLevelTokenizer", "train_micro_batch_size_per_gpu": 2, "device": "cpu",
            "load": str(tmp_path / "checkpoints"), "sample_output_file": str(tmp_path / "out" / "samples.jsonl"),
            "maximum_tokens": 6, **gen_keys}
    cfg = load_config(keys)
    torch.manual_seed(0)
    model = GPTModel(cfg.model, cfg.sepllm)
    step = tmp_path / "checkpoints" / "global_step3"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"iteration": 3}))
    (step / "config.yml").write_text(cfg.to_yaml())
    torch.save(model.state_dict(), step / "model_states.pt")
    (tmp_path / "checkpoints" / "latest").write_text("global_step3")
    path = tmp_path / "gen.yml"
    path.write_text(yaml.safe_dump(keys))
    return path


def test_input_file_mode_writes_the_jsonl_contract(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there, friend.\nA second prompt\n\nthird\n")
    cfg = write_run(tmp_path, text_gen_type="input-file", sample_input_file=str(prompts))
    assert run_generation([str(cfg)], []) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["context"] for r in rows] == ["Hello there, friend.", "A second prompt", "third"]
    for r in rows:
        assert set(r) == {"context", "text", "length", "finished", "message", "duration_seconds"}
        assert r["length"] == len(r["text"]) and (r["length"] == 6 or r["finished"])
        assert r["message"] is None and r["duration_seconds"] > 0
    # the same greedy continuation as the model API gives for that prompt alone
    session = load_session([str(cfg)], [])
    alone = session.generate(["A second prompt"])[0]
    assert alone.text == rows[1]["text"]
    assert list((tmp_path / "out").iterdir()) == [tmp_path / "out" / "samples.jsonl"]   # no temp file left


def test_unconditional_and_interactive_modes(tmp_path):
    cfg = write_run(tmp_path, num_samples=3, temperature=0.8, top_k=5)
    assert run_generation([str(cfg)], []) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["context"] == "" for r in rows)
    session = load_session([str(cfg)], ["--temperature", "0", "--top_k", "0"])
    out = io.StringIO()
    interactive(session, io.StringIO("Hi, you.\nexit\n"), out)
    want = session.generate(["Hi, you."])[0].text
    assert out.getvalue().startswith("Please enter prompt") and want + "\n" in out.getvalue()


@pytest.mark.parametrize("override,code,message", [
    (["--sample_input_file", "nope.txt"], 2, "sample_input_file nope.txt: no such file"),
    (["--load", "null", "--save", "null"], 2, "generate.py needs key 'load' (or 'save')"),
    (["--text_gen_type", "file"], 2, "key 'text_gen_type': expected one of unconditional"),
    (["--top_p", "1.5"], 2, "key 'top_p': expected a value in [0, 1]"),
    (["--load", "missing_dir"], 2, "checkpoint path missing_dir does not exist"),
    (["--sample_input_file", "bin.txt"], 2, "sample_input_file bin.txt: not UTF-8 text"),
    (["--sample_input_file", "blank.txt"], 2, "sample_input_file blank.txt: no prompts"),
])
def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch, override, code, message):
    cfg = write_run(tmp_path, text_gen_type="input-file", sample_input_file=str(tmp_path / "p.txt"))
    (tmp_path / "p.txt").write_text("x\n")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    monkeypatch.chdir(tmp_path)
    assert run_generation([str(cfg)], override) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and message in err[0]


def test_a_prompt_longer_than_seq_length_carries_a_note(tmp_path, capsys):
    """Rotary models run past seq_length, on positions they never trained: the sample says so, and the run counts
    such samples on stderr."""
    prompts = tmp_path / "prompts.txt"
    cfg = write_run(tmp_path, text_gen_type="input-file", sample_input_file=str(prompts))
    seq = load_config(str(cfg)).model.seq_length
    prompts.write_text("short\n" + "x" * (seq + 5) + "\n")            # char tokenizer: one token per character
    assert run_generation([str(cfg)], []) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert rows[0]["message"] is None
    assert rows[1]["message"] == (f"the prompt has {seq + 5} tokens, more than seq_length = {seq} the model was "
                                  f"trained on: positions past {seq} are untrained")
    assert f"generate: note: 1 of 2 samples carry a message (field 'message'), e.g. the prompt has {seq + 5}" \
        in capsys.readouterr().err


def test_training_config_with_only_save_reads_the_saved_checkpoint(tmp_path):
    """The training YAML works unchanged after training: without ``load`` the run's ``save`` folder is read."""
    cfg = write_run(tmp_path, text_gen_type="input-file", sample_input_file=str(tmp_path / "p.txt"))
    (tmp_path / "p.txt").write_text("Hi, you.\n")
    assert run_generation([str(cfg)], ["--load", "null", "--save", str(tmp_path / "checkpoints")]) == 0
    via_save = (tmp_path / "out" / "samples.jsonl").read_text()
    assert run_generation([str(cfg)], []) == 0
    assert (tmp_path / "out" / "samples.jsonl").read_text().splitlines()[0].split('"duration_seconds"')[0] == \
        via_save.splitlines()[0].split('"duration_seconds"')[0]


def test_bipe_model_needs_recompute(tmp_path, capsys):
    cfg = write_run(tmp_path, USE_BiPE=True, BiPE_seps=[10, 44, 46])
    assert run_generation([str(cfg)], []) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: USE_BiPE models") and "recompute: true" in err[-1]
    assert run_generation([str(cfg)], ["--recompute", "true"]) == 0
    rows = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    row = json.loads(rows[0])
    assert len(rows) == 1 and (row["length"] == 6 or row["finished"])


@pytest.mark.slow
def test_deepy_launches_generate(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one. two\nthree\n")
    cfg = write_run(tmp_path, text_gen_type="input-file", sample_input_file=str(prompts), kv_cache="uncapped")
    proc = subprocess.run([sys.executable, "deepy.py", "generate.py", str(cfg), "--maximum_tokens", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["context"] for r in rows] == ["one. two", "three"] and all(r["length"] <= 4 for r in rows)
