"""Import rules of the layout (README "Layout"), checked by parsing every module with `ast` (no imports executed)."""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:  # "from pkg import mod" is reported as "pkg.mod"
                yield f"{node.module}.{a.name}"
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            yield "." * node.level + (node.module or "")


def _modules(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def _rel(p):
    return p.relative_to(ROOT).as_posix()


def test_kernels_import_only_torch_and_triton():
    # torch, triton and the standard-library modules the kernels use; never the rest of drift (the kernels'
    # own modules import each other relatively, which works however the folder is installed as drift.kernels)
    allowed = ("torch", "triton", "math", "os", "functools", "typing", "dataclasses", "contextlib", "collections",
               "__future__", "importlib", "pickle", "subprocess", "sys", "tempfile", "time")  # (the last: aot.py)
    for p in _modules("kernels"):
        for name in _imports(p):
            if name.startswith("."):
                continue
            assert name.split(".")[0] in allowed, f"{_rel(p)} imports {name}"


@pytest.mark.parametrize("module,only_in", [
    ("drift.kernels", {"drift/field/triton_driver.py"}),
    ("drift._C", {"drift/_ext.py"}),
    ("nvidia.dali", {"drift/data.py"}),
    ("wandb", {"drift/tracking.py"}),
])
def test_heavy_imports_stay_in_their_module(module, only_in):
    for p in _modules("drift"):
        if _rel(p) in only_in:
            continue
        for name in _imports(p):
            hit = name == module or name.startswith(module + ".")
            assert not hit, f"{_rel(p)} imports {name}; only {sorted(only_in)} may"


def test_drift_c_extension_only_through_ext():
    for p in _modules("drift"):
        if _rel(p) == "drift/_ext.py":
            continue
        src = p.read_text()
        assert "from drift import _C" not in src and "import drift._C" not in src, _rel(p)


def test_data_prep_imports_only_schema_and_cli_from_drift():
    for p in _modules("data_prep"):
        for name in _imports(p):
            if name.startswith("drift"):
                # the two stdlib-only modules: the shard schema and the console scripts' error reporting
                assert name.split(".")[:2] in (["drift", "schema"], ["drift", "cli"]), f"{_rel(p)} imports {name}"


def test_nothing_imports_benchmarks_or_tests():
    for pkg in ("drift", "kernels", "data_prep"):
        for p in _modules(pkg):
            for name in _imports(p):
                assert not name.split(".")[0] in ("benchmarks", "tests"), f"{_rel(p)} imports {name}"


# ---------------------------------------------------------------------------------------------------
# The two packages whose modules share private protocols: no import cycle, a leaf at the bottom.
# ---------------------------------------------------------------------------------------------------
INIT = "__init__"  # the node of the package itself
PACKAGES = {"drift.field": "core", "drift.features": "base"}  # package -> its leaf module


def _absolute(pkg: str, node: ast.ImportFrom) -> str:
    """The absolute module of a `from ... import` inside package `pkg` (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    parts = pkg.split(".")
    return ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))


def _reached(pkg: str, module: str, name, modules) -> set:
    """Modules of `pkg` reached by `import module` (name None) or `from module import name`."""
    parent, _, leaf = pkg.rpartition(".")
    if (module == parent and name == leaf) or (module == pkg and name is None):
        return {INIT}
    if module == pkg:  # "from pkg import x": a submodule, or a name of the package itself (its __init__)
        return {name if name in modules else INIT}
    if module.startswith(pkg + "."):
        return {module[len(pkg) + 1:].split(".")[0]}
    return set()


def package_graph(pkg: str, sources: dict) -> dict:
    """{module: modules of `pkg` it imports}, from sources {module stem: text}. Every import counts, also those
    deferred into functions (a deferred import still ties the two modules), and a lazy `_EXPORTS` table
    ({submodule: names} loaded on first use) counts as imports of those submodules."""
    graph = {}
    for m, src in sources.items():
        out = set()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                imported = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                imported = [(_absolute(pkg, node), a.name) for a in node.names]
            elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
                out.update(ast.literal_eval(node.value))
                continue
            else:
                continue
            for module, name in imported:
                out |= _reached(pkg, module, name, sources)
        graph[m] = out - {m}
    return graph


def find_cycle(graph: dict):
    """One cycle as a list of nodes (first == last), or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def _sources(pkg: str) -> dict:
    return {p.stem: p.read_text() for p in sorted((ROOT / pkg.replace(".", "/")).glob("*.py"))}


@pytest.mark.parametrize("pkg,edges", [
    ("drift.field", {"loss": {"dispatch"}, "dispatch": {"core"}, INIT: {"dispatch", "loss"}}),
    ("drift.features", {"registry": {"base", "pixels", "mae_resnet", "convnext", "tv_resnet", "vae"},
                        "mae_resnet": {"base", "weights"}, INIT: {"registry"}}),
])
def test_package_import_graph_is_acyclic(pkg, edges):
    graph = package_graph(pkg, _sources(pkg))
    for m, expected in edges.items():  # the parser sees edges that exist (an empty graph would pass vacuously)
        assert expected <= graph[m], f"{pkg}.{m} imports {sorted(graph[m])}, expected at least {sorted(expected)}"
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle in {pkg}: " + " -> ".join(cycle)


@pytest.mark.parametrize("pkg,leaf", sorted(PACKAGES.items()))
def test_package_leaf_imports_nothing_from_drift(pkg, leaf):
    path = ROOT / pkg.replace(".", "/") / f"{leaf}.py"
    for name in _imports(path):
        assert not name.startswith((".", "drift")), f"{_rel(path)} imports {name}"


def test_importing_the_feature_keys_loads_no_encoder():
    # drift.features exports lazily, so the key functions never pull in the encoders (or diffusers/torchvision).
    pkg, leaf = "drift.features", "base"
    code = f"import sys, {pkg}.{leaf}; print(sorted(m for m in sys.modules if m.startswith('{pkg}.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == str([f"{pkg}.{leaf}"])


def test_the_cycle_checker_finds_lazy_deferred_and_relative_cycles():
    pkg = "drift.features"
    modules = {INIT: "_EXPORTS = {'registry': ('build',)}\n",
               "base": "def f():\n    from drift.features import registry\n",
               "registry": "from .base import x\n"}
    cycle = find_cycle(package_graph(pkg, modules))
    assert cycle[0] == cycle[-1] and sorted(cycle[1:]) == ["base", "registry"]
    modules["base"] = "import torch\n"
    assert find_cycle(package_graph(pkg, modules)) is None
    modules["base"] = "from drift.features import build\n"  # a name of the package: through __init__
    cycle = find_cycle(package_graph(pkg, modules))
    assert cycle[0] == cycle[-1] and sorted(cycle[1:]) == [INIT, "base", "registry"]
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
