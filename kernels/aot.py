"""Compile the drift kernels ahead of their launches: for a GPU that is not there (checks on any machine), or for
the GPU at hand, many at once before a first training step.

    from drift.kernels import aot
    with aot.record("sm90") as log:               # H100 / H200, on any machine
        drifting_field_multi(items, backend="triton", check_finite=False)    # CPU tensors, never read
    [v for v in log if v.error]                   # what would not compile or fit on that GPU

    with aot.record(aot.target_for(device), compile=False) as log:   # only list what a call launches
        drifting_field_multi(cpu_items, backend="triton", check_finite=False)
    aot.compile_variants(log, jobs=8)             # compile in parallel processes into Triton's disk cache

Inside a `record` block every Triton launch is recorded (and, with compile=True, compiled for the target,
ptxas included) instead of run, and the host code runs as it would on the target: the kernels accept CPU
tensors, the SM count is the target's (it picks routes and launch geometry), and a compiled variant that needs
more shared memory than the target has raises Triton's OutOfResources where the real launch would, so the
launch code falls back to its next candidate as it would there. No kernel runs and no output is written: the
inputs may be uninitialized, even larger than the machine's memory as long as nothing else touches them.

What it shows: that every kernel variant a call launches compiles for the target under the installed Triton
(the interpreter tier checks the kernels' semantics, not their compilation), what each needs in shared memory,
registers and spills, and how long a first call's compiles take. `compile_variants` fills Triton's on-disk
cache with the same keys the launches compute, so the first real launch loads instead of compiling (Triton
compiles hold the GIL: threads do not overlap them, processes do).

Plain Python over triton's JIT internals (`JITFunction.run`'s binder and `_pack_args`, the same in triton
3.6 and 3.8); `available()` says whether they are there. Entering a block forgets the launch plans and tuned
configurations of this process (they depend on the SM count), and so does leaving it.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import tempfile
import time
from typing import Dict, Iterator, List, NamedTuple, Optional, Union

from . import INTERPRETED

# arch -> (compute capability, SMs, max shared memory per block with opt-in, bytes): the GPUs checked in CI.
TARGETS = {
    "sm90": (90, 132, 232448),   # H100 SXM / H200: 227 KB
    "sm80": (80, 108, 166912),   # A100: 163 KB
}

_ACTIVE: Optional[dict] = None  # the target of the open record block


class Variant(NamedTuple):
    """One kernel variant a call launched: the kernel, its constexprs and launch options, what it needs on the
    target (None when not compiled), the compile time, the error (compile failure or OutOfResources) if it would
    not launch there, `source`, what `compile_variants` needs to compile it again, and `key`, which tells
    variants apart (Triton's own in-memory cache key of the launch)."""

    kernel: str
    options: str
    shared: Optional[int]
    regs: Optional[int]
    spills: Optional[int]
    seconds: float
    error: Optional[str]
    source: tuple
    key: tuple


def active() -> Optional[dict]:
    """The target of the open `record` block ({"arch", "cc", "sms", "max_shared"}), or None."""
    return _ACTIVE


def sms() -> int:
    """The target's SM count inside a `record` block (0 outside)."""
    return _ACTIVE["sms"] if _ACTIVE else 0


def available() -> bool:
    """Whether the installed Triton has the JIT internals used here (and kernels are compiled, not interpreted)."""
    if INTERPRETED:
        return False
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError:
        return False
    return hasattr(JITFunction, "_pack_args")


def target_for(device) -> dict:
    """The target of a CUDA device: {"arch", "cc", "sms", "max_shared"} from its properties."""
    import torch
    props = torch.cuda.get_device_properties(device)
    cc = props.major * 10 + props.minor
    known = TARGETS.get(f"sm{cc}")
    shared = getattr(props, "shared_memory_per_block_optin", 0) or (known[2] if known else 0)
    return {"arch": f"sm{cc}", "cc": cc, "sms": int(props.multi_processor_count), "max_shared": int(shared)}


def _target(target: Union[str, dict], sms: Optional[int]) -> dict:
    if isinstance(target, dict):
        out = dict(target)
    elif target in TARGETS:
        cc, n, shared = TARGETS[target]
        out = {"arch": target, "cc": cc, "sms": n, "max_shared": shared}
    else:
        raise ValueError(f"target must be one of {sorted(TARGETS)} or a dict from target_for(), got {target!r}")
    if sms:
        out["sms"] = int(sms)
    return out


def _resource_usage(cubin: bytes) -> tuple:
    """(registers, local-memory bytes per thread: spills) of a cubin, read with the cuobjdump that ships with
    Triton; (None, None) without it."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                 timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None, None
    regs = spills = None
    for tok in out.replace(",", " ").split():
        if tok.startswith("REG:"):
            regs = int(tok[4:])
        elif tok.startswith("LOCAL:"):
            spills = int(tok[6:])
    return regs, spills


def _compile(source: tuple, cc: int, max_shared: int, fn=None) -> tuple:
    """Compile one recorded variant for compute capability cc: (seconds, shared, regs, spills, error). Runs in
    the recording process (fn: the kernel) or in a worker of compile_variants, which finds the kernel again by
    module and name (so only module-level kernels compile there)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile
    from triton.runtime.errors import OutOfResources

    module, qualname, signature, constexprs, attrs, options = source
    if fn is None:
        fn = getattr(importlib.import_module(module), qualname)
    t0 = time.perf_counter()
    try:
        k = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
                           options=options)
    except Exception as e:  # noqa: BLE001  (CompilationError, PTXASError, ... differ between versions)
        return time.perf_counter() - t0, None, None, None, f"{type(e).__name__}: {str(e).strip()[:400]}"
    seconds = time.perf_counter() - t0
    shared = int(k.metadata.shared)
    regs, spills = _resource_usage(k.asm["cubin"]) if "cubin" in k.asm else (None, None)
    err = str(OutOfResources(shared, max_shared, "shared memory")) if max_shared and shared > max_shared else None
    return seconds, shared, regs, spills, err


