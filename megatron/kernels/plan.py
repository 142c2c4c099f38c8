"""Which fused kernels a model uses: the written rule for the ``*_fusion`` config keys.

Rule: a fusion key only changes speed. ``rope_fusion`` (rotary models), ``layernorm_fusion`` (``norm: layernorm``)
and ``rmsnorm_fusion`` (``norm: rmsnorm``) use the compiled kernels of ``csrc/`` when :func:`kernel_status` says
they are available. When one is requested but cannot be honoured (no GPU, no extension and no working JIT build,
or a key that does not apply to this model), the model is built exactly as with the key false and one warning per
model build names the keys and the reason; the run never stops for it. The GPT-NeoX hints without a kernel here
(``bias_gelu_fusion``, ``scaled_masked_softmax_fusion``, ``scaled_upper_triang_masked_softmax_fusion``) are
accepted and reported in the same single message, at info level since PyTorch's own kernels serve them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from megatron.config.model import ModelConfig
from megatron.kernels.build import kernel_status

KERNEL_FLAGS = ("rope_fusion", "layernorm_fusion", "rmsnorm_fusion")
HINT_FLAGS = ("bias_gelu_fusion", "scaled_masked_softmax_fusion", "scaled_upper_triang_masked_softmax_fusion")


@dataclass(frozen=True)
class FusionPlan:
    """The kernels a model built from this config uses."""

    rope: bool
    layernorm: bool
    rmsnorm: bool


def _applies(cfg: ModelConfig, flag: str) -> Optional[str]:
    """None when ``flag`` applies to this model, else why not."""
    if flag == "rope_fusion" and cfg.pos_emb != "rotary":
        return f"pos_emb is {cfg.pos_emb!r}, not 'rotary'"
    if flag == "layernorm_fusion" and cfg.norm != "layernorm":
        return f"norm is {cfg.norm!r}, not 'layernorm'"
    if flag == "rmsnorm_fusion" and cfg.norm != "rmsnorm":
        return f"norm is {cfg.norm!r}, not 'rmsnorm'"
    return None


def fusion_plan(cfg: ModelConfig) -> FusionPlan:
    """Kernels to use (probes the extension, once per process, only when a kernel key is true)."""
    wanted = {f: bool(getattr(cfg, f, False)) and _applies(cfg, f) is None for f in KERNEL_FLAGS}
    ok = any(wanted.values()) and kernel_status().available
    return FusionPlan(rope=ok and wanted["rope_fusion"], layernorm=ok and wanted["layernorm_fusion"],
                      rmsnorm=ok and wanted["rmsnorm_fusion"])


def fusion_message(cfg: ModelConfig) -> tuple[int, Optional[str]]:
    """``(log level, message)`` about requested fusions that are not used; ``(0, None)`` when there are none."""
    plan = fusion_plan(cfg)
    used = {"rope_fusion": plan.rope, "layernorm_fusion": plan.layernorm, "rmsnorm_fusion": plan.rmsnorm}
    parts: list[str] = []
    level = logging.INFO
    for flag in KERNEL_FLAGS:
        if getattr(cfg, flag, False) and not used[flag]:
            level = logging.WARNING
            parts.append(f"{flag}: {_applies(cfg, flag) or kernel_status().reason}")
    hints = [f for f in HINT_FLAGS if getattr(cfg, f, False)]
    if hints:
        parts.append(f"{', '.join(hints)}: no fused kernel in this project (PyTorch's kernels are used)")
    if not parts:
        return 0, None
    return level, ("fused kernels requested but not used (" + "; ".join(parts) +
                   "): running the PyTorch implementation, same results")


def log_fusion_choice(cfg: ModelConfig, logger: logging.Logger) -> None:
    """Emit :func:`fusion_message` once (call it once per model build)."""
    level, message = fusion_message(cfg)
    if message is not None:
        logger.log(level, message)
