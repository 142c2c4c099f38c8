"""Throughput and step memory of our training step against plain PyTorch loops, all measured in the same run.

* ``hf_eager``    -- the loop a user writes: Hugging Face ``GPTNeoXForCausalLM`` of the same shape (rotary 0.25,
  parallel residual, untied head, SDPA attention), ``F.cross_entropy`` on its fp32 logits, ``torch.optim.AdamW``,
  ``clip_grad_norm_``, batches already in memory (full attention only: HF has no SepLLM);
* ``hf_compiled`` -- the same loop with ``torch.compile(model)``;
* ``minimal``     -- our ``GPTModel`` (same initial weights as ``ours``) in that plain loop with our AdamW;
* ``ours``        -- what ``train.py`` runs per iteration: DeepSpeed engine (ZeRO-0, gradient clipping) around
  ``GPTModel`` and client AdamW, the LR schedule, our resumable data loader over a tokenized ``.bin/.idx`` corpus,
  batch building, ``lm_loss``, grad-norm accounting;
* ``ours_compiled`` -- ``ours`` with ``compile: true`` (per-block ``torch.compile`` + the compiled loss);
* ``ours_compiled_fused`` -- ``ours_compiled`` with ``fused_cross_entropy: true`` (no ``[B, S, V]`` logits);
* opt-in: ``ours_ac_full`` / ``ours_ac_op`` / ``ours_ac_every2`` -- ``ours`` with activation checkpointing, full or
  torchtitan's selective modes (``selective_ac_option`` op / 2), for the memory each saves.

The methods run interleaved (one round of each, order reversed every other round) so machine noise hits all alike.
``tokens_per_sec`` is the median round; ``ratio_vs_X`` the median over rounds of this method's / method X's tokens/s.
``step_mem_mib`` is the memory a training step adds on top of what is resident before it (weights, optimizer state):
on CPU the peak RSS sampled every millisecond during the method's steps minus the RSS before them; on CUDA
``max_memory_allocated`` minus ``memory_allocated`` before. Compile time (first steps) is excluded by ``--warmup``.
``mfu`` is model FLOPs/s over a CPU fp32 matmul rate measured in the same run (on CUDA: the GPU's datasheet peak).

Example: ``python benchmarks/train_step.py --layers 4 --hidden 256 --seq 1024 --micro 4 --steps 3 --rounds 3
--json train_step.json``
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

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
    p.add_argument("--methods", nargs="+", choices=METHODS + tuple(AC_METHODS), default=list(METHODS),
                   help="which loops to measure (hf_* only with --attention full; ratios need their baseline)")
    p.add_argument("--sep-impl", default="dense", choices=["dense", "compact", "flex", "flex_compact", "auto"],
                   help="sep_attention_impl with --attention sepllm")
    p.add_argument("--fused-chunk", type=int, default=1024, help="fused_cross_entropy_chunk of ours_compiled_fused")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the rows (method, tokens_per_sec, ratio_vs_*, step_mem_mib, mfu) as a JSON list")
    args = p.parse_args(argv)
    if args.attention != "full":
        args.methods = [m for m in args.methods if not m.startswith("hf_")]
    return args


METHODS = ("hf_eager", "hf_compiled", "minimal", "ours", "ours_compiled", "ours_compiled_fused")
#: opt-in rows (``--methods``): ours with activation checkpointing, full and torchtitan's selective modes
AC_METHODS = {"ours_ac_full": ("full", "op"), "ours_ac_op": ("selective", "op"), "ours_ac_every2": ("selective", "2")}


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
                     "USE_SEP_ATTN_KERNEL_ACCELERATOR": args.sep_impl != "dense",
                     "sep_attention_impl": args.sep_impl})
    return load_config(keys)


class StepMemory:
    """Peak memory a method's steps add on top of what is resident before them (see the module docstring)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self, base: int) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss() - base)

    def measure(self, fn: Callable[[], None]) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated() - base)
            return
        self._stop.clear()
        sampler = threading.Thread(target=self._sample, args=(self._rss(),), daemon=True)
        sampler.start()
        try:
            fn()
        finally:
            self._stop.set()
            sampler.join()


