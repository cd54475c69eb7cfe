"""Compile the Triton kernels of the training step's drifting field before its first step, many at once.

A step's field launches ~15-30 kernel variants (one per pass, key group shape, dtype, strides and route:
drift.kernels), each a 1-4 s Triton compile that holds the GIL, so a first step would spend ~25-60 s compiling
them one after the other (the paper presets' steps on one CPU core: benchmarks/RESULTS.md, "Trainer on GPU"). `precompile_field(trainer)` finds them without running anything and compiles them in parallel
worker processes into Triton's on-disk cache, where the first step's launches then find them:

  1. the step's inputs as fake tensors (FakeTensorMode: shapes, strides and dtypes, no memory, no compute), run
     through the trainer's own generator, encoder and key layout (`drift.step.field_calls`) under its autocast,
     so every field call's items have the layout and dtype of the real step's;
  2. those items as uninitialized host tensors of the same layout (never read: virtual memory only), passed to
     the field inside `drift.kernels.aot.record` for this GPU, which lists the kernel variants the launches
     would compile without running one;
  3. `aot.compile_variants` compiles them in up to one process per CPU core; a variant over the GPU's shared
     memory makes its launch fall back to its next candidate, so the listing is repeated with what was learnt
     until nothing new is launched (a round or two).

Under torchrun only local rank 0 compiles (the ranks of a node share the cache); the others wait at a barrier.
`field_variants` is the same listing for any target GPU, and `fake_cuda_trainer` a preset's step on a fake
GPU, so the kernels of any preset can be compiled for any GPU on a machine without one (the CPU tests do; so
can a CPU node that fills a Triton cache shared with the GPU nodes):

    python -m drift.precompile --preset ablation-B/2 --labels-per-gpu 8 --arch sm90 [--jobs 16]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Dict, List, Optional, Union

import torch

from drift.dist import barrier, print0

# Rounds of compiles: each compiles what the step launches given what the earlier rounds found (a candidate over
# the GPU's shared memory makes its launch fall back to the next, compiled in the next round).
MAX_ROUNDS = 8


# ----------------------------------------------------------------------------------------------------
# A preset's step on a fake GPU
# ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def cuda_bf16_autocast():
    """CUDA bf16 autocast as `torch.autocast("cuda")` sets it, without its check for a CUDA device (the weight
    cast cache off: the casts are of fake tensors)."""
    prev = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"), torch.is_autocast_cache_enabled())
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", prev[0])
        torch.set_autocast_dtype("cuda", prev[1])
        torch.set_autocast_cache_enabled(prev[2])


def fake_cuda_trainer(preset: str, labels: int, num_classes: int = 1000, feature_options: Optional[dict] = None,
                      **overrides):
    """A Trainer of `preset` holding `labels` labels on one fake GPU, with only what a step's forward needs
    (config, generator, encoder, autocast; no loader, queues or optimizer): every tensor of its step has the
    shape, layout and dtype it has on a GPU, and none holds memory. The generator and the encoder are built on
    the meta device (random init; `feature_options` such as width=640 go to the extractor) and moved to fake
    CUDA tensors of `tr.fake_mode`, a FakeTensorMode; CUDA's bf16 autocast is switched on at the dispatcher
    level, where `torch.autocast("cuda")` would refuse on a machine without CUDA. `overrides` are TrainConfig
    fields. For field_variants / compile_field only."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from drift.config import TrainConfig
    from drift.features import build_feature_extractor
    from drift.model import DRIFT_MODELS, build_generator_model
    from drift.step import bf16_matmul_weights
    from drift.trainer import Trainer
    cfg = TrainConfig.from_preset(preset, train_batch_size=labels, device="cuda", **overrides)
    with torch.device("meta"):
        probe = DRIFT_MODELS[cfg.model](num_classes=1)
        item_shape = (probe.in_channels, probe.input_size, probe.input_size)
        model = build_generator_model(cfg, num_classes, item_shape[1], item_shape[0])
        features = build_feature_extractor(cfg.features, device="meta", **(feature_options or {}))
    tr = Trainer.__new__(Trainer)
    tr.cfg, tr.nc_local, tr.item_shape = cfg, labels, item_shape
    tr.device = torch.device("cuda", 0)
    tr.phase_timer, tr.pg, tr.ddp = None, None, None
    tr.fake_mode = fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        tr.model = model.to_empty(device=tr.device)
        tr.features = features.to_empty(device=tr.device)
    bf16_matmul_weights(tr.features)  # what the trainer does under CUDA autocast
    tr.gen_fn = tr.model
    tr.autocast = True
    tr._autocast = cuda_bf16_autocast
    return tr


