"""lm_eval on our own checkpoints: the ``NeoXLM`` adapter (lm_eval ``TemplateLM`` over ``GPTModel``) and the
``eval.py`` runner (load, evaluate on every data-parallel rank, write results on rank 0)."""

from __future__ import annotations

from megatron._lazy import lazy_exports

_LAZY = {
    "DataParallel": "megatron.evaluation.lm",
    "EvalRequestError": "megatron.evaluation.lm",
    "NeoXLM": "megatron.evaluation.lm",
    "EvalError": "megatron.evaluation.runner",
    "EvalOutcome": "megatron.evaluation.runner",
    "resolve_tasks": "megatron.evaluation.runner",
    "results_path": "megatron.evaluation.runner",
    "run_evaluation": "megatron.evaluation.runner",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

__all__ = sorted(_LAZY)
