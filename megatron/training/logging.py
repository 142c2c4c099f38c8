"""Run logging: console lines, ``metrics.jsonl`` (public contract), TensorBoard, Weights & Biases and Comet.

``metrics.jsonl`` holds one JSON object per logged event. Training rows carry at least ``iteration``, ``lm_loss``,
``lr``, ``grad_norm`` and ``tokens_per_sec``; validation rows ``valid_lm_loss``; the final test row
``test_lm_loss``. Under ``train_impl: dpo`` ``lm_loss`` is the DPO loss and training rows add GPT-NeoX's
``chosen_rewards``, ``rejected_rewards``, ``margins``, ``reward_acc``, ``chosen_pos``, ``chosen_neg``, ``ref_pos``
and ``ref_neg`` (``megatron.training.dpo``). Retention rows carry the SepLLM ``retention/*`` ratios; diagnostics
rows (GPT-NeoX's log_* keys)
``parameter_norms/*``, ``gradient_norms/*``, ``pct_grad_zeros/*``, ``optimizer_state_norms/*``, ``noise_scale``.
Only rank 0 writes files; with ``wandb_init_all_ranks`` the other ranks log their per-parameter rows to W&B.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, TextIO

from megatron.atomic_io import atomic_open

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    """JSON-safe scalar: tensors become floats, NaN/inf become None (JSON has no spelling for them), strings lose
    lone surrogates (U+FFFD instead: they have no UTF-8 encoding, and strict JSON readers reject their escapes)."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str):
        return _valid_text(value)
    return value


def _valid_text(text: str) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def format_console_line(row: Mapping[str, Any], train_iters: int | None = None) -> str:
    """One human-readable line in GPT-NeoX's spirit: ``iteration 10/100 | lm_loss 9.8 | lr 6.0e-04 | ...``."""
    parts = []
    it = row.get("iteration")
    parts.append(f"iteration {it}/{train_iters}" if train_iters else f"iteration {it}")
    formats = {"lm_loss": "{:.4f}", "valid_lm_loss": "{:.4f}", "test_lm_loss": "{:.4f}",
               "chosen_rewards": "{:.4f}", "rejected_rewards": "{:.4f}", "margins": "{:.4f}", "reward_acc": "{:.3f}",
               "lr": "{:.3e}",
               "grad_norm": "{:.3f}", "tokens_per_sec": "{:.0f}", "step_time_ms": "{:.1f}", "mfu": "{:.2%}",
               "loss_scale": "{:.0f}", "memory_gb": "{:.2f}", "valid_ppl": "{:.2f}", "test_ppl": "{:.2f}"}
    for key, fmt in formats.items():
        if key in row and row[key] is not None:
            parts.append(f"{key} {fmt.format(row[key])}")
    for key, value in row.items():
        if key.startswith("retention/") and value is not None:
            parts.append(f"{key} {value:.4f}")
    return " | ".join(parts)


