#!/usr/bin/env python
"""Generate text from a trained checkpoint (GPT-NeoX's generate.py keys and modes).

usage: python deepy.py generate.py CONFIG.yml [MORE.yml ...] [--key value ...]
       python generate.py CONFIG.yml [...] [--key value ...]          (same, without the launcher)

The model comes from the config's `load`, else its `save` (a run's checkpoints/ folder with `latest`, or one
global_stepN folder), built with the architecture of the given config(s); the tokenizer from tokenizer_type /
vocab_file.
Keys (YAML or --key value; every key: docs/config_reference.md, guide: docs/generate.md):
  text_gen_type        unconditional | input-file | interactive
  sample_input_file    input-file mode: prompts separated by prompt_end (default a newline)
  sample_output_file   JSONL output, one row per sample: context, text, length, finished, message, duration_seconds
  num_samples          unconditional mode: how many samples
  maximum_tokens       most new tokens per sample (also stops at the end-of-document token)
  temperature, top_k, top_p   sampling; all 0 = greedy
  recompute            no KV cache: the whole sequence runs through the model every step
  kv_cache             auto | plain | compressed | uncapped (SepLLM models: compressed = flat memory)
  init_cache_size, sep_cache_size, local_cache_size, cache_size, sep_cache_exact_window   SepLLM cache sizes
  train_micro_batch_size_per_gpu   prompts decoded together (left padded)
  seed                 sampling seed
Errors print one line: exit 2 for a bad config or input (missing input file, a checkpoint that cannot be read, ...),
1 when the run fails (the output cannot be written).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Optional, Sequence

from megatron.entry_args import split_entry_args

if TYPE_CHECKING:
    from megatron.config.neox import NeoXConfig


def main(argv: Sequence[str] | None = None, config: Optional[NeoXConfig] = None) -> int:
    """Generate from the command line's configs, or from ``config`` when the caller loaded it already
    (``deepy.py``'s one-process launch); returns the exit code."""
    parsed = split_entry_args(argv, __doc__)
    if isinstance(parsed, int):
        return parsed
    files, overrides = parsed

    from megatron.inference.cli import run_generation

    return run_generation(files, overrides, config)


if __name__ == "__main__":
    sys.exit(main())
