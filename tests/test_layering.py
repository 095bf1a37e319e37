"""Imports flow one way: no featherlm module imports a layer above its own.

Layers, low to high: errors, io, config -> tokenizer, checkpoint, hub -> model -> peft -> data -> train
-> generate -> evaluate -> serve -> cli. ``featherlm/__init__.py`` (the public API) may import
anything. Every module is parsed with ``ast``; imports inside functions count too, except where the
table allows them only lazily (checkpoint builds models and reads tokenizers, but only on demand).
"""

from __future__ import annotations

import ast
from pathlib import Path

import featherlm

PACKAGE = Path(featherlm.__file__).resolve().parent
BASE = {"errors", "io", "config"}
ORDER = ["errors", "io", "config", "tokenizer", "checkpoint", "hub", "model", "peft", "data", "train",
         "generate", "evaluate", "serve", "cli"]
ABOVE_MODEL = ORDER[ORDER.index("model"):]

# layer -> layers it may import at module level (its own layer is always allowed)
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "io": {"errors"},
    "config": {"errors", "io"},
    "tokenizer": BASE,
    "checkpoint": BASE,
    "hub": BASE,
    "model": BASE,  # never checkpoint, tokenizer, hub, data, generate or anything higher
    **{layer: set(ORDER[: ORDER.index(layer)]) for layer in ABOVE_MODEL[1:]},
}
ALLOWED["cli"] = ALLOWED["cli"] | {"featherlm"}  # the CLI calls the public API
# layer -> extra layers it may import only inside a function (or under `if TYPE_CHECKING:`)
LAZY: dict[str, set[str]] = {"checkpoint": {"model", "tokenizer"}}
# Modules that sit below their package's layer: pure leaves that lower layers may use. The metric
# maths of `evaluate` (the trainer picks its best checkpoint by F1) imports nothing of featherlm;
# its package's __init__ must then import nothing above that level at module level either, since
# importing the module runs the package's __init__ (checked below).
PLACED: dict[str, str] = {"featherlm.evaluate.metrics": "config", "featherlm.evaluate.entities": "config",
                          "featherlm.evaluate.squad": "config", "featherlm.evaluate.text_metrics": "config",
                          # decoding needs nothing but a model: just above it, so seq2seq tasks generate in training
                          "featherlm.generate": "peft"}


