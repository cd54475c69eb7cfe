"""Multi-key mode of benchmarks/bench_field.py (--multi-keys): the field for all feature keys of an ablation step,
one call per key (the trainer's loop before drifting_loss_multi) against one multi-key call.

    python benchmarks/bench_field.py --multi-keys                       # CUDA: 1 and 8 labels per GPU, 86 keys
    python benchmarks/bench_field.py --multi-keys --device cpu --quick  # CPU smoke run (tiny widths)

The keys are those of the latent MAE-ResNet encoder (paper ablation: width 256, 32x32x4 latents; the key list
and each key's locations L and dims D come from drift.features at a small width, D scaled to the full one):
86 keys, S from 4 to 4096. Inputs are laid out as the extractor makes them and the trainer passes them: a
key [n*G, L, D] is a view of an NCHW map (feature stride L, as drift.features.base.per_location gives), in
--dtype for the per-location keys of the maps and fp32 for the statistics keys (means, stds: computed in
fp32 under autocast), viewed as [n, L, G, D]; the CFG weight expanded over (L, U). Per labels-per-GPU n and
provider, the time of the step's field part: forward (field and loss of every key, summed as the trainer sums
them) and backward to the keys, median over --reps after a warm-up, and the wall time of the first call
(compiles; tuning when DRIFT_TRITON_AUTOTUNE=1). Providers, for the backend that runs on the device (triton on
CUDA, cpp on CPU):
  per-key      one drifting_loss per key (3-4 launches, 2 reductions and ~5 loss kernels per key)
  multi        drifting_loss_multi (keys grouped into one launch per pass and group; same bits)
  multi-fused  drifting_loss_multi(fused=True) (the loss from the field's own value and force)
Results: a table and benchmarks/results/multikey-<device>-<utc>.json.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Dict, List, Tuple

import torch

from drift.features.mae_resnet import MAEConfig, MAEFeatures, MAEResNetEncoder
from drift.field import drifting_loss, drifting_loss_multi

PROBE_WIDTH = 8  # the encoder is built at this width to list the keys; D scales with the width


def ablation_keys(width: int = 256) -> List[Tuple[str, int, int]]:
    """(name, L, D) of every feature key of the latent MAE-ResNet at `width` (86 keys at the official layout)."""
    enc = MAEResNetEncoder(MAEConfig(width=PROBE_WIDTH, in_channels=4, patch_size=1))
    with torch.no_grad():
        feats = MAEFeatures(enc)(torch.zeros(1, 4, 32, 32))
    out = []
    for name, f in feats.items():
        L, D = f.shape[1:]
        out.append((name, L, D if name in ("global", "norm_x") else D * width // PROBE_WIDTH))
    return out


def _key_dtype(name: str, dtype):
    """The map keys' per-location vectors come out of the encoder in the autocast dtype, the statistics keys
    in fp32 (drift.features.base), `global` and `norm_x` in fp32."""
    stat = name in ("global", "norm_x") or "_mean" in name or "_std" in name
    return torch.float32 if stat else dtype


def make_items(keys, n: int, gup: Tuple[int, int, int], dtype, device, seed: int = 0):
    """Per key (gen [n*G, L, D], pos, neg, w) laid out as the extractor makes them (module docstring); gen
    requires grad (a leaf per key)."""
    G, U, P = gup
    g = torch.Generator(device=device).manual_seed(seed)
    w = (torch.rand(n, generator=g, device=device) * 3).to(torch.float32)
    items = []
    for name, L, D in keys:
        def feats(rows, shift=0.0):  # [n*rows, D, L] memory (an NCHW map), viewed as [n*rows, L, D]
            x = torch.randn(n * rows, D, L, generator=g, device=device) + shift
            return x.to(_key_dtype(name, dtype)).transpose(1, 2)

        gen = feats(G).requires_grad_(True)
        pos, neg = feats(P, 0.3), feats(U) if U else None
        items.append((gen, pos, neg, w.view(n, 1, 1).expand(n, L, U) if U else None))
    return items


def _views(items, n, gup):
    G, U, P = gup
    out = []
    for gen, pos, neg, w in items:
        L, D = gen.shape[1:]
        out.append((gen.view(n, G, L, D).transpose(1, 2), pos.view(n, P, L, D).transpose(1, 2),
                    None if neg is None else neg.view(n, U, L, D).transpose(1, 2), w))
    return out


def providers(backend: str):
    def per_key(views):
        return [drifting_loss(*v, backend=backend, check_finite=False)[0] for v in views]

    def multi(views, fused=False):
        return [lk for lk, _ in drifting_loss_multi(views, backend=backend, check_finite=False, fused=fused)]

    return {"per-key": per_key, "multi": multi, "multi-fused": lambda v: multi(v, fused=True)}


def _step(fn, items, n, gup):
    """The field part of a step: every key's loss, their row means summed, backward to the keys."""
    losses = fn(_views(items, n, gup))
    total = sum(lk.mean() for lk in losses)
    total.backward()
    for it in items:
        it[0].grad = None


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(fn, items, n, gup, device, warmup: int, reps: int) -> Dict[str, float]:
    t0 = time.perf_counter()
    _step(fn, items, n, gup)
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        _step(fn, items, n, gup)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        _step(fn, items, n, gup)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "first_call_s": first}


