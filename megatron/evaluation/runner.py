"""``eval.py``'s body: load the checkpoint named by ``load``, run lm_eval's tasks through :class:`NeoXLM` on every
data-parallel rank, and on rank 0 print lm_eval's table and write the results JSON.

Results file: ``<eval_results_prefix>_eval_results.json`` (or ``eval_results_<date-time>.json``), lm_eval's own
layout (``results``, ``groups``, ``configs``, ``versions``, ``n-shot``, ``higher_is_better``, ``n-samples``,
``config``, ...) plus ``model`` (attention, parameters), ``iteration``, ``checkpoint_dir``, ``neox_config`` (the
resolved config) and ``sepllm_retention`` (kept / causal attention summed over every forward of the evaluation and
every rank; None for full-attention models). ``eval_log_samples`` adds one JSONL per task with every document's
requests and responses.
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import torch

from megatron.atomic_io import atomic_open, atomic_write_text
from megatron.device import resolve_device
from megatron.config.sepllm_settings import attention_mode
from megatron.evaluation.lm import DataParallel, NeoXLM
from megatron.errors import UserInputError

if TYPE_CHECKING:
    from megatron.config.neox import NeoXConfig


class EvalError(UserInputError, ValueError):
    """The evaluation cannot run as configured (tasks, paths, keys); one line, exit 2."""


@dataclass(frozen=True)
class EvalOutcome:
    """What :func:`run_evaluation` returns on every rank (``results``/``results_path`` only on rank 0)."""

    results: Optional[dict]
    results_path: Optional[Path]
    iteration: int


def resolve_tasks(names: Sequence[str], include_path: Optional[str], include_defaults: bool = True) -> tuple[Any, list]:
    """(TaskManager, task names); EvalError naming unknown tasks (with a 'did you mean') or a bad include path."""
    from lm_eval.tasks import TaskManager

    if not names:
        raise EvalError("key 'eval_tasks' is empty: name at least one lm_eval task (e.g. --eval_tasks lambada_openai)")
    if include_path is not None and not Path(include_path).is_dir():
        raise EvalError(f"key 'eval_include_path' = {include_path!r}: not a directory of task YAML files")
    if include_path is not None and include_defaults:
        # indexing lm_eval's thousands of built-in task files takes ~20 s: skip it when every task is a local one
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in set(local.all_tasks) or local.match_tasks([n]) for n in names):
            return local, list(names)
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults or include_path is None)
    known = set(manager.all_tasks)
    missing = [n for n in names if n not in known and not manager.match_tasks([n])]
    if missing:
        hints = []
        for name in missing:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        where = "lm_eval's tasks" + (f" or eval_include_path {include_path}" if include_path else "")
        raise EvalError(f"key 'eval_tasks': unknown task(s) {', '.join(hints)}: not found in {where}")
    return manager, list(names)


def results_path(prefix: str, now: Optional[datetime.datetime] = None) -> Path:
    """``<prefix>_eval_results.json``, or ``eval_results_<date-time>.json`` without a prefix (GPT-NeoX naming)."""
    if prefix:
        return Path(f"{prefix}_eval_results.json")
    stamp = (now or datetime.datetime.now()).strftime("%Y-%m-%d-%H-%M-%S")
    return Path(f"eval_results_{stamp}.json")


def _retention(model: torch.nn.Module, dp: DataParallel) -> Optional[dict]:
    stats = getattr(getattr(model, "attention_backend", None), "retention", None)
    if stats is None:
        return None
    from megatron.sepllm.attention.retention import RetentionStats

    total = RetentionStats(stats.num_layers)
    for counts in dp.gather([stats.counts()]):
        total.add_counts(counts)
    return total.as_dict()


def _write_json(path: Path, payload: Any) -> None:
    """Atomic write (temp file + rename) so a crash never leaves half a results file."""
    from lm_eval.utils import handle_non_serializable

    atomic_write_text(path, json.dumps(payload, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n",
                      make_parents=True)


def _write_samples(stem: Path, samples: dict) -> list[Path]:
    from lm_eval.utils import handle_non_serializable

    written = []
    for task, rows in samples.items():
        path = stem.with_name(f"{stem.name}_samples_{task}.jsonl")
        with atomic_open(path) as fh:
            for row in rows:
                fh.write(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n")
        written.append(path)
    return written


def _device(cfg: NeoXConfig) -> torch.device:
    want = resolve_device(cfg.training.device, key="device")
    if want == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _dtype(cfg: NeoXConfig, device: torch.device) -> torch.dtype:
    precision = cfg.training.precision
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.float32  # CPU evaluation (and fp32 runs) in fp32


class _CustomDatasetNote(logging.Filter):
    """Drops lm_eval's note that a task with a ``custom_dataset`` loader could take ``--metadata`` keyword arguments
    (printed twice per such task; the loaders of ``eval_tasks/`` take none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


@contextlib.contextmanager
def _without_custom_dataset_note() -> Iterator[None]:
    task_logger = logging.getLogger("lm_eval.api.task")
    note = _CustomDatasetNote()
    task_logger.addFilter(note)
    try:
        yield
    finally:
        task_logger.removeFilter(note)


def run_evaluation(cfg: NeoXConfig, *, config_files: Sequence[str | os.PathLike] = (), overrides: Sequence[str] = (),
                   dp: DataParallel = DataParallel(), include_defaults: bool = True,
                   print_table: bool = True) -> EvalOutcome:
    """Evaluate the checkpoint in ``load`` (else ``save``) on ``cfg.training.eval_tasks``.

    ``config_files`` (+ command-line ``overrides``): the YAML(s) the model is built from (default: the resolved
    config saved in the checkpoint).
    ``include_defaults=False`` leaves lm_eval's built-in tasks out (faster start-up when only the
    ``eval_include_path`` tasks are wanted). Raises EvalError / ConfigError / CheckpointError / TokenizerError.
    """
    from lm_eval import simple_evaluate
    from lm_eval.utils import make_table

    from megatron.checkpoint.trained import checkpoint_to_read, load_trained_model
    from megatron.tokenizer import build_tokenizer

    t, ck = cfg.training, cfg.checkpoint
    source = checkpoint_to_read(ck, "eval.py")
    manager, tasks = resolve_tasks(list(t.eval_tasks or []), t.eval_include_path, include_defaults)
    device = _device(cfg)
    trained = load_trained_model(source, config_files=config_files, overrides=list(overrides), iteration=ck.iteration,
                                 dtype=_dtype(cfg, device))
    mcfg = trained.config
    tokenizer = build_tokenizer(mcfg.tokenizer.tokenizer_type, mcfg.tokenizer.vocab_file, mcfg.tokenizer.merge_file)
    if tokenizer.vocab_size > trained.model.cfg.padded_vocab_size:
        raise EvalError(f"tokenizer {mcfg.tokenizer.vocab_file} has {tokenizer.vocab_size} tokens but the checkpoint's "
                        f"embedding has {trained.model.cfg.padded_vocab_size} rows: not the tokenizer it was trained with")
    model = trained.model.to(device)
    if dp.rank == 0 and print_table:
        print(f"eval: iteration {trained.iteration} from {trained.checkpoint_dir}, attention "
              f"{attention_mode(mcfg.model.sliding_window_width, mcfg.sepllm)}, device {device}", flush=True)
    batch = t.eval_batch_size or t.train_micro_batch_size_per_gpu or 1
    lm = NeoXLM(model, tokenizer, batch_size=batch, device=device, dp=dp)
    with _without_custom_dataset_note():
        results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=t.eval_num_fewshot, limit=t.eval_limit,
                                  bootstrap_iters=t.eval_bootstrap_iters, log_samples=bool(t.eval_log_samples),
                                  task_manager=manager, random_seed=0, numpy_random_seed=1234,
                                  torch_random_seed=1234, fewshot_random_seed=1234,
                                  verbosity="INFO" if dp.rank == 0 else "ERROR")
    retention = _retention(model, dp)
    if dp.rank != 0 or results is None:
        return EvalOutcome(results=None, results_path=None, iteration=trained.iteration)
    results = dict(results)
    samples = results.pop("samples", None)
    sep = mcfg.sepllm
    results["config"] = dict(results.get("config") or {}, model="neox", batch_size=batch)
    results["model"] = {"attention": attention_mode(mcfg.model.sliding_window_width, sep),
                        "sep_attention_impl": sep.sep_attention_impl,
                        "num_parameters": sum(p.numel() for p in model.parameters()),
                        "dtype": str(next(model.parameters()).dtype), "device": str(device)}
    results["iteration"] = trained.iteration
    results["checkpoint_dir"] = str(trained.checkpoint_dir)
    results["neox_config"] = mcfg.to_dict()
    results["sepllm_retention"] = retention
    path = results_path(t.eval_results_prefix)
    _write_json(path, results)
    if samples:
        _write_samples(path.with_suffix(""), samples)
    if print_table:
        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
        if retention is not None:
            print(f"SepLLM retention over the evaluation: kv_retention/total={retention['kv_retention/total']:.4f} "
                  f"attn_map_retention/total={retention['attn_map_retention/total']:.4f}")
        print(f"results: {path}")
    if samples is not None:
        results["samples"] = samples
    return EvalOutcome(results=results, results_path=path, iteration=trained.iteration)


__all__ = ["EvalError", "EvalOutcome", "resolve_tasks", "results_path", "run_evaluation"]
