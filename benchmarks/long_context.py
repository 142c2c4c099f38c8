#!/usr/bin/env python
"""Long-context training throughput: SepLLM vs full attention vs StreamingLLM through the real training step.

The same small GPT-NeoX model (default 4 layers, hidden 256, 4 heads, the GPT-NeoX-20B vocabulary, same initial
weights) is trained on the shipped PG-19 books with the trainer's own pieces (DeepSpeed engine, client AdamW, LR
schedule, resumable loader, ``megatron.training.steppers.train_step``), once per attention kind:

* ``full``         -- plain causal SDPA (``USE_ORIGINAL_FULL_ATTEN``), the baseline;
* ``sepllm``       -- SepLLM, ``sep_attention_impl: auto`` (a initial + separators + w-token window);
* ``streamingllm`` -- StreamingLLM (a initial + w-token window).

Kinds take turns inside every round (order rotating) so machine noise hits all alike. After each kind's timed steps
one extra *instrumented* step wraps the model's attention backend: it times ``prepare`` (mask planning, gathers,
retention statistics) and every attention call forward and backward. That gives, per row:

* ``tokens_per_sec``        median over rounds of the timed (uninstrumented) steps;
* ``ratio_vs_full``         median over rounds of this kind's tokens/s over full attention's tokens/s;
* ``attention_share_full``  fraction of full attention's step spent inside attention (fwd+bwd, all layers);
* ``attention_ratio``       this kind's attention time / full attention's attention time (same rounds);
* ``ideal_ratio_vs_full``   ``1 / (1 - share * (1 - attention_ratio))``: the speed-up if nothing but attention
  changed; ``fraction_of_ideal`` = ratio_vs_full / ideal_ratio_vs_full;
* ``step_ms``, ``attention_ms``, ``plan_ms``, ``other_ms`` (step - attention - plan) and ``other_ratio_vs_full``:
  where the time goes, and whether anything outside attention eats the gain (``other_ratio_vs_full`` ~ 1).

``--budget-minutes M`` instead trains each kind for M minutes of its own step time (kinds interleaved one step at a
time), evaluates validation loss at ``--budget-points`` moments, prints each run's final validation loss and draws
loss-vs-time and loss-vs-FLOPs (``--plot``, PNG). FLOPs count the attention entries each kind really computes
(kept fraction of the causal map from the retention counters; full = causal).

Example: ``python benchmarks/long_context.py --seq-lens 4096 8192 --threads 2 --json long_context.json``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron.config.sepllm_settings import SEP_ATTENTION_IMPLS  # noqa: E402
from megatron.tokenizer import BUNDLED_NEOX_TOKENIZER  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))   # benchmarks/report.py
from report import add_model_size_args  # noqa: E402

KINDS = ("full", "sepllm", "streamingllm")
PYTHIA_SEPS = [15, 13, 32, 2, 28, 27, 209, 186, 187]
ROW_FIELDS = ("attention", "seq", "tokens_per_sec", "ratio_vs_full", "attention_share_full", "attention_ratio",
              "ideal_ratio_vs_full")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384], help="sequence lengths S")
    p.add_argument("--attentions", nargs="+", default=list(KINDS), choices=KINDS,
                   help="attention kinds to train (full is always included: it is the baseline)")
    add_model_size_args(p, layers=4, hidden=256, heads=4)
    p.add_argument("--micro", type=int, default=1, help="micro-batch size (one micro-batch per step)")
    p.add_argument("--window", type=int, default=256, help="local window w of SepLLM and StreamingLLM")
    p.add_argument("--num-initial", type=int, default=3, help="initial tokens a (init_tok_max_idx = a - 1)")
    p.add_argument("--sep-impl", default="auto", choices=SEP_ATTENTION_IMPLS,
                   help="sep_attention_impl of the SepLLM and StreamingLLM runs")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round and kind")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per kind before the first round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians over rounds are reported")
    p.add_argument("--budget-minutes", type=float, default=None, metavar="M",
                   help="instead of throughput rows: train each kind for M minutes of step time and plot "
                        "validation loss against time and FLOPs")
    p.add_argument("--budget-points", type=int, default=6, help="validation evaluations per budget run")
    p.add_argument("--eval-iters", type=int, default=2, help="validation micro-batches per evaluation (budget mode)")
    p.add_argument("--plot", type=Path, default=Path("long_context_budget.png"),
                   help="PNG written by --budget-minutes")
    p.add_argument("--tokenizer", default=str(BUNDLED_NEOX_TOKENIZER), help="GPT-NeoX-20B tokenizer.json")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="training precision (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="also write the rows (throughput) or the curves (budget) as JSON")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ instrumentation
class _Clock:
    """Wall-clock accumulator that waits for the device first (CUDA work is asynchronous)."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.totals = {"plan": 0.0, "attention": 0.0}

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def reset(self) -> None:
        self.totals = {"plan": 0.0, "attention": 0.0}


