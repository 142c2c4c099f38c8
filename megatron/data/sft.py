"""Supervised fine-tuning data: JSONL of prompt / completion pairs or chat conversations -> a token dataset plus an
aligned label dataset (``<prefix>_text_document`` and ``<prefix>_label_document``, GPT-NeoX's layout).

The label row has the token's id where the loss counts (the completion, the assistant turns and the end-of-document
token after them) and :data:`~megatron.data.packing.IGNORE_LABEL` (-100) elsewhere (the prompt, system and user
turns, the template's markup that opens a reply). Labels are not shifted: the trainer predicts ``label[t + 1]`` from
``text[:t + 1]``, as GPT-NeoX does. Label files are int32 (negative values need a signed type); the text keeps the
tokenizer's usual dtype.

Record formats, one JSON object per line (blank lines skipped):

* ``{"prompt": str, "completion": str}``: tokens of the prompt, then of the completion, then end-of-document; with
  a chat template the pair is rendered as one user turn and one assistant turn instead.
* ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``: rendered with the chat
  template (``--chat-template``, else the tokenizer's own); each turn tokenized on its own.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from megatron.data.chat_templates import ROLES, ChatTemplate, resolve_template, turn_segments
from megatron.data.errors import PrepareError
from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder, best_dtype
from megatron.data.packing import IGNORE_LABEL
from megatron.data.preprocess import (PrepareResult, check_encodable, encode_texts, expand_inputs, is_jsonl,
                                      output_prefix_for_key)
from megatron.tokenizer import Tokenizer, build_tokenizer

LABEL_DTYPE = np.dtype(np.int32)
TEXT_KEY, LABEL_KEY = "text", "label"


@dataclass(frozen=True)
class SFTOptions:
    """How records become labelled token rows (the ``--sft`` flags)."""

    template: Optional[ChatTemplate] = None   # None: prompt/completion concatenated; chat records refused
    generation_role: str = "assistant"        # GPT-NeoX --generation-role: the role whose turns are trained on
    only_last: bool = False                   # GPT-NeoX --only-last: train on the last turn only


def _text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise PrepareError(f"{where}: key {key!r} holds {type(value).__name__}, expected text")
    check_encodable(value, f"{where}: key {key!r}")
    return value


def record_segments(record: Any, where: str, options: SFTOptions) -> list[tuple[str, bool]]:
    """``(text, trained)`` pieces of one record, in order; raises PrepareError naming ``where`` (file:line)."""
    if not isinstance(record, dict):
        raise PrepareError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise PrepareError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise PrepareError(f"{where}: message {i + 1} must be an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise PrepareError(f"{where}: message {i + 1} has role {m['role']!r}, expected one of "
                                   f"{', '.join(ROLES)}")
            _text(m["content"], where, f"messages[{i}].content")
        if not any(m["role"] == options.generation_role and m["content"] for m in messages):
            raise PrepareError(f"{where}: no non-empty {options.generation_role!r} message: nothing to train on")
        if options.template is None:
            raise PrepareError(f"{where}: a chat record needs a chat template and the tokenizer has none: pass "
                               f"--chat-template chatml (or plain)")
        last = len(messages) - 1
        return [(text, role == options.generation_role and (not options.only_last or i == last))
                for i, (role, text) in enumerate(turn_segments(options.template, messages, options.generation_role))]
    missing = [k for k in ("prompt", "completion") if k not in record]
    if missing:
        raise PrepareError(f"{where}: record has no key {missing[0]!r} (keys: {sorted(record)}); expected "
                           f"{{'prompt', 'completion'}} or {{'messages': [...]}}")
    prompt = _text(record["prompt"], where, "prompt")
    completion = _text(record["completion"], where, "completion")
    if not completion:
        raise PrepareError(f"{where}: empty completion: nothing to train on")
    if options.template is not None:
        chat = [{"role": "user", "content": prompt}, {"role": options.generation_role, "content": completion}]
        return [(text, role == options.generation_role)
                for role, text in turn_segments(options.template, chat, options.generation_role)]
    return [(prompt, False), (completion, True)]


def iter_records(files: Sequence[Path]) -> Iterator[tuple[Any, str, int]]:
    """``(record, "file:line", raw bytes)`` of every non-blank JSONL line; malformed JSON names file:line."""
    for path in files:
        if not is_jsonl(path):
            raise PrepareError(f"{path}: --sft reads JSONL files (.jsonl / .json, optionally .gz), one record per line")
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PrepareError(f"{where}: invalid JSON ({exc.msg})") from None
                yield record, where, len(line.encode("utf-8"))


def encode_record(tokenizer: Tokenizer, segments: Sequence[tuple[str, bool]],
                  dtype: np.dtype = np.dtype(np.int64)) -> tuple[np.ndarray, np.ndarray]:
    """Token and label rows of one record: each piece tokenized on its own, end-of-document appended (a label when
    the last piece is trained on, so the model learns to stop)."""
    ids = encode_texts(tokenizer, [text for text, _ in segments], dtype)
    tokens = [*ids, np.asarray([tokenizer.eod], dtype=dtype)]
    labels = [piece.astype(np.int64) if trained else np.full(piece.size, IGNORE_LABEL, dtype=np.int64)
              for piece, (_, trained) in zip(ids, segments)]
    labels.append(np.asarray([tokenizer.eod if segments[-1][1] else IGNORE_LABEL], dtype=np.int64))
    return np.concatenate(tokens), np.concatenate(labels)


def prepare_sft(inputs: Sequence[str | os.PathLike] | str, output_prefix: str, *, tokenizer: Tokenizer | None = None,
                tokenizer_type: str | None = None, vocab_file: str | None = None, merge_file: str | None = None,
                chat_template: str | None = None, generation_role: str = "assistant", only_last: bool = False,
                progress: bool = True) -> list[PrepareResult]:
    """Write ``<output_prefix>_text_document`` and ``<output_prefix>_label_document`` (same lengths) from JSONL.

    ``chat_template``: a named template (``chatml``, ``plain``), ``tokenizer`` (its own), or None (its own when it
    has one). Raises PrepareError naming ``file:line`` for malformed records; nothing is written then.
    """
    if tokenizer is None:
        if tokenizer_type is None:
            raise PrepareError("no tokenizer given: set tokenizer-type (and vocab-file/merge-file)")
        tokenizer = build_tokenizer(tokenizer_type, vocab_file, merge_file)
    if generation_role not in ROLES:
        raise PrepareError(f"--generation-role {generation_role!r}: expected one of {', '.join(ROLES)}")
    options = SFTOptions(resolve_template(chat_template, vocab_file), generation_role, only_last)
    files = expand_inputs(inputs)
    dtype = best_dtype(tokenizer.vocab_size)
    prefixes = [output_prefix_for_key(output_prefix, k) for k in (TEXT_KEY, LABEL_KEY)]
    builders = [MMapIndexedDatasetBuilder(prefixes[0], dtype), MMapIndexedDatasetBuilder(prefixes[1], LABEL_DTYPE)]
    start = time.perf_counter()
    total_bytes = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="record", desc="tokenizing", dynamic_ncols=True)
    try:
        for record, where, nbytes in iter_records(files):
            tokens, labels = encode_record(tokenizer, record_segments(record, where, options))
            builders[0].add_document(tokens.astype(dtype))
            builders[1].add_document(labels.astype(LABEL_DTYPE))
            total_bytes += nbytes
            if bar is not None:
                bar.update(1)
        if builders[0].num_documents == 0:
            raise PrepareError(f"empty corpus: no records in {', '.join(map(str, files[:3]))}")
        seconds = time.perf_counter() - start
        results = []
        for key, prefix, builder in zip((TEXT_KEY, LABEL_KEY), prefixes, builders):
            n_docs, n_tokens = builder.num_documents, builder.num_tokens
            builder.finalize()
            results.append(PrepareResult(prefix, key, n_docs, n_tokens, 0, total_bytes, seconds))
        return results
    finally:
        if bar is not None:
            bar.close()
        for builder in builders:
            if not builder.finalized:
                builder.abort()
