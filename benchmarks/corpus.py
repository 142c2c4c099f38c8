"""Where the benchmarks read text and which tokenizer they use.

Benchmarks prefer the 75 PG-19 test books of the shared folder beside the checkout (dev machines and CI have it)
and fall back to the five books bundled with the package, so every benchmark also runs from a bare clone; the
tokenizer is always the bundled GPT-NeoX-20B one.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron.data.corpus_registry import SHIPPED_DIR  # noqa: E402
from megatron.tokenizer import BUNDLED_NEOX_TOKENIZER  # noqa: E402

SHARED_PG19 = REPO.parent / "shared" / "data" / "pg19" / "test"
BUNDLED_PG19 = SHIPPED_DIR / "pg19_sample"
TOKENIZER = BUNDLED_NEOX_TOKENIZER


def pg19_dir(explicit: Optional[Path | str] = None) -> Path:
    """``explicit`` if given, else the shared 75-book folder when present, else the bundled sample."""
    if explicit is not None:
        return Path(explicit)
    return SHARED_PG19 if any(SHARED_PG19.glob("*.txt")) else BUNDLED_PG19


def pg19_books(explicit: Optional[Path | str] = None) -> list[Path]:
    """The ``*.txt`` books of :func:`pg19_dir`, sorted; exits with one line when there are none."""
    folder = pg19_dir(explicit)
    books = sorted(folder.glob("*.txt"))
    if not books:
        raise SystemExit(f"error: no PG-19 books (*.txt) under {folder}")
    return books
