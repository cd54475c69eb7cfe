"""Parallel precompile of the Triton drifting-field kernels for benchmarks/bench_field.py (--precompile).

`compile_tasks` lists every (kernel, launch configuration) the autotuner may try at some row shapes, and
`warm_compile` compiles one of them by launching it once, so that the benchmark (run from several processes
at once: Triton compiles each kernel on one core) fills Triton's on-disk cache before the tuner needs the
kernels. Uses the launchers of drift.kernels.field_launch; imports triton.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from drift.field import R_LIST_DEFAULT
from drift.kernels import field_launch as launch
from drift.kernels.field_tuning import Config, candidates, gram_floats, split_blocks, stored_fits


def compile_tasks(G: int = 64, U: int = 16, P: int = 64, S_values=(64, 256, 640, 4096),
                  nR: int = 3) -> List[Tuple[str, Config]]:
    """(kernel, config) for every candidate the tuner may try at these row shapes (each one compile; the split
    route's pass 1 and reduction compile once for every S, see warm_compile, and its pass 3 is the stored
    route's compiled kernel: J and the block width are run-time arguments)."""
    tasks: List[Tuple[str, Config]] = []
    for kernel in ("scale", "sumsq", "force", "reduce"):
        for S in S_values:
            cands = candidates(kernel, G, U, P, S, nR) if kernel != "reduce" else []
            if stored_fits(G, U, P, S) and kernel != "reduce":
                cands = cands + candidates(kernel, G, U, P, S, nR, stored=True)
            if split_blocks(G, U, P, S, 1, 2 ** 30)[0] >= 2 and kernel in ("scale", "reduce"):
                cands = cands + candidates(kernel, G, U, P, S, nR, stored=True, split=True)
            for c in cands:
                if (kernel, c) not in tasks:
                    tasks.append((kernel, c))
    return tasks


def warm_compile(kernel: str, config: Config, dtype: torch.dtype, G: int = 64, U: int = 16, P: int = 64,
                 S: int = 64, device: str = "cuda") -> str:
    """Compile one (kernel, config) by launching it on one contiguous row with weighted negatives, so that a
    later launch with the same specialization (dtype, strides divisible by 16, G, U, P) loads it from
    Triton's on-disk cache instead of compiling. Stored-route configs run at the smallest S (a multiple of 16)
    where K fits, split ones at two blocks, on a buffer of random numbers (only the compile matters). Returns
    "ok" or the error (e.g. out of shared memory). Under the interpreter (device="cpu") it only runs the kernel."""
    if config.SPLIT:
        w_min = split_blocks(G, U, P, 1 << 30, 1, 0, J=1 << 30)[1]  # the narrowest block that holds K
        S = max(S, 2 * w_min)
    elif config.STORED:
        S = max(S, -(-gram_floats(G, U, P) // (16 * G)) * 16)
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    gen, pos, neg, w = rand(1, G, S), rand(1, P, S), rand(1, U, S), rand(1, U).abs()
    temps = R_LIST_DEFAULT
    try:
        p = launch._make_plan(gen, pos, neg, w)
        J, W = split_blocks(G, U, P, S, 1, 0, J=2) if config.SPLIT else (1, S)
        args = p.args(gen, pos, neg, w)
        buf = torch.randn(1, G, S, generator=g, device=device).to(p.acc_dt).abs()
        part = torch.empty((1, 4), dtype=torch.float64, device=device)
        sums = torch.ones(2, dtype=torch.float64, device=device)
        stats = torch.ones(len(temps) + 1, dtype=torch.float64, device=device)
        consts = launch._consts(temps, S, gen.device, p.acc_dt)
        if kernel == "scale":
            if config.SPLIT:
                launch._launch_part(p, args, buf, J, W, config)
            else:
                launch._launch_scale(p, args, buf, part, config)
        elif kernel == "reduce":
            launch._launch_reduce(p, args, buf, part, J, W, config)
        elif kernel == "sumsq":
            launch._launch_sumsq(p, args, buf, sums, consts, part, len(temps), 0, S, config)
        else:
            loss = torch.empty(J, dtype=p.acc_dt, device=device)
            scalars = torch.empty(2 + len(temps), dtype=p.acc_dt, device=device)
            launch._launch_force(p, args, buf, sums, stats, consts, loss, scalars, len(temps), 0, J, W, config)
        if gen.is_cuda:
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001  (a config that does not fit is an expected outcome here)
        msg = str(e).strip().splitlines()
        return f"{type(e).__name__}: {msg[0][:160] if msg else ''}"
    return "ok"
