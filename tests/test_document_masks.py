"""Document masks (GPT-NeoX ``reset_attention_mask`` / ``reset_position_ids``) with SepLLM attention.

The rule per document: ``allowed = causal AND same document AND (separator OR one of the document's first a tokens OR
q - k < w)``. Checked here:

* the kept-key sets of ``rules.py`` equal a brute-force loop over ``(q, k)`` written from that sentence (worked
  example, FixLLM, left-padding-aware initial tokens of the first document, packed real text);
* every execution path (dense, flex forward on CPU, compact with both engines, flex_compact forward, triton under
  ``TRITON_INTERPRET=1``) equals the float64 reference on packed PG-19 text with documents shorter than ``a``,
  shorter than the window, empty documents (two end-of-document tokens in a row) and documents running across both
  sample boundaries; gradients for dense / compact / triton; layers whose window covers the sequence;
* a packed document's logits equal the document's own logits alone (full attention and SepLLM; rotary, ALiBi,
  learned positions, BiPE) with restarted positions;
* retention statistics count per document (closed form against the brute-force mask sums);
* a tiny ``train.py`` run with both keys and SepLLM compact trains with a finite loss; a pipeline carries the ids.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.config.model import ModelConfig
from megatron.data.documents import document_ids, document_positions, document_starts
from megatron.model.gpt import GPTModel
from megatron.sepllm.attention import rules
from megatron.sepllm.attention.flex_compact import build_flex_compact_layout

from sep_helpers import PYTHIA_SEPS, make_sepllm_cfg, pg19_ids, reference_attention, sep_backend

EOD = 0
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
SLOPES = torch.tensor([0.5, 0.125, 0.03, 0.01])
SEQ = 96
WINDOWS = [16, 40, SEQ]          # the last one covers the sequence (an H layer): plain document-causal attention


# ------------------------------------------------------------------------------------------- the rule in words
def brute_force_keep(ids: torch.Tensor, docs: torch.Tensor, seps, a: int, window: int, interval=None,
                     first_doc_initial=None) -> torch.Tensor:
    """``[B, S, S]``: query q keeps key k iff k <= q, both lie in the same document, and k is a separator (FixLLM:
    its offset in the document is a multiple of ``interval``), or one of the first ``a`` tokens of its document (of
    the first document: the positions ``first_doc_initial[b]``, left-padding aware), or q - k < window."""
    batch, seq = ids.shape
    keep = torch.zeros(batch, seq, seq, dtype=torch.bool)
    for b in range(batch):
        doc, tok = docs[b].tolist(), ids[b].tolist()
        first = {}
        for i, d in enumerate(doc):
            first.setdefault(d, i)
        for q in range(seq):
            for k in range(q + 1):
                if doc[k] != doc[q]:
                    continue
                offset = k - first[doc[k]]
                special = (offset % interval == 0) if interval else tok[k] in seps
                if first_doc_initial is not None and first[doc[k]] == 0:
                    initial = k in first_doc_initial[b]
                else:
                    initial = offset < a
                keep[b, q, k] = special or initial or q - k < window
    return keep


def rule_keep(ids, docs, seps, a, window, interval=None, pad_counts=None):
    ds = document_starts(docs)
    g = rules.global_key_bitmap(ids, seps, a, pad_counts=pad_counts, fixed_interval=interval, doc_start=ds)
    return rules.padded_allowed_mask(g, window, None, ds)


def test_worked_example_kept_sets_equal_the_rule_in_words():
    # a=2, w=2, separators "," "." ; E = end of document (the LAST token of its document)
    #        A  B  ,  C  E  D  .  E  E  F  G  ,  H  I
    words = "A B , C E D . E E F G , H I".split()
    vocab = {"E": EOD, ",": 15, ".": 13}
    ids = torch.tensor([[vocab.get(w, 100 + i) for i, w in enumerate(words)]])
    docs = document_ids(ids, EOD)
    assert docs.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 3]]
    keep = rule_keep(ids, docs, [15, 13], 2, 2)
    assert torch.equal(keep, brute_force_keep(ids, docs, [15, 13], 2, 2))
    # the last query (I) keeps F G (its document's 2 initial tokens), "," and the window H I; nothing before F
    assert keep[0, -1].nonzero().view(-1).tolist() == [9, 10, 11, 12, 13]
    # the empty document (the second E alone) keeps only itself; D keeps only D (first token of its document)
    assert keep[0, 8].nonzero().view(-1).tolist() == [8]
    assert keep[0, 5].nonzero().view(-1).tolist() == [5]
    # FixLLM positions count from each document's start too
    for interval in (2, 3):
        assert torch.equal(rule_keep(ids, docs, [], 1, 2, interval=interval),
                           brute_force_keep(ids, docs, [], 1, 2, interval=interval))


def test_left_padded_first_document_keeps_its_adaptive_initial_tokens():
    ids = torch.randint(100, 200, (2, 24), generator=torch.Generator().manual_seed(3))
    ids[:, 9] = 15
    ids[0, [11, 17]] = EOD
    ids[1, [5, 6]] = EOD
    pad = torch.tensor([3, 2])
    docs = document_ids(ids, EOD)
    init = [set(range(int(p), int(p) + 3)) for p in pad]
    for window in (1, 4, 30):
        assert torch.equal(rule_keep(ids, docs, [15], 3, window, pad_counts=pad),
                           brute_force_keep(ids, docs, [15], 3, window, first_doc_initial=init))


# ------------------------------------------------------------------------------------------- packed real text
@pytest.fixture(scope="module")
def packed(pg19_dir, neox_tokenizer_file):
    """``[2, SEQ]`` PG-19 ids with end-of-document tokens: row 0 has a document shorter than a (2 tokens), an
    empty one (two EODs in a row), one shorter than the window, and starts / ends mid-document; row 1 ends with an
    EOD and has one short-window document."""
    ids = torch.stack([pg19_ids(pg19_dir, neox_tokenizer_file, SEQ, book_index=0, offset=3000),
                       pg19_ids(pg19_dir, neox_tokenizer_file, SEQ, book_index=1, offset=4000)])
    ids[ids == EOD] = 1
    ids[0, [20, 22, 23, 33, 70]] = EOD
    ids[1, [50, 51, 60, SEQ - 1]] = EOD
    docs = document_ids(ids, EOD)
    return ids, docs, document_positions(docs)


def _qkv(seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, SEQ, HEAD_DIM, generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS)]


def _reference_keeps(ids, docs, a):
    return [brute_force_keep(ids, docs, PYTHIA_SEPS, a if w < SEQ else 0, w) for w in WINDOWS]


@pytest.fixture(scope="module")
def reference(packed):
    ids, docs, _ = packed
    a = sep_backend("dense", WINDOWS, False, HEADS, KV_HEADS).num_initial
    keeps = _reference_keeps(ids, docs, a)
    for w, keep in zip(WINDOWS, keeps):   # the dense reference mask of rules.py is the rule in words
        g = rules.global_key_bitmap(ids, PYTHIA_SEPS, a, doc_start=document_starts(docs)) if w < SEQ else \
            torch.zeros_like(ids, dtype=torch.bool)
        assert torch.equal(rules.padded_allowed_mask(g, w, None, document_starts(docs)), keep)
    return keeps


def _grads(out, xs):
    weight = torch.sin(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)
    return torch.autograd.grad((out * weight).sum(), xs)


@pytest.mark.parametrize("impl", ["dense", "compact", "compact_generic", "flex", "flex_compact"])
def test_every_path_equals_the_reference_on_packed_text(impl, packed, reference):
    ids, docs, pos = packed
    backend = sep_backend(impl.split("_generic")[0], WINDOWS, False, HEADS, KV_HEADS)
    if impl == "compact_generic":
        backend.compact_engine = "generic"
    plan = backend.prepare(ids, pos, None, document_ids=docs)
    grad_path = impl in ("dense", "compact", "compact_generic")
    dense = sep_backend("dense", WINDOWS, False, HEADS, KV_HEADS)
    dense_plan = dense.prepare(ids, pos, None, document_ids=docs)
    for layer, keep in enumerate(reference):
        for slopes in ((None, SLOPES) if grad_path or layer == 1 else (None,)):   # flex on CPU is slow
            q, k, v = [t.requires_grad_(grad_path) for t in _qkv(layer)]
            out = backend(q, k, v, layer, plan, scale=0.25, alibi_slopes=slopes)
            ref = reference_attention(q.detach(), k.detach(), v.detach(), keep, 0.25, slopes, pos)
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
            if grad_path:
                qd, kd, vd = [t.detach().clone().requires_grad_() for t in (q, k, v)]
                want = _grads(dense(qd, kd, vd, layer, dense_plan, scale=0.25, alibi_slopes=slopes), (qd, kd, vd))
                for got, exp in zip(_grads(out, (q, k, v)), want):
                    torch.testing.assert_close(got, exp, atol=1e-5, rtol=0)


def test_documents_none_is_the_plan_without_documents(packed):
    ids, _, _ = packed
    pos = torch.arange(SEQ).expand(2, -1)
    for impl in ("dense", "compact"):
        be = sep_backend(impl, WINDOWS, False, HEADS, KV_HEADS)
        a, b = be.prepare(ids, pos, None), be.prepare(ids, pos, None, document_ids=None)
        assert a.doc_start is None and b.doc_start is None
        q, k, v = _qkv()
        for layer in range(len(WINDOWS)):
            assert torch.equal(be(q, k, v, layer, a, scale=0.25), be(q, k, v, layer, b, scale=0.25))


def _tiles(num, idx, nkv):
    keep = torch.arange(idx.shape[-1]) < num.unsqueeze(-1).long()
    return torch.zeros(*idx.shape[:-1], nkv, dtype=torch.bool).scatter_(-1, idx.long(), keep)


def test_flex_compact_tiles_with_documents_skip_only_empty_tiles(packed):
    """The closed-form BlockMask never drops a tile with a kept entry and never marks a tile full that is not."""
    from torch.nn.attention.flex_attention import create_block_mask

    ids, docs, pos = packed
    ds = document_starts(docs)
    g = rules.global_key_bitmap(ids, PYTHIA_SEPS, 3, doc_start=ds)
    skipped = 0
    for window in (1, 8, 16, 40):
        layout = build_flex_compact_layout(g, None, window, pos, block=16, doc_start=ds)
        ours = layout.attach_block_mask()
        ref = create_block_mask(layout.mask_mod(), B=2, H=None, Q_LEN=SEQ, KV_LEN=layout.kv_len, device="cpu",
                                BLOCK_SIZE=16)
        nkv = -(-layout.kv_len // 16)
        ours_any = _tiles(ours.kv_num_blocks, ours.kv_indices, nkv) | _tiles(ours.full_kv_num_blocks,
                                                                             ours.full_kv_indices, nkv)
        ref_any = _tiles(ref.kv_num_blocks, ref.kv_indices, nkv) | _tiles(ref.full_kv_num_blocks,
                                                                          ref.full_kv_indices, nkv)
        assert not (ref_any & ~ours_any).any(), f"a kept tile was skipped at window {window}"
        ours_full = _tiles(ours.full_kv_num_blocks, ours.full_kv_indices, nkv)
        assert not (ours_full & ~_tiles(ref.full_kv_num_blocks, ref.full_kv_indices, nkv)).any()
        no_docs = build_flex_compact_layout(rules.global_key_bitmap(ids, PYTHIA_SEPS, 3), None, window, pos, block=16)
        skipped += int(no_docs.tile_classes()[0].sum() - layout.tile_classes()[0].sum())
    assert skipped > 0                                          # tiles before a document start are skipped


# ------------------------------------------------------------------------------------------- triton (interpreter)
@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="the triton test runs in this process")
def test_triton_tests_pass_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p",
                          "no:cacheprovider", "-k", "triton_kernels"], cwd=Path(__file__).resolve().parents[1],
                         env=env, capture_output=True, text=True, timeout=600)
    tail = run.stdout[-4000:] + run.stderr[-2000:]
    assert run.returncode == 0 and re.search(r"\b1 passed", run.stdout), tail


@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="CPU: run under TRITON_INTERPRET=1 by "
                    "test_triton_tests_pass_under_the_interpreter")
def test_triton_kernels_with_documents_match_dense_and_skip_tiles(packed, reference):
    pytest.importorskip("triton")
    from megatron.sepllm.attention.triton_compact import (build_triton_layout, triton_compact_attention,
                                                          visited_tiles)

    ids, docs, pos = packed
    dev = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
    backend = sep_backend("triton", WINDOWS[:2], False, HEADS, KV_HEADS)
    dense = sep_backend("dense", WINDOWS[:2], False, HEADS, KV_HEADS)
    plan = backend.prepare(ids.to(dev), pos.to(dev), None, document_ids=docs.to(dev))
    dense_plan = dense.prepare(ids, pos, None, document_ids=docs)
    for layer, tiles, slopes in ((0, None, None), (1, 16, SLOPES)):
        tl_layout = plan.layer_patterns[layer].artifact
        if tiles:                                    # small tiles: the walk skips whole tiles before a document
            no_docs = backend.prepare(ids.to(dev), pos.to(dev), None).layer_patterns[layer].artifact
            assert (visited_tiles(tl_layout.layout, tiles, tiles) < visited_tiles(no_docs.layout, tiles, tiles)).all()
            tl_layout = build_triton_layout(tl_layout.layout, tiles, tiles)
        q, k, v = [t.to(dev).requires_grad_() for t in _qkv(layer)]
        sl = None if slopes is None else slopes.to(dev)
        out = triton_compact_attention(q, k, v, tl_layout, scale=0.25, alibi_slopes=sl)
        ref = reference_attention(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), reference[layer], 0.25,
                                  slopes, pos)
        torch.testing.assert_close(out.detach().cpu().double(), ref, atol=1e-5, rtol=0)
        qd, kd, vd = [t.detach().cpu().clone().requires_grad_() for t in (q, k, v)]
        want = _grads(dense(qd, kd, vd, layer, dense_plan, scale=0.25, alibi_slopes=slopes), (qd, kd, vd))
        for got, exp in zip(_grads(out, (q, k, v)), want):
            torch.testing.assert_close(got.cpu(), exp, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- statistics
def test_retention_counts_per_document_equal_brute_force_sums(packed, reference):
    ids, docs, pos = packed
    backend = sep_backend("compact", WINDOWS, False, HEADS, KV_HEADS)
    backend.prepare(ids, pos, None, document_ids=docs)
    counts = backend.retention.counts()
    doc_causal = brute_force_keep(ids, docs, [], 0, SEQ)                     # full attention with document masks
    ds = document_starts(docs)
    for layer, (window, keep) in enumerate(zip(WINDOWS, reference)):
        assert counts["kv"][layer] == [int(keep[:, -1].sum()), int(doc_causal[:, -1].sum())]
        assert counts["attn_map"][layer] == [int(keep.sum()), int(doc_causal.sum())]
        if window < SEQ:
            g = rules.global_key_bitmap(ids, PYTHIA_SEPS, backend.num_initial, doc_start=ds)
            kept, total = rules.row_kept_counts(g, window, None, ds)
            assert torch.equal(kept, keep.sum(-1)) and torch.equal(total, doc_causal.sum(-1))


# ------------------------------------------------------------------------------------------- positions
def test_bipe_ids_restart_per_document(packed):
    ids, docs, _ = packed
    intra, inter = rules.bipe_position_ids(ids, PYTHIA_SEPS, document_starts(docs))
    for b in range(2):
        for d in docs[b].unique():
            cols = (docs[b] == d).nonzero().view(-1)
            alone = rules.bipe_position_ids(ids[b:b + 1, cols], PYTHIA_SEPS)
            assert torch.equal(intra[b, cols], alone[0][0]) and torch.equal(inter[b, cols], alone[1][0])


VOCAB = 512
MODELS = {
    # name: (pos_emb, sepllm keys or None = full attention, BiPE)
    "full_rotary": ("rotary", None, False),
    "full_alibi": ("alibi", None, False),
    "full_learned": ("learned", None, False),
    "sepllm_compact_rotary_H": ("rotary", dict(prefill_windows=[6, 200], sep_attention_impl="compact"), False),
    "sepllm_dense_alibi": ("alibi", dict(prefill_windows=[6, 9], sep_attention_impl="dense"), False),
    "sepllm_compact_bipe": ("rotary", dict(prefill_windows=[6, 9], sep_attention_impl="compact"), True),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_document_logits_equal_the_document_alone(name, pg19_dir, neox_tokenizer_file):
    pos_emb, sep_keys, bipe = MODELS[name]
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=64, max_position_embeddings=64,
                      pos_emb=pos_emb, rotary_pct=0.5, no_weight_tying=True, padded_vocab_size=VOCAB)
    sep_cfg = None
    if sep_keys is not None or bipe:
        sep_cfg = make_sepllm_cfg(num_layers=2, init_tok_max_idx=1, USE_BiPE=bipe, **(sep_keys or {}))
    model = GPTModel(cfg, sep_cfg).eval()
    text = pg19_ids(pg19_dir, neox_tokenizer_file, 80, book_index=2) % VOCAB
    text[text == EOD] = 1
    first, second, third = text[:14], text[20:45], text[50:70]          # the first document starts mid-way
    eod = torch.tensor([EOD])
    packed = torch.cat([first, eod, second, eod, third])[None]
    docs = document_ids(packed, EOD)
    with torch.no_grad():
        got = model(packed, position_ids=document_positions(docs), document_ids=docs)
        alone = model(torch.cat([second, eod])[None])
        head = model(torch.cat([first, eod])[None])
    lo = len(first) + 1
    torch.testing.assert_close(got[:, lo: lo + len(second) + 1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, :lo], head, atol=1e-5, rtol=1e-5)
    # without the document mask the second document sees the first: the logits differ
    with torch.no_grad():
        mixed = model(packed, position_ids=document_positions(docs))
    assert (mixed[:, lo: lo + len(second)] - alone[:, :-1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="not to KV-cache decoding"):
        model(packed, kv_cache=object(), document_ids=docs)


# ------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def short_docs_corpus(tmp_path_factory, pg19_dir, neox_tokenizer_file) -> str:
    """A tokenized corpus of ~100-token documents, so that 64-token samples pack several of them."""
    from megatron.data.preprocess import tokenize_to_indexed

    out = tmp_path_factory.mktemp("short_docs")
    text = sorted(pg19_dir.glob("*.txt"))[0].read_text(encoding="utf-8")[:40_000]
    (out / "docs").mkdir()
    for i in range(100):
        (out / "docs" / f"part{i:03d}.txt").write_text(text[i * 400:(i + 1) * 400], encoding="utf-8")
    tokenize_to_indexed(str(out / "docs"), str(out / "short"), tokenizer_type="HFTokenizer",
                        vocab_file=str(neox_tokenizer_file), progress=False)
    return str(out / "short") + "_text_document"


def test_tiny_training_run_with_document_masks_and_sepllm_compact(short_docs_corpus, neox_tokenizer_file, tmp_path):
    import json

    from megatron.config import load_config

    from train_helpers import run_training, tiny_sepllm_keys

    run = tmp_path / "run"
    keys = tiny_sepllm_keys(short_docs_corpus, neox_tokenizer_file, run, **{
        "train-iters": 3, "reset_attention_mask": True, "reset_position_ids": True, "eod_mask_loss": True,
        "USE_SEP_ATTN_KERNEL_ACCELERATOR": True, "sep_attention_impl": "compact", "seq-length": 64,
        "max-position-embeddings": 64})
    cfg = load_config(keys, for_training=True)
    assert run_training(cfg, plot=False) == 0
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["lm_loss"] for r in rows if "lm_loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_pipeline_carries_what_the_keys_ask_for(corpus, neox_tokenizer_file, tmp_path):
    """With a pipeline the stages carry the position / document ids the keys produce (tests/test_pipeline.py runs
    two stages against the plain model)."""
    from megatron.config import load_config
    from megatron.parallel.pipeline import carried_inputs, pipeline_micro_batch
    from megatron.training.batches import BatchRules, make_batch

    from train_helpers import tiny_sepllm_keys

    keys = tiny_sepllm_keys(corpus, neox_tokenizer_file, tmp_path, **{"reset_attention_mask": True,
                                                                      "pipe-parallel-size": 2})
    t = load_config(keys, world_size=2).training
    assert carried_inputs(t.reset_position_ids, t.reset_attention_mask) == ("document_ids",)
    sample = {"text": torch.tensor([[5, 6, EOD, 7, 8, 9]])}
    batch = make_batch(sample, BatchRules(eod_token=EOD, reset_attention_mask=True), "cpu")
    inputs, _ = pipeline_micro_batch(batch)
    assert isinstance(inputs, tuple) and torch.equal(inputs[1], torch.tensor([[0, 0, 0, 1, 1]]))


# ------------------------------------------------------------------------------------------- the benchmark
def test_document_masks_benchmark_rows_and_json(pg19_dir, tmp_path):
    """``benchmarks/document_masks.py`` on a tiny slice: one row per setting, ratios in (0, 1], documents change
    only the rows with document masks, and the JSON holds the printed rows."""
    import json

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "document_masks.py"
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(bench), "--books", "1", "--chars-per-book", "30000", "--seq-lens", "256",
                          "--windows", "16", "--doc-tokens", "book", "64", "--pg19", str(pg19_dir), "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["docs"], r["reset_attention_mask"]) for r in rows] == [("book", False), ("book", True), ("64", False),
                                                                        ("64", True)]
    for r in rows:
        assert 0 < r["map_share"] <= r["attn_map_retention"] <= 1 and 0 < r["kv_retention"] <= 1
    plain, masked = rows[2], rows[3]
    assert masked["map_share"] < plain["map_share"] and plain["map_share"] == plain["attn_map_retention"]
    assert "reset_attention_mask" in run.stdout
