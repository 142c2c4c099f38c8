"""Fused CUDA kernels (``csrc/``) behind ``torch.library`` custom ops, each with a PyTorch reference.

* :func:`fused_rope` (:mod:`megatron.kernels.rope`): rotary embedding of q and k in one pass;
* :func:`fused_norm` / :func:`fused_add_norm` (:mod:`megatron.kernels.norms`): LayerNorm / RMSNorm, optionally
  with the residual add folded in;
* :func:`kernel_status` (:mod:`megatron.kernels.build`): whether the compiled extension can run here, and why not.

The project runs, trains and tests without the extension: every op falls back to its reference. See docs/kernels.md.
"""

from megatron.kernels.build import KernelStatus, kernel_status
from megatron.kernels.norms import fused_add_norm, fused_norm
from megatron.kernels.rope import fused_rope, rotary_tables

__all__ = ["KernelStatus", "kernel_status", "fused_add_norm", "fused_norm", "fused_rope", "rotary_tables"]
