"""tools/plot_logs.py: metrics.jsonl -> PNG of train/valid loss; clear errors for a folder without metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from megatron.training.logging import RunLogger, format_console_line
from megatron.training.plotting import read_metrics, series

REPO = Path(__file__).resolve().parents[1]


def _write_run(log_dir: Path) -> None:
    logger = RunLogger(log_dir, train_iters=30)
    for it in range(1, 31):
        logger.log({"iteration": it, "lm_loss": 10.0 - it * 0.1, "lr": 1e-3, "grad_norm": 1.0,
                    "tokens_per_sec": 100.0}, console=False)
        if it % 10 == 0:
            logger.log({"iteration": it, "valid_lm_loss": 10.5 - it * 0.1}, console=False)
    logger.log({"iteration": 30, "test_lm_loss": 7.4, "nan_value": float("nan")}, console=False)
    logger.close()


def test_metrics_rows_and_series(tmp_path):
    _write_run(tmp_path)
    rows = read_metrics(tmp_path)
    assert len(rows) == 34 and rows[-1]["nan_value"] is None  # NaN written as JSON null
    its, losses = series(rows, "valid_lm_loss")
    assert its == [10, 20, 30] and losses == [9.5, 8.5, 7.5]


def test_plot_cli_writes_png(tmp_path):
    _write_run(tmp_path)
    out = tmp_path / "curve.png"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "plot_logs.py"), str(tmp_path), "--output", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_plot_cli_on_a_folder_without_metrics(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "plot_logs.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'metrics.jsonl'} not found: expected the log directory of a " \
                                  "run (it holds metrics.jsonl)"


def test_console_line_format():
    line = format_console_line({"iteration": 5, "lm_loss": 2.5, "lr": 1e-3, "grad_norm": 0.5,
                                "tokens_per_sec": 1234.4, "step_time_ms": 10.0}, train_iters=10)
    assert line == ("iteration 5/10 | lm_loss 2.5000 | lr 1.000e-03 | grad_norm 0.500 | tokens_per_sec 1234 | "
                    "step_time_ms 10.0")


def test_jsonl_is_appended_by_a_resumed_run(tmp_path):
    _write_run(tmp_path)
    logger = RunLogger(tmp_path)
    logger.log({"iteration": 31, "lm_loss": 6.0}, console=False)
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1]) == {"iteration": 31, "lm_loss": 6.0} and len(lines) == 35


def test_wandb_offline_needs_no_network(tmp_path, monkeypatch):
    import pytest

    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = RunLogger(tmp_path, wandb_cfg={"project": "sepllm-test", "mode": "offline", "run_name": "t"},
                       run_config={"model": {"num_layers": 2}})
    logger.log({"iteration": 1, "lm_loss": 3.0, "lr": 1e-3}, console=False)
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
