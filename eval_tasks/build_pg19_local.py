#!/usr/bin/env python
"""Rebuild the example task data (``pg19_local.jsonl``) from the PG-19 sample shipped in the repository.

usage: python eval_tasks/build_pg19_local.py

Deterministic: the same sentences and distractors every time. Each row holds one sentence of a public-domain book
(``megatron/data/corpora/pg19_sample``): ``context`` (the sentence without its last word), ``choices`` (the true last
word and three last words of other sentences), ``label`` (index of the true word), ``prompt`` / ``completion`` (the
sentence cut after its first half) and ``text`` (the paragraph the sentence comes from, for perplexity).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
BOOKS = HERE.parent / "megatron" / "data" / "corpora" / "pg19_sample"
OUT = HERE / "pg19_local.jsonl"
ROWS = 24


def _paragraphs(text: str) -> list[str]:
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return [p for p in paras if 200 <= len(p) <= 700 and not p.startswith("[") and '"' not in p]


def _sentence(paragraph: str) -> str | None:
    for s in re.split(r"(?<=[.!?])\s+", paragraph):
        words = s.rstrip(".!?").split()
        if 8 <= len(words) <= 30 and words[-1].isalpha() and s.endswith("."):
            return s
    return None


def build() -> list[dict]:
    rng = random.Random(1234)
    found = []
    for book in ("12204.txt", "9315.txt"):
        for para in _paragraphs((BOOKS / book).read_text(encoding="utf-8")):
            sent = _sentence(para)
            if sent is not None:
                found.append((sent, para))
    picked = rng.sample(found, ROWS)
    last_words = [s.rstrip(".").split()[-1] for s, _ in picked]
    rows = []
    for n, (sent, para) in enumerate(picked):
        words = sent.rstrip(".").split()
        others = sorted({w for w in last_words if w.lower() != words[-1].lower()})
        choices = [words[-1]] + rng.sample(others, 3)
        rng.shuffle(choices)
        half = len(words) // 2
        rows.append({"id": n, "context": " ".join(words[:-1]), "choices": choices,
                     "label": choices.index(words[-1]), "prompt": " ".join(words[:half]),
                     "completion": " " + " ".join(words[half:]) + ".", "text": para})
    return rows


def main() -> None:
    rows = build()
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
