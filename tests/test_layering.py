"""Imports run one way through the package's layers (docs/architecture.md): a module imports
only from its own layer and the layers before it in :data:`LAYERS`. Every import statement
counts, also inside functions; imports only for type checkers (``if TYPE_CHECKING:``) do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import adderquant

PACKAGE = Path(adderquant.__file__).parent

# The layers, lowest first: each entry is the set of top-level modules or sub-packages in it.
LAYERS: list[set[str]] = [
    {"_io", "download"},  # file helpers and verified downloads
    {"ops"},  # kernels and their Python faces
    {"nn"},  # modules over the ops
    {"data", "hub"},  # datasets, and resolving a file (dataset or checkpoint)
    {"models"},  # architectures and their records
    {"quant"},  # quantization: configurations, methods, the pipeline
    {"evaluate", "train"},  # evaluation and training loops
    {"engine"},  # export and integer-only inference
    {"studies"},  # experiments combining the above: tables, analyses, plots
    {"cli", "__main__"},  # the command line, and `python -m adderquant`
]

def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path) -> set[str]:
    """The ``adderquant`` modules the file at ``path`` imports."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return imports_in(path.read_text(), package)


def imports_in(source: str, package: str) -> set[str]:
    """The ``adderquant`` modules ``source`` (a module of ``package``) imports: ``from a.b
    import c`` names ``a.b.c`` when that is a module, else ``a.b``."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base
                     for a in node.names]
        else:
            continue
        if _type_checking_only(node, parents):
            continue
        found.update(n for n in names if n == "adderquant" or n.startswith("adderquant."))
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layer_of(module: str) -> int | None:
    """The index in :data:`LAYERS` of a module (``None``: the package's own ``__init__``)."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    for i, layer in enumerate(LAYERS):
        if parts[1] in layer:
            return i
    raise AssertionError(f"{module} belongs to no layer; add its top-level name to LAYERS")


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_belongs_to_a_layer() -> None:
    for module in import_graph():
        layer_of(module)


def test_no_import_runs_against_the_layers() -> None:
    violations = set()
    for module, imported in import_graph().items():
        for target in imported:
            here, there = layer_of(module), layer_of(target)
            if here is not None and there is not None and there > here:
                violations.add((module, target))
    assert violations == set(), "imports against the layers"


def test_no_two_modules_import_each_other() -> None:
    graph = import_graph()
    cycles = {frozenset({a, b}) for a, targets in graph.items() for b in targets
              if a != b and a in graph.get(b, set())}
    assert cycles == set(), "modules importing each other"


def test_the_walk_sees_imports_inside_functions_and_skips_type_checking() -> None:
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
              "    from adderquant.cli import main\n"
              "def f():\n    from ..studies import experiment\n    import adderquant.nn\n")
    assert imports_in(source, "adderquant.ops") == {"adderquant.studies.experiment",
                                                     "adderquant.nn"}
