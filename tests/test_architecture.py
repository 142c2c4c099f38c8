"""The import direction of docs/architecture.md holds: no package imports a higher layer (function-level imports
count too), apart from the listed exceptions."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: lowest layer first; documented in docs/architecture.md
LAYERS = {
    "errors": 0, "atomic_io": 0, "_lazy": 0, "__init__": 0,
    "device": 1, "tokenizer": 1,
    "config": 2, "data": 2,
    "kernels": 3, "sepllm": 3, "sepllm.attention": 3,
    "sepllm.cache": 4,
    "sepllm.hf": 5,
    "sepllm.public": 6,   # megatron/sepllm/__init__.py: SepCache, generate, apply_sepllm, ... named lazily
    "model": 7,
    "parallel": 8,
    "checkpoint": 9,
    "checkpoint.hf": 10,
    "training": 11,
    "inference": 12,
    "evaluation": 13,
    "entry_args": 14,
    "__main__": 15,   # every megatron/**/__main__.py: run by `python -m`, imported by nothing
}
#: (importing file, imported package) pairs that break the rule today, each with its reason in the docs
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


#: package ``__init__`` modules that only name a feature's public entry points (lazily) and sit above what they name
_FACADES = {"megatron.sepllm": "sepllm.public"}

#: sub-packages that sit on a layer of their own
_SUBPACKAGES = {("checkpoint", "hf"), ("sepllm", "attention"), ("sepllm", "cache"), ("sepllm", "hf")}


def package_of(module: str) -> str | None:
    """``megatron.checkpoint.hf.export`` -> ``checkpoint.hf``; ``megatron.sepllm.hf.cache`` -> ``sepllm``."""
    parts = module.split(".")
    if parts[0] != "megatron":
        return None
    if parts[-1] == "__main__":
        return "__main__"
    if len(parts) == 1:
        return "__init__"
    if module in _FACADES:
        return _FACADES[module]
    if len(parts) > 2 and (parts[1], parts[2]) in _SUBPACKAGES:
        return f"{parts[1]}.{parts[2]}"
    return parts[1]


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(dotted: str, root: Path) -> bool:
    base = root.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _lazy_imports(tree: ast.Module, here: str) -> set[str]:
    """The submodules named by the ``{submodule: names}`` tables a module passes to ``megatron._lazy.lazy_exports``
    (``lazy_exports(__name__, TABLE, globals())``: relative to the module itself, else to the package it names)."""
    tables = {target.id: node.value for node in tree.body if isinstance(node, ast.Assign)
              and isinstance(node.value, ast.Dict) for target in node.targets if isinstance(target, ast.Name)}
    out = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_exports" and len(node.args) > 1
                and isinstance(node.args[1], ast.Name) and node.args[1].id in tables):
            continue
        owner = node.args[0]
        package = owner.value if isinstance(owner, ast.Constant) else here
        out.update(f"{package}.{key.value}" for key in tables[node.args[1].id].keys if isinstance(key, ast.Constant))
    return out


def _imports(path: Path, root: Path = REPO) -> set[str]:
    """Every ``megatron`` module ``path`` imports: top-level and function-level imports, relative imports, the
    submodule behind ``from package import submodule``, and the entries of a lazy export table (importing a
    lazily exported name runs that submodule, so the table is an import too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = _module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            subs = {f"{module}.{a.name}" for a in node.names if _is_module(f"{module}.{a.name}", root)}
            out.update(subs)
            if len(subs) < len(node.names):
                out.add(module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    out.update(_lazy_imports(tree, here))
    return {m for m in out if m == "megatron" or m.startswith("megatron.")}


def violations(root: Path = REPO) -> list[str]:
    """Every import in ``root/megatron`` that goes to the same or a higher layer (exceptions excluded)."""
    found = []
    for path in sorted((root / "megatron").rglob("*.py")):
        own = package_of(_module_name(path, root))
        rel = str(path.relative_to(root))
        for target in sorted(filter(None, (package_of(m) for m in _imports(path, root)))):
            if target == own or (rel, target) in KNOWN_EXCEPTIONS:
                continue
            if target not in LAYERS or own not in LAYERS:
                found.append(f"{rel}: package {own if own not in LAYERS else target!r} has no layer in LAYERS")
            elif LAYERS[target] >= LAYERS[own]:
                found.append(f"{rel} (layer {LAYERS[own]}, {own}) imports {target} (layer {LAYERS[target]})")
    return found


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the modules it imports (only modules that exist under ``root/megatron``)."""
    modules = {_module_name(p, root): p for p in (root / "megatron").rglob("*.py")}
    return {name: {m for m in _imports(path, root) if m in modules and m != name} for name, path in modules.items()}


def import_circles(root: Path = REPO) -> list[list[str]]:
    """Groups of modules that import each other in a circle (strongly connected components of more than one
    module), whether the imports sit at the top of a file or inside a function: inside one package the layer
    rule cannot see them."""
    graph = import_graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(start: str) -> None:  # Tarjan's algorithm, iterative (deep import chains)
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        circles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(circles)


def test_no_package_imports_a_higher_or_same_layer():
    assert violations() == []


def test_no_import_circles_inside_a_package():
    assert import_circles() == []


def private_imports(root: Path = REPO) -> list[str]:
    """Imports of a private module or sub-package (a name starting with ``_``, e.g. ``megatron.config._loading``)
    from outside the package that holds it: the loading machinery stays behind the package's public modules."""
    found = []
    for name, targets in sorted(import_graph(root).items()):
        for target in sorted(targets):
            parts = target.split(".")
            private = next((i for i, part in enumerate(parts) if part.startswith("_") and not part.startswith("__")),
                           None)
            owner = ".".join(parts[:private]) if private is not None else None
            if owner is not None and not (name == owner or name.startswith(owner + ".")):
                found.append(f"{name} imports {target} (private to {owner})")
    return found


def test_private_modules_are_imported_only_inside_their_package(tmp_path):
    assert private_imports() == []
    pkg = tmp_path / "megatron" / "config" / "_loading"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "merge.py").write_text("")
    (tmp_path / "megatron" / "config" / "loader.py").write_text("from megatron.config._loading import merge\n")
    (tmp_path / "megatron" / "training").mkdir()
    (tmp_path / "megatron" / "training" / "loop.py").write_text("from megatron.config._loading.merge import x\n")
    assert private_imports(tmp_path) == ["megatron.training.loop imports megatron.config._loading.merge "
                                         "(private to megatron.config)"]


def test_known_exceptions_still_exist():
    """An exception that no longer happens must leave the list (so the list only ever shrinks)."""
    for rel, target in KNOWN_EXCEPTIONS:
        path = REPO / rel
        assert path.is_file() and target in {package_of(m) for m in _imports(path)}, (rel, target)


def test_the_checker_catches_a_circle_inside_a_package(tmp_path):
    """A function-level import closing a circle, and the circle through a package's own ``__init__``."""
    pkg = tmp_path / "megatron" / "config"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from megatron.config.neox import NeoXConfig\n")
    (pkg / "neox.py").write_text("def ready():\n    from megatron.config.validate import check\n")
    (pkg / "validate.py").write_text("from megatron.config import merge\n")
    (pkg / "merge.py").write_text("import megatron.config.neox\n")
    (pkg / "layout.py").write_text("from megatron.config import NeoXConfig\n")
    (pkg / "derived.py").write_text("from .layout import x\n")
    assert import_circles(tmp_path) == [["megatron.config.merge", "megatron.config.neox", "megatron.config.validate"]]
    (pkg / "neox.py").write_text("from .layout import check\n")
    assert import_circles(tmp_path) == [["megatron.config", "megatron.config.layout", "megatron.config.neox"]]


def test_the_checker_reads_lazy_export_tables(tmp_path):
    """A name exported lazily from a higher layer is an upward import, and a lazy table can close a circle."""
    pkg = tmp_path / "megatron" / "tokenizer"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from megatron._lazy import lazy_exports\n"
                                     "_LAZY = {'base': ('Tok',)}\n"
                                     "__getattr__, __dir__, __all__ = lazy_exports(__name__, _LAZY, globals())\n")
    (pkg / "base.py").write_text("from megatron.tokenizer import Tok\n")
    (tmp_path / "megatron" / "_lazy.py").write_text("")
    assert import_circles(tmp_path) == [["megatron.tokenizer", "megatron.tokenizer.base"]]
    (pkg / "base.py").write_text("")
    (pkg / "__init__.py").write_text("from megatron._lazy import lazy_exports\n"
                                     "_LAZY = {'base': ('Tok',)}\n"
                                     "_TABLE = {'training.loop': ('pretrain',)}\n"
                                     "__getattr__, __dir__, __all__ = lazy_exports('megatron', _TABLE, globals())\n")
    assert import_circles(tmp_path) == []
    assert violations(tmp_path) == ["megatron/tokenizer/__init__.py (layer 1, tokenizer) imports training (layer 11)"]


def test_the_checker_catches_an_upward_import(tmp_path):
    fake = tmp_path / "megatron" / "tokenizer"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from megatron.training.loop import pretrain\n")
    assert violations(tmp_path) == ["megatron/tokenizer/bad.py (layer 1, tokenizer) imports training (layer 11)"]


def test_main_modules_are_the_top_layer(tmp_path):
    """``python -m megatron.X`` modules are entry points: they may import any layer, and nothing may import them."""
    pkg = tmp_path / "megatron" / "config"
    pkg.mkdir(parents=True)
    (pkg / "__main__.py").write_text("def f():\n    from megatron.training.size_summary import summarize\n")
    (pkg / "cli.py").write_text("def f():\n    from megatron.training.size_summary import summarize\n")
    (tmp_path / "megatron" / "entry_args.py").write_text("import megatron.config.__main__\n")
    assert violations(tmp_path) == ["megatron/config/cli.py (layer 2, config) imports training (layer 11)",
                                    "megatron/entry_args.py (layer 14, entry_args) imports __main__ (layer 15)"]
