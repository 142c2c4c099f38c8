#!/usr/bin/env python
"""Convert a checkpoint trained here into a Hugging Face model folder (GPT-NeoX's converter flags).

    python tools/ckpts/convert_neox_to_hf.py --input_dir runs/tiny-cpu/checkpoints --output_dir hf/tiny

Reads checkpoints of any tensor / pipeline-parallel layout; writes config.json (with a ``sepllm`` block), safetensors
weights and, for HF-json tokenizers, the tokenizer files. Exit 2 with one line on bad input; nothing is left behind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


class _Parser(argparse.ArgumentParser):
    """Bad flags: one line and exit 2 (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"convert_neox_to_hf: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="convert_neox_to_hf.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_dir", required=True,
                   help="a global_stepN checkpoint folder, or a run's checkpoints/ folder (its 'latest' is used)")
    p.add_argument("--config_file", default=None,
                   help="training YAML to build the model from (default: the resolved config.yml saved in the "
                        "checkpoint)")
    p.add_argument("--output_dir", required=True,
                   help="new (or empty) folder for the HF model; written via a temp folder and renamed at the end")
    p.add_argument("--precision", choices=["auto", "fp16", "bf16", "fp32"], default="auto",
                   help="dtype of the saved weights; auto = the precision the run trained in (default: auto)")
    p.add_argument("--architecture", choices=["neox", "llama", "mistral", "sepllm_neox"], default=None,
                   help="HF class: neox = GPTNeoXForCausalLM, llama = LlamaForCausalLM, mistral = "
                        "MistralForCausalLM (sliding_window = sliding_window_width + 1) (default: llama for "
                        "rmsnorm + gated-MLP configs, mistral for those with sliding_window_width, else neox); "
                        "sepllm_neox = our own modeling code written beside the weights, for every config we train "
                        "(load with trust_remote_code=True)")
    p.add_argument("--no_save_tokenizer", action="store_true",
                   help="do not write tokenizer files (default: write them for HFTokenizer runs)")
    p.add_argument("--vocab-is-hf-tokenizer", dest="vocab_is_hf_tokenizer", action="store_true",
                   help="the config's vocab_file is a Hugging Face tokenizer folder: save that tokenizer")
    p.add_argument("--pad-token-id", dest="pad_token_id", type=int, default=None,
                   help="pad token id written to config.json and the tokenizer (default: the end-of-text id)")
    p.add_argument("--iteration", type=int, default=None,
                   help="convert global_step<N> of --input_dir instead of the one 'latest' names")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron.errors import NeoxError, report_error
    from megatron.checkpoint.hf.export import export_to_hf

    try:
        result = export_to_hf(args.input_dir, args.output_dir, config_file=args.config_file,
                              precision=args.precision, architecture=args.architecture,
                              save_tokenizer=not args.no_save_tokenizer,
                              vocab_is_hf_tokenizer=args.vocab_is_hf_tokenizer, pad_token_id=args.pad_token_id,
                              iteration=args.iteration, progress=True)
    except (NeoxError, ValueError) as exc:  # the checkpoint and config are this tool's input
        return report_error(exc, "convert_neox_to_hf", exit_code=2)
    except OSError as exc:
        return report_error(exc, "convert_neox_to_hf")
    print(f"wrote {result.output_dir} ({result.architecture}, {str(result.dtype).replace('torch.', '')}, iteration "
          f"{result.iteration}): {', '.join(result.files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
