"""CUDA architectures to compile the fused kernels for, derived from the installed nvcc.

This file imports nothing outside the standard library: ``setup.py`` loads it by path while pip builds the package,
before torch may be importable. Upstream builds broke on toolkits that dropped old architectures (CUDA 13 rejects
``compute_70``) or lacked new ones (sm_89 / sm_90); asking nvcc which codes it supports avoids both.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Optional

# Ampere (A100, A10/3090), Ada (L4/4090), Hopper (H100/H200), Blackwell (B200, RTX 50xx).
WANTED_ARCHS: tuple[int, ...] = (80, 86, 89, 90, 100, 120)


def find_nvcc() -> Optional[str]:
    """``$CUDA_HOME/bin/nvcc`` when set and present, else ``nvcc`` on PATH, else None."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        candidate = os.path.join(home, "bin", "nvcc")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("nvcc")


def nvcc_gpu_codes(nvcc: str) -> set[int]:
    """The ``sm_XX`` codes this nvcc can emit (``nvcc --list-gpu-code``), as integers (``sm_90`` -> 90)."""
    out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60, check=True).stdout
    return {int(m) for m in re.findall(r"\bsm_(\d+)\b", out)}


def arch_list(nvcc: str) -> str:
    """``TORCH_CUDA_ARCH_LIST`` value: the user's if set, else :data:`WANTED_ARCHS` that this nvcc supports, with
    PTX for the newest so later GPUs can still JIT the kernels. Raises RuntimeError when nvcc supports none."""
    user = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if user:
        return user
    codes = sorted(a for a in WANTED_ARCHS if a in nvcc_gpu_codes(nvcc))
    if not codes:
        raise RuntimeError(f"{nvcc} supports none of the architectures sm_{', sm_'.join(map(str, WANTED_ARCHS))}")
    names = [f"{a // 10}.{a % 10}" for a in codes]
    names[-1] += "+PTX"
    return ";".join(names)


def gencode_flags(archs: str) -> list[str]:
    """nvcc ``-gencode`` flags for a ``TORCH_CUDA_ARCH_LIST``-style string (``"8.0;9.0+PTX"``)."""
    flags = []
    for item in re.split(r"[;\s]+", archs.strip()):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        num = item.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags
