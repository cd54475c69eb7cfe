"""Launch configurations, routes and the autotuner of the fused drifting field (host side, no kernel launches).

What is decided here, once per tuning key (row shape, dtype, optional inputs, contiguity, occupancy regime):
the route (recompute, stored or split; see ../docs/field_kernels.md, relative to this folder) and per kernel
the S chunk BS, num_warps, num_stages and (pass 2) the in-kernel Gram route. `candidates` lists what the
tuner may try, calibrated default first. Two modes (DRIFT_TRITON_AUTOTUNE):

* "0" (the default): no timing. The route is split, else stored where offered, and each kernel runs the first
  candidate that launches. The candidate lists are ordered so that this is the configuration the tuner chose
  on an H200 at most shapes of the benchmark grid (see _CANDIDATES), and the route rule is what the tuner
  chose at every shape there: a first call costs only the compiles of the configurations it runs.
* "1": `tuned_launch` compiles and times every candidate the first time a key is seen and keeps the fastest;
  `choose_route` times whole routes through a measuring function that field_launch.py provides.

In both modes a configuration or route that an earlier process tuned on the same GPU model, Triton version
and kernel code is taken from the store set with `set_store` (drift/field/tune_cache.py: a JSON file on disk),
and in mode "1" every new tuning result is written there, so that tuning happens once per machine, not once
per process. The interpreter never tunes.

Caches: the tuned configurations, their times, the route decisions and the tuning log are not bounded: an
entry is only made when a new tuning key is launched, which costs a Triton compile (seconds) per key anyway,
so their number is that of the shape specializations a process compiles (a handful in training), at a few
hundred bytes each. The SM counts are one per device. Plain Python; imports torch (CUDA events) only.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from . import INTERPRETED, aot

# Tuning needs CUDA events; the interpreter runs one fixed configuration. Off by default: the calibrated first
# candidates need no timing, so a first training step compiles a few kernels instead of every candidate.
AUTOTUNE = os.environ.get("DRIFT_TRITON_AUTOTUNE", "0") == "1" and not INTERPRETED
# DRIFT_TRITON_GRAM=0 keeps pass 2 of the recompute route on streaming. The Gram route's ||c T||^2 = sum c K c^T
# cancels where the force is small next to the targets' spread (gen close to the data): its rounding error
# grows with that ratio, while the streaming route forms the force itself, like the reference (the stored
# route guards against it per row, field_launch.GRAM_RTOL).
GRAM_ROUTE = os.environ.get("DRIFT_TRITON_GRAM", "1") != "0"
# DRIFT_TRITON_STORED=0 turns the stored route (and its split variant) off: the passes then recompute the
# distances from the inputs.
STORED_ROUTE = os.environ.get("DRIFT_TRITON_STORED", "1") != "0"

# The official temperatures (drift/field/core.py holds the same numbers; this package may not import drift,
# and tests/kernels/test_field_tuning.py compares the two). With normalization "xy" (code 0), the defaults of
# the drifting field, they stand in for passes 2 and 3 when a route is decided; calls with these options
# reuse those tunings.
R_LIST_DEFAULT = (0.02, 0.05, 0.2)
PROXY_NORM = 0


class Config(NamedTuple):
    """One launch configuration: S chunk, warps, software-pipelining stages, pass 2's in-kernel Gram route
    (GRAM), the stored route (STORED) and its split variant (SPLIT: pass 1's per-block kernel, the reduction
    and pass 3 over column blocks). The route is the same for all passes of a call (see field_launch._pass1)."""

    BS: int
    num_warps: int
    num_stages: int
    GRAM: bool = False
    STORED: bool = False
    SPLIT: bool = False

    def label(self) -> str:
        return (f"BS{self.BS}/w{self.num_warps}/s{self.num_stages}" + ("/gram" if self.GRAM else "")
                + ("/stored" if self.STORED else "") + ("/split" if self.SPLIT else ""))


# (BS, num_warps, num_stages) tried by the tuner, first = the untuned default. Chosen from ptxas reports of
# these kernels for sm_90 at (G, U, P) = (64, 16, 64), fp32 (triton 3.8; the GPU's 3.6 may differ, which is
# what the tuner is for): with 8 warps the streaming kernels use ~220-255 registers and spill nothing at
# BS 16/32 (a little with 3 stages), BS 64 spills 0.2-2 KB, 4 warps spill 1-3 KB (dropped), 16 warps cap at
# 128 registers and spill 0.1-0.4 KB. Shared memory: 16-33 KB (pass 1) and ~90 KB (passes 2-3) at one
# stage, +9/+18 KB per extra stage at BS 16/32. The Gram kernel holds the six Gram blocks in shared memory
# (~190 KB at any BS: one program per SM) and spills ~0.25 KB at BS 16, more at larger BS.
# Every candidate is one compile (~2-5 s): the lists are kept short. Each list starts with the configuration
# the tuner chose most often on an H200 (triton 3.6; benchmarks/results/field-NVIDIA_H200-20261126T051723Z.json,
# G, U, P = 64, 16, 64, B = 8..8192, S = 64..4096), the untuned default: recompute scale and force BS64/w8/s2 at
# every shape (streaming sumsq too, at S = 64), Gram sumsq BS32/w8/s2 (within 1% of BS16/w8/s3 where that won);
# stored scale BS32/w8/s2 (BS64/w8/s2 won at S = 4096 by ~2%), sumsq BS32/w8/s1, force BS64/w8/s3 (BS64/w8/s1
# at B = 8 by ~2%); split pass 1 BS32/w8/s2 or s1, reduction BS16/w8/s1, force BS64/w8/s1. The first candidate
# was at most 3% slower than the winner at B >= 512 and at most 11% (3 us) at B = 8.
_CANDIDATES = ((64, 8, 2), (32, 8, 1), (16, 8, 2), (32, 8, 2), (16, 8, 3), (32, 8, 3), (32, 16, 2))
_GRAM_CANDIDATES = ((32, 8, 2), (16, 8, 1), (16, 8, 3))
# The stored route's kernels, from the same ptxas reports (8 warps, 1 stage unless noted): pass 1 forms six
# Gram blocks per chunk and spills 16-48 B at BS 16 (1-3 stages), ~150 B at BS 32 and ~0.5 KB at BS 64 (4
# warps: ~1 KB, dropped); shared memory 33-84 KB, 168 KB at BS 64. Pass 2 keeps K's blocks (split into TF32
# heads and tails) in shared memory across the temperatures, ~190 KB at any BS (one program per SM, like the
# in-kernel Gram route), and spills ~0.35 KB (16 warps: 128 registers, ~0.6 KB; 4 warps ~1.8 KB, dropped);
# BS only sizes its rarely taken streaming guard. Pass 3 streams once: no spills at BS 32 (221 registers),
# 70-180 B at BS 64, 0.9 KB at BS 128 (dropped). The split route's per-block pass 1 and pass 3 are the same
# code over a column range; its reduction only adds up K (BS unused).
_STORED_CANDIDATES = {
    "scale": ((32, 8, 2), (16, 8, 2), (16, 8, 1), (16, 8, 3), (32, 8, 1), (64, 8, 2)),
    "sumsq": ((32, 8, 1), (16, 8, 1), (32, 16, 1)),
    "force": ((64, 8, 3), (64, 8, 2), (32, 8, 3), (32, 8, 2), (64, 8, 1)),
    "reduce": ((16, 8, 1), (16, 16, 1)),
}
# The split route's pass 1 per block (its programs each sweep W >= 256 columns of a row).
_SPLIT_PART_CANDIDATES = ((32, 8, 2), (32, 8, 1), (16, 8, 2), (16, 8, 1))

# Routes: recompute (every shape), stored (K fits in a row's output), split (stored, with passes 1 and 3 over
# J column blocks per row: offered where the rows are fewer than the SMs and J >= 2 blocks hold K).
ROUTE_RECOMPUTE, ROUTE_STORED, ROUTE_SPLIT = 0, 1, 2
ROUTE_NAMES = ("recompute", "stored", "split")
SPLIT_ALIGN = 128  # block widths are multiples of this (of every BS, and aligned loads at the block starts)


def _next_pow2(n: int) -> int:
    # Host-side; triton.next_power_of_2 is a jit-aware wrapper that costs microseconds per call.
    return 1 << max(0, int(n) - 1).bit_length()


def block_sizes(G: int, U: int, P: int) -> Tuple[int, int, int]:
    """Per-block padded sizes (powers of two, >= 16 for tl.dot)."""
    return tuple(max(16, _next_pow2(max(n, 1))) for n in (G, U, P))


def _cap_bs(bs: int, S: int) -> int:
    return max(16, min(bs, _next_pow2(S)))


def _dedupe(cfgs: List[Config]) -> List[Config]:
    out: List[Config] = []
    for c in cfgs:
        if c not in out:
            out.append(c)
    return out


def gram_ratio(G: int, U: int, P: int, S: int, nR: int) -> float:
    """MACs of pass 2 by the Gram route over the streaming route (both including the distance sweep)."""
    M = G + U + P
    stream = (1 + nR) * G * M * S
    gram = (G * M + U * U + U * P + P * P) * S + nR * G * M * M
    return gram / stream


def gram_floats(G: int, U: int, P: int) -> int:
    """Elements of a row's stored Gram matrix (the six blocks on and above the diagonal, unpadded)."""
    return G * (G + U + P) + U * U + U * P + P * P


