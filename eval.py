#!/usr/bin/env python
"""Evaluate a trained checkpoint with lm_eval, running our own model (SepLLM / StreamingLLM / full attention as
trained), on one process or split over data-parallel ranks.

usage: python deepy.py eval.py CONFIG.yml [MORE.yml ...] --eval_tasks TASK [TASK ...] [--key value ...]
       python eval.py CONFIG.yml [...] --eval_tasks TASK [TASK ...]     (one process, no launcher)

The checkpoint is the config's `load`, else its `save` (a run's checkpoint folder, following `latest`, or one
global_stepN folder); the model is built from the given config(s), which must describe the trained model (the training YAML).
Keys (also settable in YAML; see docs/config_reference.md and docs/eval.md):
  --eval_tasks T [T ...]      lm_eval task names (built-in ones need the Hugging Face hub or its cache)
  --iteration N               evaluate global_stepN instead of the one `latest` names
  --eval_num_fewshot K        few-shot examples (default: each task's own)
  --eval_limit N              first N documents of each task only
  --eval_results_prefix P     write P_eval_results.json (default eval_results_<date-time>.json)
  --eval_include_path DIR     extra task YAMLs, e.g. eval_tasks/ (local JSONL tasks, works offline)
  --eval_batch_size B         sequences per forward per rank (default train_micro_batch_size_per_gpu)
  --eval_bootstrap_iters N    stderr bootstrap resamples (lm_eval default 100000)
  --eval_log_samples true     also write every document's requests and responses (JSONL per task)
Exit status: 0 done; 2 bad config, unknown task, missing checkpoint or tokenizer (one `error:` line); 1 the
evaluation itself failed.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Optional, Sequence

from megatron.entry_args import load_entry

if TYPE_CHECKING:
    from megatron.config.neox import NeoXConfig


def main(argv: Sequence[str] | None = None, config: Optional[NeoXConfig] = None) -> int:
    """Evaluate from the command line's configs, or from ``config`` when the caller loaded it already
    (``deepy.py``'s one-process launch); returns the exit code."""
    from megatron.evaluation.cli import run_eval_cli

    entry = load_entry(argv, __doc__, config)
    if isinstance(entry, int):
        return entry
    return run_eval_cli(entry.config, entry.files, entry.overrides)


if __name__ == "__main__":
    sys.exit(main())