class RunLogger:
    """Fans one metrics row out to console, metrics.jsonl, TensorBoard and wandb (each optional)."""

    def __init__(self, log_dir: str | os.PathLike | None, *, enabled: bool = True,
                 tensorboard_dir: str | os.PathLike | None = None, wandb_cfg: Mapping[str, Any] | None = None,
                 run_config: Mapping[str, Any] | None = None, train_iters: int | None = None,
                 stream: TextIO | None = None, comet_cfg: Mapping[str, Any] | None = None, rank: int = 0) -> None:
        self.enabled = enabled
        self.train_iters = train_iters
        self.stream = stream or sys.stdout
        self.log_dir = Path(log_dir) if log_dir else None
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._comet = None
        if not enabled:
            if wandb_cfg and wandb_cfg.get("all_ranks"):  # GPT-NeoX wandb_init_all_ranks: a run of its own
                named = dict(wandb_cfg, run_name=f"{wandb_cfg['run_name']}-rank{rank}" if wandb_cfg.get("run_name")
                             else None)
                self._wandb = _start_wandb(named, run_config, None)
            return
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.log_dir / METRICS_FILE, "a", encoding="utf-8")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: tensorboard is optional

            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))
        if wandb_cfg:
            self._wandb = _start_wandb(wandb_cfg, run_config, self.log_dir)
        if comet_cfg:
            from megatron.training.comet import start_comet

            self._comet = start_comet(comet_cfg, run_config)

    @property
    def metrics_path(self) -> Path | None:
        return self.log_dir / METRICS_FILE if self.log_dir else None

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def log_all_ranks(self, row: Mapping[str, Any]) -> None:
        """A row every rank computes for its own parameters: rank 0 logs it like any row (no console line), the
        other ranks to their own W&B run when there is one (GPT-NeoX's all_ranks logging)."""
        if self.enabled:
            self.log(row, console=False)
        elif self._wandb is not None:
            clean = {_valid_text(str(k)): _clean(v) for k, v in row.items()}
            self._wandb.log({k: v for k, v in clean.items() if k != "iteration" and isinstance(v, (int, float))},
                            step=int(clean.get("iteration", 0)))

    def log(self, row: Mapping[str, Any], console: bool = True) -> None:
        """Record one event; ``row['iteration']`` is the step for TensorBoard/wandb/Comet."""
        if not self.enabled:
            return
        clean = {_valid_text(str(k)): _clean(v) for k, v in row.items()}
        if console:
            self.info(format_console_line(clean, self.train_iters))
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(clean, ensure_ascii=False) + "\n")
            self._jsonl.flush()
        step = int(clean.get("iteration", 0))
        scalars = {k: v for k, v in clean.items() if k != "iteration" and isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(_tb_tag(key), value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._comet is not None:
            self._comet.log_metrics({_tb_tag(k): v for k, v in scalars.items()}, step=step)

    def drop_rows_after(self, iteration: int) -> int:
        """Remove rows with ``iteration`` > ``iteration`` from metrics.jsonl (atomic rewrite); returns how many.

        Called on resume: the rows a run wrote after the checkpoint it resumes from are about to be written again,
        and a file holding both would plot as two overlapping curves."""
        path = self.metrics_path
        if not self.enabled or path is None or self._jsonl is None:
            return 0
        self._jsonl.close()
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        kept = [line for line in lines if not _row_after(line, iteration)]
        if len(kept) != len(lines):
            with atomic_open(path) as handle:
                handle.writelines(kept)
        self._jsonl = open(path, "a", encoding="utf-8")
        return len(lines) - len(kept)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._comet is not None:
            self._comet.end()
            self._comet = None


def _row_after(line: str, iteration: int) -> bool:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return False  # not ours to judge: keep it
    it = row.get("iteration") if isinstance(row, dict) else None
    return isinstance(it, (int, float)) and not isinstance(it, bool) and it > iteration


def _tb_tag(key: str) -> str:
    """Group TensorBoard scalars: train/..., valid/..., test/..., retention/..."""
    if "/" in key:
        return key
    for split in ("valid", "test"):
        if key.startswith(split + "_"):
            return f"{split}/{key[len(split) + 1:]}"
    return f"train/{key}"


def _start_wandb(cfg: Mapping[str, Any], run_config: Mapping[str, Any] | None, log_dir: Path | None) -> Any:
    """Start a wandb run; ``mode`` offline/disabled needs no network. Import errors are explicit."""
    try:
        import wandb
    except ImportError as exc:
        raise RuntimeError("use_wandb is set but wandb is not installed: pip install wandb, or set use_wandb false"
                           ) from exc
    mode = cfg.get("mode") or os.environ.get("WANDB_MODE") or "online"
    settings = wandb.Settings(base_url=cfg["host"]) if cfg.get("host") else None
    return wandb.init(project=cfg.get("project"), group=cfg.get("group"), entity=cfg.get("team"),
                      name=cfg.get("run_name"), mode=mode, config=dict(run_config or {}),
                      dir=str(log_dir) if log_dir else None, reinit="finish_previous", settings=settings)