def _meta() -> dict:
    import platform
    import subprocess
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    from drift import kernels
    return {"git_sha": sha, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "triton": kernels.TRITON_VERSION}}


def run(device: str, dtype, gup, *, quick: bool, reps=None, out_dir=None) -> int:
    """Run the mode (bench_field.py --multi-keys); prints the table and writes the JSON. Returns 0."""
    from drift.field import dispatch
    backend = "triton" if device == "cuda" else ("cpp" if dispatch.has_cpp() else "reference")
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    width, labels = (PROBE_WIDTH, (1,)) if quick else (256, (1, 8))
    if quick:
        gup = (8, 4, 8)
    keys = ablation_keys(width)
    reps = reps or (2 if quick else 10)
    print(f"multi-key field  device={device_name}  backend={backend}  keys={len(keys)}  width={width}  "
          f"G,U,P={gup}  dtype={dtype}", flush=True)
    rows = []
    for n in labels:
        items = make_items(keys, n, gup, dtype, device)
        if backend == "triton":
            from drift.kernels import field_multi
            groups = field_multi.group_sizes(_views([tuple(t.detach() if t is not None else None for t in it)
                                                     for it in items], n, gup))
        else:
            groups = [1] * len(keys)
        base = None
        for name, fn in providers(backend).items():
            r = time_step(fn, items, n, gup, device, warmup=1 if quick else 3, reps=reps)
            base = base or r["median_ms"]
            rows.append({"labels": n, "provider": name, "backend": backend, "keys": len(keys),
                         "launch_units": len(groups) if name != "per-key" else len(keys), **r,
                         "speedup": base / r["median_ms"]})
            print(f"  labels={n} {name:12s} {r['median_ms']:9.3f} ms  x{base / r['median_ms']:.2f}  "
                  f"(first call {r['first_call_s']:.1f} s)", flush=True)
        del items
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"{'labels':>6} {'provider':12s} {'median ms':>10} {'min ms':>9} {'x per-key':>9} {'units':>6} {'1st s':>6}")
    for r in rows:
        print(f"{r['labels']:>6} {r['provider']:12s} {r['median_ms']:>10.3f} {r['min_ms']:>9.3f} "
              f"{r['speedup']:>9.2f} {r['launch_units']:>6} {r['first_call_s']:>6.1f}")
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = os.path.join(out_dir, f"multikey-{device_name.replace(' ', '_')}-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"meta": _meta(), "device": device_name, "backend": backend, "width": width, "G": gup[0],
                   "U": gup[1], "P": gup[2], "dtype": str(dtype), "keys": [list(k) for k in keys], "rows": rows,
                   "autotune": os.environ.get("DRIFT_TRITON_AUTOTUNE", "0")}, f, indent=1)
    print(f"wrote {path}")
    return 0
