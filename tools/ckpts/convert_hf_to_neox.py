#!/usr/bin/env python
"""Convert a Hugging Face GPT-NeoX / Pythia or Llama folder into a checkpoint of ours plus its architecture YAML.

    python tools/ckpts/convert_hf_to_neox.py --hf_dir hf/pythia-160m --output_dir ckpts/pythia-160m --tp 2
    python deepy.py train.py ckpts/pythia-160m/model.yml my_data.yml --load ckpts/pythia-160m --finetune true

Exit 2 with one line on bad input; nothing is left behind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


class _Parser(argparse.ArgumentParser):
    """Bad flags: one line and exit 2 (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"convert_hf_to_neox: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="convert_hf_to_neox.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf_dir", required=True, help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--output_dir", required=True,
                   help="new (or empty) folder: global_step0/, latest, model.yml (and tokenizer.json if present)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size the checkpoint is split for (default 1)")
    p.add_argument("--pp", type=int, default=1,
                   help="pipeline stages written into model.yml (pipe-parallel-size; the weights are stored whole, "
                        "which every stage count reads) (default 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron.errors import NeoxError, report_error
    from megatron.checkpoint.hf.import_hf import import_from_hf

    try:
        result = import_from_hf(args.hf_dir, args.output_dir, tp=args.tp, pp=args.pp)
    except (NeoxError, ValueError) as exc:  # the HF folder is this tool's input
        return report_error(exc, "convert_hf_to_neox", exit_code=2)
    except OSError as exc:
        return report_error(exc, "convert_hf_to_neox")
    print(f"wrote {result.checkpoint_dir} ({result.architecture}) and {result.yaml_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
