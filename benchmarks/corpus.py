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


def tokenized_slice(workdir: Path, chars: int = 400_000, parts: int = 20) -> str:
    """The first ``chars`` characters of the first book, split into ``parts`` documents and tokenized once per
    ``workdir`` with the bundled tokenizer; returns the data prefix the training benchmarks read."""
    from megatron.data.preprocess import tokenize_to_indexed

    prefix = workdir / "corpus" / "pg19"
    if Path(str(prefix) + "_text_document.bin").is_file():
        return str(prefix) + "_text_document"
    docs = workdir / "corpus" / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    text = pg19_books()[0].read_text(encoding="utf-8")[:chars]
    step = len(text) // parts
    for i in range(parts):
        (docs / f"part{i}.txt").write_text(text[i * step:(i + 1) * step], encoding="utf-8")
    tokenize_to_indexed(str(docs), str(prefix), tokenizer_type="HFTokenizer", vocab_file=str(TOKENIZER),
                        progress=False)
    return str(prefix) + "_text_document"


def training_config(layers: int, hidden: int, heads: int, seq: int, iters: int, micro: int, data_prefix: str,
                    run_dir: Path):
    """The resolved-config skeleton the training benchmarks share: a rotary full-attention model, Adam at a constant
    rate, fp32 on the CPU, no evaluation, a console line every iteration (what they time). Callers set the rest."""
    from megatron.config import NeoXConfig

    cfg = NeoXConfig()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads = layers, hidden, heads
    m.seq_length = m.max_position_embeddings = seq
    m.pos_emb, m.rotary_pct, m.no_weight_tying = "rotary", 0.25, True
    cfg.sepllm.USE_ORIGINAL_FULL_ATTEN, cfg.sepllm.mode = True, "full"
    cfg.optimizer.type, cfg.optimizer.lr = "Adam", 1e-3
    cfg.lr_schedule.lr_decay_style, cfg.lr_schedule.warmup_iters = "constant", 0
    cfg.data.data_path, cfg.data.split, cfg.data.num_workers = data_prefix, "100,0,0", 0
    cfg.data.data_cache_dir = str(run_dir.parent / "index_cache")
    cfg.tokenizer.tokenizer_type, cfg.tokenizer.vocab_file = "HFTokenizer", str(TOKENIZER)
    t = cfg.training
    t.train_iters, t.train_micro_batch_size_per_gpu, t.gradient_accumulation_steps = iters, micro, 1
    t.train_batch_size = micro
    t.batch_inputs = ["train_micro_batch_size_per_gpu", "gradient_accumulation_steps"]
    t.gradient_clipping, t.seed, t.eval_interval, t.eval_iters, t.do_test = 1.0, 1234, 0, 0, False
    t.device, t.precision = "cpu", "fp32"
    cfg.logging.log_interval, cfg.logging.log_dir, cfg.logging.peak_flops = 1, str(run_dir / "logs"), 1e11
    return cfg