def fake_batch(tr) -> Dict[str, torch.Tensor]:
    """A batch of the step's shapes and dtypes for Trainer `tr` (`Trainer._sample_inputs`' keys), made of
    whatever tensors the active mode makes (fake ones under FakeTensorMode): values are never read."""
    cfg, dev, n = tr.cfg, tr.device, tr.nc_local
    G, P, U = cfg.gen_per_label, cfg.pos_per_sample, cfg.neg_per_sample
    shape = tuple(tr.item_shape)
    return {"labels": torch.zeros(n, dtype=torch.long, device=dev), "alpha": torch.ones(n, device=dev),
            "noise": torch.empty(n * G, *shape, device=dev),
            "style": torch.zeros(n * G, tr.model.num_style_tokens, dtype=torch.long, device=dev),
            "pos": torch.empty(n * P, *shape, device=dev),
            "unc": torch.empty(n * U, *shape, device=dev) if U else None}


def materialize(calls: List[List[tuple]], device: Union[str, torch.device] = "cpu") -> List[List[tuple]]:
    """The items of `calls` (fake tensors) as uninitialized tensors on `device` with the same sizes, strides,
    storage offsets and dtypes, views of one storage wherever the fakes share one (so the kernels see the same
    alignment and key offsets). Nothing is written: on the host the memory stays virtual until touched."""
    storages: Dict[int, torch.UntypedStorage] = {}

    def real(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None:
            return None
        st = t.untyped_storage()
        key = st._cdata
        if key not in storages:
            storages[key] = torch.empty(st.nbytes(), dtype=torch.uint8, device=device).untyped_storage()
        return torch.empty(0, dtype=t.dtype, device=device).set_(storages[key], t.storage_offset(), t.shape,
                                                                 t.stride())

    return [[tuple(real(t) for t in it) for it in items] for items in calls]


def field_variants(tr, target, compile: bool = False, known=None) -> list:
    """The Triton kernel variants one step of Trainer `tr` launches on `target` (drift.kernels.aot: "sm90",
    "sm80" or aot.target_for(device)), found without running any; compile=True also compiles each for the
    target (errors in the Variants); `known`: variants compiled before (aot.record). The step runs under
    `tr.fake_mode` (fake_cuda_trainer) or a new FakeTensorMode around the trainer's real modules."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from drift.field import drifting_field_multi
    from drift.field.triton_driver import aot
    from drift.step import field_calls

    mode = getattr(tr, "fake_mode", None) or FakeTensorMode(allow_non_fake_inputs=True)
    # Compiled blocks (cfg.compile) run eagerly here: only shapes are wanted, not a compile on fake inputs.
    with mode, torch.compiler.set_stance("force_eager"):
        calls = field_calls(tr, fake_batch(tr))
    cfg = tr.cfg
    with aot.record(target, compile=compile, known=known) as log:
        for items in materialize(calls):
            drifting_field_multi(items, temperatures=cfg.R_list, normalization=cfg.normalization, backend="triton",
                                 check_finite=False)
    return log


def uses_triton(tr) -> bool:
    """Whether the step of Trainer `tr` runs the Triton field (a CUDA device and the backend that resolves to it)."""
    from drift.field.dispatch import resolve
    return tr.device.type == "cuda" and resolve(tr.cfg.field_backend, "cuda") == "triton"


def compile_field(tr, target, jobs: int = 0) -> dict:
    """Compile every Triton kernel variant a step of Trainer `tr` launches on `target` into Triton's disk cache,
    in rounds of up to `jobs` worker processes (0: one per CPU core) until a listing launches nothing new.
    Returns {"variants", "rounds", "over_shared_memory", "errors", "seconds", "jobs", "kernels"}:
    "over_shared_memory" counts candidates the launches skip on this GPU (they fall back to the next, compiled
    in a later round), "errors" lists kernels that do not compile, "kernels" holds every compiled aot.Variant
    (with its compile time in the worker)."""
    from drift.field.triton_driver import aot
    t0 = time.perf_counter()
    jobs = jobs or (os.cpu_count() or 1)
    known, rounds = {}, 0
    while rounds < MAX_ROUNDS:
        todo = [v for v in field_variants(tr, target, known=known) if v.key not in known]
        if not todo:
            break
        known.update((v.key, v) for v in aot.compile_variants(todo, target, jobs=jobs))
        rounds += 1
    over = [v for v in known.values() if v.error and v.error.startswith("out of resource")]
    errors = [f"{v.kernel} ({v.options}): {v.error}" for v in known.values() if v.error and v not in over]
    return {"variants": len(known), "rounds": rounds, "over_shared_memory": len(over), "errors": errors,
            "seconds": time.perf_counter() - t0, "jobs": jobs, "kernels": list(known.values())}


def precompile_field(tr, jobs: int = 0) -> Optional[dict]:
    """`compile_field` for the GPU of Trainer `tr`, before its first step: on local rank 0 only (the ranks of a
    node share Triton's cache; the others wait at a barrier), with one line printed on rank 0. Returns its
    summary, or None where nothing is to be done (no CUDA, another field backend, a Triton without the
    internals drift.kernels.aot uses, another local rank). A failure here is reported and left to the first
    step, which compiles what it needs itself."""
    if not uses_triton(tr):
        return None
    from drift.field.triton_driver import aot
    if aot is None or not aot.available():
        return None
    out: Optional[dict] = None
    if tr.info.local_rank == 0:
        t0 = time.perf_counter()
        try:
            out = compile_field(tr, aot.target_for(tr.device), jobs)
        except Exception as e:  # noqa: BLE001  (a shortcut only: the step compiles what it needs itself)
            print0(f"Triton field: precompile skipped ({type(e).__name__}: {str(e)[:200]}); the first step "
                   f"compiles its kernels ({time.perf_counter() - t0:.1f} s spent)")
        else:
            over, errors = out["over_shared_memory"], out["errors"]
            print0(f"Triton field: {out['variants']} kernel variants compiled or found in the cache in "
                   f"{out['seconds']:.1f} s ({out['rounds']} rounds of up to {out['jobs']} processes"
                   + (f"; {over} candidates over the GPU's shared memory, skipped by their launches" if over else "")
                   + ")" + (f"; {len(errors)} do not compile: {errors[0]}" if errors else ""))
    barrier()
    return out


# ----------------------------------------------------------------------------------------------------
# python -m drift.precompile: a preset's field kernels for a GPU, on any machine
# ----------------------------------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    """List, compile and check the Triton field kernels of a preset's per-GPU step for a target GPU (no GPU
    needed): one row per kernel variant (shared memory, registers, spills, compile time, status) and a summary.
    --jobs N compiles in N worker processes (what the trainer does before step 0), filling Triton's cache."""
    from drift.config import PRESETS
    from drift.field.triton_driver import aot
    p = argparse.ArgumentParser(prog="python -m drift.precompile", description=main.__doc__.split("\n")[0])
    p.add_argument("--preset", default="ablation-B/2", choices=sorted(PRESETS), help="training preset")
    p.add_argument("--labels-per-gpu", type=int, default=8, help="labels of one GPU's step")
    p.add_argument("--arch", default="sm90", help="target GPU: sm90 (H100/H200) or sm80 (A100)")
    p.add_argument("--mae-width", type=int, default=None, help="MAE-ResNet width (default: the preset's)")
    p.add_argument("--jobs", type=int, default=0, help="compile in N worker processes (0: one by one, in order)")
    args = p.parse_args(argv)
    if aot is None or not aot.available():
        p.error("needs triton with its JIT (TRITON_INTERPRET unset)")
    if args.arch not in aot.TARGETS:
        p.error(f"--arch must be one of {sorted(aot.TARGETS)}")
    opts = {"width": args.mae_width} if args.mae_width else None
    tr = fake_cuda_trainer(args.preset, args.labels_per_gpu, feature_options=opts)
    t0 = time.perf_counter()
    if args.jobs:
        out = compile_field(tr, args.arch, jobs=args.jobs)
        log = out["kernels"]  # (compile times as measured in the workers)
    else:
        log = field_variants(tr, args.arch, compile=True)
    wall = time.perf_counter() - t0
    print(f"{'kernel':<28} {'shared KB':>9} {'regs':>4} {'spill':>5} {'compile s':>9}  status / constexprs")
    for v in log:
        status = "OVER SHARED MEMORY (its launch falls back)" if (v.error or "").startswith("out of resource") \
            else (f"ERROR {v.error}" if v.error else "ok")
        print(f"{v.kernel:<28} {(v.shared or 0) / 1024:>9.1f} {v.regs or 0:>4} {v.spills or 0:>5} "
              f"{v.seconds:>9.2f}  {status}: {v.options}")
    bad = [v for v in log if v.error and not v.error.startswith("out of resource")]
    how = f"{out['rounds']} rounds of {args.jobs} processes" if args.jobs else "one by one"
    print(f"{args.preset}, {args.labels_per_gpu} labels per GPU, {args.arch}: {len(log)} variants, "
          f"{sum(1 for v in log if v.error and v not in bad)} over shared memory, {len(bad)} failing; "
          f"{wall:.1f} s ({how})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
