"""The layers of esp_medsam_hf import only downwards (docs/architecture.md): every ``import`` and ``from ... import``
of every module under src/esp_medsam_hf, lazy ones inside functions included, is read with ``ast`` and checked
against the table below. Layers are package prefixes, so modules that are added, renamed or moved inside a layer
are covered without touching this file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "esp_medsam_hf"

# module prefix -> layer; the longest prefix that matches a module wins (whole dotted names only)
LAYERS = {
    PACKAGE: "core",  # what never ships: conversion, assets, drawing, segmenting files (inference), metrics
    f"{PACKAGE}.models": "ship",  # what ships as remote code: models/esp_medsam/
    f"{PACKAGE}.benchmark": "benchmark",
    f"{PACKAGE}.data": "data",
    f"{PACKAGE}.hub": "hub",
    f"{PACKAGE}.training": "training",
    f"{PACKAGE}.commands": "commands",
    f"{PACKAGE}.cli": "commands",
    f"{PACKAGE}.testing": "testing",
    # the entry points that run the local Hub, a test double: `esp-medsam demo` and `esp-medsam hub start|stop|status`
    f"{PACKAGE}.training.demo": "demo",
    f"{PACKAGE}.commands.demo": "demo",
    f"{PACKAGE}.commands.hub": "demo",
}
RUNTIME = ("ship", "core", "benchmark", "data", "hub", "training")
MAY_IMPORT = {
    "ship": {"ship"},
    "core": {"ship", "core"},
    "benchmark": {"ship", "core", "benchmark"},
    "data": {"ship", "core", "benchmark", "data"},
    "hub": {"ship", "core", "benchmark", "data", "hub"},
    "training": set(RUNTIME),
    "commands": {*RUNTIME, "commands"},
    "demo": {*RUNTIME, "commands", "demo", "testing"},
    "testing": {*RUNTIME, "testing"},
}
LOCAL_HUB = f"{PACKAGE}.testing.localhub"


def layer_of(module: str) -> str:
    """The layer of a dotted module name: the layer of its longest matching prefix in ``LAYERS``."""
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)]


def module_name(path: Path) -> str:
    """``src/esp_medsam_hf/data/prepared.py`` -> ``esp_medsam_hf.data.prepared`` (a package: its own name)."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The package's modules that ``path`` imports (for ``from PACKAGE import name``: ``PACKAGE.name``)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found |= {f"{base}.{alias.name}" for alias in node.names} if base == PACKAGE else {base}
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


def all_imports() -> list[tuple[str, str]]:
    """(importing module, imported module) for every module of the package."""
    return [(module_name(path), target) for path in sorted((SRC / PACKAGE).rglob("*.py"))
            for target in sorted(imported_modules(path))]


def test_layers_import_only_what_the_table_allows():
    broken = [f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
              for module, target in all_imports() if layer_of(target) not in MAY_IMPORT[layer_of(module)]]
    assert not broken, "imports against docs/architecture.md:\n" + "\n".join(broken)


def test_runtime_code_never_imports_the_test_doubles():
    runtime = [(m, t) for m, t in all_imports() if layer_of(m) in RUNTIME + ("commands",) and layer_of(t) == "testing"]
    assert runtime == []


def test_the_local_hub_imports_nothing_else_from_the_package():
    """Its write server loads testing/localhub as a stand-alone package, without esp_medsam_hf's own imports."""
    outside = [(m, t) for m, t in all_imports() if m.startswith(LOCAL_HUB) and not t.startswith(LOCAL_HUB)]
    assert outside == []


@pytest.mark.parametrize("module,layer", [
    (f"{PACKAGE}.models.esp_medsam.modeling_esp_medsam", "ship"), (f"{PACKAGE}.drawing", "core"), (f"{PACKAGE}.metrics.dice.dice", "core"),
    (f"{PACKAGE}.data.prepared", "data"), (f"{PACKAGE}.training.demo", "demo"), (f"{PACKAGE}.training.data", "training"),
    (f"{PACKAGE}.hub.publish", "hub"), (f"{PACKAGE}.testing.localhub.server", "testing"), (f"{PACKAGE}.cli", "commands"),
    (f"{PACKAGE}.commands.hub", "demo"), (f"{PACKAGE}.commands.train", "commands"), (f"{PACKAGE}.dataset", "core"),
])
def test_modules_are_placed_by_their_package_prefix(module, layer):
    assert layer_of(module) == layer


def test_imports_are_resolved_relative_to_their_package():
    assert imported_modules(SRC / PACKAGE / "training" / "data.py") >= {f"{PACKAGE}.data", f"{PACKAGE}.data.schema"}
    assert f"{PACKAGE}.training.publishing" in imported_modules(SRC / PACKAGE / "training" / "demo.py")
