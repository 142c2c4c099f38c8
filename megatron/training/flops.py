"""Throughput accounting: model FLOPs per token (from the model's helper), MFU, and a measured CPU matmul rate.

MFU needs a peak. On a GPU we know (``KNOWN_GPU_PEAKS``) it is the datasheet's dense 16-bit rate, as in torchtitan;
``logging.peak_flops`` (GPT-NeoX's key, in FLOP/s per device) overrides it. A CPU has no datasheet peak: training
logs no MFU there unless ``peak_flops`` is set. (A matmul rate measured at start-up varied twofold between two runs
of the same speed on a shared machine, so it is no longer used as a peak for training; the benchmarks, which only
compare runs of one process, still measure it with :func:`measure_matmul_peak`.)
"""

from __future__ import annotations

import time

import torch

from megatron.config.model import ModelConfig
from megatron.model.flops import flops_per_token as model_flops_per_token

# Dense bf16/fp16 tensor-core peaks (FLOP/s, no sparsity) for GPUs we recognise by name.
KNOWN_GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "L4": 121e12,
                   "V100": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def flops_per_token(model_cfg: ModelConfig, seq_length: int, vocab_size: int, backward: bool = True) -> float:
    """Training (``backward=True``) FLOPs per token, as the model defines them."""
    return model_flops_per_token(model_cfg, seq_length, vocab_size, backward=backward)


def measure_matmul_peak(device: str = "cpu", dtype: torch.dtype = torch.float32, size: int = 1024,
                        repeats: int = 10) -> float:
    """Best achieved FLOP/s of a square matmul on ``device`` (a practical peak, not a datasheet number).

    The best of ``repeats`` runs is kept because other processes only ever slow a run down; on a busy machine the
    measured peak is still low, and MFU against it high (it can then exceed 100%: set ``peak_flops`` instead).
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up (thread pools, kernels)
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def default_peak_flops(device: str) -> tuple[float | None, str]:
    """Peak per device and where it comes from: a known GPU's datasheet; None (no MFU) for an unknown GPU or a CPU."""
    if device == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in KNOWN_GPU_PEAKS.items():
            if key in name:
                return peak, f"{name} datasheet dense 16-bit"
        return None, f"unknown GPU {name!r}: set peak_flops for MFU"
    return None, "a CPU has no datasheet peak: set peak_flops for MFU"


def mfu(tokens_per_sec: float, flops_per_tok: float, peak_flops: float | None, num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices (None without a peak)."""
    if not peak_flops or peak_flops <= 0:
        return None
    return tokens_per_sec * flops_per_tok / (peak_flops * num_devices)
