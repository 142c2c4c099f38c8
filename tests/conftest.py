"""Shared test fixtures: the assets bundled with the repository (the suite never needs the shared folder beside
the checkout)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from megatron.data.corpus_registry import SHIPPED_DIR
from megatron.tokenizer import BUNDLED_NEOX_TOKENIZER

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _existing(path: Path) -> Path:
    """A bundled asset; a missing one is a broken checkout, which fails the test (never a skip)."""
    if not path.exists():
        raise FileNotFoundError(f"bundled test asset missing from the checkout: {path}")
    return path


@pytest.fixture(scope="session")
def neox_tokenizer_file() -> Path:
    """The GPT-NeoX-20B tokenizer shipped in the package."""
    return _existing(BUNDLED_NEOX_TOKENIZER)


@pytest.fixture(scope="session")
def gpt2_tokenizer_file() -> Path:
    """The GPT-2 BPE tokenizer (HF json) shipped as a test fixture."""
    return _existing(FIXTURES / "tokenizers" / "gpt2.json")


@pytest.fixture(scope="session")
def pg19_dir() -> Path:
    """The five PG-19 books bundled with the repository (``pg19_sample``)."""
    return _existing(SHIPPED_DIR / "pg19_sample")


@pytest.fixture(scope="session")
def pg19_books(pg19_dir: Path) -> list[Path]:
    """The bundled books, in a fixed order."""
    return sorted(pg19_dir.glob("*.txt"))


@pytest.fixture(scope="session")
def reference_configs_dir() -> Path:
    """SepLLM reference configs as users bring them (copies shipped as fixtures)."""
    return _existing(FIXTURES / "reference_configs")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, pg19_dir: Path, neox_tokenizer_file: Path) -> str:
    """A tiny tokenized corpus (the first bundled book's first 60k characters); its data prefix. Test modules that
    need another corpus define their own ``corpus`` fixture."""
    from train_helpers import make_tiny_corpus

    return make_tiny_corpus(tmp_path_factory.mktemp("corpus"), sorted(pg19_dir.glob("*.txt"))[0], neox_tokenizer_file)
