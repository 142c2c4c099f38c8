"""A Hugging Face GPT-NeoX / Pythia, Llama or Mistral folder -> a checkpoint in our format (any TP / PP layout) plus
the YAML of its architecture, so that ``python deepy.py train.py <that yaml> <your data/training yaml> --load DIR
--finetune`` continues from the HF weights.

Only HF settings ``GPTModel`` computes exactly are accepted (rope_type ``default``, erf-GELU / ReLU / gated
activations, Llama's full-head rotary, Mistral's ``sliding_window`` s as ``sliding_window_width`` s - 1); anything
else is refused with one line naming the ``config.json`` key.
A ``sepllm`` block in ``config.json`` (written by our exporter) is turned back into the SepLLM keys; without one,
SepLLM keys at the top level of ``config.json`` (the SepLLM authors' ``sepllm_gpt_neox`` format,
``megatron.sepllm.authors_config``, ``megatron.checkpoint.hf.sepllm_gpt_neox``) are read instead.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from megatron.checkpoint.format import CONFIG_FILE, FORMAT_VERSION, LATEST_FILE, META_FILE, checkpoint_name
from megatron.checkpoint.hf import sepllm_gpt_neox as authors_weights
from megatron.checkpoint.hf.mapping import FROM_HF, HF_GATED_ACTS
from megatron.config import derived
from megatron.config.errors import ConfigError
from megatron.sepllm import authors_config as authors
from megatron.sepllm.config_block import sepllm_settings

GENERATED_YAML = "model.yml"
_MODEL_TYPES = {"gpt_neox": "neox", "llama": "llama", "mistral": "mistral", authors.MODEL_TYPE: "neox"}


class ImportHFError(ConfigError):
    """The HF folder cannot be imported as asked; the message names the file, key and value."""


@dataclass(frozen=True)
class ImportResult:
    checkpoint_dir: Path      # output_dir/global_step0
    yaml_file: Path           # output_dir/model.yml
    architecture: str


def _read_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ImportHFError(f"--hf_dir {hf_dir}: no config.json (expected a Hugging Face model folder)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ImportHFError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ImportHFError(f"{path}: expected a JSON object")
    return raw


def _rope(raw: dict[str, Any], where: Path, default_pct: float) -> tuple[float, float]:
    rope = raw.get("rope_parameters") or {}
    if raw.get("rope_scaling"):
        rope = {**rope, **raw["rope_scaling"]}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ImportHFError(f"{where}: rope_type = {kind!r}: only 'default' rotary is computed by GPTModel")
    theta = rope.get("rope_theta", raw.get("rope_theta", raw.get("rotary_emb_base", 10000)))
    pct = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", raw.get("rotary_pct", default_pct)))
    return float(theta), float(pct)


def model_keys_from_hf(raw: dict[str, Any], where: Path) -> tuple[str, dict[str, Any]]:
    """``(architecture, GPT-NeoX-style model keys)`` describing the HF model of ``config.json`` ``raw``."""
    model_type = raw.get("model_type")
    arch = _MODEL_TYPES.get(str(model_type))
    if arch is None:
        raise ImportHFError(f"{where}: model_type = {model_type!r}: expected one of {sorted(_MODEL_TYPES)} "
                            f"(GPT-NeoX / Pythia, the SepLLM authors' GPT-NeoX, Llama or Mistral)")
    try:
        hidden, heads, layers = int(raw["hidden_size"]), int(raw["num_attention_heads"]), int(raw["num_hidden_layers"])
        positions = int(raw.get("max_position_embeddings", 2048))
        keys: dict[str, Any] = {
            "num_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "intermediate_size": int(raw["intermediate_size"]), "seq_length": positions,
            "max_position_embeddings": positions, "pos_emb": "rotary",
            "no_weight_tying": not bool(raw.get("tie_word_embeddings", False)),
            "hidden_dropout": float(raw.get("hidden_dropout", 0.0) or 0.0),
            "attention_dropout": float(raw.get("attention_dropout", 0.0) or 0.0),
            "init_method_std": float(raw.get("initializer_range", 0.02)),
            "use_bias_in_attn_linear": bool(raw.get("attention_bias", arch == "neox")),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ImportHFError(f"{where}: missing or invalid key {exc}") from exc
    act = raw.get("hidden_act", "gelu")
    if arch == "neox":
        tanh_gelu = act in derived.TANH_GELU_HF_NAMES     # GPT-NeoX's fused bias+GeLU computes tanh-GELU
        if act not in ("gelu", "relu", "silu", "swish", "mish") and not tanh_gelu:
            raise ImportHFError(f"{where}: hidden_act = {act!r}: GPTModel computes 'gelu' (erf), tanh-GELU "
                                f"({', '.join(derived.TANH_GELU_HF_NAMES)}), 'relu', 'silu' / 'swish' or 'mish' for "
                                f"GPT-NeoX")
        keys["bias_gelu_fusion"] = tanh_gelu
        act = "gelu" if tanh_gelu else act
        theta, pct = _rope(raw, where, 0.25)
        keys.update(rotary_pct=pct, rotary_emb_base=theta, norm="layernorm",
                    layernorm_epsilon=float(raw.get("layer_norm_eps", 1e-5)), activation=act,
                    gpt_j_residual=bool(raw.get("use_parallel_residual", True)), use_bias_in_mlp=True,
                    use_bias_in_norms=True)
    else:
        acts = {hf: ours for ours, hf in HF_GATED_ACTS.items()}
        if act not in acts:
            raise ImportHFError(f"{where}: hidden_act = {act!r}: GPTModel's gated MLP computes "
                                f"{', '.join(repr(a) for a in acts)}")
        theta, pct = _rope(raw, where, 1.0)
        if pct != 1.0:
            raise ImportHFError(f"{where}: partial_rotary_factor = {pct}: Llama rotates the full head")
        head_dim = raw.get("head_dim") or hidden // heads
        if int(head_dim) * heads != hidden:
            raise ImportHFError(f"{where}: head_dim = {head_dim}: GPTModel needs head_dim x num_attention_heads = "
                                f"hidden_size ({hidden})")
        keys.update(rotary_pct=1.0, rotary_emb_base=theta, norm="rmsnorm",
                    rms_norm_epsilon=float(raw.get("rms_norm_eps", 1e-6)), activation=acts[act],
                    gpt_j_residual=False, use_bias_in_mlp=bool(raw.get("mlp_bias", False)), use_bias_in_norms=False,
                    num_kv_heads=int(raw.get("num_key_value_heads") or heads))
    if arch == "mistral":
        keys.update(use_bias_in_attn_linear=False, use_bias_in_mlp=False,
                    sliding_window_width=_sliding_window_width(raw, where))
    # HF's intermediate_size is the width after gating; GPT-NeoX's key is the base width (derived.mlp_widths)
    keys["intermediate_size"] = derived.intermediate_size_for(keys["intermediate_size"], keys["activation"])
    if float(keys["rotary_emb_base"]).is_integer():
        keys["rotary_emb_base"] = int(keys["rotary_emb_base"])
    if authors.is_authors_format(raw):
        try:
            keys = authors_weights.authors_model_keys(raw, keys, str(where))
        except ValueError as exc:
            raise ImportHFError(str(exc)) from exc
    return arch, keys


def _sliding_window_width(raw: dict[str, Any], where: Path) -> Any:
    """GPT-NeoX's ``sliding_window_width`` of a Mistral ``config.json``: HF keeps ``q - k < sliding_window`` keys,
    GPT-NeoX ``q - k <= W``, so ``W = sliding_window - 1`` (None: full attention)."""
    window = raw.get("sliding_window")
    layer_types = raw.get("layer_types")
    if layer_types is not None and len(set(layer_types)) > 1:
        raise ImportHFError(f"{where}: layer_types = {sorted(set(layer_types))}: GPTModel has one attention pattern "
                            f"for every layer")
    if window is None or (layer_types is not None and set(layer_types) == {"full_attention"}):
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ImportHFError(f"{where}: sliding_window = {window!r}: expected null or an integer >= 2 (it becomes "
                            f"sliding_window_width = sliding_window - 1 >= 1)")
    return window - 1


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder: ``model.safetensors``, its sharded index, or ``pytorch_model.bin``
    (``weights_only``)."""
    from safetensors.torch import load_file

    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        state: dict[str, torch.Tensor] = {}
        for name in sorted(set(weight_map.values())):
            state.update(load_file(str(hf_dir / name)))
        return state
    legacy = hf_dir / "pytorch_model.bin"
    if legacy.is_file():
        state = torch.load(legacy, map_location="cpu", weights_only=True)
        if isinstance(state, dict):
            return state
    raise ImportHFError(f"--hf_dir {hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def import_from_hf(hf_dir: str | os.PathLike, output_dir: str | os.PathLike, *, tp: int = 1, pp: int = 1,
                   iteration: int = 0) -> ImportResult:
    """Write ``output_dir/global_step{iteration}`` (weights split for ``tp`` tensor-parallel ranks; pipeline runs
    read the whole-model layout), ``output_dir/latest`` and ``output_dir/model.yml``. Written into a temp folder
    and renamed at the end."""
    from megatron.config import load_config
    from megatron.parallel.reshard import split_tp_state_dict, tp_model_file

    src, out = Path(hf_dir), Path(output_dir)
    if tp < 1 or pp < 1:
        raise ImportHFError(f"--tp {tp} --pp {pp}: both must be >= 1")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ImportHFError(f"--output_dir {out}: exists and is not an empty folder; choose a new path")
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImportHFError(f"--output_dir {out}: cannot create parent folder {out.absolute().parent} "
                            f"({exc.strerror or exc})") from exc
    if not os.access(out.absolute().parent, os.W_OK | os.X_OK):
        raise ImportHFError(f"--output_dir {out}: parent folder {out.absolute().parent} is missing or not writable")
    if not src.is_dir():
        raise ImportHFError(f"--hf_dir {src}: not a folder")
    raw = _read_config(src)
    arch, keys = model_keys_from_hf(raw, src / "config.json")
    vocab = int(raw.get("vocab_size", 0))
    if vocab < 1:
        raise ImportHFError(f"{src / 'config.json'}: vocab_size = {raw.get('vocab_size')!r}: expected > 0")
    multiple = 128 * tp
    keys["padded_vocab_size"] = vocab if vocab % tp == 0 else -(-vocab // multiple) * multiple
    keys["make_vocab_size_divisible_by"] = 128
    block = raw.get("sepllm")      # ours wins over top-level keys (docs/export.md)
    if isinstance(block, dict):
        sep_keys = sepllm_settings(block)
    elif authors.carries_top_level_settings(raw):
        sep_keys = authors.sepllm_keys(raw)
    else:
        sep_keys = {"USE_ORIGINAL_FULL_ATTEN": True}
    sep_keys.pop("Layer_num", None)
    layout = {"model-parallel-size": tp, "pipe-parallel-size": pp if pp > 1 else 0}
    tokenizer = src / "tokenizer.json"
    tok_keys = {"tokenizer-type": "HFTokenizer", "vocab-file": str((out / "tokenizer.json").absolute())} \
        if tokenizer.is_file() else {}
    yaml_keys = {**keys, **sep_keys, **layout, **tok_keys}
    try:
        cfg = load_config(dict(yaml_keys))
    except ConfigError as exc:
        raise ImportHFError(f"{src / 'config.json'}: the derived config is invalid: {exc}") from exc
    try:
        weights = read_hf_weights(src)
        if arch == "neox":             # transformers 4.x names: the authors' prefix, ``embed_out`` for the head
            weights = authors_weights.rename_weights(weights)
        convert = (authors_weights.from_sepllm_gpt_neox_state_dict if authors.is_authors_format(raw)
                   else FROM_HF[arch])
        state = convert(weights, cfg.model, cfg.sepllm)
    except (KeyError, ValueError) as exc:
        raise ImportHFError(f"--hf_dir {src}: {str(exc).strip(chr(34) + chr(39))}") from exc
    shards = split_tp_state_dict(state, tp, cfg.model) if tp > 1 else [state]

    tmp = out.absolute().parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    step = tmp / checkpoint_name(iteration)
    step.mkdir(parents=True)
    try:
        for rank, shard in enumerate(shards):
            torch.save({k: v.contiguous().clone() for k, v in shard.items()}, step / tp_model_file(rank, tp))
        meta = {"format_version": FORMAT_VERSION, "iteration": iteration, "world_size": tp * pp, "zero_stage": 0,
                "tensor_parallel_size": tp, "pipe_parallel_size": pp, "optimizer_per_rank": False,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch_version": torch.__version__,
                "param_shapes": {k: list(v.shape) for k, v in shards[0].items()},
                "client_state": {"imported_from": str(src.absolute()), "architecture": arch}}
        (step / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        (step / CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")
        (tmp / LATEST_FILE).write_text(step.name + "\n", encoding="utf-8")
        header = (f"# Architecture of {src.absolute()} ({arch}), written by tools/ckpts/convert_hf_to_neox.py.\n"
                  f"# Continue training: python deepy.py train.py {out.absolute() / GENERATED_YAML} <data/training "
                  f"yml> --load {out.absolute()} --finetune true\n")
        (tmp / GENERATED_YAML).write_text(header + yaml.safe_dump(yaml_keys, sort_keys=False), encoding="utf-8")
        if tokenizer.is_file():
            shutil.copy2(tokenizer, tmp / "tokenizer.json")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportResult(out / step.name, out / GENERATED_YAML, arch)


__all__ = ["GENERATED_YAML", "ImportHFError", "ImportResult", "import_from_hf", "model_keys_from_hf",
           "read_hf_weights"]
