"""drift.kernels: the Triton kernels of drift (imports only torch and triton, never the rest of drift).

This folder is the top-level `kernels/` of the source tree, installed as the subpackage `drift.kernels`
(setup.py's package_dir; drift/__init__.py maps it the same way when the tree is used without installing).
The fused drifting field is split by role (design note: ../docs/field_kernels.md, relative to this folder):

    field_device.py        device code: the @triton.jit helpers and the kernels of the three passes
    field_device_split.py  device code of the split stored route (pass 1 over column blocks)
    field_tuning.py        launch configurations, routes, the autotuner and its store hook
    field_launch.py        launch plans, launchers and the three passes as functions
    field_multi.py         multi-key launches: the passes for groups of feature keys in one launch each
    field_ops.py           the torch.library custom ops (what drift/field/triton_driver.py calls)

This module imports nothing but triton: HAS_TRITON says whether it imports, TRITON_VERSION which one (tuning
results are only reused with the version that measured them). The kernels run on CUDA tensors, or on CPU
tensors when TRITON_INTERPRET=1 was set before triton was imported (the test tier `pytest -m interp`);
INTERPRETED records that.
"""
import os

try:
    import triton

    HAS_TRITON = True
    TRITON_VERSION = str(triton.__version__)
except ImportError:  # a CPU-only install without triton: the field falls back to cpp / reference
    HAS_TRITON = False
    TRITON_VERSION = None

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
