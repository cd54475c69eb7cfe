"""Build and install `drift`.

The C++ extension `drift._C` is compiled from every `csrc/*.cpp` with torch's cpp_extension
(pybind11 underneath). Ops are registered with TORCH_LIBRARY so `torch.compile` can trace them.

    pip install --no-build-isolation -e .      # what `make build` does
    DEBUG=1 pip install --no-build-isolation -e .
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


def get_extensions():
    debug = os.getenv("DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    if os.getenv("DRIFT_NATIVE") == "1":  # opt-in: binaries built this way only run on the build machine's CPU
        cxx.append("-march=native")
    # -fno-math-errno and -fno-trapping-math let GCC vectorize sqrt and if-convert the selects in the
    # field's exp/softmax loops (nothing here reads errno or FP exception flags; results are unchanged).
    # The C++ standard is chosen by torch's cpp_extension for the installed torch.
    cxx += ["-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    return [
        CppExtension(
            "drift._C",
            sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    ]


setup(
    name="drift",
    version="0.1.0",
    description="Drifting Models (arXiv 2602.04770) in PyTorch: fused drifting field, DALI data, DDP trainer",
    # The top-level kernels/ folder is installed as drift.kernels: a top-level package named `kernels` would
    # collide with an unrelated PyPI project of that name.
    packages=find_packages(include=["drift", "drift.*", "data_prep", "data_prep.*"]) + ["drift.kernels"],
    package_dir={"drift.kernels": "kernels"},
    python_requires=">=3.10",
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={
        "console_scripts": [
            "drift-toy=drift.toy:main",
            "drift-prep=data_prep.cli:main",
            "drift-train=drift.train:main",
            "drift-sample=drift.sample:main",
            "drift-eval=drift.evaluate:main",
            "drift-mae=drift.mae_train:main",
            "drift-convert=drift.convert:main",
        ]
    },
)
