"""hrnetdet's modules import one way: no cycles (imports inside functions count), the packages in
layers (ARCHITECTURE.md), and the zoo's modules in layers, each importing only what sits below it."""
import ast
from pathlib import Path
from typing import Dict, Set

PACKAGE = Path(__file__).resolve().parents[1] / "hrnetdet"

# records leaf, pure conversion, the table, checkpoint I/O, the Hub, the factory, the commands.
ZOO_LAYERS = ["recipe", "records", "registry", "convert", "models", "parity", "checkpoint", "config", "hub", "push",
              "factory", "commands", "__init__"]


# hrnetdet's packages and top-level modules, lowest first: each imports only from layers below it
# (modules of one layer do not import each other).
PACKAGE_LAYERS = [
    {"version", "io", "threads", "safe_pickle", "names"},  # leaves: no hrnetdet imports
    {"backbone", "neck", "heads"},  # the network's parts
    {"detectors"},  # parts composed into torchvision-contract detectors
    {"data"},  # images, COCO data, categories, results records
    {"zoo"},  # registry, checkpoints, the Hub, create_model
    {"visualize"},
    {"inference"},  # predict, runs over files, slicing, TTA, export, runtimes
    {"engine", "integrations", "serve"},  # training and evaluation; adapters for outside tools (SAHI); HTTP serving
    {"demo", "cli", "hrnetdet"},  # entry points (hrnetdet: the package's lazy __init__)
]


def _module_name(path: Path) -> str:
    parts = ("hrnetdet",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def _imports(path: Path) -> Set[str]:
    """hrnetdet modules imported anywhere in the file (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("hrnetdet")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("hrnetdet"):
                modules = {f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")}
                found |= modules  # `from .. import safe_pickle` imports that module, not the package
                if len(modules) < len(node.names):
                    found.add(base)
    return found


def _graph() -> Dict[str, Set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}


def test_no_import_cycles():
    graph = _graph()
    state: Dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "hrnetdet"


def test_packages_import_only_lower_layers():
    layer_of = {name: i for i, layer in enumerate(PACKAGE_LAYERS) for name in layer}
    graph = _graph()
    assert {_top(m) for m in graph} == set(layer_of), "a package or module without a layer"
    for module, deps in graph.items():
        for dep in deps:
            here, there = _top(module), _top(dep)
            if here != there:
                assert layer_of[there] < layer_of[here], f"{module} imports {dep}: {there} is not below {here}"


def test_zoo_modules_import_only_lower_layers():
    graph = _graph()
    for i, layer in enumerate(ZOO_LAYERS):
        name = "hrnetdet.zoo" if layer == "__init__" else f"hrnetdet.zoo.{layer}"
        zoo_deps = {d.rpartition(".")[2] for d in graph[name] if d.startswith("hrnetdet.zoo.")}
        assert zoo_deps <= set(ZOO_LAYERS[:i]), f"{name} imports {sorted(zoo_deps - set(ZOO_LAYERS[:i]))}"
    assert set(ZOO_LAYERS) == {p.stem for p in (PACKAGE / "zoo").glob("*.py")}, "a zoo module without a layer"
