"""Load a trained checkpoint of ours as one full ``GPTModel`` on CPU: the entry point of every tool that uses a
trained model outside the training loop (HF export, ``eval.py``, ``generate.py``).

A checkpoint may have been written under any tensor- and pipeline-parallel layout: pipeline runs save the gathered
``GPTModel`` layout, tensor-parallel runs one ``mp_rank_XX_model_states.pt`` per TP rank, which
:func:`megatron.parallel.reshard.merge_tp_state_dicts` joins (split tensors concatenated, replicated tensors taken
once after checking that every rank holds the same values, so a replicated bias is never summed). Files are read
with ``torch.load(weights_only=True)``; the config is the resolved ``config.yml`` saved beside the weights unless
the caller gives the training YAML(s).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from megatron.config.errors import ConfigError
from megatron.checkpoint.format import (
    CONFIG_FILE,
    META_FILE,
    CheckpointError,
    check_model_shapes,
    checkpoint_name,
    load_file,
    read_meta,
    resolve_checkpoint_dir,
)

if TYPE_CHECKING:
    from megatron.model.gpt import GPTModel

EMBEDDING_KEY = "embed.word_embeddings.weight"


@dataclass(frozen=True)
class TrainedModel:
    """A trained model ready for inference, with the config and checkpoint it came from."""

    model: "GPTModel"            # eval() mode, on CPU, full (unsharded) weights, dtype as requested
    config: Any                   # the resolved NeoXConfig (what megatron.config.load_config returns)
    iteration: int
    checkpoint_dir: Path          # the global_stepN folder actually read


def checkpoint_to_read(checkpoint_cfg: Any, tool: str) -> str:
    """The checkpoint folder an inference tool (``eval.py``, ``generate.py``) reads: ``load``, or else the run's own
    ``save`` folder, so the training config works unchanged after training (GPT-NeoX configs usually set both)."""
    source = checkpoint_cfg.load or checkpoint_cfg.save
    if not source:
        raise ConfigError(f"{tool} needs key 'load' (or 'save'): the checkpoint folder (a run's checkpoints/ with "
                          "`latest`, or one global_stepN folder)")
    return str(source)


def find_checkpoint_dir(load_dir: str | os.PathLike, iteration: int | None = None) -> Path:
    """The ``global_stepN`` folder to read: ``load_dir`` itself, the one ``latest`` names, or
    ``global_step{iteration}``.

    Raises :class:`CheckpointError` with one line naming the path when nothing usable is there."""
    path = Path(load_dir)
    if iteration is None:
        return resolve_checkpoint_dir(path)
    if iteration < 0:
        raise CheckpointError(f"iteration = {iteration}: expected >= 0")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} does not exist or is not a directory")
    if (path / META_FILE).is_file():
        meta = read_meta(path)
        if int(meta["iteration"]) != iteration:
            raise CheckpointError(f"checkpoint {path} holds iteration {meta['iteration']}, not the requested "
                                  f"iteration {iteration}")
        return path
    target = path / checkpoint_name(iteration)
    if not (target / META_FILE).is_file():
        have = sorted(int(p.name[len("global_step"):]) for p in path.glob("global_step*")
                      if p.name[len("global_step"):].isdigit() and (p / META_FILE).is_file())
        raise CheckpointError(f"no complete checkpoint for iteration {iteration} in {path} (expected {target.name}/"
                              f"{META_FILE}; available iterations: {have or 'none'})")
    return target


def read_full_model_state(ckpt_dir: Path, model_cfg: Any = None) -> dict[str, torch.Tensor]:
    """The full (TP=1, all pipeline stages) ``GPTModel`` state dict stored in ``ckpt_dir``.

    ``model_cfg`` (a ``ModelConfig``) says whether the MLP is gated; without it that is read off the shapes."""
    from megatron.parallel.reshard import ReshardError, find_tp_model_files, merge_tp_state_dicts

    ckpt_dir = Path(ckpt_dir)
    try:
        files = find_tp_model_files(ckpt_dir)
    except (ReshardError, OSError) as exc:
        raise CheckpointError(str(exc)) from exc
    shards = []
    for path in files:
        state = load_file(path)
        if isinstance(state, dict) and isinstance(state.get("module"), dict):
            state = state["module"]  # DeepSpeed-style wrapper
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"checkpoint file {path} does not hold a module state dict (name -> tensor)")
        shards.append(state)
    if len(shards) == 1:
        return shards[0]
    try:
        return merge_tp_state_dicts(shards, model_cfg, check_replicated=True)
    except (ReshardError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {ckpt_dir}: cannot merge its {len(shards)} tensor-parallel shards: "
                              f"{exc}") from exc


def load_checkpoint_config(ckpt_dir: Path, config_files: Sequence[str | os.PathLike] = (),
                           overrides: Sequence[str] = ()) -> Any:
    """The run config: ``config_files`` (later wins) if given, else the resolved ``config.yml`` saved in
    ``ckpt_dir``; ``overrides`` are command-line tokens (``["--sep_attention_impl", "dense"]``)."""
    from megatron.config import load_config

    if config_files:
        sources = [Path(f) for f in config_files]
    else:
        saved = Path(ckpt_dir) / CONFIG_FILE
        if not saved.is_file():
            raise CheckpointError(f"checkpoint {ckpt_dir} has no saved {CONFIG_FILE}; pass the training config "
                                  f"file(s) explicitly")
        sources = [saved]
    return load_config(*sources, overrides=list(overrides))


def load_trained_model(load_dir: str | os.PathLike, *, config_files: Sequence[str | os.PathLike] = (),
                       overrides: Sequence[str] = (), iteration: int | None = None,
                       dtype: torch.dtype = torch.float32) -> TrainedModel:
    """Build the trained ``GPTModel`` from a checkpoint written under any TP / PP layout.

    ``load_dir``: a ``global_stepN`` folder or a run's ``checkpoints/`` folder (``latest`` is used unless
    ``iteration`` picks ``global_step{iteration}``). Raises :class:`CheckpointError` (checkpoint problems) or
    :class:`ConfigError` (config problems), each with one line naming the path / key.
    """
    from megatron.model.gpt import GPTModel

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype = {dtype!r}: expected a floating torch dtype (torch.float32, torch.bfloat16, ...)")
    ckpt = find_checkpoint_dir(load_dir, iteration)
    meta = read_meta(ckpt)
    cfg = load_checkpoint_config(ckpt, config_files, overrides)
    state = read_full_model_state(ckpt, cfg.model)
    if EMBEDDING_KEY not in state:
        raise CheckpointError(f"checkpoint {ckpt} has no {EMBEDDING_KEY!r}: not a GPTModel checkpoint")
    rows = int(state[EMBEDDING_KEY].shape[0])
    if cfg.model.padded_vocab_size is None:
        cfg.model.padded_vocab_size = rows  # derived from the tokenizer at training time; the weights know it
    elif cfg.model.padded_vocab_size != rows:
        raise CheckpointError(f"checkpoint {ckpt} has {rows} embedding rows, the config says padded_vocab_size = "
                              f"{cfg.model.padded_vocab_size}")
    try:
        with torch.device("meta"):
            model = GPTModel(cfg.model, cfg.sepllm)
    except ValueError as exc:
        raise ConfigError(f"{ckpt}: cannot build the model from its config: {exc}") from exc
    check_model_shapes(state, model, ckpt)
    model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    model.to(dtype)
    model.eval()
    return TrainedModel(model=model, config=cfg, iteration=int(meta["iteration"]), checkpoint_dir=ckpt)


__all__ = ["TrainedModel", "checkpoint_to_read", "find_checkpoint_dir", "load_checkpoint_config",
           "load_trained_model", "read_full_model_state"]
