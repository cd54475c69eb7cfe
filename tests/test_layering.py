"""Import rules of docs/style.md §4, checked by parsing every module with `ast` (no imports executed)."""
import ast
import pathlib

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
    # torch, triton and the standard-library modules the kernels use; never drift/ (docs/style.md §4)
    allowed = ("torch", "triton", "kernels", "math", "os", "functools", "typing", "dataclasses", "contextlib",
               "__future__")
    for p in _modules("kernels"):
        for name in _imports(p):
            if name.startswith("."):
                continue
            assert name.split(".")[0] in allowed, f"{_rel(p)} imports {name}"


@pytest.mark.parametrize("module,only_in", [
    ("kernels", {"drift/backends.py"}),
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


def test_data_prep_imports_only_schema_from_drift():
    for p in _modules("data_prep"):
        for name in _imports(p):
            if name.startswith("drift"):
                assert name in ("drift.schema",) or name.startswith("drift.schema."), f"{_rel(p)} imports {name}"


def test_nothing_imports_benchmarks_or_tests():
    for pkg in ("drift", "kernels", "data_prep"):
        for p in _modules(pkg):
            for name in _imports(p):
                assert not name.split(".")[0] in ("benchmarks", "tests"), f"{_rel(p)} imports {name}"
