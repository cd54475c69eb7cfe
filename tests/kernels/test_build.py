"""The build: the C++ extension drift._C is built and registers its ops, and the top-level kernels/ folder
imports as `drift.kernels` however the tree is used: installed (setup.py maps it into drift/), or as a bare
copy of the source tree with only its root on PYTHONPATH (how the GPU machine runs the project). The editable
install of `make build` is the one this suite runs under.

Run: pytest tests/kernels/test_build.py
"""
import os
import shutil
import subprocess
import sys

import torch

from drift import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = ("import drift, drift.kernels, drift.field\n"
         "print(drift.kernels.__file__)\n"
         "if drift.kernels.HAS_TRITON:\n"
         "    from drift.kernels import field_ops\n"
         "    print(field_ops.__file__)\n")


def test_extension_is_built_and_registers_the_field_ops():
    assert _ext.HAS_C_EXT, "drift._C missing: run `make build`"
    assert _ext._C.num_threads() >= 1
    for op in ("field_scale_sums", "field_sumsq", "field_force"):
        assert hasattr(torch.ops.drift, op), op


def _probe(pythonpath: str, cwd: str):
    """The files `drift.kernels` (and its field_ops where triton is installed) load from, in a fresh process
    whose only extra import path is `pythonpath` (the environment's editable install stays active)."""
    env = {**os.environ, "PYTHONPATH": pythonpath}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


def test_kernels_import_from_a_bare_source_copy(tmp_path):
    tree = tmp_path / "tree"
    for folder in ("drift", "kernels"):
        shutil.copytree(os.path.join(ROOT, folder), tree / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    files = _probe(str(tree), cwd=str(tmp_path))
    assert files and all(f.startswith(str(tree / "kernels")) for f in files), files


def test_kernels_import_from_an_install_layout(tmp_path):
    # setup.py's build_py lays the packages out as an install does (kernels/ copied into drift/kernels); no
    # compile, and nothing is written into the source tree.
    lib = tmp_path / "lib"
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(lib)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (lib / "drift" / "kernels" / "field_ops.py").is_file() and not (lib / "kernels").exists()
    files = _probe(str(lib), cwd=str(tmp_path))
    assert files and all(f.startswith(str(lib / "drift" / "kernels")) for f in files), files