def layer_of(module: str) -> str:
    """featherlm.checkpoint.hf -> checkpoint; featherlm -> featherlm (the package root)."""
    if module in PLACED:
        return PLACED[module]
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imported_modules(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Absolute featherlm module names one import statement brings in."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "featherlm"]
    assert isinstance(node, ast.ImportFrom)
    if node.level:  # relative: resolve against this module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != "featherlm":
        return []
    if base == "featherlm":  # `from featherlm import x`: x may be a submodule or a name of the API
        return [f"featherlm.{a.name}" if (PACKAGE / a.name).is_dir() or (PACKAGE / f"{a.name}.py").exists()
                else "featherlm" for a in node.names]
    return [base]


def module_imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str, bool]]:
    """(line, imported module, lazy) for every featherlm import; lazy = inside a function or an
    ``if TYPE_CHECKING:`` block."""
    found: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.extend((node.lineno, m, lazy) for m in imported_modules(node, module, is_package))
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or (
            isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def violations(source: str, module: str, is_package: bool = False, where: str = "<source>") -> list[str]:
    """Human-readable offending import lines of one module ('' list when it follows the table)."""
    own = layer_of(module)
    if module == "featherlm":
        return []  # the public API may import anything
    if own not in ALLOWED:
        return [f"{where}: module layer {own!r} is not in the layering table of tests/test_layering.py"]
    lines = source.splitlines()
    bad = []
    for lineno, target, lazy in module_imports(ast.parse(source), module, is_package):
        layer = layer_of(target)
        if layer == own or layer in ALLOWED[own] or (lazy and layer in LAZY.get(own, set())):
            continue
        why = "only lazily (inside a function)" if layer in LAZY.get(own, set()) else "not at all"
        bad.append(f"{where}:{lineno}: {lines[lineno - 1].strip()}  ({own} may import {layer} {why})")
    return bad


def package_modules() -> list[tuple[str, Path, bool]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out.append((".".join(parts), path, is_package))
    return out


def test_no_module_imports_a_higher_layer():
    modules = package_modules()
    assert len(modules) >= 8  # errors, io, config, model..., generate, cli at least
    problems = []
    for module, path, is_package in modules:
        rel = path.relative_to(PACKAGE.parent)
        problems += violations(path.read_text(encoding="utf-8"), module, is_package, str(rel))
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_placed_modules_do_not_drag_their_package_in():
    """Importing a placed module runs its package's __init__: that may import, at module level, only
    what the placed layer may (lazy imports inside functions are fine)."""
    for module, layer in PLACED.items():
        init = PACKAGE.parent.joinpath(*module.split(".")[:-1], "__init__.py")
        package = module.rsplit(".", 1)[0]
        for lineno, target, lazy in module_imports(ast.parse(init.read_text(encoding="utf-8")), package, True):
            if not lazy:
                assert target in PLACED or layer_of(target) in ALLOWED[layer] | {layer}, f"{init}:{lineno}: {target}"


def test_every_layer_in_the_table_is_ordered():
    assert set(ALLOWED) == set(ORDER)
    for layer, allowed in ALLOWED.items():
        assert all(ORDER.index(a) < ORDER.index(layer) for a in allowed - {"featherlm"}), layer


# ----------------------------------------------------------------------------- the checker itself


def test_checker_reports_upward_imports_with_their_line():
    source = "import torch\nfrom featherlm.config import ModelConfig\n\nfrom featherlm.generate import x\n"
    (problem,) = violations(source, "featherlm.model.transformer", where="m.py")
    assert problem.startswith("m.py:4: from featherlm.generate import x")


def test_checker_resolves_relative_and_package_imports():
    assert violations("from ..checkpoint import read_checkpoint\n", "featherlm.model.layers")
    # inside featherlm/model/__init__.py, `from . import x` means featherlm.model.x
    assert violations("from . import checkpoint\n", "featherlm.model", is_package=True) == []
    assert violations("from featherlm import checkpoint\n", "featherlm.model.layers")
    assert violations("import featherlm\n", "featherlm.generate")  # the root pulls in every layer
    assert violations("import featherlm\n", "featherlm.cli") == []
    assert violations("from .hf import read_json\n", "featherlm.checkpoint", is_package=True) == []


def test_checker_allows_lazy_imports_only_where_the_table_says():
    module_level = "from featherlm.model import Transformer\n"
    in_function = "def build():\n    from featherlm.model import Transformer\n"
    type_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from featherlm.tokenizer import T\n"
    assert violations(module_level, "featherlm.checkpoint.hf")
    assert violations(in_function, "featherlm.checkpoint.hf") == []
    assert violations(type_only, "featherlm.checkpoint.gguf") == []
    assert violations(in_function, "featherlm.hub")  # hub may not build models, even lazily
    assert violations("def f():\n    from featherlm.generate import stream\n", "featherlm.model.layers")
    assert violations("from featherlm.checkpoint import x\n", "featherlm.tokenizer")  # same level


def test_checker_flags_modules_missing_from_the_table():
    assert violations("", "featherlm.plugins")


def test_checker_places_leaf_modules_below_their_package():
    assert violations("from featherlm.evaluate.metrics import accuracy\n", "featherlm.train.trainer") == []
    assert violations("from featherlm.evaluate import evaluate\n", "featherlm.train.trainer")
    assert violations("from featherlm.train import finetune\n", "featherlm.evaluate.metrics")  # held to its level
