"""Find or build the compiled fused-kernel extension, never hanging and never ending the process.

Order: the extension ``setup.py`` built (``import megatron_fused_kernels``), else a JIT build of ``csrc/`` with
``torch.utils.cpp_extension.load`` (ninja) into a per-user folder whose name hashes the sources, torch and CUDA
versions and architectures (a stale or ABI-mismatched build is never reused). Concurrent builders (ranks of one
job) serialise on an ``flock``, which the kernel drops when its holder dies, so a killed build cannot leave a lock
that hangs the next start; waiting is bounded by ``MEGATRON_KERNELS_LOCK_TIMEOUT`` seconds (default 600). Any
failure becomes an unavailable :class:`KernelStatus` with a one-line reason (full compiler output in a log file).

Environment: ``MEGATRON_KERNELS_JIT=0`` disables the JIT build; ``TORCH_EXTENSIONS_DIR`` moves the build root;
``TORCH_CUDA_ARCH_LIST`` overrides the architectures.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional

import torch

EXTENSION_NAME = "megatron_fused_kernels"
CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("fused_kernels.cpp", "rope_kernels.cu", "norm_kernels.cu")
HEADERS = ("fused_kernels.h", "float_conversions.cuh")
DEFAULT_LOCK_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class KernelStatus:
    """Whether the compiled kernels can run here; ``reason`` says why not (or where they came from)."""

    available: bool
    reason: str
    module: Optional[ModuleType] = field(default=None, repr=False, compare=False)


def build_root() -> Path:
    """Per-user JIT build root: ``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/sepllm_neox/torch_extensions``, else a
    per-uid folder in the temp dir when the home folder is not writable."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    home = Path.home() / ".cache" / "sepllm_neox" / "torch_extensions"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"sepllm_neox-torch_extensions-{os.getuid()}"


def build_tag(archs: str) -> str:
    """Hash of everything a build depends on: sources, torch and CUDA versions, Python, architectures."""
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update(name.encode())
        digest.update((CSRC_DIR / name).read_bytes())
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{sys.version_info[:2]}|{archs}".encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def build_lock(path: Path, timeout_s: float) -> Iterator[None]:
    """Exclusive ``flock`` on ``path``, polled until ``timeout_s``; raises TimeoutError instead of waiting forever."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"another process has held the kernel build lock {path} for {timeout_s:.0f} s "
                                       f"(raise MEGATRON_KERNELS_LOCK_TIMEOUT or wait for it)") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def jit_build(root: Path, timeout_s: float) -> ModuleType:
    """Compile ``csrc/`` with ninja into ``root/<name>-<tag>`` (or load that build) and import it."""
    from torch.utils import cpp_extension

    from megatron.kernels.arch import arch_list, find_nvcc

    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    missing = [s for s in SOURCES if not (CSRC_DIR / s).is_file()]
    if missing:
        raise RuntimeError(f"kernel sources {missing} not found in {CSRC_DIR} (JIT needs a source checkout)")
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        major, minor = torch.cuda.get_device_capability()
        archs = f"{major}.{minor}"  # this GPU only: the fastest build
    else:
        archs = arch_list(nvcc)
    build_dir = root / f"{EXTENSION_NAME}-{build_tag(archs)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    with build_lock(root / f"{build_dir.name}.flock", timeout_s):
        stale = build_dir / "lock"  # torch's FileBaton file; we hold the flock, so no live process owns it
        if stale.exists():
            stale.unlink()
        previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        try:
            return cpp_extension.load(
                name=EXTENSION_NAME, sources=[str(CSRC_DIR / s) for s in SOURCES], build_directory=str(build_dir),
                extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], extra_include_paths=[str(CSRC_DIR)], verbose=False)
        finally:
            if previous is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = previous


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


@functools.cache
def kernel_status() -> KernelStatus:
    """Probe once per process (importing or building is expensive); later calls return the same answer."""
    if not torch.cuda.is_available():
        return KernelStatus(False, f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda})")
    try:
        module = importlib.import_module(EXTENSION_NAME)
        return KernelStatus(True, f"prebuilt extension {module.__file__}", module)
    except ImportError as exc:  # absent, or built against another torch ("undefined symbol"): rebuild below
        prebuilt = _first_line(exc)
    if os.environ.get("MEGATRON_KERNELS_JIT", "1") == "0":
        return KernelStatus(False, f"prebuilt extension not importable ({prebuilt}) and MEGATRON_KERNELS_JIT=0")
    root = build_root()
    try:
        timeout = float(os.environ.get("MEGATRON_KERNELS_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT_S))
        module = jit_build(root, timeout)
        return KernelStatus(True, f"JIT build {module.__file__}", module)
    except Exception as exc:  # a failed build must never end the run: the PyTorch path takes over
        log = root / f"{EXTENSION_NAME}-build-error.log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(f"{type(exc).__name__}: {exc}\n")
        except OSError:
            log = Path("(log not writable)")
        return KernelStatus(False, f"JIT build failed ({_first_line(exc)}); full output in {log}")


def extension() -> Optional[ModuleType]:
    """The loaded extension module, or None when :func:`kernel_status` says unavailable."""
    return kernel_status().module
