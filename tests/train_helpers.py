"""Shared helpers of the training tests: a tiny tokenized PG-19 corpus and a tiny resolved config."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Any

import torch

from megatron.config import NeoXConfig

REPO = Path(__file__).resolve().parents[1]


def run_training(cfg: NeoXConfig, **kwargs: Any) -> int:
    """``train.py``'s ``run_training`` (exit codes, interrupt lines, plot), loaded without running its main block."""
    return runpy.run_path(str(REPO / "train.py"), run_name="train_script")["run_training"](cfg, **kwargs)


def make_tiny_corpus(out_dir: Path, book: Path, tokenizer_file: Path, chars: int = 60_000) -> str:
    """Tokenize the first ``chars`` characters of one book (split into a few documents); returns the prefix."""
    from megatron.data.preprocess import tokenize_to_indexed

    prefix = out_dir / "tiny"
    doc = out_dir / "docs"
    doc.mkdir(parents=True, exist_ok=True)
    text = book.read_text(encoding="utf-8")[:chars]
    step = max(len(text) // 10, 1)
    for i in range(10):
        (doc / f"part{i}.txt").write_text(text[i * step:(i + 1) * step], encoding="utf-8")
    tokenize_to_indexed(str(doc), str(prefix), tokenizer_type="HFTokenizer", vocab_file=str(tokenizer_file),
                        progress=False)
    return str(prefix) + "_text_document"


def tiny_config(data_prefix: str, tokenizer_file: Path, run_dir: Path, *, train_iters: int = 6, micro: int = 2,
                gas: int = 1, seq: int = 32, **overrides) -> NeoXConfig:
    """A 2-layer, hidden-64 GPT-NeoX-shaped model on CPU in fp32, logging every iteration."""
    cfg = NeoXConfig()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 2, 64, 4, seq
    m.max_position_embeddings = seq
    m.pos_emb, m.rotary_pct, m.gpt_j_residual, m.no_weight_tying = "rotary", 0.25, True, True
    cfg.sepllm.USE_ORIGINAL_FULL_ATTEN = True
    cfg.sepllm.mode = "full"
    cfg.optimizer.type, cfg.optimizer.lr, cfg.optimizer.betas = "Adam", 3e-3, [0.9, 0.95]
    cfg.optimizer.weight_decay = 0.1
    cfg.lr_schedule.lr_decay_style, cfg.lr_schedule.warmup, cfg.lr_schedule.min_lr = "cosine", 0.1, 3e-4
    cfg.lr_schedule.lr_decay_iters = train_iters
    cfg.lr_schedule.warmup_iters = max(1, int(0.1 * train_iters))
    cfg.data.data_path, cfg.data.split, cfg.data.num_workers = data_prefix, "80,10,10", 0
    cfg.data.data_cache_dir = str(run_dir / "index_cache")
    cfg.tokenizer.tokenizer_type, cfg.tokenizer.vocab_file = "HFTokenizer", str(tokenizer_file)
    t = cfg.training
    t.train_iters, t.train_micro_batch_size_per_gpu, t.gradient_accumulation_steps = train_iters, micro, gas
    t.train_batch_size = micro * gas
    t.batch_inputs = ["train_micro_batch_size_per_gpu", "gradient_accumulation_steps"]
    t.gradient_clipping, t.seed, t.eval_interval, t.eval_iters, t.do_test = 1.0, 1234, 1000, 2, False
    t.device, t.precision = "cpu", "fp32"
    cfg.logging.log_interval, cfg.logging.log_dir = 1, str(run_dir / "logs")
    cfg.logging.peak_flops = 1e11
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


def tiny_sepllm_keys(data_prefix: str, tokenizer_file: Path, run_dir: Path, **extra) -> dict:
    """GPT-NeoX-style keys (as a user writes them) for a tiny SepLLM run; pass to ``load_config``."""
    keys = {
        "num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "seq-length": 32,
        "max-position-embeddings": 32, "pos-emb": "rotary", "rotary-pct": 0.25, "gpt-j-residual": True,
        "no-weight-tying": True, "separator_token_ids": [15, 13, 32, 2, 28, 27, 209, 186, 187],
        "prefill_local_window_size": 8, "generate_local_window_size": 8, "init_tok_max_idx": 2,
        "USE_SEP_ATTN_KERNEL_ACCELERATOR": False,
        "optimizer": {"type": "Adam", "params": {"lr": 0.003, "betas": [0.9, 0.95], "eps": 1.0e-8}},
        "min_lr": 0.0003, "lr-decay-style": "cosine", "warmup": 0.25,
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train-iters": 4,
        "gradient_clipping": 1.0, "precision": "fp32", "device": "cpu",
        "data-path": data_prefix, "split": "80,10,10", "num_workers": 0, "data_cache_dir": str(run_dir / "idx"),
        "tokenizer-type": "HFTokenizer", "vocab-file": str(tokenizer_file),
        "eval-interval": 1000, "eval-iters": 1, "do_test": False, "log-interval": 1,
        "log_dir": str(run_dir / "logs"), "peak_flops": 1.0e11,
    }
    keys.update(extra)
    return keys


def pretrain_with_weights(cfg: NeoXConfig) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``pretrain(cfg)``, the initial and the trained weights (full tensors, gathered from ZeRO-3 shards: collective
    under data parallelism).

    Equal losses alone hide a constant gradient scale (Adam and clipping undo it): parallel-equivalence tests
    compare the weight updates and the logged grad norms too.
    """
    from megatron.training import loop, steppers

    engines: list[Any] = []
    initial: dict[str, torch.Tensor] = {}
    build = steppers.build_engine

    def capture(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        initial.update((n, p.detach().clone()) for n, p in model.named_parameters())
        engines.append(build(model, *args, **kwargs))
        return engines[-1]

    steppers.build_engine = capture
    try:
        result = loop.pretrain(cfg)
    finally:
        steppers.build_engine = build
    (engine,) = engines
    named = list(engine.module.named_parameters())
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return result, initial, {n: p.detach().clone() for n, p in named}
    return result, initial, {n: p.detach().clone() for n, p in named}


def logged_grad_norms(log_dir: Path) -> dict[int, float]:
    """``{iteration: grad_norm}`` of the training rows of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["grad_norm"] for r in rows if "lm_loss" in r}


# Adam's default eps (1e-8) turns an entry whose gradient is rounding noise into a ~lr step of random sign, so
# two equivalent runs end ~1e-3 apart in a few entries. Runs whose weights are compared use this eps: updates
# stay Adam-like for real gradients and noise stays noise-sized. (A gradient scale is still undone by clipping when
# the norm exceeds gradient_clipping: the logged grad norms are what catches it.)
WEIGHT_CHECK_ADAM_EPS = 1e-3


def update_mismatch(initial: dict[str, torch.Tensor], got: dict[str, torch.Tensor],
                    want: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter ``||got - want|| / ||want - initial||``: how far one run's weights are from another's, relative
    to the update the reference made from the common ``initial`` weights (shapes and names must match)."""
    assert sorted(got) == sorted(want) == sorted(initial)
    out = {}
    for name, w0 in initial.items():
        assert got[name].shape == want[name].shape == w0.shape, name
        moved = (want[name].double() - w0.double()).norm()
        assert moved > 0, f"{name} did not move: the comparison would be empty"
        out[name] = float((got[name].double() - want[name].double()).norm() / moved)
    return out
