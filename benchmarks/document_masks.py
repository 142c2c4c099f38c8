#!/usr/bin/env python
"""Kept-key share of SepLLM attention on packed PG-19, with and without document masks (``reset_attention_mask``).

Books (the shared 75-book PG-19 test folder when present, else the bundled sample) are tokenized with the GPT-NeoX-20B
tokenizer, cut into documents (``--doc-tokens``: whole books, or pieces of N tokens), each closed by the
end-of-document token, concatenated and packed into samples of ``S`` tokens as pre-training packs them. For each
``(S, w)`` and document size the SepLLM rule (``a`` initial tokens, the 20B separators, window ``w``) is counted in
closed form (``rules.row_kept_counts``, the trainer's retention counters) without and with document masks:

* ``attn_map_retention`` / ``kv_retention``: the trainer's ratios: kept entries of the whole map / of the last query
  row over the causal ones; with document masks the denominator is full attention with the same document masks;
* ``map_share`` = kept entries / ``S(S+1)/2`` (plain causal) in both cases: the share of causal attention's work.

Nothing is timed. Example: ``python benchmarks/document_masks.py --seq-lens 2048 4096 --windows 64 256 --json out.json``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))   # benchmarks/corpus.py

from corpus import TOKENIZER, pg19_books, pg19_dir  # noqa: E402
from report import print_table, write_json  # noqa: E402
from megatron.data.documents import document_ids, document_starts  # noqa: E402
from megatron.sepllm.attention import rules  # noqa: E402
from megatron.sepllm.attention.retention import pattern_counts  # noqa: E402

NEOX_SEPS = [15, 13, 32, 2, 28, 27, 209, 186, 187]     # separator_token_ids of configs/sepllm-160m-*.yml
EOD = 0                                                 # <|endoftext|>


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--windows", type=int, nargs="+", default=[64, 256])
    p.add_argument("--initial", type=int, default=4, help="initial tokens a (default 4)")
    p.add_argument("--doc-tokens", nargs="+", default=["book", "2048", "512"],
                   help="document sizes: 'book' (whole books) or N (books cut into N-token documents)")
    p.add_argument("--books", type=int, default=30, help="books read (default 30)")
    p.add_argument("--chars-per-book", type=int, default=600_000, help="characters read per book (default 600k)")
    p.add_argument("--pg19", default=None, help="folder of PG-19 *.txt books (default: shared, else bundled)")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    return p.parse_args(argv)


def tokenized_books(folder: Optional[str], books: int, chars: int) -> list[torch.Tensor]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    out = []
    for path in pg19_books(folder)[:books]:
        ids = torch.tensor(tok.encode(path.read_text(encoding="utf-8", errors="replace")[:chars]).ids)
        out.append(torch.where(ids == EOD, torch.ones_like(ids), ids))          # EOD only where we put it
    return out


def packed_samples(books: list[torch.Tensor], doc_tokens: str, seq_len: int) -> torch.Tensor:
    """``[N, S]``: documents (each closed by EOD) concatenated and cut into whole samples."""
    eod = torch.tensor([EOD])
    docs = []
    for ids in books:
        size = len(ids) if doc_tokens == "book" else int(doc_tokens)
        docs += [torch.cat([piece, eod]) for piece in ids.split(size)]
    stream = torch.cat(docs)
    n = len(stream) // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def count(samples: torch.Tensor, window: int, initial: int, documents: bool) -> dict:
    ds = document_starts(document_ids(samples, EOD)) if documents else None
    g = rules.global_key_bitmap(samples, NEOX_SEPS, initial, doc_start=ds)
    kv_kept, kv_total, map_kept, map_total = pattern_counts(g, window, None, ds)
    n, s = samples.shape
    return {"attn_map_retention": map_kept / map_total, "kv_retention": kv_kept / kv_total,
            "map_share": map_kept / (n * s * (s + 1) / 2)}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    books = tokenized_books(args.pg19, args.books, args.chars_per_book)
    print(f"{len(books)} books from {pg19_dir(args.pg19)}, {sum(len(b) for b in books)} tokens; a={args.initial}, "
          f"separators {NEOX_SEPS}")
    rows = []
    for seq_len in args.seq_lens:
        for doc_tokens in args.doc_tokens:
            samples = packed_samples(books, doc_tokens, seq_len)
            docs_per_sample = float((samples == EOD).sum(dim=1).float().mean()) + 1.0
            for window in args.windows:
                for documents in (False, True):
                    row = {"seq_len": seq_len, "docs": doc_tokens, "window": window,
                           "reset_attention_mask": documents, "samples": int(samples.shape[0]),
                           "docs_per_sample": round(docs_per_sample, 2)}
                    row.update({k: round(v, 4) for k, v in count(samples, window, args.initial, documents).items()})
                    rows.append(row)
    print_table(rows, [("seq_len", "seq", ">6d"), ("docs", "docs", "<6"), ("docs_per_sample", "docs/sample", ">.2f"),
                       ("window", "window", ">6d"), ("reset_attention_mask", "reset_attention_mask", "<"),
                       ("attn_map_retention", "attn_map_retention", ">.4f"), ("kv_retention", "kv_retention", ">.4f"),
                       ("map_share", "map_share", ">.4f")])
    write_json(args.json, {"benchmark": "document_masks", "initial": args.initial, "separators": NEOX_SEPS,
                           "books": len(books), "pg19": str(pg19_dir(args.pg19)), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
