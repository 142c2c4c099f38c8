"""Our checkpoint -> a Hugging Face model folder (``config.json``, safetensors, tokenizer files).

The folder is written into a hidden temp folder beside ``output_dir`` and renamed into place at the end, so a failed
export never leaves a half-written ``output_dir``. Everything that makes the export impossible (missing checkpoint,
a config HF cannot express, an output folder that exists or cannot be written) is found before any weight is written
and raised as :class:`ExportError` (one line).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from megatron.checkpoint.hf import sepllm_neox
from megatron.checkpoint.hf.mapping import ARCHITECTURES, CHECKS, HF_CLASSES, HF_CONFIGS, TO_HF
from megatron.checkpoint.trained import load_trained_model
from megatron.config.errors import ConfigError
from megatron.config.model import ModelConfig
from megatron.sepllm.config_block import BLOCK_KEY, build_block, check_exportable

if TYPE_CHECKING:
    from megatron.config.neox import NeoXConfig


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3  # as transformers' save_pretrained: shard above 5 GB
#: the transformers classes first; ``sepllm_neox`` (own modeling code) only when asked for, or suggested on refusal
EXPORT_ARCHITECTURES = (*ARCHITECTURES, sepllm_neox.ARCHITECTURE)
REMOTE_CODE_HINT = (f"; --architecture {sepllm_neox.ARCHITECTURE} exports it with its own modeling code (load with "
                    f"trust_remote_code=True)")


class ExportError(ConfigError):
    """The export cannot be done as asked; the message names the input, key or path."""


@dataclass(frozen=True)
class ExportResult:
    output_dir: Path
    architecture: str
    dtype: torch.dtype
    iteration: int
    files: tuple[str, ...]


def default_architecture(model_cfg: ModelConfig) -> str:
    """``llama`` for RMSNorm + gated-MLP models (``mistral`` when they have ``sliding_window_width``), ``neox``
    otherwise (the shape the config describes)."""
    from megatron.model.mlp import GATED

    if model_cfg.norm == "rmsnorm" and model_cfg.activation in GATED:
        return "llama" if model_cfg.sliding_window_width is None else "mistral"
    return "neox"


def make_temp_beside(output_dir: Path) -> Path:
    """Check that ``output_dir`` can be created and create the hidden temp folder it will be renamed from."""
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ExportError(f"--output_dir {output_dir}: exists and is not an empty folder; choose a new path")
    parent = output_dir.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)          # like mkdir -p: hf/run1 works without creating hf/
    except OSError as exc:
        raise ExportError(f"--output_dir {output_dir}: cannot create parent folder {parent} "
                          f"({exc.strerror or exc})") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"--output_dir {output_dir}: parent folder {parent} is not writable")
    tmp = parent / f".{output_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise ExportError(f"--output_dir {output_dir}: cannot write in {parent} ({exc.strerror or exc})") from exc
    return tmp


def _new_file_mode(folder: Path) -> int:
    """The permissions ``open()`` gives a new file in ``folder`` (0644 under the usual umask). safetensors writes its
    files 0600; the weights get the mode of the other exported files instead."""
    probe = folder / ".mode-probe"
    probe.touch()
    try:
        return probe.stat().st_mode & 0o777
    finally:
        probe.unlink()


def save_safetensors(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> list[str]:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` when the
    weights exceed ``max_shard_bytes`` (the layout ``from_pretrained`` reads)."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    mode = _new_file_mode(out)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(out / "model.safetensors", mode)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
        os.chmod(out / name, mode)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return names + ["model.safetensors.index.json"]


def _hf_tokenizer(cfg: NeoXConfig, vocab_is_hf_tokenizer: bool) -> Optional[Any]:
    """A transformers fast tokenizer for the run's tokenizer (None when it has no HF form)."""
    tok_cfg = cfg.tokenizer
    if vocab_is_hf_tokenizer:
        from transformers import AutoTokenizer

        if not tok_cfg.vocab_file:
            raise ExportError("--vocab-is-hf-tokenizer needs the config key 'vocab_file' to name a tokenizer folder")
        try:
            return AutoTokenizer.from_pretrained(tok_cfg.vocab_file)
        except (OSError, ValueError) as exc:
            raise ExportError(f"--vocab-is-hf-tokenizer: vocab_file {tok_cfg.vocab_file} is not a Hugging Face "
                              f"tokenizer folder ({type(exc).__name__})") from exc
    if str(tok_cfg.tokenizer_type).lower() != "hftokenizer":
        return None
    from transformers import PreTrainedTokenizerFast

    path = Path(str(tok_cfg.vocab_file))
    if not path.is_file():
        raise ExportError(f"config key 'vocab_file' = {path}: tokenizer file not found (pass --no_save_tokenizer to "
                          f"export the weights only)")
    return PreTrainedTokenizerFast(tokenizer_file=str(path))