def build_hf_model(args: argparse.Namespace, vocab: int) -> torch.nn.Module:
    """``GPTNeoXForCausalLM`` of the benchmark's shape (what a user would instantiate)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hf_cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=args.heads, intermediate_size=4 * args.hidden, rotary_pct=0.25,
                           max_position_embeddings=args.seq, use_parallel_residual=True, tie_word_embeddings=False,
                           hidden_dropout=0.0, attention_dropout=0.0, use_cache=False)
    hf_cfg._attn_implementation = "sdpa"
    return GPTNeoXForCausalLM(hf_cfg).to(args.device).train()


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from megatron.config.derived import padded_vocab_size
    from megatron.data.corpus_registry import fetch_corpus
    from megatron.data.preprocess import tokenize_to_indexed
    from megatron.model.compile import BlockCompiler
    from megatron.model.fused_loss import FusedLMLoss
    from megatron.model.gpt import GPTModel
    from megatron.model.loss import lm_loss
    from megatron.training.batches import BatchRules, make_batch
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
    vocab = cfg.model.padded_vocab_size = padded_vocab_size(tokenizer.vocab_size, 128, 1)
    info = init_distributed(args.device)
    quiet_deepspeed_logs()
    set_seed(1234)
    total_steps = args.warmup + args.steps * args.rounds
    datasets = build_datasets(cfg, args.micro, len(args.methods) * (total_steps + 1))
    reference = GPTModel(cfg.model, cfg.sepllm)   # every GPTModel method starts from these weights
    ds_config = cfg.deepspeed_config(info.world_size, client_optimizer=True)
    ds_config["gradient_clipping"] = 0.0  # as in the trainer for ZeRO-0 fp32: train_step clips with the norm
    preloaded = [make_batch({"text": torch.stack([torch.as_tensor(datasets.train[j]["text"])
                                                  for j in range(i * args.micro, (i + 1) * args.micro)])},
                            BatchRules(tokenizer.eod), args.device) for i in range(total_steps)]

    def ours(compiled: bool, fused: bool, ac: tuple[str, str] | None = None) -> Callable[[], None]:
        model = copy.deepcopy(reference)
        if ac is not None:
            model.cfg.checkpoint_activations = True
            model.cfg.activation_checkpoint_mode, model.cfg.selective_ac_option = ac
        if compiled:
            BlockCompiler(model)
        engine = build_engine(model, build_optimizer(model, cfg.optimizer, device_type=args.device), ds_config,
                              args.device)
        loss_fn = FusedLMLoss(args.fused_chunk) if fused else torch.compile(lm_loss) if compiled else lm_loss
        scheduler = AnnealingLR(max_lr=1e-3, warmup_iters=1, lr_decay_iters=10 ** 6, decay_style="cosine",
                                min_lr=1e-4)
        loader = build_loader(datasets.train, 0, args.micro, 0, 1, num_workers=args.num_workers,
                              pin_memory=args.device == "cuda")
        batches = (make_batch(sample, BatchRules(tokenizer.eod), args.device) for sample in loader)
        iteration = [0]

        def step() -> None:
            iteration[0] += 1
            scheduler.step(iteration[0], engine.optimizer.param_groups)
            loss, _ = train_step(engine, batches, 1, own_grad_norm=True, clip=1.0, loss_fn=loss_fn)
            float(loss)  # the loop reads the loss every iteration
        return step

    def plain_loop(model: torch.nn.Module, opt: torch.optim.Optimizer,
                   logits_of: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        batches = iter(preloaded)

        def step() -> None:
            batch = next(batches)
            logits = logits_of(batch.tokens)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            float(loss.detach())
        return step

    def hf(compiled: bool) -> Callable[[], None]:
        torch.manual_seed(1234)
        model = build_hf_model(args, vocab)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        run = torch.compile(model) if compiled else model
        return plain_loop(model, opt, lambda ids: run(input_ids=ids).logits)

    def minimal() -> Callable[[], None]:
        model = copy.deepcopy(reference).to(args.device)
        opt = build_optimizer(model, cfg.optimizer, device_type=args.device)  # the very same optimizer as ours
        return plain_loop(model, opt, model)

    builders = {"hf_eager": lambda: hf(False), "hf_compiled": lambda: hf(True), "minimal": minimal,
                "ours": lambda: ours(False, False), "ours_compiled": lambda: ours(True, False),
                "ours_compiled_fused": lambda: ours(True, True)}
    builders.update({m: functools.partial(ours, False, False, ac) for m, ac in AC_METHODS.items()})
    steps = {m: builders[m]() for m in args.methods}

    def timed(step: Callable[[], None], n: int) -> float:
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    warm = {m: timed(steps[m], args.warmup) for m in args.methods}   # compiles happen here
    memory = {m: StepMemory(args.device) for m in args.methods}
    rates: dict[str, list[float]] = {m: [] for m in args.methods}
    tokens = args.steps * args.micro * args.seq
    for r in tqdm(range(args.rounds), desc="rounds", disable=not sys.stderr.isatty()):
        order = args.methods if r % 2 == 0 else args.methods[::-1]  # ABBA: drift hits all alike
        for method in order:
            seconds = []
            memory[method].measure(lambda: seconds.append(timed(steps[method], args.steps)))
            rates[method].append(tokens / seconds[0])
    peak, peak_source = default_peak_flops(args.device)
    if peak is None and args.device == "cpu":   # ratios within this run: the matmul rate measured here
        peak, peak_source = measure_matmul_peak("cpu"), "measured CPU fp32 matmul, this run"
    fpt = flops_per_token(cfg.model, args.seq, vocab)
    baselines = [b for b in ("minimal", "hf_eager", "hf_compiled", "ours") if b in rates]
    rows = []
    for method in args.methods:
        tps = statistics.median(rates[method])
        # the median of per-round ratios: each round times the methods back to back, so slow drifts of the
        # machine's load cancel out of the ratio even when they move the absolute rates
        row = {"method": method, "tokens_per_sec": tps, "step_mem_mib": memory[method].peak / 2 ** 20,
               "warmup_s": warm[method], "mfu": mfu(tps, fpt, peak), "rounds_tokens_per_sec": rates[method]}
        for b in baselines:
            row[f"ratio_vs_{b}"] = statistics.median(a / c for a, c in zip(rates[method], rates[b]))
        if "ours" in rates:
            row["mem_vs_ours"] = memory[method].peak / max(memory["ours"].peak, 1)
        rows.append(row)

    n_params = sum(p.numel() for p in reference.parameters())
    print(f"model {n_params / 1e6:.2f} M params, {args.layers} layers, hidden {args.hidden}, seq {args.seq}, "
          f"micro {args.micro}, vocab {vocab}, attention {args.attention}, device {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"MFU peak: {peak / 1e9:.1f} GFLOP/s ({peak_source}); {fpt / 1e6:.1f} MFLOPs/token")
    columns = [("method", "method".ljust(19), "<"), ("tokens_per_sec", "tokens/s", ">.1f")]
    columns += [(f"ratio_vs_{b}", f"ratio_vs_{b}", ">.3f") for b in baselines]
    columns += [("step_mem_mib", "step MiB", ">.0f"), ("mem_vs_ours", "mem vs ours", ">.2f"),
                ("warmup_s", "warmup s", ">.1f"), ("mfu_pct", "mfu %", ">.1f")]
    print_table([dict(r, mfu_pct=None if r["mfu"] is None else r["mfu"] * 100) for r in rows], columns)
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
