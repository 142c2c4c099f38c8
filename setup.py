"""Optional build of the fused CUDA kernels in csrc/ (package metadata lives in pyproject.toml).

``pip install -e .`` on a CPU machine (or wherever torch is CPU-only or not importable) builds nothing and says so;
everything then runs on the PyTorch paths. On a GPU machine with a CUDA build of torch and nvcc:

    pip install --no-build-isolation -e .      # builds the extension megatron_fused_kernels

(``--no-build-isolation`` lets this script see the installed torch; pip's isolated build environment has none).
Architectures come from the installed nvcc (sm_80, 86, 89, 90, 100, 120 where supported, PTX for the newest) unless
``TORCH_CUDA_ARCH_LIST`` is set. ``MEGATRON_BUILD_KERNELS=0`` skips the build. Without a prebuilt extension the
kernels are JIT-built at first use instead (see docs/kernels.md). pip shows this script's messages with ``-v``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
SOURCES = ["csrc/fused_kernels.cpp", "csrc/rope_kernels.cu", "csrc/norm_kernels.cu"]


def say(message: str) -> None:
    print(f"setup.py: {message}", file=sys.stderr)


def load_arch_helpers():
    """megatron/kernels/arch.py by path: importing the package here would need its dependencies installed."""
    spec = importlib.util.spec_from_file_location("_megatron_kernel_arch", ROOT / "megatron" / "kernels" / "arch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extensions() -> tuple[list, dict]:
    """``(ext_modules, cmdclass)``: the CUDA extension when it can be built here, else nothing (with the reason)."""
    if os.environ.get("MEGATRON_BUILD_KERNELS", "1") == "0":
        say("MEGATRON_BUILD_KERNELS=0: fused kernels not built")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        say("torch is not importable in this build environment: fused kernels not built (on a GPU machine use "
            "`pip install --no-build-isolation -e .`, or let them JIT-build at first use)")
        return [], {}
    if torch.version.cuda is None:
        say(f"torch {torch.__version__} is a CPU build: no CUDA extension built (PyTorch paths are used)")
        return [], {}
    arch = load_arch_helpers()
    nvcc = arch.find_nvcc()
    if nvcc is None:
        say("nvcc not found (set CUDA_HOME or put nvcc on PATH): fused kernels not built")
        return [], {}
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch.arch_list(nvcc)
    say(f"building megatron_fused_kernels with {nvcc} for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    ext = CUDAExtension("megatron_fused_kernels", sources=SOURCES, include_dirs=[str(ROOT / "csrc")],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
