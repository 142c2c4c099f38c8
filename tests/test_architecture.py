"""The import direction of docs/architecture.md holds: no package imports a higher layer (function-level imports
count too), apart from the listed exceptions."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: lowest layer first; documented in docs/architecture.md
LAYERS = {
    "errors": 0, "atomic_io": 0, "_lazy": 0, "__init__": 0,
    "device": 1,
    "tokenizer": 1,
    "config": 2, "data": 2,
    "kernels": 3, "sepllm": 3, "sepllm.attention": 3,
    "model": 4,
    "parallel": 5,
    "training": 6,
    "model.convert": 7,
    "sepllm.hf": 8,
    "inference": 9,
    "evaluation": 10,
    "entry_args": 11,
    "__main__": 12,   # every megatron/**/__main__.py: run by `python -m`, imported by nothing
}
#: (importing file, imported package) pairs that break the rule today, each with its reason in the docs
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


#: sub-packages that sit on a layer of their own
_SUBPACKAGES = {("model", "convert"), ("sepllm", "attention"), ("sepllm", "hf")}


def package_of(module: str) -> str | None:
    """``megatron.model.convert.hf`` -> ``model.convert``; ``megatron.sepllm.hf.cache`` -> ``sepllm``."""
    parts = module.split(".")
    if parts[0] != "megatron":
        return None
    if parts[-1] == "__main__":
        return "__main__"
    if len(parts) == 1:
        return "__init__"
    if len(parts) > 2 and (parts[1], parts[2]) in _SUBPACKAGES:
        return f"{parts[1]}.{parts[2]}"
    return parts[1]


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m == "megatron" or m.startswith("megatron.")}


def violations(root: Path = REPO) -> list[str]:
    """Every import in ``root/megatron`` that goes to the same or a higher layer (exceptions excluded)."""
    found = []
    for path in sorted((root / "megatron").rglob("*.py")):
        own = package_of(_module_name(path, root))
        rel = str(path.relative_to(root))
        for target in sorted(filter(None, (package_of(m) for m in _imports(path)))):
            if target == own or (rel, target) in KNOWN_EXCEPTIONS:
                continue
            if target not in LAYERS or own not in LAYERS:
                found.append(f"{rel}: package {own if own not in LAYERS else target!r} has no layer in LAYERS")
            elif LAYERS[target] >= LAYERS[own]:
                found.append(f"{rel} (layer {LAYERS[own]}, {own}) imports {target} (layer {LAYERS[target]})")
    return found


def test_no_package_imports_a_higher_or_same_layer():
    assert violations() == []


def test_known_exceptions_still_exist():
    """An exception that no longer happens must leave the list (so the list only ever shrinks)."""
    for rel, target in KNOWN_EXCEPTIONS:
        path = REPO / rel
        assert path.is_file() and target in {package_of(m) for m in _imports(path)}, (rel, target)


def test_the_checker_catches_an_upward_import(tmp_path):
    fake = tmp_path / "megatron" / "tokenizer"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from megatron.training.loop import pretrain\n")
    assert violations(tmp_path) == ["megatron/tokenizer/bad.py (layer 1, tokenizer) imports training (layer 6)"]


def test_main_modules_are_the_top_layer(tmp_path):
    """``python -m megatron.X`` modules are entry points: they may import any layer, and nothing may import them."""
    pkg = tmp_path / "megatron" / "config"
    pkg.mkdir(parents=True)
    (pkg / "__main__.py").write_text("def f():\n    from megatron.training.size_summary import summarize\n")
    (pkg / "cli.py").write_text("def f():\n    from megatron.training.size_summary import summarize\n")
    (tmp_path / "megatron" / "entry_args.py").write_text("import megatron.config.__main__\n")
    assert violations(tmp_path) == ["megatron/config/cli.py (layer 2, config) imports training (layer 6)",
                                    "megatron/entry_args.py (layer 11, entry_args) imports __main__ (layer 12)"]
