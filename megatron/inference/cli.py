"""``generate.py``: load a checkpoint, read prompts (file, console or none), generate in batches, write JSONL.

Errors reach the user as one ``error: ...`` line: exit 2 for a config or input problem, 1 for an unusable
checkpoint or a failure during the run.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, TextIO

import torch

from megatron.atomic_io import atomic_open
from megatron.device import resolve_device
from megatron.inference.generator import generate_batch
from megatron.inference.kv_cache import KVCacheSettings, model_attention_mode
from megatron.inference.sampling import SamplingSettings
from megatron.errors import UserInputError

if TYPE_CHECKING:
    from megatron.config.neox import NeoXConfig


class UsageError(UserInputError, ValueError):
    """A config / input problem (exit 2)."""


@dataclass
class Sample:
    """One JSONL row (GPT-NeoX's fields)."""

    context: str
    text: str
    length: int
    finished: bool
    message: Optional[str]
    duration_seconds: float

    def to_json(self) -> str:
        return json.dumps({"context": self.context, "text": self.text, "length": self.length,
                           "finished": self.finished, "message": self.message,
                           "duration_seconds": round(self.duration_seconds, 6)}, ensure_ascii=False)


@dataclass
class Session:
    """A loaded model with everything a generation call needs."""

    model: Any
    tokenizer: Any
    cfg: Any
    sampling: SamplingSettings
    cache_settings: KVCacheSettings
    generator: torch.Generator
    chat_template: Any = None       # megatron.data.chat_templates.ChatTemplate of key chat_template, or None

    def _prompt_ids(self, contexts: Sequence[str]) -> list[list[int]]:
        """The prompts' ids ("" = unconditional: the end-of-document token); with ``chat_template`` each prompt is a
        user message opening an assistant reply, tokenized piece by piece as the fine-tuning data was."""
        eod = self.tokenizer.eod
        if self.chat_template is None:
            return [self.tokenizer.tokenize(c) if c else [eod] for c in contexts]
        from megatron.data.chat_templates import prompt_segments

        return [[i for piece in prompt_segments(self.chat_template, c) for i in self.tokenizer.tokenize(piece)]
                if c else [eod] for c in contexts]

    def generate(self, contexts: Sequence[str], on_token: Optional[Callable[[int, int], None]] = None
                 ) -> list[Sample]:
        """One batch of prompts (texts; "" = unconditional, starting from the end-of-document token)."""
        eod = self.tokenizer.eod
        prompts = self._prompt_ids(contexts)
        for c, p in zip(contexts, prompts):
            if not p:
                raise UsageError(f"prompt {c!r} encodes to no tokens")
        gen = self.cfg.generation
        start = time.perf_counter()
        out = generate_batch(self.model, prompts, max_new_tokens=gen.maximum_tokens, eos_id=eod,
                             sampling=self.sampling, vocab_size=self.tokenizer.vocab_size, recompute=gen.recompute,
                             cache_settings=self.cache_settings, generator=self.generator, on_token=on_token,
                             pad_id=eod)
        duration = time.perf_counter() - start
        return [Sample(context=c, text=self.tokenizer.detokenize(r.tokens), length=len(r.tokens),
                       finished=r.finished, message=r.message, duration_seconds=duration)
                for c, r in zip(contexts, out)]


def load_session(files: Sequence[str], overrides: Sequence[str], config: Optional[NeoXConfig] = None) -> Session:
    """Config (``config`` when the caller loaded it already), checkpoint, tokenizer. Raises ConfigError / UsageError /
    CheckpointError (all exit 2)."""
    from megatron.checkpoint.trained import checkpoint_to_read, load_trained_model
    from megatron.config import load_config
    from megatron.tokenizer.base import TokenizerError
    from megatron.tokenizer.factory import build_tokenizer

    cfg = config if config is not None else load_config(*files, overrides=list(overrides))
    gen = cfg.generation
    source = checkpoint_to_read(cfg.checkpoint, "generate.py")
    if gen.text_gen_type == "input-file":
        if not gen.sample_input_file:
            raise UsageError("text_gen_type 'input-file' needs key 'sample_input_file'")
        if not Path(gen.sample_input_file).is_file():
            raise UsageError(f"sample_input_file {gen.sample_input_file}: no such file")
    tok = cfg.tokenizer
    try:
        tokenizer = build_tokenizer(tok.tokenizer_type, tok.vocab_file, tok.merge_file)
    except (TokenizerError, OSError) as exc:
        raise UsageError(f"tokenizer (tokenizer_type {tok.tokenizer_type}, vocab_file {tok.vocab_file}): {exc}") \
            from None
    chat_template = None
    if gen.chat_template is not None:
        from megatron.data.chat_templates import resolve_template
        from megatron.data.errors import PrepareError

        try:
            chat_template = resolve_template(gen.chat_template, tok.vocab_file)
        except PrepareError as exc:
            raise UsageError(str(exc).replace("--chat-template ", "chat_template ", 1)) from None
    device = resolve_device(cfg.training.device, key="device")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.training.precision, torch.float32)
    if device == "cpu" and dtype == torch.float16:
        dtype = torch.float32   # fp16 matmuls are not a CPU thing; results only get more exact
    trained = load_trained_model(source, config_files=list(files), overrides=list(overrides),
                                 dtype=dtype)
    model = trained.model.to(device)
    if tokenizer.vocab_size > model.cfg.padded_vocab_size:
        raise UsageError(f"tokenizer {tok.vocab_file} has {tokenizer.vocab_size} tokens but the checkpoint's "
                         f"embedding has {model.cfg.padded_vocab_size} rows: not the tokenizer it was trained with")
    print(f"generate: iteration {trained.iteration} from {trained.checkpoint_dir}, attention "
          f"{model_attention_mode(model)}, "
          f"{'recompute (no KV cache)' if gen.recompute else 'kv_cache ' + gen.kv_cache}, device {device}",
          file=sys.stderr)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(cfg.training.seed))
    return Session(model=model, tokenizer=tokenizer, cfg=cfg, chat_template=chat_template,
                   sampling=SamplingSettings(gen.temperature, gen.top_k, gen.top_p),
                   cache_settings=KVCacheSettings(kind=gen.kv_cache, init_cache_size=gen.init_cache_size,
                                                  sep_cache_size=gen.sep_cache_size,
                                                  local_size=gen.local_cache_size, cache_size=gen.cache_size,
                                                  exact_window=gen.sep_cache_exact_window),
                   generator=generator)


