"""drift: Drifting Models (Deng et al., arXiv 2602.04770) in PyTorch.

Public API (stable names): drift.field.drifting_field, drift.loss.drifting_loss (also drift.field.drifting_loss).
Heavy dependencies (DALI, wandb, triton) are imported lazily by the modules that need them; this file imports
only the standard library.

`drift.kernels` (the Triton kernels) lives in the top-level `kernels/` folder of the source tree. An install
puts it at drift/kernels (setup.py's package_dir); when drift is used from the source tree itself, with only
the tree's root on PYTHONPATH, the finder below maps the name `drift.kernels` to that folder.
"""
import os as _os
import sys as _sys
from importlib.machinery import PathFinder as _PathFinder

__version__ = "0.1.0"


class _SourceTreeKernels:
    """Meta-path finder for `drift.kernels` in a source tree: <root>/kernels, next to <root>/drift."""

    def __init__(self, root: str):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "drift.kernels":
            return None
        return _PathFinder.find_spec(fullname, [self.root])


def _map_source_tree_kernels() -> None:
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    if _os.path.isdir(_os.path.join(here, "kernels")) or not _os.path.isfile(_os.path.join(root, "kernels",
                                                                                          "__init__.py")):
        return  # an installed copy (drift/kernels is a real folder), or no source tree around this one
    if not any(isinstance(f, _SourceTreeKernels) and f.root == root for f in _sys.meta_path):
        # First in line: an editable install's finder would map the name to the tree it was installed from,
        # which need not be this one.
        _sys.meta_path.insert(0, _SourceTreeKernels(root))


_map_source_tree_kernels()
