"""Draw docs/architecture.png: the layers of esp_medsam_hf and the imports between them, read from the code.

The layers, the import graph and the rule of which layer may import which are tests/test_architecture.py's (loaded
by path), so the picture shows what the test checks: the stack of layers with their module counts, and the number
of imports (module to module, lazy ones included) from each layer into each other one.

Usage: ``python scripts/draw_architecture.py [docs/architecture.png]``
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.patches import FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# bottom to top; testing stands beside the stack
STACK = ("ship", "tools", "benchmark", "data", "hub", "training", "commands", "demo")
TITLES = {
    "ship": "ship: models/esp_medsam (remote code)",
    "tools": "tools: inference, conversion, drawing, ...",
    "benchmark": "benchmark", "data": "data", "hub": "hub", "training": "training",
    "commands": "commands (esp-medsam)", "demo": "demo entry points", "testing": "testing (local Hub)",
}


def load_architecture_test():
    path = ROOT / "tests" / "test_architecture.py"
    spec = importlib.util.spec_from_file_location("test_architecture", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def layer_imports(architecture) -> tuple[dict[str, list[str]], Counter]:
    """(layer -> its modules, (from layer, to layer) -> number of imports between different layers)."""
    graph = architecture.import_graph()
    modules: dict[str, list[str]] = {}
    for module in graph:
        modules.setdefault(architecture.layer_of(module), []).append(module)
    edges = Counter((architecture.layer_of(m), architecture.layer_of(t)) for m, targets in graph.items()
                    for t in targets if architecture.layer_of(m) != architecture.layer_of(t))
    return modules, edges


def draw(modules: dict[str, list[str]], edges: Counter, may_import: dict[str, set[str]], output: Path) -> Path:
    """Left: the stack of layers (bottom: what ships); right: the imports from each layer (row) into each other
    layer (column), with the cells the layering forbids hatched."""
    layers = [*STACK, "testing"]
    figure, (stack, matrix) = plt.subplots(1, 2, figsize=(13, 6.5), gridspec_kw={"width_ratios": [1, 1.15]})
    for row, layer in enumerate(STACK):
        colour = "#fde2a7" if layer == "ship" else "#dbe9f6"
        stack.add_patch(FancyBboxPatch((0, row), 6.0, 0.8, boxstyle="round,pad=0.04", facecolor=colour,
                                       edgecolor="#333333"))
        stack.text(3.0, row + 0.5, TITLES[layer], ha="center", va="center", fontsize=9, weight="bold")
        stack.text(3.0, row + 0.2, f"{len(modules.get(layer, []))} modules", ha="center", va="center", fontsize=8)
    row = STACK.index("hub")
    stack.add_patch(FancyBboxPatch((6.5, row), 2.2, 0.8, boxstyle="round,pad=0.04", facecolor="#e6e6e6",
                                   edgecolor="#333333"))
    stack.text(7.6, row + 0.5, "testing", ha="center", va="center", fontsize=9, weight="bold")
    stack.text(7.6, row + 0.2, f"{len(modules.get('testing', []))} modules (beside)", ha="center", va="center",
               fontsize=7)
    stack.set_xlim(-0.2, 8.9)
    stack.set_ylim(-0.4, len(STACK))
    stack.axis("off")
    stack.set_title("layers: a module imports its own layer and those below", fontsize=10)
    for i, source in enumerate(layers):
        for j, target in enumerate(layers):
            allowed = target in may_import[source] or source == target
            matrix.add_patch(plt.Rectangle((j, i), 1, 1, facecolor="white" if allowed else "#f2d0d0",
                                           hatch=None if allowed else "//", edgecolor="#cccccc"))
            count = edges.get((source, target), 0)
            if source != target and count:
                matrix.text(j + 0.5, i + 0.5, str(count), ha="center", va="center", fontsize=9,
                            color="#000000" if allowed else "#cc0000", weight="bold")
    matrix.set_xlim(0, len(layers))
    matrix.set_ylim(0, len(layers))
    matrix.set_xticks([i + 0.5 for i in range(len(layers))], layers, rotation=45, ha="right", fontsize=8)
    matrix.set_yticks([i + 0.5 for i in range(len(layers))], layers, fontsize=8)
    matrix.set_xlabel("imported layer")
    matrix.set_ylabel("importing layer")
    matrix.set_title("imports between layers, read from the code (hatched: forbidden)", fontsize=10)
    matrix.set_aspect("equal")
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    output = Path(argv[0]) if argv else ROOT / "docs" / "architecture.png"
    architecture = load_architecture_test()
    modules, edges = layer_imports(architecture)
    wrong = [(s, t) for s, t in edges if t not in architecture.MAY_IMPORT[s]]
    if wrong:
        raise SystemExit(f"imports against the layering: {wrong}")
    print(draw(modules, edges, architecture.MAY_IMPORT, output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
