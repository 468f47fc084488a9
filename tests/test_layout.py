"""The layout follows the data flow, read from the imports themselves (README "Layout").

videos -> preprocess -> cache/shards -> datasets -> training -> checkpoints -> generate, bench;
``shared`` is the contract under all of them. A layer imports only the layers below it, never
another module's private names, and every project import sits at the top of its module, so that
grep shows the real graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "preprocess", "datasets", "training", "generate", "bench")
ALLOWED = {
    "shared": {"shared"},
    "preprocess": {"shared", "preprocess"},
    "datasets": {"shared", "datasets"},
    "training": {"shared", "datasets", "training"},
    "generate": set(PACKAGES),
    "bench": set(PACKAGES),
}


def modules() -> list[tuple[str, str, Path]]:
    """(package, dotted module name, file) for every module of the project."""
    out = []
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            rel = f.relative_to(REPO / pkg).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out.append((pkg, ".".join(["dwm", pkg, *parts]), f))
    return out


def project_imports(name: str, path: Path):
    """(imported dwm module, imported names, node, at module top) for each project import."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    top = set(map(id, tree.body))
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[id(child)] = node

    def at_top(node) -> bool:
        while id(node) not in top:  # climb through if/try at module level
            node = parents.get(id(node))
            if node is None or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                 ast.ClassDef)):
                return False
        return True

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("dwm."):
                    yield a.name, [], node, at_top(node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("dwm"):
                yield mod, [a.name for a in node.names], node, at_top(node)


def test_every_package_is_checked():
    assert {pkg for pkg, _, _ in modules()} == set(PACKAGES)


@pytest.mark.parametrize("pkg", PACKAGES)
def test_layers_import_only_what_is_below_them(pkg):
    wrong = []
    for p, name, path in modules():
        if p != pkg:
            continue
        for mod, _names, node, _top in project_imports(name, path):
            layer = mod.split(".")[1] if mod.count(".") else ""
            if layer not in ALLOWED[pkg]:
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno} imports {mod}")
    assert not wrong, f"{pkg} may import only {sorted(ALLOWED[pkg])}:\n" + "\n".join(wrong)


def private(n: str) -> bool:
    return n.startswith("_") and not n.startswith("__")


def test_no_module_uses_another_modules_private_names():
    """Neither ``from m import _x`` nor ``m._x`` / ``SomeClass._x`` on an imported name."""
    wrong = []
    for _pkg, name, path in modules():
        bound = set()
        for mod, names, node, _top in project_imports(name, path):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            wrong += [f"{where} {mod}.{n}" for n in names if private(n) and mod != name]
            if isinstance(node, ast.ImportFrom):
                bound |= {a.asname or a.name for a in node.names}
            else:
                bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and private(node.attr) and \
                    isinstance(node.value, ast.Name) and node.value.id in bound:
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value.id}.{node.attr}")
    assert not wrong, "private names imported across modules:\n" + "\n".join(wrong)


def test_project_imports_sit_at_the_top_of_each_module():
    wrong = [f"{path.relative_to(REPO)}:{node.lineno} {mod}"
             for _pkg, name, path in modules()
             for mod, _names, node, top in project_imports(name, path) if not top]
    assert not wrong, "project imports inside functions (move them to the top):\n" + "\n".join(
        wrong)
