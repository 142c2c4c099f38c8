"""Reading GPT-NeoX-flavoured YAML safely.

GPT-NeoX configs are JSON-like dicts with ``#`` comments, single- or double-quoted keys, Python-style ``True``/``False``
/``None`` and anchors/aliases. PyYAML's SafeLoader follows YAML 1.1, which reads ``1e-3`` (no dot) as a string and
``None`` as a string; this loader fixes both, refuses duplicate keys (a silent last-wins inside one file hides typos),
and turns syntax errors into ConfigError naming file, line and column.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from megatron.config.errors import ConfigError

_FLOAT_RE = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|"
                       r"^\.(?:nan|NaN|NAN)$")


class NeoXYamlLoader(yaml.SafeLoader):
    """SafeLoader + ``1e-3`` as float + ``None`` as null + duplicate keys rejected. Constructs only plain data."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        self.flatten_mapping(node)  # resolves ``<<`` merge keys first
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                first = seen[key].start_mark
                raise ConfigError(
                    f"{self.name}:{key_node.start_mark.line + 1}:{key_node.start_mark.column + 1}: duplicate key "
                    f"{key!r} (first defined at line {first.line + 1}); a key may appear once per mapping")
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


# Integers stay integers (the int resolver is tried first for digit-only scalars); anything float-shaped is a float.
NeoXYamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))
NeoXYamlLoader.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^(?:None)$"), ["N"])


def parse_yaml_text(text: str, name: str) -> Any:
    """Parse one YAML document; ``name`` is used in error messages."""
    try:
        loader = NeoXYamlLoader(text)
        loader.name = name
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name
        problem = exc.problem or exc.context or "invalid YAML"
        kind = "YAML syntax error" if isinstance(exc, (yaml.scanner.ScannerError, yaml.parser.ParserError)) else (
            "YAML error (only plain data is allowed)")
        raise ConfigError(f"{where}: {kind}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: YAML error: {exc}") from None


def read_yaml_file(path: str | Path) -> dict:
    """Read one config file into a dict (an empty file is an empty config)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc}") from None
    data = parse_yaml_text(text, str(p))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config file must be a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_scalar(text: str, name: str) -> Any:
    """Parse a command-line value as a YAML scalar or flow list/dict (``1e-3``, ``true``, ``[1, 2]``, ``None``)."""
    if text == "":
        return ""
    return parse_yaml_text(text, name)
