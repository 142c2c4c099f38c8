"""lm_eval on our own checkpoints: the ``NeoXLM`` adapter (lm_eval ``TemplateLM`` over ``GPTModel``) and the
``eval.py`` runner (load, evaluate on every data-parallel rank, write results on rank 0)."""

from __future__ import annotations

from megatron._lazy import lazy_exports

_LAZY = {
    "lm": ("DataParallel", "EvalRequestError", "NeoXLM"),
    "runner": ("EvalError", "EvalOutcome", "resolve_tasks", "results_path", "run_evaluation"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _LAZY, globals())
