"""``python -m megatron.config a.yml [b.yml ...] [--key value ...]``: print the resolved config, or one error line."""

from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

USAGE = """\
usage: python -m megatron.config CONFIG.yml [MORE.yml ...] [--key value | --key=value ...]
                                 [--for-training] [--summary] [--quiet] [--help]

Load GPT-NeoX-style YAML configs, merge them left to right (later files win, nested blocks are deep-merged), apply
command-line overrides, validate, and print the resolved config as YAML on stdout (exit 0). On a bad config print
one line naming the file, key and what was expected on stderr and exit 2.

overrides:
  --key value / --key=value   any config key; '-' and '_' are interchangeable (--train-iters 10)
  --block.key value           nested keys, e.g. --optimizer.params.lr 1e-3, --fp16.enabled true,
                              --model.num_layers 4, --sep_attention_impl compact
  --flag                      a key with no value is set to true
  values are YAML scalars or flow lists: 1e-3, true, null, [1, 2, 3]

options:
  --for-training   also require what train.py needs (train_iters, data paths, tokenizer file)
  --summary        print the model size instead of the config: parameters per block, FLOPs per token and memory
                   per GPU under the config's precision, ZeRO stage, TP / PP / DP sizes and micro batch
                   (docs/model_size.md); needs padded_vocab_size or a readable tokenizer vocab_file, no data
  --quiet          do not print the log of forced SepLLM changes and derived settings (stderr)
  --help, -h       show this help and exit

Every key is documented in docs/config_reference.md.
"""

_OPTIONS = ("--for-training", "--for_training", "--quiet", "--summary")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or "--help" in args or "-h" in args:
        (sys.stdout if args else sys.stderr).write(USAGE)
        return 0 if args else 2
    for_training = any(a in ("--for-training", "--for_training") for a in args)
    quiet = "--quiet" in args
    summary = "--summary" in args
    args = [a for a in args if a not in _OPTIONS]
    split = next((i for i, a in enumerate(args) if a.startswith("--")), len(args))
    files, overrides = args[:split], args[split:]
    if not files:
        sys.stderr.write("error: give at least one config file before the --key value overrides (see --help)\n")
        return 2
    from megatron.config.errors import ConfigError
    from megatron.config.loader import load_config

    # Decisions are logged only for a config that loads; a failing one gets exactly one error line.
    collected = _Collect()
    logger = logging.getLogger("megatron.config")
    logger.addHandler(collected)
    logger.setLevel(logging.INFO)
    try:
        cfg = load_config(*files, overrides=overrides, for_training=for_training)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    finally:
        logger.removeHandler(collected)
    if not quiet:
        for record in collected.records:
            sys.stderr.write(f"config: {record.getMessage()}\n")
    if summary:
        return _print_summary(cfg)
    sys.stdout.write(cfg.to_yaml())
    return 0


def _print_summary(cfg: object) -> int:
    """``--summary``: the size lines of ``megatron.training.size_summary`` (an entry point may import any layer)."""
    from megatron.errors import NeoxError, report_error
    from megatron.tokenizer import TokenizerError
    from megatron.training.size_summary import summarize, summary_lines

    try:
        lines = summary_lines(summarize(cfg))
    except NeoxError as exc:
        return report_error(exc, input_kinds=(TokenizerError,))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


class _Collect(logging.Handler):
    """Keeps log records until we know whether the config loads."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


if __name__ == "__main__":
    sys.exit(main())