class _TimedAttention(torch.autograd.Function):
    """Runs one attention call on detached leaves so its forward and its backward can each be timed exactly."""

    @staticmethod
    def forward(ctx, clock: _Clock, fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        t0 = clock.now()
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(x.requires_grad) for x in (q, k, v)]
            out = fn(*leaves)
        clock.totals["attention"] += clock.now() - t0
        ctx.clock, ctx.leaves, ctx.out = clock, leaves, out
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        t0 = ctx.clock.now()
        wanted = [x for x in ctx.leaves if x.requires_grad]
        grads = iter(torch.autograd.grad(ctx.out, wanted, grad))
        result = tuple(next(grads) if x.requires_grad else None for x in ctx.leaves)
        ctx.clock.totals["attention"] += ctx.clock.now() - t0
        ctx.leaves = ctx.out = None
        return (None, None) + result


class TimedBackend:
    """Wraps a model's attention backend; when ``enabled`` it times ``prepare`` and attention fwd+bwd."""

    def __init__(self, inner: Any, clock: _Clock) -> None:
        self.inner = inner
        self.clock = clock
        self.enabled = False

    def __getattr__(self, name: str) -> Any:       # retention, resolve_impl, ... of the wrapped backend
        if name == "inner":                        # not yet set (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def prepare(self, input_ids, position_ids, attention_mask_2d):
        if not self.enabled:
            return self.inner.prepare(input_ids, position_ids, attention_mask_2d)
        t0 = self.clock.now()
        state = self.inner.prepare(input_ids, position_ids, attention_mask_2d)
        self.clock.totals["plan"] += self.clock.now() - t0
        return state

    def __call__(self, q, k, v, layer_idx, state, **kw):
        if not self.enabled:
            return self.inner(q, k, v, layer_idx, state, **kw)
        if not torch.is_grad_enabled():
            t0 = self.clock.now()
            out = self.inner(q, k, v, layer_idx, state, **kw)
            self.clock.totals["attention"] += self.clock.now() - t0
            return out
        return _TimedAttention.apply(self.clock, lambda a, b, c: self.inner(a, b, c, layer_idx, state, **kw), q, k, v)


# ------------------------------------------------------------------------------------------------ runs
def build_config(args: argparse.Namespace, kind: str, seq: int, data_prefix: str, work: Path, budget: bool):
    from megatron.config import load_config

    precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    keys = {
        "num-layers": args.layers, "hidden-size": args.hidden, "num-attention-heads": args.heads,
        "seq-length": seq, "max-position-embeddings": seq, "pos-emb": "rotary", "rotary-pct": 0.25,
        "gpt-j-residual": True, "no-weight-tying": True,
        "optimizer": {"type": "Adam", "params": {"lr": 1.0e-3, "betas": [0.9, 0.95], "eps": 1.0e-8}},
        "weight-decay": 0.1, "lr-decay-style": "cosine", "warmup": 0.01, "min_lr": 1.0e-4,
        "train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1,
        "train-iters": 100_000, "gradient_clipping": 1.0, "precision": precision, "device": args.device,
        "data-path": data_prefix, "split": "80,20,0" if budget else "100,0,0", "num_workers": 0,
        "data_cache_dir": str(work / "idx"), "tokenizer-type": "HFTokenizer", "vocab-file": args.tokenizer,
        "eval-iters": args.eval_iters if budget else 0, "eval-interval": 1 if budget else 1000,
        "do_test": False, "steps_per_print": 10 ** 9,
    }
    if kind == "full":
        keys["USE_ORIGINAL_FULL_ATTEN"] = True
    else:
        keys.update({"init_tok_max_idx": args.num_initial - 1, "prefill_local_window_size": args.window,
                     "generate_local_window_size": args.window, "USE_SEP_ATTN_KERNEL_ACCELERATOR": True,
                     "sep_attention_impl": args.sep_impl})
        if kind == "sepllm":
            keys["separator_token_ids"] = list(PYTHIA_SEPS)
        else:
            keys.update({"separator_token_ids": [-1], "streamingLLM": True})
    return load_config(keys)


