"""Fused RoPE / LayerNorm / RMSNorm kernels against the eager PyTorch path and ``torch.compile`` of it.

Each row times one kernel, one implementation, one shape: forward (``fwd``) or forward+backward (``fwd+bwd``), the
median of ``--repeats`` runs after warm-up (CUDA events on GPU). ``gb_per_s`` divides the minimal memory traffic of
the operation (each input read once, each output written once; see ``traffic_bytes``) by the time, and
``fraction_of_peak`` divides that by the device's peak memory bandwidth (``--peak-gb-s``, or a table of known GPUs).
``speedup_vs_eager`` is eager time / this time for the same kernel, shape and pass, measured in the same run.

Kernels: ``rope`` (q and k of a fused QKV projection, the model's [B, H, S, D] views), ``layernorm`` and ``rmsnorm``
(plain) and ``add_layernorm`` / ``add_rmsnorm`` (residual add + norm, returning both). Implementations: ``fused``
(the ``megatron::`` custom ops; without the compiled extension they run their PyTorch references and the row says
``fused-reference``), ``eager`` (the model's unfused code), ``compile`` (``torch.compile`` of eager).
Default shapes are Pythia-1.4B's (hidden 2048, 16 heads of 128, rotary_pct 0.25) at 2048 and 8192 tokens, bf16.
Targets on an H100/H200-class GPU: fused RoPE >= 3x eager and >= 70% of peak bandwidth; residual+norm >= 1.5x.

Example: ``python benchmarks/fused_kernels.py --json results/fused_kernels.json`` (GPU);
``python benchmarks/fused_kernels.py --device cpu --dtype float32 --seq-lens 128 --impls fused eager`` (CPU rows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron.kernels import fused_add_norm, fused_norm, fused_rope, kernel_status  # noqa: E402
from megatron.model.positional import apply_rotary, rotary_cos_sin  # noqa: E402

KERNELS = ("rope", "layernorm", "rmsnorm", "add_layernorm", "add_rmsnorm")
IMPLS = ("fused", "eager", "compile")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PEAK_GB_S = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H100": 3350.0,
             "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100": 1555.0, "L40S": 864.0, "L4": 300.0,
             "B200": 8000.0}
FIELDS = ("kernel", "impl", "shape", "dtype", "pass", "ms", "gb_per_s", "fraction_of_peak", "speedup_vs_eager")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="torch device (default cuda; cpu gives the reference rows)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="tensor dtype (default bfloat16)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192], help="tokens per row (default 2048 8192)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size (default 2048, Pythia-1.4B)")
    p.add_argument("--heads", type=int, default=16, help="attention heads (default 16; head dim = hidden / heads)")
    p.add_argument("--rotary-pct", type=float, default=0.25, help="fraction of each head rotated (default 0.25)")
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS, help="kernels to time (all)")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS,
                   help="implementations (all; eager is always timed as the baseline)")
    p.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"],
                   help="forward only and/or forward+backward (both)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per row; the median is reported (20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs before timing (5; compile warms up here)")
    p.add_argument("--peak-gb-s", type=float, default=None,
                   help="peak memory bandwidth in GB/s for fraction_of_peak (default: known GPUs by name)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    if min(args.seq_lens) < 1 or args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--seq-lens, --batch and --repeats must be >= 1 and --warmup >= 0")
    rot = int(args.hidden // args.heads * args.rotary_pct)
    if rot < 2 or rot % 2:
        p.error(f"--rotary-pct {args.rotary_pct} gives {rot} rotary dims per head: expected an even number >= 2")
    args.impls = ["eager", *[i for i in dict.fromkeys(args.impls) if i != "eager"]]  # baseline first
    return args


def peak_bandwidth(device: torch.device, given: Optional[float]) -> Optional[float]:
    """GB/s: ``--peak-gb-s``, else the first name in :data:`PEAK_GB_S` contained in the CUDA device name."""
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((gb for key, gb in PEAK_GB_S.items() if key in name), None)


def traffic_bytes(kernel: str, pass_: str, tokens: int, hidden: int, heads: int, rot: int, elem: int) -> int:
    """Minimal bytes moved: rope reads q, k (+ the cos/sin rows) and writes q, k; norms read x (and the residual)
    and write y (and h); backward reads the output gradients and the saved input and writes the input gradients."""
    n = tokens * hidden
    if kernel == "rope":
        fwd = (2 * 2 * n + 2 * tokens * rot) * elem
        return fwd if pass_ == "fwd" else 2 * fwd
    add = kernel.startswith("add_")
    fwd = (4 if add else 2) * n * elem
    bwd = (4 if add else 3) * n * elem  # grad_y (+ grad_h), saved input -> grad_x
    return fwd if pass_ == "fwd" else fwd + bwd


def make_case(kernel: str, impl: str, args: argparse.Namespace, seq: int, device: torch.device,
              dtype: torch.dtype) -> tuple[Callable[[], tuple], list[torch.Tensor]]:
    """``(fn, leaves)``: fn() runs the operation once and returns its outputs; leaves get gradients."""
    b, h, hd = args.batch, args.heads, args.hidden // args.heads
    rot = int(hd * args.rotary_pct)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    if kernel == "rope":
        qkv = rand(b, seq, h, 3, hd)
        cos, sin = rotary_cos_sin(torch.arange(seq, device=device).expand(b, seq), rot, 10000.0, dtype)

        def eager() -> tuple:
            q, k = qkv[:, :, :, 0].transpose(1, 2), qkv[:, :, :, 1].transpose(1, 2)
            return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        def fused() -> tuple:
            return fused_rope(qkv[:, :, :, 0].transpose(1, 2), qkv[:, :, :, 1].transpose(1, 2), cos, sin)

        leaves = [qkv]
    else:
        rms, add = "rmsnorm" in kernel, kernel.startswith("add_")
        x, r, w = rand(b, seq, args.hidden), rand(b, seq, args.hidden), rand(args.hidden)
        bias = None if rms else rand(args.hidden)
        leaves = [x, w] + ([r] if add else []) + ([] if bias is None else [bias])

        def norm_eager(t: torch.Tensor) -> torch.Tensor:
            if rms:
                tf = t.float()
                return w * (tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(t.dtype)
            return F.layer_norm(t, (args.hidden,), w, bias, 1e-5)

        def eager() -> tuple:
            if add:
                hsum = x + r
                return norm_eager(hsum), hsum
            return (norm_eager(x),)

        def fused() -> tuple:
            if add:
                return fused_add_norm(x, r, w, bias, 1e-6 if rms else 1e-5, rms)
            return (fused_norm(x, w, bias, 1e-6 if rms else 1e-5, rms),)

    if impl == "eager":
        return eager, leaves
    if impl == "fused":
        return fused, leaves
    return torch.compile(eager), leaves


def time_ms(fn: Callable[[], tuple], leaves: list[torch.Tensor], pass_: str, device: torch.device, warmup: int,
            repeats: int) -> float:
    """Median milliseconds of one forward (under no_grad) or forward+backward."""
    def once() -> None:
        if pass_ == "fwd":
            with torch.no_grad():
                fn()
            return
        outs = fn()
        grads = [torch.ones_like(o) for o in outs]
        torch.autograd.backward(list(outs), grads)
        for t in leaves:
            t.grad = None

    for _ in range(warmup):
        once()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            once()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            once()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(args: argparse.Namespace) -> list[dict]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    peak = peak_bandwidth(device, args.peak_gb_s)
    compiled_kernel = device.type == "cuda" and kernel_status().available
    elem = torch.tensor([], dtype=dtype).element_size()
    hd = args.hidden // args.heads
    rot = int(hd * args.rotary_pct)
    rows: list[dict] = []
    for seq in args.seq_lens:
        tokens = args.batch * seq
        for kernel in args.kernels:
            shape = (f"b{args.batch} s{seq} h{args.heads} d{hd} r{rot}" if kernel == "rope"
                     else f"b{args.batch} s{seq} hidden{args.hidden}")
            for pass_ in args.passes:
                baseline = None
                for impl in args.impls:
                    fn, leaves = make_case(kernel, impl, args, seq, device, dtype)
                    ms = time_ms(fn, leaves, pass_, device, args.warmup, args.repeats)
                    baseline = ms if impl == "eager" else baseline
                    gb = traffic_bytes(kernel, pass_, tokens, args.hidden, args.heads, rot, elem) / ms / 1e6
                    label = impl if impl != "fused" or compiled_kernel else "fused-reference"
                    rows.append(dict(kernel=kernel, impl=label, shape=shape, dtype=args.dtype, **{"pass": pass_},
                                     ms=round(ms, 4), gb_per_s=round(gb, 2),
                                     fraction_of_peak=None if peak is None else round(gb / peak, 4),
                                     speedup_vs_eager=round(baseline / ms, 3)))
    return rows


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    widths = {f: max(len(f), *(len(str(r[f])) for r in rows)) for f in FIELDS}
    print("  ".join(f.ljust(widths[f]) for f in FIELDS))
    for r in rows:
        print("  ".join(str(r[f]).ljust(widths[f]) for f in FIELDS))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available (use --device cpu for the reference rows)",
              file=sys.stderr)
        return 2
    status = kernel_status()
    rows = run(args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = (f"fused kernels on {name} ({args.dtype}); compiled kernels: "
              f"{'yes' if status.available else 'no'} ({status.reason}); peak GB/s: "
              f"{peak_bandwidth(device, args.peak_gb_s)}")
    print_table(rows, header)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"device": name, "kernel_status": status.reason, "torch": torch.__version__, "rows": rows}
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
