"""The package's layers, read from its own imports (module level and lazy).

estimators (sklearn glue, torch parts) -> codebooks, index -> kernels, and
persistence beside them: no module may import one above it, and the module
graph has no circle.
"""

import ast
from pathlib import Path

import pytest

import skquant

PACKAGE_DIR = Path(skquant.__file__).parent

KERNELS = {"skquant._search", "skquant._ivf", "skquant._scan_loop", "skquant._probe_loop",
           "skquant._product_tables", "skquant._heap"}
INDEX = {"skquant._index", "skquant._dask_index"}
CODEBOOKS = {"skquant._codebooks", "skquant._product", "skquant._additive"}
PERSISTENCE = {"skquant._persistence", "skquant._version"}


def _module_name(path):
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules():
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _imports(name, path, submodules=frozenset()):
    """Every module ``name`` imports, anywhere in its source (absolute names).

    ``from pkg import a, b`` counts ``pkg`` itself unless every name is one
    of ``submodules`` (``from . import _search`` runs no code of ``pkg``).
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names = {f"{module}.{alias.name}" for alias in node.names}
            # ``from pkg import name`` may import the submodule ``pkg.name``.
            found.update(names)
            if not names <= submodules:
                found.add(module)
    return found


def _graph():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target in _imports(name, path, frozenset(modules)):
            if target in modules and target != name:
                edges.add(target)
                # Importing a.b.c runs a.b's __init__ first (not the root's,
                # which is the entry point).
                parent = target.rpartition(".")[0]
                if parent != "skquant" and not name.startswith(parent):
                    edges.add(parent)
        graph[name] = edges
    return graph


def _external(name):
    modules = _modules()
    return _imports(name, modules[name], frozenset(modules))


def test_layer_sets_name_existing_modules():
    assert KERNELS | INDEX | CODEBOOKS | PERSISTENCE <= set(_modules())


def test_module_graph_has_no_circle():
    graph = _graph()
    state = {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize(
    "layer, allowed",
    [
        (KERNELS, KERNELS),
        (INDEX, INDEX | KERNELS),
        (CODEBOOKS, CODEBOOKS | KERNELS),
        (PERSISTENCE, PERSISTENCE),
    ],
    ids=["kernels", "index", "codebooks", "persistence"],
)
def test_layers_only_look_down(layer, allowed):
    graph = _graph()
    for name in layer:
        above = graph[name] - allowed
        assert not above, f"{name} imports {sorted(above)}, above its layer"


def test_kernels_import_no_estimator_glue():
    for name in KERNELS:
        imported = _external(name)
        assert "sklearn.base" not in imported, name
        assert not any(m.startswith("sklearn.neighbors") for m in imported), name
        # torch only lazily, and only the engine's optional gather.
        assert not (imported & {"skquant._base", "skquant.neighbors"}), name


def test_the_search_path_runs_through_the_index():
    # The estimators' glue searches through the index object only: it never
    # calls a kernel itself.
    glue = _external("skquant._base")
    assert "skquant._index" in glue
    assert not (glue & KERNELS)
