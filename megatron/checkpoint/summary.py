"""What one checkpoint holds, read without materialising its tensors (``mmap``): layout, position, tensors, sizes.

:func:`describe_checkpoint` returns a JSON-able dict; :func:`summary_lines` formats it. Used by
``tools/ckpts/inspect_checkpoint.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from megatron.checkpoint.format import CONFIG_FILE, CheckpointError, read_meta, resolve_checkpoint_dir
from megatron.checkpoint.layout_free import find_optim_full_files


def _load_mmap(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several types for truncated/corrupt archives
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable: {type(exc).__name__}") from exc


def _seq_length(ckpt: Path) -> int | None:
    try:
        config = yaml.safe_load((ckpt / CONFIG_FILE).read_text(encoding="utf-8"))
        return int(config["model"]["seq_length"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def _model_tensors(ckpt: Path) -> list[dict[str, Any]]:
    """Every module tensor with its full (TP-merged) shape, dtype and bytes."""
    from megatron.parallel.reshard import find_tp_model_files, infer_gated, shard_spec

    files = find_tp_model_files(ckpt)
    shards = [_load_mmap(p) for p in files]
    tp = len(shards)
    gated = infer_gated(shards[0]) if tp > 1 else False
    rows = []
    for name, tensor in shards[0].items():
        shape = list(tensor.shape)
        spec = shard_spec(name, gated) if tp > 1 else None
        if spec is not None:
            shape[spec.dim] *= tp
        numel = 1
        for n in shape:
            numel *= n
        rows.append({"name": name, "shape": shape, "dtype": str(tensor.dtype).removeprefix("torch."),
                     "numel": numel, "bytes": numel * tensor.element_size()})
    return rows


def _optimizer(ckpt: Path, meta: dict[str, Any]) -> dict[str, Any]:
    files = find_optim_full_files(ckpt)
    out: dict[str, Any] = {"saved": bool(meta.get("has_optimizer", True)),
                           "per_rank_files": sorted(p.name for p in ckpt.glob("optim_rank*.pt")),
                           "layout_free_files": sorted(p.name for p in files.values())}
    if files:
        first = _load_mmap(sorted(files.items())[0][1])
        out["step"] = first.get("step")
        out["states"] = sorted(first.get("states", {}))
        out["loss_scaler"] = first.get("loss_scaler")
    return out


def describe_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Layout, iteration, samples / tokens seen, files and tensors of the checkpoint at ``path`` (a ``global_stepN``
    folder, or a save folder whose ``latest`` names one)."""
    ckpt = resolve_checkpoint_dir(path)
    meta = read_meta(ckpt)
    client = meta.get("client_state", {})
    world = int(meta.get("world_size", 1))
    tp, pp = int(meta.get("tensor_parallel_size", 1)), int(meta.get("pipe_parallel_size", 1))
    consumed = client.get("consumed_train_samples")
    seq = _seq_length(ckpt)
    tensors = _model_tensors(ckpt)
    return {
        "path": str(ckpt),
        "format_version": meta.get("format_version"),
        "saved_at": meta.get("saved_at"),
        "iteration": int(meta["iteration"]),
        "consumed_samples": consumed,
        "seq_length": seq,
        "tokens_seen": consumed * seq if consumed is not None and seq is not None else None,
        "layout": {"world_size": world, "data_parallel": meta.get("data_parallel_size", world // max(tp * pp, 1)),
                   "tensor_parallel": tp, "pipeline_stages": pp, "zero_stage": meta.get("zero_stage"),
                   "precision": meta.get("precision"), "global_batch": meta.get("global_batch_size")},
        "lr_scheduler": client.get("lr_scheduler"),
        "optimizer": _optimizer(ckpt, meta),
        "rng_files": sorted(p.name for p in ckpt.glob("rng_rank*.pt")),
        "files": {p.name: p.stat().st_size for p in sorted(ckpt.iterdir()) if p.is_file()},
        "tensors": tensors,
        "parameters": sum(t["numel"] for t in tensors),
    }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def summary_lines(info: dict[str, Any], tensors: bool = True) -> list[str]:
    """Human-readable lines of :func:`describe_checkpoint`'s dict."""
    lay, opt = info["layout"], info["optimizer"]
    tokens = (f"{info['tokens_seen']:,} tokens ({info['consumed_samples']:,} samples x seq {info['seq_length']})"
              if info["tokens_seen"] is not None else f"{info['consumed_samples']} samples (seq length unknown)")
    lines = [f"checkpoint   {info['path']} (format {info['format_version']}, saved {info['saved_at']})",
             f"iteration    {info['iteration']}",
             f"seen         {tokens}",
             f"layout       world size {lay['world_size']} = DP {lay['data_parallel']} x TP {lay['tensor_parallel']}"
             f" x PP {lay['pipeline_stages']} | ZeRO {lay['zero_stage']} | precision {lay['precision'] or '?'} | "
             f"global batch {lay['global_batch'] or '?'}"]
    if not opt["saved"]:
        lines.append("optimizer    not saved (no_save_optim)")
    else:
        free = (f"layout-free copy ({len(opt['layout_free_files'])} file(s); step {opt.get('step')}; states "
                f"{', '.join(opt.get('states', []))})" if opt["layout_free_files"] else "no layout-free copy")
        lines.append(f"optimizer    {len(opt['per_rank_files'])} DeepSpeed per-rank file(s) (this layout only), "
                     f"{free}")
    lines.append(f"rng          {len(info['rng_files'])} rank file(s)")
    lines.append(f"files        {len(info['files'])}, {_size(sum(info['files'].values()))} in all")
    for name, size in info["files"].items():
        lines.append(f"  {name:<36} {_size(size):>10}")
    lines.append(f"tensors      {len(info['tensors'])} model tensors, {info['parameters']:,} values "
                 "(full shapes, tensor-parallel shards merged)")
    if tensors:
        for t in info["tensors"]:
            lines.append(f"  {t['name']:<52} {str(tuple(t['shape'])):<16} {t['dtype']:<9} {_size(t['bytes']):>10}")
    return lines


__all__ = ["describe_checkpoint", "summary_lines"]