def _special_tokens(tokenizer: Any, cfg: NeoXConfig, pad_token_id: Optional[int],
                    vocab: int) -> dict[str, Optional[int]]:
    """bos/eos = the end-of-document token the run trained with; pad = ``--pad-token-id`` or eos."""
    eos = None
    if tokenizer is not None:
        for name in ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>"):
            tid = tokenizer.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
                eos = tid
                break
        if eos is None:
            eos = tokenizer.eos_token_id
    pad = pad_token_id if pad_token_id is not None else eos
    if pad is not None and not 0 <= pad < vocab:
        raise ExportError(f"--pad-token-id {pad}: outside the vocabulary [0, {vocab})")
    return {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad}


def export_to_hf(input_dir: str | os.PathLike, output_dir: str | os.PathLike, *, config_file: Optional[str] = None,
                 precision: str = "auto", architecture: Optional[str] = None, save_tokenizer: bool = True,
                 vocab_is_hf_tokenizer: bool = False, pad_token_id: Optional[int] = None,
                 iteration: Optional[int] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 progress: bool = False) -> ExportResult:
    """Convert the checkpoint at ``input_dir`` (any TP / PP layout) into an HF folder at ``output_dir``.

    ``precision``: ``auto`` (the precision the run trained in) or ``fp32`` / ``fp16`` / ``bf16``;
    ``architecture``: ``neox`` (``GPTNeoXForCausalLM``), ``llama`` (``LlamaForCausalLM``) or ``mistral``
    (``MistralForCausalLM``, the sliding window as HF's ``sliding_window = W + 1``), default from the model config;
    ``sepllm_neox`` writes the model's own modeling code beside the weights (every config we train,
    loaded with ``trust_remote_code=True``; ``megatron.checkpoint.hf.sepllm_neox``). Raises :class:`ExportError` /
    ``CheckpointError`` / ``ConfigError`` with one line.
    """
    out = Path(output_dir)
    if precision not in ("auto", *PRECISIONS):
        raise ExportError(f"--precision {precision!r}: expected one of auto, fp16, bf16, fp32")
    if architecture is not None and architecture not in EXPORT_ARCHITECTURES:
        raise ExportError(f"--architecture {architecture!r}: expected one of {', '.join(EXPORT_ARCHITECTURES)}")
    tmp = make_temp_beside(out)
    try:
        return _export(input_dir, out, tmp, config_file, precision, architecture, save_tokenizer,
                       vocab_is_hf_tokenizer, pad_token_id, iteration, max_shard_bytes, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _export(input_dir: Any, out: Path, tmp: Path, config_file: Optional[str], precision: str,
            architecture: Optional[str], save_tokenizer: bool, vocab_is_hf_tokenizer: bool,
            pad_token_id: Optional[int], iteration: Optional[int], max_shard_bytes: int,
            progress: bool) -> ExportResult:
    from tqdm import tqdm

    trained = load_trained_model(input_dir, config_files=[config_file] if config_file else (), iteration=iteration)
    cfg = trained.config
    arch = architecture or default_architecture(cfg.model)
    remote = arch == sepllm_neox.ARCHITECTURE
    try:
        if not remote:
            CHECKS[arch](cfg.model)
            check_exportable(cfg.sepllm)
    except ValueError as exc:
        raise ExportError(f"{trained.checkpoint_dir}: {str(exc).rstrip('.')}{REMOTE_CODE_HINT}") from exc
    dtype = PRECISIONS[cfg.model.precision if precision == "auto" else precision]
    tokenizer = _hf_tokenizer(cfg, vocab_is_hf_tokenizer) if save_tokenizer else None
    special = _special_tokens(tokenizer, cfg, pad_token_id, int(cfg.model.padded_vocab_size))
    block = build_block(cfg.sepllm, cfg.model.num_layers, own_attention=remote)
    if remote:
        try:
            hf_config = sepllm_neox.sepllm_neox_config(cfg.model, cfg.sepllm, dtype=dtype, **{BLOCK_KEY: block},
                                                       **special)
        except ValueError as exc:
            raise ExportError(f"{trained.checkpoint_dir}: {exc}") from exc
        state = sepllm_neox.to_sepllm_neox_state_dict(trained.model.state_dict(), cfg.model, cfg.sepllm,
                                                      include_tied_head=False)
    else:
        hf_config = HF_CONFIGS[arch](cfg.model, dtype=dtype, architectures=[HF_CLASSES[arch]],
                                     **{BLOCK_KEY: block}, **special)
        state = TO_HF[arch](trained.model.state_dict(), cfg.model, include_tied_head=False)
    items = tqdm(sorted(state), desc="converting", disable=not progress, unit="tensor")
    state = {k: state[k].to(dtype).contiguous().clone() for k in items}
    save_safetensors(state, tmp, max_shard_bytes)
    hf_config.save_pretrained(tmp)
    if remote:
        sepllm_neox.copy_remote_code(tmp)
    if tokenizer is not None:
        if special["pad_token_id"] is not None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(special["pad_token_id"])
        if special["eos_token_id"] is not None:
            tokenizer.eos_token = tokenizer.bos_token = tokenizer.convert_ids_to_tokens(special["eos_token_id"])
        tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()  # checked empty above
    os.replace(tmp, out)
    return ExportResult(out, arch, dtype, trained.iteration, tuple(sorted(p.name for p in out.iterdir())))


__all__ = ["ExportError", "ExportResult", "default_architecture", "export_to_hf", "make_temp_beside",
           "save_safetensors"]