class Run:
    """One attention kind at one sequence length: model, engine, data and an instrumented backend."""

    def __init__(self, args: argparse.Namespace, kind: str, seq: int, prefix: str, work: Path, steps_needed: int,
                 budget: bool, tokenizer: Any, info: Any) -> None:
        from megatron.config.derived import padded_vocab_size
        from megatron.model.gpt import GPTModel
        from megatron.training.batches import BatchRules, make_batch
        from megatron.training.data_setup import build_datasets, build_loader
        from megatron.training.distributed import set_seed
        from megatron.training.engine import build_engine
        from megatron.training.lr_schedules import AnnealingLR
        from megatron.training.optimizer import build_optimizer

        self.kind, self.seq, self.args = kind, seq, args
        cfg = build_config(args, kind, seq, prefix, work, budget)
        cfg.model.padded_vocab_size = padded_vocab_size(tokenizer.vocab_size, 128, 1)
        self.cfg, self.info, self.eod = cfg, info, tokenizer.eod
        set_seed(1234)                                     # same initial weights for every kind
        model = GPTModel(cfg.model, cfg.sepllm)
        self.clock = _Clock(args.device)
        self.backend = TimedBackend(model.attention_backend, self.clock)
        model.attention_backend = self.backend
        ds_config = cfg.deepspeed_config(info.world_size, client_optimizer=True)
        # the trainer's rule: ZeRO-0 fp32 measures and clips the norm in train_step, else DeepSpeed clips
        self.own_norm = cfg.training.precision == "fp32"
        if self.own_norm:
            ds_config["gradient_clipping"] = 0.0
        self.engine = build_engine(model, build_optimizer(model, cfg.optimizer, device_type=args.device), ds_config,
                                   args.device)
        self.scheduler = AnnealingLR(max_lr=1e-3, warmup_iters=1, lr_decay_iters=10 ** 6, decay_style="cosine",
                                     min_lr=1e-4)
        self.datasets = build_datasets(cfg, args.micro, steps_needed)
        loader = build_loader(self.datasets.train, 0, args.micro, 0, 1, num_workers=0,
                              pin_memory=args.device == "cuda")
        self._batches = (make_batch(s, BatchRules(tokenizer.eod), args.device) for s in loader)
        self.iteration = 0

    def step(self) -> float:
        from megatron.training.steppers import train_step

        self.iteration += 1
        self.scheduler.step(self.iteration, self.engine.optimizer.param_groups)
        loss, _ = train_step(self.engine, self._batches, 1, own_grad_norm=self.own_norm, clip=1.0)
        return float(loss)                                 # the loop reads the loss every iteration

    def instrumented_step(self) -> dict[str, float]:
        """One step with the backend timed: ``{"step", "attention", "plan"}`` in seconds."""
        self.clock.reset()
        self.backend.enabled = True
        try:
            t0 = self.clock.now()
            self.step()
            total = self.clock.now() - t0
        finally:
            self.backend.enabled = False
        return {"step": total, **self.clock.totals}

    def density(self) -> float:
        """Kept fraction of the causal attention map (1.0 for full attention), from the retention counters."""
        retention = getattr(self.backend.inner, "retention", None)
        return 1.0 if retention is None else retention.as_dict()["attn_map_retention/total"]

    def validate(self) -> Optional[float]:
        from megatron.model.loss import lm_loss
        from megatron.training.batches import BatchRules
        from megatron.training.parallel_setup import ParallelPlan
        from megatron.training.steppers import PlainStepper, evaluate

        stepper = PlainStepper(engine=self.engine, n_params=0, gas=1, own_grad_norm=False, clip=0.0, loss_fn=lm_loss,
                               info=self.info)
        plan = ParallelPlan(tp_size=1, pp_stages=0, sequence_parallel=False, dp_rank=self.info.rank,
                            dp_size=self.info.world_size)
        return evaluate(stepper, self.datasets.valid, self.args.eval_iters, self.args.micro, plan,
                        BatchRules(self.eod), self.args.device)


def ideal_ratio(share: float, attention_ratio: float) -> float:
    """Speed-up of the whole step if only attention changed: ``1 / (1 - share * (1 - attention_ratio))``."""
    return 1.0 / (1.0 - share * (1.0 - attention_ratio))


def effective_flops_per_token(cfg: Any, seq: int, vocab: int, density: float) -> float:
    """Training FLOPs per token counting only the attention entries computed (``density`` of the causal map)."""
    from megatron.training.flops import flops_per_token

    dense = flops_per_token(cfg.model, seq, vocab)
    attention_full = 6 * 2 * cfg.model.num_layers * seq * cfg.model.hidden_size   # the model's non-causal term
    causal_fraction = (seq + 1) / (2 * seq)
    return dense - attention_full + attention_full * causal_fraction * density


def _timed(fn: Callable[[], Any], n: int, clock: _Clock) -> float:
    t0 = clock.now()
    for _ in range(n):
        fn()
    return clock.now() - t0


