#!/usr/bin/env python
"""Write the small instruction set of the fine-tuning demo (README "Fine-tune", docs/finetuning.md).

Templated tasks a tiny model can pick up in a few hundred steps: adding and subtracting small numbers, reversing
the words of a short list, the capital of a country from a small table, writing words in capital letters, counting
words. Every pair is drawn from a seeded RNG, so the files are the same on every machine; the held-out set shares no
prompt with the training set. Output: chat records ``{"messages": [{"role": "user", ...}, {"role": "assistant",
...}]}``, one per line, in ``<out-dir>/train.jsonl`` and ``<out-dir>/heldout.jsonl``.

  python tools/datasets/make_demo_instructions.py             # data/instructions_demo/{train,heldout}.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Callable, Sequence

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Egypt": "Cairo", "Canada": "Ottawa", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo",
    "Greece": "Athens", "Poland": "Warsaw", "Chile": "Santiago", "Cuba": "Havana", "Ireland": "Dublin",
    "Austria": "Vienna",
}
WORDS = ("red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "milk", "rain", "book",
         "door", "lamp", "ship")


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return f"What is {a} plus {b}?", str(a + b)


def _subtract(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(0, 20)
    b = rng.randint(0, a)
    return f"What is {a} minus {b}?", str(a - b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 4))
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))


def _capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(CAPITALS))
    phrasing = rng.choice(("What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital "
                                                                                            "of {}?"))
    return phrasing.format(country), CAPITALS[country]


def _upper(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(1, 3))
    return f"Write in capital letters: {' '.join(words)}", " ".join(words).upper()


def _count(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 6))]
    return f"How many words are in: {' '.join(words)}", str(len(words))


TASKS: Sequence[Callable[[random.Random], tuple[str, str]]] = (_add, _subtract, _reverse, _capital, _upper, _count)


def make_pairs(n_train: int, n_heldout: int, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Distinct (prompt, response) pairs, tasks in turn (a repeated prompt is skipped); the held-out pairs come first so the training set never
    repeats one of their prompts. Raises ValueError if the tasks cannot supply that many distinct prompts."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    tries = 0
    while len(out) < n_train + n_heldout:
        prompt, response = TASKS[tries % len(TASKS)](rng)
        tries += 1
        if tries > 100 * (n_train + n_heldout):
            raise ValueError(f"could not draw {n_train + n_heldout} distinct prompts")
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append((prompt, response))
    return out[n_heldout:], out[:n_heldout]


def _write(path: Path, pairs: Sequence[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for prompt, response in pairs:
            record = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
            f.write(json.dumps(record) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="data/instructions_demo", help="output folder (default: data/instructions_demo)")
    p.add_argument("--train", type=int, default=360, help="training pairs (default: 360)")
    p.add_argument("--heldout", type=int, default=60, help="held-out pairs (default: 60)")
    p.add_argument("--seed", type=int, default=1234, help="RNG seed (default: 1234)")
    args = p.parse_args(argv)
    if args.train < 1 or args.heldout < 1:
        print("make_demo_instructions.py: error: --train and --heldout must be >= 1", file=sys.stderr)
        return 2
    train, heldout = make_pairs(args.train, args.heldout, args.seed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "train.jsonl", train)
    _write(out / "heldout.jsonl", heldout)
    print(f"wrote {out / 'train.jsonl'} ({len(train)} pairs) and {out / 'heldout.jsonl'} ({len(heldout)} pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