def read_prompts(path: str, prompt_end: str) -> list[str]:
    """The prompts of ``sample_input_file``: split at ``prompt_end``, blank pieces dropped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"sample_input_file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return [p for p in text.split(prompt_end) if p.strip()]


def _batches(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def write_samples(session: Session, contexts: Sequence[str], output: str) -> list[Sample]:
    """Generate for every context in batches of ``train_micro_batch_size_per_gpu``; rows go to ``output``
    (written to a temp file, renamed when complete)."""
    from tqdm import tqdm

    batch = max(int(session.cfg.training.train_micro_batch_size_per_gpu or 1), 1)
    path = Path(output)
    samples: list[Sample] = []
    seconds = 0.0
    with atomic_open(path, make_parents=True) as fh, tqdm(total=len(contexts), desc="generate", unit="sample",
                                                          file=sys.stderr) as bar:
        for chunk in _batches(contexts, batch):
            rows = session.generate(chunk)
            seconds += rows[0].duration_seconds
            for sample in rows:
                fh.write(sample.to_json() + "\n")
                samples.append(sample)
            fh.flush()
            bar.update(len(chunk))
    tokens = sum(s.length for s in samples)
    print(f"generate: wrote {len(samples)} samples ({tokens} tokens, {tokens / max(seconds, 1e-9):.1f} tokens/s) "
          f"to {path}", file=sys.stderr)
    noted = [s for s in samples if s.message]
    if noted:
        print(f"generate: note: {len(noted)} of {len(samples)} samples carry a message (field 'message'), e.g. "
              f"{noted[0].message}", file=sys.stderr)
    return samples


def interactive(session: Session, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """Read a prompt per line ('exit' or end of input stops), print the continuation token by token."""
    tokenizer = session.tokenizer
    while True:
        stdout.write("Please enter prompt (type 'exit' to quit): ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "exit":
            stdout.write("\n")
            return
        prompt = line.rstrip("\n")
        shown: list[int] = []
        printed = ""

        def stream(row: int, token: int) -> None:
            nonlocal printed
            shown.append(token)
            text = tokenizer.detokenize(shown)
            if not text.endswith("\ufffd"):          # wait for the rest of a multi-token character
                stdout.write(text[len(printed):])
                stdout.flush()
                printed = text

        sample = session.generate([prompt], on_token=stream)[0]
        stdout.write(sample.text[len(printed):] + "\n")
        if sample.message:
            stdout.write(f"[{sample.message}]\n")
        stdout.flush()


def run_generation(files: Sequence[str], overrides: Sequence[str], config: Optional[NeoXConfig] = None) -> int:
    """The whole of ``generate.py`` after argument splitting (``config``: already loaded from them); returns the exit
    code."""
    from megatron.errors import NeoxError, report_error

    try:
        session = load_session(files, overrides, config)
        gen = session.cfg.generation
        if gen.text_gen_type == "interactive":
            interactive(session)
        elif gen.text_gen_type == "input-file":
            prompts = read_prompts(gen.sample_input_file, gen.prompt_end)
            if not prompts:
                raise UsageError(f"sample_input_file {gen.sample_input_file}: no prompts (the file is empty or "
                                 f"holds only blank pieces between prompt_end {gen.prompt_end!r})")
            write_samples(session, prompts, gen.sample_output_file)
        else:
            write_samples(session, [""] * gen.num_samples, gen.sample_output_file)
    except NeoxError as exc:
        return report_error(exc)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


__all__ = ["Sample", "Session", "UsageError", "interactive", "load_session", "read_prompts", "run_generation",
           "write_samples"]