@contextlib.contextmanager
def record(target: Union[str, dict] = "sm90", compile: bool = True, sms: Optional[int] = None,
           known: Optional[Dict[tuple, Variant]] = None) -> Iterator[List[Variant]]:
    """Inside the block, Triton launches are recorded for `target` (a key of TARGETS, or target_for(device))
    and not run; yields the list of distinct variants (in first-launch order). compile=True compiles each for
    the target as it is first launched (its error raised where the launch would raise); compile=False only
    lists them (for compile_variants). `known` maps Variant.key to variants compiled earlier (by
    compile_variants): those behave as compiled, errors included, so a launch that falls back past them
    records its next candidate. `sms` overrides the target's SM count (e.g. 114 for an H100 PCIe)."""
    global _ACTIVE
    tgt = _target(target, sms)
    if not available():
        raise RuntimeError("aot.record needs triton's JIT internals (triton >= 3.4) and TRITON_INTERPRET unset")
    if _ACTIVE is not None:
        raise RuntimeError("aot.record blocks do not nest")
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.errors import OutOfResources
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from . import field_launch, field_tuning

    backend = make_backend(GPUTarget("cuda", tgt["cc"], 32))
    binders: Dict[object, object] = {}
    seen: Dict[tuple, Variant] = {}
    log: List[Variant] = []

    def run(fn, *args, grid, warmup, **kwargs):
        # JITFunction.run up to the launch, for the target instead of the current device (same options, so the
        # same cache keys as the real launch).
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = binders.get(fn)
        if binder is None:
            binder = binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        key = (fn.fn.__module__, fn.fn.__qualname__, str(spec), str(opts))
        v = seen.get(key)
        if v is None and known is not None and key in known:
            v = seen[key] = known[key]
            log.append(v)
        if v is None:
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
            consts = ", ".join(f"{fn.arg_names[k[0]]}={c}" for k, c in sorted(constexprs.items()))
            label = f"{consts}, num_warps={options.num_warps}, num_stages={options.num_stages}"
            source = (fn.fn.__module__, fn.fn.__qualname__, signature, constexprs, attrs, options.__dict__)
            v = Variant(fn.fn.__name__, label, None, None, None, 0.0, None, source, key)
            if compile:
                v = v._replace(**dict(zip(("seconds", "shared", "regs", "spills", "error"),
                                          _compile(source, tgt["cc"], tgt["max_shared"], fn))))
            seen[key] = v
            log.append(v)
        if v.error is not None:
            if v.error.startswith("out of resource"):
                raise OutOfResources(v.shared, tgt["max_shared"], "shared memory")
            raise RuntimeError(f"{v.kernel} does not compile for {tgt['arch']}: {v.error}")
        return None

    # Launch plans and tuned configurations depend on the SM count: none made outside the block is used in it,
    # and none made inside outlives it. The tuner never times here (nothing runs).
    field_launch.reset_tuning()
    saved, autotune = JITFunction.run, field_tuning.AUTOTUNE
    JITFunction.run, field_tuning.AUTOTUNE = run, False
    _ACTIVE = tgt
    try:
        yield log
    finally:
        JITFunction.run, field_tuning.AUTOTUNE = saved, autotune
        _ACTIVE = None
        field_launch.reset_tuning()


def compile_variants(variants: List[Variant], target: Union[str, dict] = "sm90", jobs: int = 0) -> List[Variant]:
    """Compile recorded variants for `target` in `jobs` worker processes (0: one per CPU core, at most one per
    variant; 1: in this process), filling Triton's on-disk cache; returns them with what each needs and its
    compile time. The workers are fresh interpreters (`python -m drift.kernels.aot`), never forks of this
    process, which may hold a CUDA context, and never re-runs of its main module."""
    import pickle
    import sys
    tgt = _target(target, None)
    todo = [v for v in variants if v.shared is None and v.error is None]
    jobs = min(jobs or (os.cpu_count() or 1), len(todo))
    args = [(v.source, tgt["cc"], tgt["max_shared"]) for v in todo]
    if jobs <= 1:
        results = [_compile(*a) for a in args]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "variants.pkl")
            with open(path, "wb") as f:
                pickle.dump(args, f)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
            procs = [subprocess.Popen([sys.executable, "-m", "drift.kernels.aot", path, str(i), str(jobs)], env=env)
                     for i in range(jobs)]
            codes = [p.wait() for p in procs]
            results = [None] * len(args)
            for i, code in enumerate(codes):
                part = f"{path}.{i}"
                if code != 0 or not os.path.exists(part):
                    for j in range(i, len(args), jobs):
                        results[j] = (0.0, None, None, None, f"compile worker {i} exited with code {code}")
                    continue
                with open(part, "rb") as f:
                    for j, r in zip(range(i, len(args), jobs), pickle.load(f)):
                        results[j] = r
    done = {id(v): v._replace(**dict(zip(("seconds", "shared", "regs", "spills", "error"), r)))
            for v, r in zip(todo, results)}
    return [done.get(id(v), v) for v in variants]


def _worker(path: str, i: int, jobs: int) -> None:
    """A compile_variants worker: compile every jobs-th variant of the pickled list from index i."""
    import pickle
    with open(path, "rb") as f:
        args = pickle.load(f)
    out = [_compile(*a) for a in args[i::jobs]]
    with open(f"{path}.{i}", "wb") as f:
        pickle.dump(out, f)


if __name__ == "__main__":
    import sys
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