def throughput_rows(args: argparse.Namespace, seq: int, runs: dict[str, Run]) -> list[dict]:
    """Interleaved rounds at one sequence length -> one row per kind (see module docstring)."""
    from tqdm import tqdm

    kinds = list(runs)
    for run in runs.values():
        for _ in range(args.warmup):
            run.step()
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    parts: dict[str, list[dict]] = {k: [] for k in kinds}
    tokens = args.steps * args.micro * seq
    for r in tqdm(range(args.rounds), desc=f"S={seq}", unit="round", file=sys.stderr):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        for kind in order:
            run = runs[kind]
            rates[kind].append(tokens / _timed(run.step, args.steps, run.clock))
            parts[kind].append(run.instrumented_step())
    share_rounds = [p["attention"] / p["step"] for p in parts["full"]]
    share = statistics.median(share_rounds)
    full_other = statistics.median(p["step"] - p["attention"] - p["plan"] for p in parts["full"])
    rows = []
    for kind in kinds:
        ratio = statistics.median(a / b for a, b in zip(rates[kind], rates["full"]))
        attn_ratio = statistics.median(a["attention"] / b["attention"] for a, b in zip(parts[kind], parts["full"]))
        ideal = ideal_ratio(share, attn_ratio)
        med = {key: statistics.median(p[key] for p in parts[kind]) for key in ("step", "attention", "plan")}
        other = statistics.median(p["step"] - p["attention"] - p["plan"] for p in parts[kind])
        rows.append({"attention": kind, "seq": seq, "tokens_per_sec": statistics.median(rates[kind]),
                     "ratio_vs_full": ratio, "attention_share_full": share, "attention_ratio": attn_ratio,
                     "ideal_ratio_vs_full": ideal, "fraction_of_ideal": ratio / ideal,
                     "step_ms": med["step"] * 1e3, "attention_ms": med["attention"] * 1e3,
                     "plan_ms": med["plan"] * 1e3, "other_ms": other * 1e3, "other_ratio_vs_full": other / full_other,
                     "density": runs[kind].density(), "impl": _impl(runs[kind]),
                     "rounds_tokens_per_sec": rates[kind]})
    return rows


def _impl(run: Run) -> str:
    inner = run.backend.inner
    if not hasattr(inner, "resolve_impl"):
        return "sdpa_causal"
    return inner.resolve_impl(torch.device(run.args.device), run.seq)


def budget_curves(args: argparse.Namespace, seq: int, runs: dict[str, Run]) -> dict[str, dict]:
    """Each kind trains ``--budget-minutes`` of its own step time; kinds step in turn (least time first)."""
    from tqdm import tqdm

    budget_s = args.budget_minutes * 60.0
    marks = [budget_s * (i + 1) / args.budget_points for i in range(args.budget_points)]
    vocab = next(iter(runs.values())).cfg.model.padded_vocab_size
    curves = {k: {"time_s": [0.0], "flops": [0.0], "tokens": [0], "valid_loss": [runs[k].validate()]}
              for k in runs}
    spent = {k: 0.0 for k in runs}
    flops = {k: 0.0 for k in runs}
    next_mark = {k: 0 for k in runs}
    bar = tqdm(total=round(budget_s * len(runs)), desc=f"budget S={seq}", unit="s", file=sys.stderr)
    while True:
        active = [k for k in runs if spent[k] < budget_s]
        if not active:
            break
        kind = min(active, key=lambda k: spent[k])
        run = runs[kind]
        dt = _timed(run.step, 1, run.clock)
        spent[kind] += dt
        flops[kind] += args.micro * seq * effective_flops_per_token(run.cfg, seq, vocab, run.density())
        while next_mark[kind] < len(marks) and spent[kind] >= marks[next_mark[kind]]:
            next_mark[kind] += 1
            c = curves[kind]
            if c["tokens"][-1] == run.iteration * args.micro * seq:
                continue
            c["time_s"].append(spent[kind])
            c["flops"].append(flops[kind])
            c["tokens"].append(run.iteration * args.micro * seq)
            c["valid_loss"].append(run.validate())
        bar.n = round(sum(min(s, budget_s) for s in spent.values()))
        bar.refresh()
    bar.close()
    for kind, c in curves.items():
        c.update(attention=kind, seq=seq, steps=runs[kind].iteration, density=runs[kind].density(),
                 final_valid_loss=c["valid_loss"][-1])
    return curves


