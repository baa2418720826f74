"""The layers of esp_medsam_hf import only downwards and no module imports itself through others
(docs/architecture.md): every ``import`` and ``from ... import`` of every module under src/esp_medsam_hf, lazy ones
inside functions included, is read with ``ast`` and checked against the table below, and the graph they make must
have no cycle. Layers are package prefixes, so modules that are added, renamed or moved inside a layer are covered
without touching this file. What ships as remote code (``models/esp_medsam``) imports only its siblings, with
single-dot imports, as transformers copies them. No file under src/ is over 500 lines but the modeling files, and no
function is over 60 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "esp_medsam_hf"

# module prefix -> layer; the longest prefix that matches a module wins (whole dotted names only)
LAYERS = {
    PACKAGE: "tools",  # never shipped: registration, conversion, assets, drawing, segmenting files, metrics
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
    f"{PACKAGE}.training.demo_summary": "demo",
    f"{PACKAGE}.commands.demo": "demo",
    f"{PACKAGE}.commands.hub": "demo",
}
RUNTIME = ("ship", "tools", "benchmark", "data", "hub", "training")
MAY_IMPORT = {
    "ship": {"ship"},
    "tools": {"ship", "tools"},
    "benchmark": {"ship", "tools", "benchmark"},
    "data": {"ship", "tools", "benchmark", "data"},
    "hub": {"ship", "tools", "benchmark", "data", "hub"},
    "training": set(RUNTIME),
    "commands": {*RUNTIME, "commands"},
    "demo": {*RUNTIME, "commands", "demo", "testing"},
    "testing": {*RUNTIME, "testing"},
}
LOCAL_HUB = f"{PACKAGE}.testing.localhub"
SHIP = f"{PACKAGE}.models.esp_medsam"


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


def module_paths() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(path): path for path in sorted((SRC / PACKAGE).rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, each resolved to a module file: ``from package import name``
    points at the submodule ``package.name`` when there is one, else at the package (its ``__init__``)."""
    modules = module_paths()
    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(package, node)
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[module] = {target for target in targets if target in modules and target != module}
    return graph


def _absolute(package: str, node: ast.ImportFrom) -> str:
    """The absolute module name of a ``from ... import`` in ``package``."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    return ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted: every import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    """Lazy imports inside functions count: a cycle is one even when Python happens to resolve it at run time."""
    assert cycles(import_graph()) == []


def test_cycle_detection_sees_a_cycle_through_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_what_ships_imports_only_its_siblings_with_single_dot_imports():
    """transformers copies a saved model's code file with the single-dot siblings it imports, and nothing else."""
    wrong = []
    for module, path in module_paths().items():
        if not module.startswith(SHIP + "."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                wrong += [f"{module}: import {a.name}" for a in node.names if a.name.split(".")[0] == PACKAGE]
            elif isinstance(node, ast.ImportFrom) and (
                node.level > 1 or (node.level == 0 and (node.module or "").split(".")[0] == PACKAGE)
            ):
                wrong.append(f"{module}: from {'.' * node.level}{node.module or ''} import ...")
    assert wrong == []


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
    (f"{PACKAGE}.models.esp_medsam.modeling_esp_medsam", "ship"), (f"{PACKAGE}.drawing", "tools"),
    (f"{PACKAGE}.registration", "tools"), (f"{PACKAGE}.metrics.dice.dice", "tools"), (f"{PACKAGE}.data.prepared", "data"),
    (f"{PACKAGE}.training.demo", "demo"), (f"{PACKAGE}.training.stages.distill", "training"),
    (f"{PACKAGE}.hub.publish", "hub"), (f"{PACKAGE}.testing.localhub.server", "testing"), (f"{PACKAGE}.cli", "commands"),
    (f"{PACKAGE}.commands.hub", "demo"), (f"{PACKAGE}.commands.train", "commands"), (f"{PACKAGE}.inference", "tools"),
])
def test_modules_are_placed_by_their_package_prefix(module, layer):
    assert module in module_paths(), f"{module} does not exist"
    assert layer_of(module) == layer


def test_imports_are_resolved_relative_to_their_package():
    assert imported_modules(SRC / PACKAGE / "training" / "data.py") >= {f"{PACKAGE}.data", f"{PACKAGE}.data.schema"}
    assert f"{PACKAGE}.training.publishing" in imported_modules(SRC / PACKAGE / "training" / "demo.py")


MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60
LONG_FILES_ALLOWED = "modeling_*.py"  # the modeling files, as in transformers: one file a model


def long_files(paths: list[Path]) -> list[str]:
    """The files over ``MAX_FILE_LINES`` lines, other than the modeling files."""
    return [f"{path}: {count} lines" for path in paths if not path.match(LONG_FILES_ALLOWED)
            and (count := len(path.read_text().splitlines())) > MAX_FILE_LINES]


def long_functions(paths: list[Path]) -> list[str]:
    """The functions and methods over ``MAX_FUNCTION_LINES`` lines (decorators not counted, docstrings counted)."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_file_over_500_lines_but_the_modeling_files():
    assert long_files(sorted((SRC / PACKAGE).rglob("*.py"))) == []


def test_no_function_over_60_lines():
    assert long_functions(sorted((SRC / PACKAGE).rglob("*.py"))) == []


def test_the_length_checks_see_a_long_file_and_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long_function.py").write_text(f"def f():\n{body}\n")
    (tmp_path / "short_function.py").write_text(f"def f():\n{body[:body.rindex(chr(10))]}\n")
    (tmp_path / "long.py").write_text("x = 1\n" * (MAX_FILE_LINES + 1))
    (tmp_path / "modeling_long.py").write_text("x = 1\n" * (MAX_FILE_LINES + 1))
    (tmp_path / "short.py").write_text("x = 1\n" * MAX_FILE_LINES)
    paths = sorted(tmp_path.glob("*.py"))
    assert long_functions(paths) == [f"{tmp_path / 'long_function.py'}:1 f: {MAX_FUNCTION_LINES + 1} lines"]
    assert long_files(paths) == [f"{tmp_path / 'long.py'}: {MAX_FILE_LINES + 1} lines"]
