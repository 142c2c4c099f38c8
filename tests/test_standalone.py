"""The repository stands alone: nothing the main job or the suite runs refers to the shared folder beside the
checkout, and every asset the shipped configs name is inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from megatron.config import load_config
from megatron.tokenizer import BUNDLED_NEOX_TOKENIZER, build_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_PATH = re.compile(r"\.\./shared/|/work/shared|shared_dir\b|[\"']shared[\"']\s*/")
#: only benchmarks may read the large optional corpora beside the checkout
SCANNED = ["megatron", "tests", "tools", "configs", "train.py", "deepy.py", "prepare_data.py", "eval.py",
           "generate.py"]


def _files() -> list[Path]:
    out = []
    for name in SCANNED:
        root = REPO / name
        if root.is_file():
            out.append(root)
        elif root.is_dir():
            out += [p for p in root.rglob("*") if p.suffix in (".py", ".yml", ".yaml", ".sh", ".md")]
    return [p for p in out if p != Path(__file__).resolve()]


def test_no_code_config_or_test_points_at_the_shared_folder():
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in _files()
                 for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
                 if SHARED_PATH.search(line)]
    assert offenders == []


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yml")))
def test_every_shipped_config_names_a_bundled_tokenizer(config):
    raw = yaml.safe_load((REPO / "configs" / config).read_text(encoding="utf-8"))
    vocab = raw.get("vocab-file") or raw.get("vocab_file")
    assert vocab is not None and (REPO / vocab).resolve() == BUNDLED_NEOX_TOKENIZER
    assert load_config(REPO / "configs" / config).tokenizer.vocab_file == vocab


def test_bundled_tokenizer_is_the_gpt_neox_20b_one():
    tok = build_tokenizer("HFTokenizer", str(BUNDLED_NEOX_TOKENIZER))
    assert tok.vocab_size == 50277
    assert tok.tokenize("Hello world.") == [12092, 1533, 15]


def test_bundled_assets_are_package_data():
    """Non-editable installs carry the tokenizer and the books (setuptools package-data in pyproject.toml)."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert '"megatron.tokenizer" = ["assets/*"]' in text and '"megatron.data" = ["corpora/pg19_sample/*"]' in text
    assert '"megatron.sepllm.attention" = ["auto_table.json"]' in text       # auto's measured table
