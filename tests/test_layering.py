"""The package's layering (docs/design.md section 2): imports run one way, cli -> perf -> nn -> ops -> kernels,
with no import cycles, function-local imports included (so none can hide a cycle)."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ["fastgan.usage", "fastgan.kernels", "fastgan.ops", "fastgan.nn", "fastgan.perf", "fastgan.cli", "fastgan"]
# fastgan.usage (UsageError) may be imported by every layer and imports nothing of fastgan.
LEAVES = {"fastgan.usage"}


def _modules():
    """{dotted module name: path} of every module of the package, kernels/ as fastgan.kernels."""
    found = {}
    for root, package in ((ROOT / "fastgan", "fastgan"), (ROOT / "kernels", "fastgan.kernels")):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(name, path):
    """The fastgan modules that ``name`` imports anywhere in its file, as (module, line, in a function)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # "fastgan.ops.backends.resolve" -> "fastgan.ops.backends"
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target, node.lineno, id(node) in functions


GRAPH = {name: sorted(set(_imports(name, path))) for name, path in MODULES.items()}


def _layer(name):
    """The index in LAYERS of the most specific layer holding ``name``."""
    return max((len(layer), i) for i, layer in enumerate(LAYERS) if name == layer or name.startswith(layer + "."))[1]


def test_the_package_is_found():
    assert {"fastgan.ops.functional", "fastgan.nn.models", "fastgan.cli.train", "fastgan.perf.bench",
            "fastgan.kernels.bn_act"} <= MODULES.keys()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_down_the_layers(name):
    wrong = [f"line {line}: {target}" for target, line, _ in GRAPH[name]
             if _layer(target) > _layer(name) or (_layer(name) in map(LAYERS.index, LEAVES)
                                                   and _layer(target) != _layer(name))]
    assert not wrong, f"{name} ({LAYERS[_layer(name)]}) imports from a layer above it: {wrong}"


def test_no_import_cycles():
    """Tarjan's strongly connected components over every import, module-level or inside a function."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _, _ in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_a_function_local_import_is_an_edge(tmp_path):
    """The check itself: an import inside a function counts like any other, so it cannot hide a cycle."""
    path = tmp_path / "plan.py"
    path.write_text("import torch\n\n\ndef f():\n    from . import layers\n    from ..ops.backends import resolve\n")
    assert sorted(_imports("fastgan.nn.plan", path)) == [("fastgan.nn.layers", 5, True),
                                                        ("fastgan.ops.backends", 6, True)]
    assert _layer("fastgan.usage") < _layer("fastgan.ops.backends") < _layer("fastgan.nn.plan") < _layer("fastgan")
