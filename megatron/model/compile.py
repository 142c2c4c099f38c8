"""``compile: true``: ``torch.compile`` per transformer block, with one warning and eager blocks when it cannot.

Compiling each block (torchtitan's approach) rather than the whole model keeps compile time short -- the blocks
share one code object, so the graph compiled for the first is reused by the others whose attributes match -- and
leaves the pieces around the blocks (embedding, the SepLLM plan built once per forward, the loss, DeepSpeed's and
tensor parallelism's hooks) as they are. Module names and ``state_dict`` keys do not change (the block's ``forward``
is replaced on the instance; no ``_orig_mod.`` wrapper), so checkpoints are the same with and without compile.

A block that fails to compile (dynamo cannot trace it, the backend fails: a missing C++ compiler for inductor, ...)
makes every block run eagerly from then on, after one warning naming why. Other exceptions pass through untouched
(errors of the model itself, activation checkpointing's own control flow during recomputation).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from megatron.model.transformer import TransformerLayer

logger = logging.getLogger(__name__)


class BlockCompiler:
    """Compiles every :class:`TransformerLayer` found in ``module`` (a ``GPTModel``, a tensor-parallel one, a
    pipeline stage) in place; ``failed`` is the reason the blocks went back to eager, None while compiled."""

    def __init__(self, module: nn.Module, dynamic: Optional[bool] = None, backend: str = "inductor") -> None:
        self.blocks = [m for m in module.modules() if isinstance(m, TransformerLayer)]
        self.failed: Optional[str] = None
        self.backend = backend
        for block in self.blocks:
            eager = block.forward
            block.forward = functools.partial(self._call, torch.compile(eager, dynamic=dynamic, backend=backend),
                                              eager)

    def _call(self, compiled: Callable[..., Any], eager: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.failed is None and kwargs.get("kv_cache") is None:
            try:
                return compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as exc:  # compiler failures only (inductor's are wrapped)
                cause = getattr(exc, "inner_exception", None) or exc
                text = str(cause).strip()
                self.failed = f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}"
                logger.warning("compile: %d transformer blocks run eagerly from here on (torch.compile failed: %s)",
                               len(self.blocks), self.failed[:300])
        return eager(*args, **kwargs)

    def summary(self, first_step_seconds: float) -> str:
        """One line for the log after the first step (which includes compiling)."""
        from torch._dynamo.utils import counters

        if self.failed is not None:
            return f"compile: fell back to eager ({self.failed[:200]})"
        graphs = int(counters["stats"].get("unique_graphs", 0))
        breaks = sum(counters["graph_break"].values())
        via = "" if self.backend == "inductor" else f" with backend {self.backend}"
        return (f"compile: {len(self.blocks)} transformer blocks compiled{via}; first step {first_step_seconds:.1f} s "
                f"(includes compilation; {graphs} graphs, {breaks} graph breaks)")


class FirstStepTimer:
    """Times the first call of a step function and logs ``BlockCompiler.summary`` once."""

    def __init__(self, compiler: BlockCompiler, log: Callable[[str], None] = logger.info) -> None:
        self.compiler, self.log, self.done = compiler, log, False

    def __call__(self, step: Callable[[], Any]) -> Any:
        if self.done:
            return step()
        start = time.perf_counter()
        out = step()
        self.done = True
        self.log(self.compiler.summary(time.perf_counter() - start))
        return out


__all__ = ["BlockCompiler", "FirstStepTimer"]