def plot_budget(curves: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, c in curves.items():
        ax_t.plot([t / 60 for t in c["time_s"]], c["valid_loss"], marker="o", label=kind)
        ax_f.plot([f / 1e12 for f in c["flops"]], c["valid_loss"], marker="o", label=kind)
    ax_t.set_xlabel("training time (min)")
    ax_f.set_xlabel("training FLOPs (TFLOP, attention entries actually computed)")
    for ax in (ax_t, ax_f):
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def format_table(rows: list[dict]) -> str:
    head = (f"{'attention':<13}{'impl':>8}{'seq':>7}{'tok/s':>9}{'vs_full':>9}{'attn_share':>11}{'attn_ratio':>11}"
            f"{'ideal':>7}{'of_ideal':>9}{'step_ms':>9}{'attn_ms':>9}{'plan_ms':>8}{'other_ms':>9}{'other/full':>11}"
            f"{'density':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['attention']:<13}{r['impl'][:8]:>8}{r['seq']:>7}{r['tokens_per_sec']:>9.1f}"
                     f"{r['ratio_vs_full']:>9.3f}{r['attention_share_full']:>11.3f}{r['attention_ratio']:>11.3f}"
                     f"{r['ideal_ratio_vs_full']:>7.3f}{r['fraction_of_ideal']:>9.3f}{r['step_ms']:>9.0f}"
                     f"{r['attention_ms']:>9.0f}{r['plan_ms']:>8.1f}{r['other_ms']:>9.0f}"
                     f"{r['other_ratio_vs_full']:>11.3f}{r['density']:>8.3f}")
    return "\n".join(lines)


def _check_args(args: argparse.Namespace) -> Optional[str]:
    for name in ("steps", "rounds", "layers", "hidden", "heads", "micro", "window", "budget_points", "eval_iters"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if args.warmup < 0 or args.num_initial < 0:
        return "--warmup and --num-initial must be >= 0"
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        return f"--budget-minutes must be > 0, got {args.budget_minutes}"
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda requested but CUDA is not available"
    if not Path(args.tokenizer).is_file():
        return f"--tokenizer {args.tokenizer}: no such file (expected the GPT-NeoX-20B tokenizer.json)"
    return None


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    problem = _check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from megatron.data.corpus_registry import fetch_corpus
    from megatron.data.preprocess import tokenize_to_indexed
    from megatron.tokenizer import build_tokenizer
    from megatron.training.distributed import init_distributed
    from megatron.training.engine import quiet_deepspeed_logs

    kinds = ["full"] + [k for k in KINDS[1:] if k in args.attentions]
    budget = args.budget_minutes is not None
    work = Path(tempfile.mkdtemp(prefix="long_context_bench_"))
    prefix = str(work / "pg19")
    tokenize_to_indexed(str(fetch_corpus("pg19_sample", work)), prefix, tokenizer_type="HFTokenizer",
                        vocab_file=args.tokenizer, progress=False)
    tokenizer = build_tokenizer("HFTokenizer", args.tokenizer)
    info = init_distributed(args.device)
    quiet_deepspeed_logs()
    steps_needed = 20_000 if budget else args.warmup + args.rounds * (args.steps + 1) + 1
    rows: list[dict] = []
    curves: dict[str, dict] = {}
    for seq in args.seq_lens:
        runs = {k: Run(args, k, seq, prefix + "_text_document", work, steps_needed, budget, tokenizer, info)
                for k in kinds}
        if budget:
            for kind, c in budget_curves(args, seq, runs).items():
                curves[f"{kind}@{seq}"] = c
        else:
            rows.extend(throughput_rows(args, seq, runs))
        del runs
    header = (f"model {args.layers} layers, hidden {args.hidden}, {args.heads} heads, micro {args.micro}, a="
              f"{args.num_initial}, w={args.window}, device {args.device}, torch {torch.__version__}, "
              f"threads {torch.get_num_threads()}")
    print(header)
    if budget:
        for seq in args.seq_lens:
            sub = {k: curves[f"{k}@{seq}"] for k in kinds}
            path = args.plot if len(args.seq_lens) == 1 else args.plot.with_name(f"{args.plot.stem}_S{seq}.png")
            plot_budget(sub, path, f"{header}\nS={seq}, {args.budget_minutes:g} min per kind, PG-19 sample")
            for kind, c in sub.items():
                print(f"S={seq} {kind:<13} steps {c['steps']:>5}  final validation loss {c['final_valid_loss']:.4f}"
                      f"  ({c['flops'][-1] / 1e12:.2f} TFLOP, density {c['density']:.3f})")
            print(f"wrote {path}")
        payload: Any = list(curves.values())
    else:
        print(format_table(rows))
        payload = rows
    if args.json:
        from megatron.atomic_io import atomic_write_text

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
