"""Shared test fixtures: paths to ../shared and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEPLLM_SHARED_DIR", REPO_ROOT.parent / "shared")).resolve()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def neox_tokenizer_file(shared_dir: Path) -> Path:
    return shared_dir / "tokenizers" / "20B_tokenizer.json"


@pytest.fixture(scope="session")
def pg19_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "pg19" / "test"
