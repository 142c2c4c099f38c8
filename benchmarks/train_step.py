"""Throughput of our full training step against a minimal hand-written PyTorch loop, measured in the same run.

* ``ours``    -- what ``train.py`` runs per iteration: DeepSpeed engine (ZeRO-0, gradient clipping) around our
  ``GPTModel`` and client AdamW, the LR schedule, our resumable data loader over a tokenized ``.bin/.idx`` corpus,
  batch building, ``lm_loss``, grad-norm accounting;
* ``minimal`` -- the same model (same initial weights), the same optimizer (fused AdamW, same parameter groups),
  the same micro-batches,
  ``loss.backward(); clip_grad_norm_; opt.step(); opt.zero_grad()`` over batches already in memory.

The two run interleaved (one round of each, order alternating) so machine noise hits both alike.
``tokens_per_sec`` is the median round; ``ratio_vs_minimal`` the median over rounds of ours / minimal tokens/s
(1.0 = no framework overhead; target >= 0.9).
``mfu`` is model FLOPs/s over a CPU fp32 matmul rate measured in the same run (on CUDA: the GPU's datasheet peak).

Example: ``python benchmarks/train_step.py --steps 10 --rounds 5 --json train_step.json``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron.tokenizer import BUNDLED_NEOX_TOKENIZER  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))   # benchmarks/report.py
from report import add_model_size_args, print_table, write_json  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_size_args(p, layers=4, hidden=128, heads=4)
    p.add_argument("--seq", type=int, default=128, help="sequence length (tokens per sample)")
    p.add_argument("--micro", type=int, default=4, help="micro-batch size (one micro-batch per step)")
    p.add_argument("--attention", choices=["full", "sepllm"], default="full",
                   help="full causal attention, or SepLLM (dense mask path, window seq/4)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and method")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method before the first round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median round is reported")
    p.add_argument("--tokenizer", default=str(BUNDLED_NEOX_TOKENIZER),
                   help="GPT-NeoX-20B tokenizer.json used to tokenize the bundled PG-19 sample")
    p.add_argument("--num-workers", type=int, default=0,
                   help="data-loader worker processes for ours (0 = load in the training process: on a 2-core "
                        "machine a worker process competes with the step for the cores)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the rows (method, tokens_per_sec, ratio_vs_minimal, mfu) as a JSON list")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, data_prefix: str, work: Path):
    from megatron.config import load_config

    keys = {
        "num-layers": args.layers, "hidden-size": args.hidden, "num-attention-heads": args.heads,
        "seq-length": args.seq, "max-position-embeddings": args.seq, "pos-emb": "rotary", "rotary-pct": 0.25,
        "gpt-j-residual": True, "no-weight-tying": True,
        "optimizer": {"type": "Adam", "params": {"lr": 1.0e-3, "betas": [0.9, 0.95], "eps": 1.0e-8}},
        "weight-decay": 0.1, "lr-decay-style": "cosine", "warmup": 0.01, "min_lr": 1.0e-4,
        "train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1,
        "train-iters": 100_000, "gradient_clipping": 1.0, "precision": "fp32", "device": args.device,
        "data-path": data_prefix, "split": "100,0,0", "num_workers": args.num_workers, "data_cache_dir": str(work / "idx"),
        "tokenizer-type": "HFTokenizer", "vocab-file": args.tokenizer, "eval-iters": 0, "do_test": False,
        "steps_per_print": 10 ** 9,
    }
    if args.attention == "full":
        keys["USE_ORIGINAL_FULL_ATTEN"] = True
    else:
        keys.update({"separator_token_ids": [15, 13, 32, 2, 28, 27, 209, 186, 187], "init_tok_max_idx": 2,
                     "prefill_local_window_size": max(args.seq // 4, 1),
                     "generate_local_window_size": max(args.seq // 4, 1),
                     "USE_SEP_ATTN_KERNEL_ACCELERATOR": False})
    return load_config(keys)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from megatron.config.derived import padded_vocab_size
    from megatron.data.corpus_registry import fetch_corpus
    from megatron.data.preprocess import tokenize_to_indexed
    from megatron.model.gpt import GPTModel
    from megatron.model.loss import lm_loss
    from megatron.training.batches import make_batch
    from megatron.training.data_setup import build_datasets, build_loader
    from megatron.training.distributed import init_distributed, set_seed
    from megatron.training.engine import build_engine, quiet_deepspeed_logs
    from megatron.training.flops import default_peak_flops, flops_per_token, measure_matmul_peak, mfu
    from megatron.training.steppers import train_step
    from megatron.training.lr_schedules import AnnealingLR
    from megatron.training.optimizer import build_optimizer
    from megatron.tokenizer import build_tokenizer

    work = Path(tempfile.mkdtemp(prefix="train_step_bench_"))
    prefix = str(work / "pg19")
    tokenize_to_indexed(str(fetch_corpus("pg19_sample", work)), prefix, tokenizer_type="HFTokenizer",
                        vocab_file=args.tokenizer, progress=False)
    cfg = build_config(args, prefix + "_text_document", work)
    tokenizer = build_tokenizer("HFTokenizer", args.tokenizer)
    cfg.model.padded_vocab_size = padded_vocab_size(tokenizer.vocab_size, 128, 1)
    info = init_distributed(args.device)
    quiet_deepspeed_logs()
    set_seed(1234)
    total_steps = args.warmup + args.steps * args.rounds

    # ours: the trainer's own pieces
    model = GPTModel(cfg.model, cfg.sepllm)
    minimal_model = copy.deepcopy(model).to(args.device)
    ds_config = cfg.deepspeed_config(info.world_size, client_optimizer=True)
    ds_config["gradient_clipping"] = 0.0  # as in the trainer for ZeRO-0 fp32: train_step clips with the norm
    engine = build_engine(model, build_optimizer(model, cfg.optimizer, device_type=args.device), ds_config,
                          args.device)
    scheduler = AnnealingLR(max_lr=1e-3, warmup_iters=1, lr_decay_iters=10 ** 6, decay_style="cosine", min_lr=1e-4)
    datasets = build_datasets(cfg, args.micro, total_steps + 1)
    loader = build_loader(datasets.train, 0, args.micro, 0, 1, num_workers=args.num_workers,
                          pin_memory=args.device == "cuda")

    def batches():
        for sample in loader:
            yield make_batch(sample, tokenizer.eod, False, args.device)

    ours_batches = batches()
    iteration = [0]

    def ours_step() -> None:
        iteration[0] += 1
        scheduler.step(iteration[0], engine.optimizer.param_groups)
        loss, _ = train_step(engine, ours_batches, 1, own_grad_norm=True, clip=1.0)
        float(loss)  # the loop reads the loss every iteration

    # minimal: same model/optimizer/batch, plain PyTorch, batches pre-loaded
    opt = build_optimizer(minimal_model, cfg.optimizer, device_type=args.device)  # the very same optimizer
    preloaded = [make_batch({"text": torch.stack([torch.as_tensor(datasets.train[j]["text"])
                                                  for j in range(i * args.micro, (i + 1) * args.micro)])},
                            tokenizer.eod, False, args.device) for i in range(total_steps)]
    minimal_iter = iter(preloaded)

    def minimal_step() -> None:
        batch = next(minimal_iter)
        loss = lm_loss(minimal_model(batch.tokens), batch.labels, batch.loss_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(minimal_model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(step, n: int) -> float:
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(ours_step, args.warmup)
    timed(minimal_step, args.warmup)
    rates: dict[str, list[float]] = {"ours": [], "minimal": []}
    tokens = args.steps * args.micro * args.seq
    for r in tqdm(range(args.rounds), desc="rounds", disable=not sys.stderr.isatty()):
        order = ("minimal", "ours") if r % 2 == 0 else ("ours", "minimal")  # ABBA: drift hits both alike
        for method in order:
            rates[method].append(tokens / timed(minimal_step if method == "minimal" else ours_step, args.steps))
    peak, peak_source = default_peak_flops(args.device)
    if peak is None and args.device == "cpu":   # ratios within this run: the matmul rate measured here
        peak, peak_source = measure_matmul_peak("cpu"), "measured CPU fp32 matmul, this run"
    fpt = flops_per_token(cfg.model, args.seq, cfg.model.padded_vocab_size)
    rows = []
    for method in ("minimal", "ours"):
        tps = statistics.median(rates[method])
        # the median of per-round ratios: each round times both methods back to back, so slow drifts of the
        # machine's load cancel out of the ratio even when they move the absolute rates
        ratio = statistics.median(a / b for a, b in zip(rates[method], rates["minimal"]))
        rows.append({"method": method, "tokens_per_sec": tps, "ratio_vs_minimal": ratio,
                     "mfu": mfu(tps, fpt, peak), "rounds_tokens_per_sec": rates[method]})

    n_params = sum(p.numel() for p in minimal_model.parameters())
    print(f"model {n_params / 1e6:.2f} M params, {args.layers} layers, hidden {args.hidden}, seq {args.seq}, "
          f"micro {args.micro}, attention {args.attention}, device {args.device}")
    print(f"MFU peak: {peak / 1e9:.1f} GFLOP/s ({peak_source}); {fpt / 1e6:.1f} MFLOPs/token")
    print_table([dict(r, mfu_pct=None if r["mfu"] is None else r["mfu"] * 100) for r in rows],
                [("method", "method", "<"), ("tokens_per_sec", "tokens/s", ">.1f"),
                 ("ratio_vs_minimal", "ratio_vs_minimal", ">.3f"), ("mfu_pct", "mfu %", ">.1f")])
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
