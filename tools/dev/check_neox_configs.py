"""Load every YAML of a GPT-NeoX ``configs/`` folder with our loader and report, per file, whether it loads (with the
parameter count of the model we build for it, on the meta device) or the one-line reason it is refused.

    python tools/dev/check_neox_configs.py /path/to/gpt-neox/configs [--json out.json] [--markdown out.md]

Data and tokenizer paths are never opened (loading does not read them), so the files are checked as they are. A
file GPT-NeoX itself only uses merged with others (``local_setup*.yml``, ``docker/``, ``slurm_local.yml``, ...)
loads on its own here too, since every key is optional until training.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from megatron.config import ConfigError, load_config
from megatron.errors import UserInputError

DEFAULT_VOCAB = 50304  # GPT-NeoX-20B tokenizer padded to 128, used when a config names no padded_vocab_size


def parameter_count(cfg) -> int:
    """Parameters of the GPTModel built from ``cfg`` on the meta device (no memory is allocated)."""
    import dataclasses

    import torch

    from megatron.model.gpt import GPTModel

    model_cfg = cfg.model
    if model_cfg.padded_vocab_size is None:
        model_cfg = dataclasses.replace(model_cfg, padded_vocab_size=DEFAULT_VOCAB)
    with torch.device("meta"):
        model = GPTModel(model_cfg)
    return sum(p.numel() for p in model.parameters())


def check(path: Path) -> dict:
    """``{"file", "status": "loads" | "refused", "parameters" | "reason"}`` for one config file."""
    try:
        cfg = load_config(path)
    except (ConfigError, UserInputError) as exc:
        return {"status": "refused", "reason": str(exc).splitlines()[0]}
    return {"status": "loads", "parameters": parameter_count(cfg)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs_dir", type=Path, help="a GPT-NeoX checkout's configs/ folder")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="also write the results as a markdown table here")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    files = sorted(p for p in args.configs_dir.rglob("*.yml"))
    if not files:
        print(f"error: no .yml files under {args.configs_dir}", file=sys.stderr)
        return 2
    results = {}
    for path in files:
        name = str(path.relative_to(args.configs_dir))
        results[name] = check(path)
        row = results[name]
        detail = f"{row['parameters']:,} parameters" if row["status"] == "loads" else row["reason"]
        print(f"{name:40s} {row['status']:8s} {detail}")
    loads = sum(r["status"] == "loads" for r in results.values())
    print(f"{loads} load, {len(results) - loads} refused, of {len(results)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(markdown_table(results), encoding="utf-8")
    return 0


def markdown_table(results: dict) -> str:
    """One row per file: loads (with the parameter count) or refused (with the reason, the file path dropped)."""
    rows = ["| file | result | parameters / reason |", "|---|---|---|"]
    for name, row in results.items():
        if row["status"] == "loads":
            detail = f"{row['parameters']:,}"
        else:
            detail = row["reason"].split(": ", 1)[-1].replace("|", "\\|")
        rows.append(f"| `{name}` | {row['status']} | {detail} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
