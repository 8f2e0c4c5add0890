"""The package's imports run one way (ARCHITECTURE.md): no import loops, function-level imports included, and the
lower layers never import the upper ones."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "zimage_deploy"

# leaves: they import nothing of the package (errors.py aside)
LEAVES = ("errors", "paths", "numerics", "components", "variants", "fsutil")
# ARCHITECTURE.md's layers, lowest first: a module imports only from its own layer or lower ones
LAYERS = [
    ("errors", "paths", "numerics", "schemes", "components", "variants", "targets", "fsutil", "cli",
     "quantize.options"),
    ("hashing", "manifest", "buildfolder", "scales", "keymaps", "checkpoint", "singlefile", "facts", "tiny", "tiny_files",
     "tiny_controlnet", "realsize"),
    ("models",),
    ("export", "engines"),
    ("controlnet", "lora"),
    ("job", "plan"),
    ("runtime",),
    ("quantize",),
    ("build", "generate", "bench", "refit", "serve", "batch"),
]


def layer_of(module: str) -> int:
    """The index in LAYERS of the most specific entry naming `module` or a package above it."""
    best, found = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, found = len(name), i
    if found is None:
        raise AssertionError(f"{module} is in no layer of ARCHITECTURE.md: add it to LAYERS and the document")
    return found


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports() -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in the file (relative names, without the package).
    The package's own `__init__` ("", the face: `__version__`, the lazy `ZImageRuntime`) is left out as a target:
    it runs before any module of the package, so reading a name from it ties nothing."""
    names = _module_names()
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".") if package else []
                    base = base[:len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                elif (node.module or "").startswith("zimage_deploy"):
                    module = node.module.partition(".")[2]
                else:
                    continue
                for alias in node.names:
                    target = f"{module}.{alias.name}".strip(".")
                    found.add(target if target in names else module)
            elif isinstance(node, ast.Import):
                found.update(a.name.partition(".")[2] for a in node.names if a.name.startswith("zimage_deploy."))
        graph[name] = {m for m in found if m in names and m not in (name, "")}
    return graph


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_loop_finder_finds_loops():
    assert loops({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert loops({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_sees_function_level_imports():
    graph = imports()
    assert "runtime.tensorrt_backend" in graph["runtime.backends"]  # imported inside make_backend
    assert "models.load" in graph["runtime.torch_fast"]  # imported inside TorchBackend.model


def test_no_import_loops():
    assert loops(imports()) == []


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaves_import_nothing_of_the_package(leaf):
    assert imports()[leaf] <= {"errors"}


def test_every_module_has_a_layer():
    for module in imports():
        if module:  # the package's face
            layer_of(module)


def test_imports_run_down_the_layers():
    graph = imports()
    up = sorted((m, t) for m, targets in graph.items() if m for t in targets if layer_of(t) > layer_of(m))
    assert up == []
