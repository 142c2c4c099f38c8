"""Which device a command runs on: the one place that probes for CUDA and resolves ``device: auto``.

Sits on the bottom layer so the config loader, the launcher and every tool ask the same question the same way. The
probe avoids importing torch when it is not loaded yet (8 s on a busy CPU box), so ``deepy.py`` and
``python -m megatron.config`` stay fast.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal, MutableMapping, Optional, get_args

from megatron.errors import UserInputError

#: what a config's ``training.device`` may say
Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = get_args(Device)

_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version", "/dev/kfd")


class DeviceConfigError(UserInputError, ValueError):
    """A requested device (or a setting that needs one) is not available here."""


def torch_build_has_gpu(version_py_text: str) -> bool:
    """True when torch/version.py records a CUDA or HIP version (CPU wheels say ``cuda = None``)."""
    return re.search(r"^(?:cuda|hip)\s*(?::[^=\n]*)?=\s*['\"][0-9]", version_py_text, re.M) is not None


def cuda_available() -> bool:
    """Whether this process can use CUDA, without importing torch when it is not loaded yet.

    Uses torch when already imported; otherwise: a GPU build of torch (its version.py names a cuda/hip version), a
    GPU driver node, and CUDA_VISIBLE_DEVICES not hiding every device. The trainer still falls back to gloo when a
    CPU device is finally chosen, so the torch-free answer only has to be right in the common case.
    """
    if "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_available())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        return False
    try:
        version_text = (Path(spec.origin).parent / "version.py").read_text(encoding="utf-8")
    except OSError:
        return False
    return torch_build_has_gpu(version_text) and any(Path(n).exists() for n in _GPU_NODES)


def visible_gpu_count() -> int:
    """CUDA devices this machine shows; 0 without importing torch on CPU-only builds / machines."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "" or not cuda_available():
        return 0
    import torch

    return torch.cuda.device_count()


def resolve_device(requested: Optional[str], key: str = "training.device") -> str:
    """``auto`` -> cuda when available else cpu; ``cuda`` without a GPU, or an unknown name, is an error naming
    ``key``."""
    requested = (requested or "auto").lower()
    if requested not in DEVICES:
        raise DeviceConfigError(f"{key}: expected auto, cpu or cuda, got {requested!r}")
    if requested == "auto":
        return "cuda" if cuda_available() else "cpu"
    if requested == "cuda" and not cuda_available():
        raise DeviceConfigError(f"{key} is 'cuda' but no CUDA device is visible; use device auto or cpu")
    return requested


def quiet_accelerator_probe(environ: Optional[MutableMapping[str, Any]] = None) -> None:
    """Tell DeepSpeed up front that it runs on CPU when no CUDA device is visible.

    On import DeepSpeed probes for an accelerator and, finding none, warns "Setting accelerator to CPU" in every
    process of every command. ``DS_ACCELERATOR=cpu`` is DeepSpeed's own switch for that choice, so it picks the CPU
    without the warning; the variable reaches the launcher and its workers. A ``DS_ACCELERATOR`` already set is kept,
    and with a visible GPU nothing changes."""
    env = os.environ if environ is None else environ
    if "DS_ACCELERATOR" in env:
        return
    import torch

    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"


__all__ = ["DEVICES", "Device", "DeviceConfigError", "cuda_available", "quiet_accelerator_probe", "resolve_device",
           "torch_build_has_gpu", "visible_gpu_count"]
