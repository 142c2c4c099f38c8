#!/usr/bin/env python
"""Write the small preference set of the DPO demo (docs/finetuning.md, "Preference training (DPO)").

Built from the SFT demo's instruction set (tools/datasets/make_demo_instructions.py): for every conversation the
prompt is the user's message, the chosen response the right answer, the rejected response the answer of the next
conversation in the file (a well-formed reply to another question). Output: ``{"prompt", "chosen", "rejected"}``
records, one per line, in ``<out-dir>/train.jsonl`` and ``<out-dir>/heldout.jsonl``.

  python tools/datasets/make_demo_preferences.py          # data/instructions_demo/*.jsonl -> data/preferences_demo/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


def preference_records(conversations: Sequence[dict]) -> list[dict]:
    """One record per conversation; the rejected answer is the next conversation's (the last takes the first's),
    skipped where the two answers are the same."""
    pairs = [(c["messages"][0]["content"], c["messages"][1]["content"]) for c in conversations]
    out = []
    for i, (prompt, answer) in enumerate(pairs):
        other = pairs[(i + 1) % len(pairs)][1]
        if other != answer:
            out.append({"prompt": prompt, "chosen": answer, "rejected": other})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instructions", default="data/instructions_demo",
                   help="folder of the SFT demo's train.jsonl / heldout.jsonl (default: data/instructions_demo)")
    p.add_argument("--out-dir", default="data/preferences_demo", help="output folder (default: data/preferences_demo)")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "heldout"):
        source = Path(args.instructions) / f"{split}.jsonl"
        if not source.is_file():
            print(f"make_demo_preferences.py: error: {source} not found; run python "
                  f"tools/datasets/make_demo_instructions.py first", file=sys.stderr)
            return 2
        conversations = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        records = preference_records(conversations)
        with (out / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        print(f"wrote {out / f'{split}.jsonl'} ({len(records)} pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
