"""``load_config``: files and dicts merged left to right, command-line overrides last, then validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from megatron.config._loading.merge import merge_sources, parse_overrides
from megatron.config._loading.training_checks import check_training_ready
from megatron.config._loading.validate import build_config
from megatron.config._loading.yaml_io import read_yaml_file
from megatron.config.errors import ConfigError
from megatron.config.neox import NeoXConfig

Source = Union[str, Path, Mapping[str, Any]]


def _flatten_sources(paths: Sequence[Any]) -> list[Source]:
    out: list[Source] = []
    for p in paths:
        if isinstance(p, (list, tuple)):
            out.extend(_flatten_sources(p))
        else:
            out.append(p)
    return out


def _override_args(overrides: Optional[Union[Iterable[str], Mapping[str, Any]]]) -> list[tuple[str, Any, str]]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [(str(k), v, f"--{k}={v!r}") for k, v in overrides.items()]
    if isinstance(overrides, str):
        raise ConfigError("overrides must be a list of command-line tokens such as ['--train-iters', '10'], "
                          "not one string")
    return parse_overrides(overrides)


def load_config(*paths: Union[Source, Sequence[Source]],
                overrides: Optional[Union[Iterable[str], Mapping[str, Any]]] = None,
                for_training: bool = False,
                world_size: Union[int, Callable[[Any], int], None] = None) -> NeoXConfig:
    """Read, merge (later wins, nested mappings deep-merged), override and validate configs.

    ``paths``: YAML files and/or already-parsed dicts (a list of them works too). ``overrides``: command-line tokens
    (``["--train-iters", "10", "--optimizer.params.lr=1e-3"]``) or a ``{dotted key: value}`` mapping.
    ``for_training=True`` also requires what ``train.py`` needs (train_iters, data, tokenizer file, num_layers
    consistent with the SepLLM block). ``world_size``: the ranks of the launch, or a function of the launcher
    section returning them (``deepy.py`` reads the hostfile / visible devices); the layout and the batch triple are
    validated against it (None: ``world_size`` key, else num_nodes x num_gpus, else num_gpus). Raises ConfigError
    with a message naming file, key and expectation.
    """
    sources: list[tuple[str, dict]] = []
    for i, src in enumerate(_flatten_sources(list(paths))):
        if isinstance(src, Mapping):
            sources.append((f"<dict #{i + 1}>", dict(src)))
        elif isinstance(src, (str, Path)):
            sources.append((str(src), read_yaml_file(src)))
        else:
            raise ConfigError(f"config source #{i + 1}: expected a file path or a mapping, got {type(src).__name__}")
    parsed = _override_args(overrides)
    merged, origins = merge_sources(sources, parsed)
    cfg = build_config(merged, origins, [name for name, _ in sources], [text for _, _, text in parsed],
                       world_size=world_size)
    if for_training:
        check_training_ready(cfg)
    return cfg
