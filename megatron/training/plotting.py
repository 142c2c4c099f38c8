"""Loss curves from a run's ``metrics.jsonl`` (train ``lm_loss`` and ``valid_lm_loss`` against iteration)."""

from __future__ import annotations

import json
from pathlib import Path

from megatron.training.logging import METRICS_FILE
from megatron.errors import UserInputError


class PlotError(UserInputError, ValueError):
    """The run folder named has no usable metrics (exit 2 from tools/plot_logs.py; a warning after training)."""


def read_metrics(run_dir: Path) -> list[dict]:
    """Rows of ``metrics.jsonl`` as one run; ``run_dir`` may also be the file itself. Rows replayed after a resume
    supersede the earlier ones (see :func:`drop_replayed`)."""
    path = run_dir if run_dir.is_file() else run_dir / METRICS_FILE
    if not path.is_file():
        raise PlotError(f"{path} not found: expected the log directory of a run (it holds {METRICS_FILE})")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise PlotError(f"{path}:{n}: not a JSON object ({exc.msg})") from exc
    return drop_replayed(rows)


def drop_replayed(rows: list[dict]) -> list[dict]:
    """One curve from a file that several resumed runs appended to.

    A training row (``lm_loss``) whose iteration is not above the previous training row's marks a resume: every
    earlier row (train, valid, test, retention) with an iteration at or above it belongs to the abandoned
    continuation and is dropped. Files rewritten on resume (the trainer now drops those rows itself) pass
    unchanged."""
    kept: list[dict] = []
    last_train = None
    for row in rows:
        it = row.get("iteration")
        if row.get("lm_loss") is not None and isinstance(it, (int, float)):
            if last_train is not None and it <= last_train:
                kept = [r for r in kept if not (isinstance(r.get("iteration"), (int, float)) and r["iteration"] >= it)]
            last_train = it
        kept.append(row)
    return kept


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points: dict[int, float] = {}
    for row in rows:
        if row.get(key) is not None and "iteration" in row:
            points[int(row["iteration"])] = float(row[key])
    its = sorted(points)
    return its, [points[i] for i in its]


def plot_run(run_dir: Path, output: Path, title: str | None = None) -> Path:
    """Write a PNG with the train and valid loss curves (and the test loss as a marker); returns its path."""
    rows = read_metrics(run_dir)
    train = series(rows, "lm_loss")
    valid = series(rows, "valid_lm_loss")
    test = series(rows, "test_lm_loss")
    if not train[0] and not valid[0]:
        raise PlotError(f"{run_dir} has no lm_loss or valid_lm_loss rows to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    if train[0]:
        ax.plot(*train, label="train lm_loss", linewidth=1.2)
    if valid[0]:
        ax.plot(*valid, "o-", label="valid lm_loss", linewidth=1.5)
    if test[0]:
        ax.plot(*test, "s", label="test lm_loss", markersize=7)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or str(run_dir))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)
    return output
