"""Import layering: no import cycle between modules, the private runtime's subpackages in their order, the kernels
below the model and the methods.

Every import in every module of mpcache/ and parties/ counts, read from the source (AST): function-local ones too
(they run as soon as the function does) and those under `if TYPE_CHECKING` (a dependency all the same). Importing
`a.b.c` also runs the package `a.b` unless the importer lives inside it, so that edge is counted too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mpcache", "parties")
MPC = "mpcache.mpc"
# The private runtime's subpackages, lowest first: a module may import only from its own subpackage or earlier ones.
MPC_ORDER = ("fss", "arith", "transport", "dealer", "nn", "caches", "deploy")
# Packages that must not import the listed ones (the kernels sit below the model and the methods; fss stands alone).
FORBIDDEN = {
    "mpcache.kernels": ("mpcache",),
    "mpcache.mpc.fss": ("mpcache",),
    "mpcache.model": ("mpcache.methods", "mpcache.mpc", "mpcache.eval"),
    "mpcache.methods": ("mpcache.mpc",),
}

Graph = dict[str, set[str]]


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file of the packages (a package is its __init__.py)."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imported_names(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module name an import statement of `name` (anywhere in the file) refers to."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"  # `from package import submodule`
                names.add(candidate if candidate in known else base)
    return names


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> Graph:
    """module -> the modules of `packages` it imports, including the packages an import runs on the way."""
    files = module_files(root, packages)
    known = set(files)
    graph: Graph = {}
    for name, path in files.items():
        edges = set()
        for target in imported_names(name, path, known):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in known and not within(name, prefix):  # a package the importer lives in is running
                    edges.add(prefix)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: Graph) -> list[str] | None:
    """One import cycle [a, b, ..., a] if there is any (iterative depth-first search), else None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt) and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def mpc_layer(name: str) -> str | None:
    """The subpackage of mpcache.mpc a module belongs to (None outside them)."""
    if not within(name, MPC) or name == MPC:
        return None
    return name[len(MPC) + 1 :].split(".")[0]


def layering_violations(graph: Graph, order: tuple[str, ...] = MPC_ORDER) -> list[str]:
    """Imports of a higher mpc subpackage from a lower one, modules in no listed subpackage, and forbidden imports."""
    rank = {sub: i for i, sub in enumerate(order)}
    bad = []
    for name, targets in sorted(graph.items()):
        own = mpc_layer(name)
        if own is not None and own not in rank:
            bad.append(f"{name}: subpackage {own!r} has no place in the order {order}")
        for target in sorted(targets):
            other = mpc_layer(target)
            if own in rank and other in rank and rank[other] > rank[own]:
                bad.append(f"{name} ({own}) imports {target} ({other}), a higher layer")
            for package, banned in FORBIDDEN.items():
                if within(name, package) and not within(target, package) and any(within(target, b) for b in banned):
                    bad.append(f"{name} imports {target}: {package} must not import {', '.join(banned)}")
    return bad


# ------------------------------------------------------------------------------------------ the repository
def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50 and "mpcache.mpc.arith.numerics" in graph  # the walk saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_mpc_subpackages_import_only_downwards():
    graph = import_graph()
    present = {mpc_layer(name) for name in graph} - {None}
    assert {"arith", "transport", "dealer", "nn", "caches", "deploy"} <= present  # fss may or may not exist yet
    assert layering_violations(graph) == []


def test_kernels_sit_below_the_model_and_the_methods():
    graph = import_graph()
    users = {name for name, targets in graph.items() if any(within(t, "mpcache.kernels") for t in targets)}
    assert "mpcache.model.transformer" in users and "mpcache.methods.quest" in users
    outside = [t for name, targets in graph.items() if within(name, "mpcache.kernels") for t in targets]
    assert [t for t in outside if not within(t, "mpcache.kernels")] == []


# ---------------------------------------------------------------------------------------------- the checker
def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_reads_every_kind_of_import(tmp_path):
    write(tmp_path, {
        "pkg/__init__.py": "from pkg import b\n",
        "pkg/a.py": "def f():\n    from pkg.sub import c  # function-local\n",
        "pkg/b.py": "from . import a\nimport os\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from ..b import x\nfrom . import d as dd\n",
        "pkg/sub/d.py": "",
    })  # fmt: skip
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg"] == {"pkg.b"}
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.c"}  # the package pkg.sub runs first
    assert graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.sub.c"] == {"pkg.b", "pkg.sub.d"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"pkg.a", "pkg.sub.c", "pkg.b"}


def test_checker_finds_cycles_and_upward_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x2"}, "x2": set(), "a": {"a"}}) == ["a", "a"]
    ok = {"mpcache.mpc.nn.layers": {"mpcache.mpc.arith.numerics"}, "mpcache.mpc.arith.numerics": set()}
    assert layering_violations(ok) == []
    up = {"mpcache.mpc.arith.numerics": {"mpcache.mpc.dealer.tuples"}, "mpcache.mpc.dealer.tuples": set()}
    assert layering_violations(up) == [
        "mpcache.mpc.arith.numerics (arith) imports mpcache.mpc.dealer.tuples (dealer), a higher layer"
    ]
    stray = {"mpcache.mpc.misc.x": set()}
    assert "has no place in the order" in layering_violations(stray)[0]
    kernel_up = {"mpcache.kernels.decode": {"mpcache.model", "mpcache.model.cache"}}
    assert len(layering_violations(kernel_up)) == 2
    fss_out = {"mpcache.mpc.fss.dpf": {"mpcache.mpc.arith.ring"}}
    assert [v for v in layering_violations(fss_out) if "mpcache.mpc.fss must not import" in v]


@pytest.mark.parametrize("module", ["mpcache.mpc.transport.local", "mpcache.mpc.caches.mpcache"])
def test_graph_holds_function_local_imports(module):
    """These two import upwards-allowed modules inside functions only; the walk must see them."""
    graph = import_graph()
    expected = {"mpcache.mpc.transport.local": "mpcache.mpc.transport.grpc_comm",
                "mpcache.mpc.caches.mpcache": "mpcache.mpc.nn.decoder"}[module]  # fmt: skip
    assert expected in graph[module]