def stored_fits(G: int, U: int, P: int, S: int) -> bool:
    """Whether a row's K fits in its [G, S] force output, where the stored route keeps it: the route then
    needs no memory beyond the output. Where it does not fit (S < gram_floats / G, ~228 at the default row
    shape (G, U, P) = (64, 16, 64)), a separate [B, gram_floats] scratch would exceed the memory target (<= 0.1x
    the reference's peak: at S = 64 it alone is ~0.14x), so the route is not offered there."""
    return STORED_ROUTE and gram_floats(G, U, P) <= G * S


def split_blocks(G: int, U: int, P: int, S: int, B: int, n_sm: int, J: Optional[int] = None) -> Tuple[int, int]:
    """(J, W) of the split stored route: J column blocks per row, the first J - 1 of width W (a multiple of
    SPLIT_ALIGN, at least K's floats / G) and the last of width S - (J-1) W (between W and 2W), so that every
    block holds a copy of K. J aims at one program per SM for B rows (B < n_sm), or is the requested J; (1, S)
    where no split into >= 2 blocks exists (or the stored route does not fit)."""
    if not stored_fits(G, U, P, S):
        return 1, S
    if J is None:
        if n_sm <= 0 or B >= n_sm:
            return 1, S
        J = -(-n_sm // max(B, 1))
    a = SPLIT_ALIGN
    w_min = -(-(-(-gram_floats(G, U, P) // G)) // a) * a
    W = max(w_min, (S // max(J, 1)) // a * a)
    J = S // W
    return (J, W) if J >= 2 else (1, S)


def route_macs(G: int, U: int, P: int, S: int, nR: int = 3) -> Dict[str, float]:
    """Multiply-adds per row of the two routes (each is 3 TF32 products on tensor cores):
    recompute: pass 1 G*M*S, pass 2 min(streaming, in-kernel Gram), pass 3 2*G*M*S (distances, then force);
    stored: pass 1 (G*M + U^2 + U*P + P^2)*S (all of K), pass 2 ~nR*G*(that without S), pass 3 G*M*S (the split
    variant does the same work in more programs)."""
    M = G + U + P
    kn = gram_floats(G, U, P)
    p2 = min((1 + nR) * G * M * S, kn * S + nR * G * M * M) if GRAM_ROUTE else (1 + nR) * G * M * S
    return {"recompute": G * M * S + p2 + 2 * G * M * S, "stored": kn * S + nR * G * kn + G * M * S}


def candidates(kernel: str, G: int, U: int, P: int, S: int, nR: int = 3, stored: bool = False,
               split: bool = False) -> List[Config]:
    """Configurations the tuner tries for one kernel ("scale", "sumsq", "force"; "reduce" of the split route)
    at this row shape, on the recompute route (default), the stored route or its split variant (pass 2 of
    the split route is the stored one)."""
    if stored or kernel == "reduce":
        sp = (split and kernel != "sumsq") or kernel == "reduce"
        table = _SPLIT_PART_CANDIDATES if (sp and kernel == "scale") else _STORED_CANDIDATES[kernel]
        return _dedupe([Config(_cap_bs(bs, S), nw, ns, False, True, sp) for bs, nw, ns in table])
    stream = [Config(_cap_bs(bs, S), nw, ns) for bs, nw, ns in _CANDIDATES]
    if kernel != "sumsq" or not GRAM_ROUTE:
        return _dedupe(stream)
    gram = [Config(_cap_bs(bs, S), nw, ns, True) for bs, nw, ns in _GRAM_CANDIDATES]
    ratio = gram_ratio(G, U, P, S, nR)
    if ratio < 0.5:  # Gram clearly cheaper: its configurations, plus the streaming default as a fallback
        return _dedupe(gram + stream[:1])  # (the Gram kernel's ~190 KB of shared memory is near the limit)
    if ratio > 2.0:
        return _dedupe(stream)
    return _dedupe(gram + stream) if ratio < 1.0 else _dedupe(stream + gram)


_BEST: Dict[tuple, Config] = {}  # (kernel, *key) -> the chosen configuration
STORE = None  # persistent store of tuning results (set_store), or None
BEST_MS: Dict[tuple, float] = {}  # (kernel, *key) -> its time (NaN untuned), summed by the route decision
ROUTES: Dict[tuple, int] = {}  # tuning key -> ROUTE_*
FORCED: Dict[str, object] = {}  # kernel -> Config (and "split" -> J) inside forced_configs
_TUNING_LOG: List[dict] = []
_NUM_SMS: Dict[int, int] = {}  # CUDA device index -> multiprocessor count
# Row shapes whose pass-2 Gram blocks K do not fit in the GPU's shared memory: the stored and the Gram
# configurations of pass 2 hold the same K blocks whatever their BS, warps or stages (e.g. ~392 KB at the pixel
# presets' (G, U, P) = (64, 32, 128) on sm_90, where 227 KB fit), so after one of them runs out of shared
# memory the others are not compiled only to fail too. Keyed by (G, U, P, dtype, has_neg, device).
_K_OVER: set = set()


@contextlib.contextmanager
def forced_configs(**per_kernel):
    """Run the given kernels ("scale", "sumsq", "force", "reduce") with fixed configurations inside the block
    (tests use it to cover every candidate, e.g. the Gram route of pass 2 at shapes where it would not be
    picked). A forced "scale" config fixes the route (recompute; STORED: stored; STORED and SPLIT: split, with
    `split=J` column blocks, default: as for the rows at hand); forced sumsq/force configs must agree with it."""
    unknown = set(per_kernel) - {"scale", "sumsq", "force", "reduce", "split"}
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}")
    saved = dict(FORCED)
    FORCED.update(per_kernel)
    try:
        yield
    finally:
        FORCED.clear()
        FORCED.update(saved)


def set_store(store) -> None:
    """Use `store` for tuning results across processes (None: none). It has get(device, entry) -> dict or None
    and put(device, entry, value): entry is ("cfg", kernel, *key) or ("route", *key) with the key's device
    entry left out (the store keys by GPU model), value {"config": [...], "ms": t} or {"route": name}."""
    global STORE
    STORE = store


def _portable(entry: tuple, device) -> tuple:
    """A tuning key without its device entry (str(device)): the store keys results by GPU model instead."""
    dev = str(device)
    return tuple(k for k in entry if k != dev)


def _store_get(device, entry: tuple) -> Optional[dict]:
    if STORE is None or device is None or FORCED:
        return None
    hit = STORE.get(device, _portable(entry, device))
    return hit if isinstance(hit, dict) else None


def _store_put(device, entry: tuple, value: dict) -> None:
    if STORE is not None and device is not None:
        STORE.put(device, _portable(entry, device), value)


def _stored_config(kernel: str, key: tuple, cands: List[Config], device) -> Optional[Tuple[Config, float]]:
    """(config, ms) of a stored tuning result for (kernel, key), if it is one of today's candidates."""
    hit = _store_get(device, ("cfg", kernel) + tuple(key))
    if hit is None:
        return None
    try:
        cfg = Config(*hit["config"])
        ms = float(hit.get("ms", math.nan))
    except (KeyError, TypeError, ValueError):  # another layout (an older drift): tune again
        return None
    return (cfg, ms) if cfg in cands else None


def tuning_log() -> List[dict]:
    """One entry per tuned (kernel, key): the key, the route, the winner and every candidate's time or error;
    and one per route decision (kernel "route": each route's summed best times)."""
    return [dict(e) for e in _TUNING_LOG]


def reset() -> None:
    """Forget tuned configurations, their times, routes and the log (field_launch.reset_tuning also drops the
    launch plans, which hold the configurations chosen for them)."""
    _BEST.clear()
    BEST_MS.clear()
    ROUTES.clear()
    _TUNING_LOG.clear()
    _K_OVER.clear()


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return aot.sms()  # the target GPU's inside an aot.record block, else 0
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def rows_bucket(B: int, device: torch.device) -> int:
    """0: fewer rows than SMs; 1: up to 8 waves; 2: more. The best config depends on the occupancy regime."""
    n = num_sms(device)
    if n == 0:
        return 0
    return 0 if B < n else (1 if B < 8 * n else 2)


def _time_ms(launch: Callable[[], None], best_ms: float) -> float:
    """Mean time of `launch` in ms over ~2 ms of runs (one run when it is already 3x slower than the best)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    launch()
    end.record()
    end.synchronize()
    t1 = start.elapsed_time(end)
    if t1 > 3.0 * best_ms:
        return t1
    reps = max(2, min(20, int(2.0 / max(t1, 1e-3))))
    start.record()
    for _ in range(reps):
        launch()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _error_text(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160] if msg else ''}"


def _route_name(c: Config) -> str:
    return ROUTE_NAMES[ROUTE_SPLIT if c.SPLIT else (ROUTE_STORED if c.STORED else ROUTE_RECOMPUTE)]


def _holds_k(kernel: str, c: Config) -> bool:
    """Whether a configuration keeps a row's Gram blocks K in shared memory (pass 2's Gram and stored routes)."""
    return kernel == "sumsq" and (c.GRAM or c.STORED)


def _k_shape(key: tuple) -> tuple:
    """(G, U, P, dtype, has_neg, device) of a tuning key (field_launch's _Plan.key layout)."""
    return key[0], key[1], key[2], key[4], key[5], key[9]


def _over_shared_memory(e: Exception) -> bool:
    return type(e).__name__ == "OutOfResources" and "shared memory" in str(e)


def tuned_launch(kernel: str, key: tuple, cands: List[Config], launch: Callable[[Config], None],
                  trial: Optional[Callable[[Config], None]] = None, route: Optional[int] = None,
                  device=None) -> Config:
    """Launch with the best known config for (kernel, key), choosing it the first time the key is seen.

    A result stored by an earlier process (set_store; `device` names the GPU) is used without timing.
    Otherwise, tuning on: every candidate is launched (compiling it), timed, the fastest kept (and stored).
    Tuning off: the first candidate that launches. Either way a candidate that raises (out of shared memory or
    registers, a compile failure) is dropped and its error logged, except under the interpreter, which has no
    resource limits. The kernels only store, so the timing runs leave the same outputs as the final launch; a
    kernel that overwrites its own input (the stored route's pass 3, the split route's reduction) is compiled
    and timed through `trial` (on a copy), and only the winner runs through `launch`. The winner's time is
    kept in BEST_MS (for the route decision); `route` names the route in the log (default: the config's)."""
    if kernel in FORCED:
        launch(FORCED[kernel])
        return FORCED[kernel]
    cache_key = (kernel,) + key
    cfg = _BEST.get(cache_key)
    if cfg is not None:
        launch(cfg)
        return cfg
    times: Dict[Config, float] = {}
    errors: Dict[str, str] = {}
    stored = _stored_config(kernel, key, cands, device)
    if stored is not None:
        try:
            launch(stored[0])
        except Exception as e:  # noqa: BLE001  (e.g. a driver that lost resources: tune as if not stored)
            if INTERPRETED:
                raise
            errors[stored[0].label()] = _error_text(e)
        else:
            _BEST[cache_key], BEST_MS[cache_key] = stored
            name = _route_name(stored[0]) if route is None else ROUTE_NAMES[route]
            _TUNING_LOG.append({"kernel": kernel, "key": list(key), "route": name, "best": stored[0].label(),
                                "best_ms": stored[1], "times_ms": {stored[0].label(): stored[1]}, "errors": {},
                                "source": "store"})
            return stored[0]
    best = math.inf
    tune = AUTOTUNE  # (also a single candidate: the route decision sums the kernels' times)
    run = trial if (tune and trial is not None) else launch
    for c in cands:
        if _holds_k(kernel, c) and _k_shape(key) in _K_OVER:
            errors[c.label()] = "skipped: K does not fit in shared memory at this row shape"
            continue
        try:
            run(c)  # compiles on first use; resource checks happen here, before the kernel runs
            if tune:
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001  (OutOfResources, PTXASError, CompilationError differ by version)
            if INTERPRETED:
                raise
            errors[c.label()] = _error_text(e)
            if _holds_k(kernel, c) and _over_shared_memory(e):
                _K_OVER.add(_k_shape(key))
            continue
        if not tune:
            times[c] = math.nan
            break
        times[c] = _time_ms(lambda: run(c), best)
        best = min(best, times[c])
    if not times:
        raise RuntimeError(f"no launch configuration of {kernel} ran for key {key}: {errors}")
    cfg = min(times, key=times.get) if tune else next(iter(times))
    _BEST[cache_key] = cfg
    BEST_MS[cache_key] = times[cfg]
    if tune:
        _store_put(device, ("cfg", kernel) + tuple(key), {"config": list(cfg), "ms": times[cfg]})
    if tune or errors:
        name = _route_name(cfg) if route is None else ROUTE_NAMES[route]
        _TUNING_LOG.append({"kernel": kernel, "key": list(key), "route": name, "best": cfg.label(),
                            "best_ms": times[cfg], "times_ms": {c.label(): t for c, t in times.items()},
                            "errors": errors})
    if tune:
        launch(cfg)  # the outputs come from the chosen configuration
    return cfg


def choose_route(p, measure: Callable[[int], float]) -> None:
    """Decide the route of plan p's tuning key (p has .key, .stored_ok, .split). Tuning on (and more than one
    route offered): `measure(route)` tunes and times each offered route whole (passes 2 and 3 at the proxy
    options, R_LIST_DEFAULT and PROXY_NORM) and returns the sum of its kernels' best times in ms; the fastest
    route is kept, and a route with a pass that has no configuration that compiles and fits (measure raises
    RuntimeError) loses. Tuning off: the stored route wherever it is offered (it needs fewer multiply-adds
    wherever it fits in the output, route_macs), split where that is offered. Either way a decision stored by
    an earlier process (set_store) for this key is taken without measuring, if that route is offered."""
    offered = routes_offered(p)
    device = getattr(p, "device", None)
    if len(offered) > 1:
        hit = _store_get(device, ("route",) + tuple(p.key))
        name = hit.get("route") if hit else None
        if name in ROUTE_NAMES and ROUTE_NAMES.index(name) in offered:
            ROUTES[p.key] = ROUTE_NAMES.index(name)
            _TUNING_LOG.append({"kernel": "route", "key": list(p.key), "route": name, "best": name,
                                "best_ms": math.nan, "times_ms": {}, "errors": {}, "source": "store"})
            return
    if not AUTOTUNE or len(offered) == 1 or FORCED:  # (a forced sumsq/force config would not be timed)
        ROUTES[p.key] = offered[-1]
        return
    times: Dict[str, float] = {}
    errors: Dict[str, str] = {}
    for route in offered:  # the stored routes last: their pass 1 leaves K in the output buffer
        try:
            times[ROUTE_NAMES[route]] = measure(route)
        except RuntimeError as e:  # no configuration of one of its passes ran (or out of memory for a copy)
            errors[ROUTE_NAMES[route]] = _error_text(e)
    if not times:
        raise RuntimeError(f"no route of the drifting field ran for key {p.key}: {errors}")
    best = min(times, key=times.get)
    ROUTES[p.key] = ROUTE_NAMES.index(best)
    _store_put(device, ("route",) + tuple(p.key), {"route": best})
    _TUNING_LOG.append({"kernel": "route", "key": list(p.key), "route": best, "best": best, "best_ms": times[best],
                        "times_ms": times, "errors": errors})


def routes_offered(p) -> List[int]:
    """The routes plan p may take: recompute always; stored where K fits in the output; split where, in
    addition, the rows are fewer than the SMs and the columns hold >= 2 copies of K (p.split = (J, W))."""
    out = [ROUTE_RECOMPUTE]
    if p.stored_ok:
        out.append(ROUTE_STORED)
        if p.split[0] >= 2:
            out.append(ROUTE_SPLIT)
    return out
