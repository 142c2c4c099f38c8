"""Preference JSONL ``{"prompt", "chosen", "rejected"}`` -> the four datasets DPO reads (GPT-NeoX's layout).

For every record, each side is ``prompt + response (+ end-of-document)`` tokenized as two parts (the prompt's ids
followed by the response's ids, so the prompt / response boundary is exact), with a label row that is -100 on the
prompt and the token itself on the response. With a chat template (``--chat-template``, as for SFT data) the prompt
is the rendered user turn with the opening of the assistant reply and the response the rest of the assistant turn,
cut as :func:`megatron.data.chat_templates.turn_segments` cuts SFT conversations::

    <prefix>_chosen_document        <prefix>_chosen_label_document     -> pos_*_data_paths / pos_*_label_data_paths
    <prefix>_rejected_document      <prefix>_rejected_label_document   -> neg_*_data_paths / neg_*_label_data_paths

Record ``i`` becomes document ``i`` of all four datasets, which is how the pairwise dataset pairs them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from megatron.data.chat_templates import ChatTemplate, resolve_template, turn_segments
from megatron.data.errors import PrepareError
from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder, best_dtype
from megatron.data.packing import IGNORE_LABEL
from megatron.data.sft import iter_records
from megatron.tokenizer import Tokenizer, build_tokenizer

#: the JSONL keys of one preference record
RECORD_KEYS = ("prompt", "chosen", "rejected")
#: output prefix suffix of each dataset: (side, kind) -> suffix
OUTPUTS = {("chosen", "text"): "_chosen_document", ("chosen", "label"): "_chosen_label_document",
           ("rejected", "text"): "_rejected_document", ("rejected", "label"): "_rejected_label_document"}


@dataclass
class PreferencePrepResult:
    """Where the four datasets went and how many pairs they hold."""

    prefixes: dict[str, str]        # "chosen" / "chosen_label" / "rejected" / "rejected_label" -> prefix
    pairs: int
    tokens: int                     # chosen + rejected tokens


def read_records(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, str]]]:
    """("file:line", record) of a JSONL file; a record without the three string keys fails naming the line."""
    for record, where, _ in iter_records([Path(path)]):
        if not isinstance(record, dict):
            raise PrepareError(f"{where}: expected a JSON object with keys {', '.join(RECORD_KEYS)}")
        missing = [k for k in RECORD_KEYS if not isinstance(record.get(k), str)]
        if missing:
            raise PrepareError(f"{where}: key(s) {', '.join(missing)} missing or not a string; a "
                               f"preference record is {{\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}}")
        yield where, record


def encode_side(tokenizer: Tokenizer, prompt: str, response: str, append_eod: bool,
                template: Optional[ChatTemplate] = None) -> tuple[np.ndarray, np.ndarray]:
    """Token and label rows of one side: the prompt's labels are -100, the response's (and eod's) are the ids."""
    if template is not None:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        (_, prompt), (_, response) = turn_segments(template, messages)
    prompt_ids = tokenizer.tokenize(prompt) if prompt else []
    response_ids = tokenizer.tokenize(response) + ([tokenizer.eod] if append_eod else [])
    tokens = np.asarray(prompt_ids + response_ids, dtype=np.int64)
    labels = tokens.copy()
    labels[: len(prompt_ids)] = IGNORE_LABEL
    return tokens, labels


def prepare_preference_data(input_path: str | os.PathLike, output_prefix: str, tokenizer_type: str,
                            vocab_file: Optional[str] = None, merge_file: Optional[str] = None,
                            append_eod: bool = True, chat_template: Optional[str] = None) -> PreferencePrepResult:
    """Write the four datasets of ``input_path``; every pair must have a non-empty chosen and rejected response.
    ``chat_template``: a named template or ``tokenizer`` (None: the plain prompt + response text)."""
    if not Path(input_path).is_file():
        raise PrepareError(f"{input_path}: no such preference JSONL file")
    tokenizer = build_tokenizer(tokenizer_type, vocab_file, merge_file)
    template = resolve_template(chat_template, vocab_file) if chat_template else None
    text_dtype = best_dtype(tokenizer.vocab_size)
    prefixes = {f"{side}{'_label' if kind == 'label' else ''}": output_prefix + suffix
                for (side, kind), suffix in OUTPUTS.items()}
    builders = {name: MMapIndexedDatasetBuilder(prefix, np.int32 if name.endswith("_label") else text_dtype)
                for name, prefix in prefixes.items()}
    pairs = tokens = 0
    try:
        for where, record in read_records(input_path):
            for side in ("chosen", "rejected"):
                ids, labels = encode_side(tokenizer, record["prompt"], record[side], append_eod, template)
                if not (labels >= 0).any():
                    raise PrepareError(f"{where}: the {side} response is empty (nothing to score)")
                builders[side].add_document(ids)
                builders[f"{side}_label"].add_document(labels)
                tokens += int(ids.size)
            pairs += 1
        if pairs == 0:
            raise PrepareError(f"{input_path}: no preference records")
        for builder in builders.values():
            builder.finalize()
    except BaseException:
        for builder in builders.values():
            if not builder.finalized:
                builder.abort()
        raise
    return PreferencePrepResult(prefixes=prefixes, pairs=pairs, tokens=tokens)


__all__ = ["OUTPUTS", "PreferencePrepResult", "RECORD_KEYS", "encode_side", "prepare_preference_data",
           "read_records"]
