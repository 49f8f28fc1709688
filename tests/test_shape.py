"""The shape of the package: which package imports which, and no loop between them.

The graph counts every ``stagejax`` import, at module level and inside
functions, between the packages (and top-level modules) of ``stagejax/``.
Entry points may import anything and are left out: each package's
``__main__.py`` and ``stagejax/main.py``; ``stagejax/cli.py``, their shared
helper, may be imported by them alone. ``python -m tests.test_shape`` prints
the graph, one ``package -> imports`` line each.
"""

from __future__ import annotations

import ast
import collections
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

ROOT = REPO / "stagejax"
ENTRY_HELPER = "cli"


def _is_entry(path: Path) -> bool:
    return path.name == "__main__.py" or path == ROOT / "main.py"


def _node(path: Path) -> str:
    """The package (or top-level module) a file of stagejax/ belongs to."""
    parts = path.relative_to(ROOT).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _target(dotted: str) -> str | None:
    """The package (or top-level module) ``stagejax.X...`` names; None for the root's own
    names (``from stagejax import __version__``)."""
    first = dotted.split(".")[1] if "." in dotted else None
    if first and ((ROOT / first).is_dir() or (ROOT / f"{first}.py").is_file()):
        return first
    return None


def _imports(tree: ast.AST) -> list[tuple[str, int]]:
    """(package imported, line) for every stagejax import in a module, functions included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("stagejax.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "stagejax":
                names = [f"stagejax.{a.name}" for a in node.names]
            elif node.module.startswith("stagejax."):
                names = [node.module]
            else:
                continue
        else:
            continue
        found += [(t, node.lineno) for t in map(_target, names) if t is not None]
    return found


def import_graph(
    include_entries: bool = False,
) -> tuple[dict[str, set[str]], dict[tuple[str, str], list[str]]]:
    """({package: packages it imports}, {(a, b): ["file:line", ...]}) of stagejax/."""
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for path in sorted(ROOT.rglob("*.py")):
        if path == ROOT / "__init__.py" or (_is_entry(path) and not include_entries):
            continue
        source = _node(path)
        targets = graph.setdefault(source, set())  # a node even if it imports nothing
        for target, line in _imports(ast.parse(path.read_text(), str(path))):
            if target != source:
                targets.add(target)
                where[(source, target)].append(f"{path.relative_to(REPO)}:{line}")
    return graph, dict(where)


def graph_text() -> str:
    """Which package imports which (entry points left out), one line per package."""
    graph, _ = import_graph()
    return "\n".join(
        f"{a} -> {', '.join(sorted(b)) or '(nothing)'}" for a, b in sorted(graph.items())
    )


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_loop_between_packages():
    graph, where = import_graph()
    loops = _cycles(graph)
    detail = [
        f"{a} -> {b} ({', '.join(where[(a, b)][:3])})"
        for component in loops
        for a in component
        for b in sorted(graph[a] & set(component))
    ]
    assert not loops, "packages importing each other:\n" + "\n".join(detail)


def test_a_loop_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_evaluation_never_imports_training():
    graph, where = import_graph()
    assert "train" not in graph["evaluate"], where.get(("evaluate", "train"))
    assert "train" in graph and "model" in graph["train"]  # the graph is not empty


def test_only_entry_points_import_the_cli_helper():
    graph, where = import_graph()
    users = sorted(a for a, targets in graph.items() if ENTRY_HELPER in targets)
    assert not users, [where[(a, ENTRY_HELPER)] for a in users]
    with_entries, _ = import_graph(include_entries=True)
    assert ENTRY_HELPER in with_entries["main"]  # what the exclusion is for


OPEN_A_SLIDE = """
import sys
import numpy as np
import tifffile
from stagejax import slides

path = sys.argv[1]
rgb = np.arange(64 * 48 * 3, dtype=np.uint8).reshape(48, 64, 3)
tifffile.imwrite(path, rgb, photometric="rgb")
with slides.open_slide(path, mpp=0.5) as slide:
    assert (slide.read_region(0, 0, 64, 48) == rgb).all()
print(sorted(m for m in sys.modules if m.startswith(("tensorflow", "stagejax"))))
"""


def test_opening_a_slide_does_not_load_the_dataset_stack(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", OPEN_A_SLIDE, str(tmp_path / "s.tif")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert "stagejax.slides" in loaded
    assert "tensorflow_datasets" not in loaded, loaded


if __name__ == "__main__":
    print(graph_text())
