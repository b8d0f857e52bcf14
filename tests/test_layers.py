"""The package's layers, read from its imports (function-level imports included): each
module imports only from its own layer or the layers below, no module imports itself
back through others, and ``mlx_kvq/bridge.py`` alone imports mlx-lm."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_kvq"

# bottom to top; a module of layer i may import from layers 0..i
LAYERS = [
    {"_blas", "format", "home", "rotation"},
    {"kernels"},
    {"cache"},
    {"attention"},
    {"bridge"},
    {"models"},
    {"generation"},
    {"eval"},
    {"cli"},
]
LAYER = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path):
    """Absolute names of every module ``path`` imports (``from . import x`` gives ``pkg.x``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # ``from pkg import module``
    return out


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def room(name):
    """``mlx_kvq.cache.view`` -> ``cache``; None outside the package. A ``__main__`` module
    (``python -m mlx_kvq.eval``) is a command's door: the ``cli`` layer."""
    parts = name.split(".")
    if parts[0] != "mlx_kvq" or len(parts) < 2:
        return None
    return "cli" if parts[-1] == "__main__" else parts[1]


def test_the_layers_are_known():
    rooms = {room(n) for n in MODULES} - {None}
    assert rooms <= set(LAYER), f"modules outside the known layers: {rooms - set(LAYER)}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if room(n)))
def test_imports_run_down_the_layers(name):
    here = LAYER[room(name)]
    for target in imports(MODULES[name]):
        r = room(target)
        if r in LAYER:
            assert LAYER[r] <= here, f"{name} (layer {room(name)}) imports {target} from the higher layer {r}"


def test_only_the_bridge_imports_mlx_lm():
    found = {n for n, p in MODULES.items() if any(t.split(".")[0] == "mlx_lm" for t in imports(p))}
    assert found == {"mlx_kvq.bridge"}


def test_no_circles_between_modules():
    graph = {n: {t for t in imports(p) if t in MODULES and t != n} for n, p in MODULES.items()}
    # a package's __init__ re-exports its modules: edges into a package face are edges to what it exports
    state = {}

    def visit(n, path):
        state[n] = 1
        for m in graph[n]:
            if m.startswith(n + "."):  # a package face importing its own modules
                continue
            if state.get(m) == 1 and not n.startswith(m + "."):
                raise AssertionError(" -> ".join(path + [m]))
            if not state.get(m):
                visit(m, path + [m])
        state[n] = 2

    for n in sorted(graph):
        if not state.get(n):
            visit(n, [n])


def test_the_scan_sees_imports():
    """The scan itself: it finds what these files are known to import."""
    assert "mlx_lm.models.cache" in imports(MODULES["mlx_kvq.bridge"])
    assert "mlx_kvq.cache.view" in imports(MODULES["mlx_kvq.cache.quantized"])
    assert "mlx_kvq.kernels.backend" in imports(MODULES["mlx_kvq.kernels.decode"])
