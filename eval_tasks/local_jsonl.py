"""``custom_dataset`` loader for the task YAMLs in this folder: JSONL files named relative to this folder.

lm_eval resolves ``!function local_jsonl.load`` next to the YAML, so the tasks work from any working directory and
fully offline (no ``datasets`` download or cache). Your own YAMLs can instead use ``dataset_path: json`` with an
absolute ``data_files`` path (see docs/eval.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def load(data_files: dict[str, str], **_: Any) -> Any:
    """``{split: file.jsonl}`` -> ``datasets.DatasetDict`` (relative files are looked up in this folder)."""
    import datasets

    splits = {}
    for split, name in data_files.items():
        path = Path(name) if Path(name).is_absolute() else HERE / name
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
