"""train.py as users run it: problems come back as one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from train_helpers import tiny_sepllm_keys

REPO = Path(__file__).resolve().parents[1]


def _train(cfg: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, str(REPO / "train.py"), str(path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def test_missing_data_names_the_prefix_and_the_fix(tmp_path, neox_tokenizer_file):
    proc = _train(tiny_sepllm_keys(str(tmp_path / "nowhere_text_document"), neox_tokenizer_file, tmp_path),
                  tmp_path)
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert str(tmp_path / "nowhere_text_document") in line and "prepare_data.py" in line


def test_missing_checkpoint_names_the_path(tmp_path, neox_tokenizer_file, pg19_dir):
    from train_helpers import make_tiny_corpus

    prefix = make_tiny_corpus(tmp_path / "data", sorted(pg19_dir.glob("*.txt"))[0], neox_tokenizer_file)
    cfg = tiny_sepllm_keys(prefix, neox_tokenizer_file, tmp_path, load=str(tmp_path / "no_such_ckpt"))
    proc = _train(cfg, tmp_path)
    assert proc.returncode == 2
    assert _one_error_line(proc) == f"error: checkpoint path {tmp_path / 'no_such_ckpt'} does not exist"


def test_help_explains_usage():
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "usage: python train.py CONFIG.yml" in proc.stdout
