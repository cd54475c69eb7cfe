"""The 2-D toy of the paper (Figs. 3-4): a small MLP generator driven only by `drifting_loss`.

A one-step generator f(z) (an MLP, 32-D Gaussian noise -> 3 x 256 SiLU -> the plane) is trained with Adam on
`drifting_loss` alone. Each step draws fresh generated samples and fresh samples of the target distribution; the
generated samples are their own negatives, exactly as in the image models. The step's samples are split into
`--rows` independent drifting problems of `--per-row` samples each, as the image models split theirs by class:
the official field is built for problems of ~100 samples (its 1e-3 affinity floor is small against 1/sqrt(G M)
there), and one problem of thousands of samples drowns the kernel in floor mass that pulls every sample toward
the mean of all positives. Two targets (the paper's bimodal mixture and a 4x4 checkerboard with 8 filled cells)
and the paper's three initializations (between the modes, far away, collapsed onto one mode).

Outputs (in --out): `toy_evolution.png` (one row per target x init: samples at several steps, then the target),
`toy_loss.png` (the raw field energy over training, log scale), `toy_metrics.json`.

The plotted "loss" is the field energy of the paper's Fig. 4: the drifting loss before the per-temperature RMS
normalization, sum_R mean(V_R^2), taken back to data units (`info["force_rms"]` times `scale_inputs`). The
normalized loss that is optimized stays near len(R_list) by construction, so it says nothing about convergence.
The start and end values in toy_metrics.json average this energy over 8 fresh batches. Its lower limit is not 0:
each problem sees a finite sample of p and q, so even q = p leaves a field of sampling noise. toy_metrics.json
reports that floor (`loss_noise_floor`: the energy with target samples in place of generated ones) and
`end_over_floor`; a run whose energy reaches ~1x the floor has a field the batch can no longer tell from q = p.

Temperatures: the official R_list (0.02, 0.05, 0.2) is tuned for high-dimensional features, whose pairwise
distances concentrate near their mean. In 2-D they spread widely: at R = 0.02 a generator sitting between the
two modes sees both at the affinity floor, feels no net pull and stays put. The toy therefore defaults to
(0.05, 0.2, 0.5); `--temperatures 0.02,0.05,0.2` shows the official set (it works from the far init).

Runs go to `--jobs` worker processes of one thread each (two 1-thread runs beat one 2-thread run on 2 cores).

    drift-toy --out outputs/toy                # ~2 min on 2 CPU cores
    drift-toy --out /tmp/toy --steps 300       # the short CI setting
"""
from __future__ import annotations

import argparse
import json
import math
import os
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Optional

import torch
import torch.nn as nn
from PIL import Image, ImageDraw

from drift.cli import run_main
from drift.loss import drifting_loss

INITS = ("between", "far", "collapsed")
TARGETS = ("bimodal", "checkerboard")
BIMODAL_CENTERS = ((-2.0, 0.0), (2.0, 0.0))
BIMODAL_STD = 0.35


# ---------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------

def sample_target(name: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """n samples [n, 2] of a target distribution."""
    if name == "bimodal":
        centers = torch.tensor(BIMODAL_CENTERS)
        idx = torch.randint(0, 2, (n,), generator=generator)
        return centers[idx] + BIMODAL_STD * torch.randn(n, 2, generator=generator)
    if name == "checkerboard":
        # 4x4 board on [-2, 2]^2; the 8 cells with (i + j) even carry the mass uniformly
        cells = torch.tensor([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0], dtype=torch.float32)
        idx = torch.randint(0, len(cells), (n,), generator=generator)
        return cells[idx] - 2.0 + torch.rand(n, 2, generator=generator)
    raise ValueError(f"unknown target {name!r}; choose from {TARGETS}")


def mode_coverage(name: str, x: torch.Tensor) -> dict:
    """How the samples spread over the target's modes: fraction per mode, and mass outside the support."""
    if name == "bimodal":
        c = torch.tensor(BIMODAL_CENTERS)
        d = torch.cdist(x, c)  # [n, 2]
        near = d.min(1).values < 3 * BIMODAL_STD
        frac = [float(((d.argmin(1) == k) & near).float().mean()) for k in range(2)]
        return {"mode_fractions": frac, "off_support": float((~near).float().mean())}
    ij = torch.floor(x + 2.0).long()
    inside = ((ij >= 0) & (ij < 4)).all(1)
    black = inside & ((ij.sum(1) % 2) == 0)
    cell = ij[:, 0] * 4 + ij[:, 1]
    frac = [float((black & (cell == i * 4 + j)).float().mean()) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
    return {"mode_fractions": frac, "off_support": float((~black).float().mean())}


# ---------------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------------

class ToyGenerator(nn.Module):
    """x = center + spread * MLP(z): the init picks where the pushforward starts (center) and how wide (spread)."""

    def __init__(self, noise_dim: int = 32, hidden: int = 256, center=(0.0, 0.0), spread: float = 0.3, depth: int = 3):
        super().__init__()
        self.noise_dim = noise_dim
        layers, width = [], noise_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(hidden, 2))
        self.center = nn.Parameter(torch.tensor(center, dtype=torch.float32))
        self.spread = spread

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.center + self.spread * self.net(z)


def make_generator(init: str, target: str, seed: int, hidden: int = 256, depth: int = 3,
                   noise_dim: int = 32) -> ToyGenerator:
    """The paper's three starting points, relative to the target's modes."""
    torch.manual_seed(seed)
    kw = dict(hidden=hidden, depth=depth, noise_dim=noise_dim)
    if init == "between":  # between the modes (the origin is empty space for both targets)
        return ToyGenerator(center=(0.0, 0.5) if target == "checkerboard" else (0.0, 0.0), spread=1.0, **kw)
    if init == "far":  # far away from every mode
        return ToyGenerator(center=(7.0, 7.0), spread=1.0, **kw)
    if init == "collapsed":  # all mass on one mode
        return ToyGenerator(center=BIMODAL_CENTERS[0] if target == "bimodal" else (-1.5, -1.5), spread=0.2, **kw)
    raise ValueError(f"unknown init {init!r}; choose from {INITS}")


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------

TOY_TEMPERATURES = (0.05, 0.2, 0.5)


def field_energy(info: dict) -> float:
    """sum_R mean(V_R^2) in data units: the un-normalized drifting loss of the paper's Fig. 4."""
    return float((info["force_rms"] ** 2).sum() * info["scale_inputs"] ** 2)


@torch.no_grad()
def _batch_energy(draw_gen, target: str, rows: int, per_row: int, temperatures, backend: str, n_batches: int,
                  seed: int) -> float:
    """Field energy averaged over n_batches fresh batches; draw_gen(n, generator) gives the generated side."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(n_batches):
        x = draw_gen(rows * per_row, g).view(rows, per_row, 2)
        y = sample_target(target, rows * per_row, g).view(rows, per_row, 2)
        _, info = drifting_loss(x, y, temperatures=temperatures, backend=backend, check_finite=False)
        total += field_energy(info)
    return total / n_batches


def mean_energy(gen_model: nn.Module, target: str, rows: int, per_row: int, temperatures, backend: str = "auto",
                n_batches: int = 8, seed: int = 99) -> float:
    """The generator's field energy, averaged over n_batches fresh batches."""
    return _batch_energy(lambda n, g: gen_model(torch.randn(n, gen_model.noise_dim, generator=g)), target, rows,
                         per_row, temperatures, backend, n_batches, seed)


def noise_floor_energy(target: str, rows: int, per_row: int, temperatures, backend: str = "auto",
                       n_batches: int = 8, seed: int = 98) -> float:
    """The field energy when the generated samples ARE target samples (q = p), measured like `mean_energy`.

    V_{p,p} = 0 in expectation, but every problem sees only `per_row` samples of each side, so the field of
    one batch is sampling noise of this size: the lowest energy a generator can reach at this batch shape.
    """
    return _batch_energy(lambda n, g: sample_target(target, n, g), target, rows, per_row, temperatures, backend,
                         n_batches, seed)


# The checkerboard's eight cells touch at their corners and need a sharp map from noise to the plane; the
# generator keeps carving them out long after the bimodal target has converged.
DEFAULT_STEPS = {"bimodal": 800, "checkerboard": 3000}


def steps_for(target: str, steps: Optional[int] = None) -> int:
    """`steps`, or the target's default when None."""
    return DEFAULT_STEPS.get(target, 800) if steps is None else steps


def train_toy(target: str, init: str, *, steps: Optional[int] = None, rows: int = 4, per_row: int = 128,
              lr: float = 2e-3, seed: int = 0,
              temperatures=TOY_TEMPERATURES, snapshots=(0.0, 0.05, 0.2, 1.0), backend: str = "auto",
              hidden: int = 256, depth: int = 3, noise_dim: int = 32, beta2: float = 0.999,
              lr_decay_frac: float = 0.3) -> dict:
    """Train one generator; returns snapshots of samples, the field-energy curve and coverage metrics.

    steps: Adam steps (None: DEFAULT_STEPS of the target). lr_decay_frac: the last fraction of the steps decays
    the learning rate linearly to 0 (0 = constant). beta2: Adam's second-moment decay.
    """
    steps = steps_for(target, steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= lr_decay_frac <= 1.0:
        raise ValueError(f"lr_decay_frac must be in [0, 1], got {lr_decay_frac}")
    gen_model = make_generator(init, target, seed, hidden=hidden, depth=depth, noise_dim=noise_dim)
    opt = torch.optim.Adam(gen_model.parameters(), lr=lr, betas=(0.9, beta2))
    decay_steps = int(round(lr_decay_frac * steps))

    def lr_at(step: int) -> float:
        left = steps - step
        return lr if decay_steps <= 0 or left >= decay_steps else lr * left / decay_steps

    g = torch.Generator().manual_seed(seed + 1)
    z_fixed = torch.randn(2000, gen_model.noise_dim, generator=g)  # the same noise for every snapshot
    snap_steps = sorted({min(steps, int(round(f * steps))) for f in snapshots})
    snaps, raw_loss = {}, []
    start = mean_energy(gen_model, target, rows, per_row, temperatures, backend)
    for step in range(steps + 1):
        if step in snap_steps:
            with torch.no_grad():
                snaps[step] = gen_model(z_fixed)
        if step == steps:
            break
        x = gen_model(torch.randn(rows * per_row, gen_model.noise_dim, generator=g)).view(rows, per_row, 2)
        y = sample_target(target, rows * per_row, g).view(rows, per_row, 2)
        loss, info = drifting_loss(x, y, temperatures=temperatures, backend=backend, check_finite=False)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.step()
        raw_loss.append(field_energy(info))
    final = snaps[steps]
    end = mean_energy(gen_model, target, rows, per_row, temperatures, backend)
    floor = noise_floor_energy(target, rows, per_row, temperatures, backend)
    return {"target": target, "init": init, "steps": steps, "snapshots": snaps, "raw_loss": raw_loss,
            "loss_start": start, "loss_end": end, "loss_ratio": start / max(end, 1e-30),
            "loss_noise_floor": floor, "end_over_floor": end / max(floor, 1e-30),
            "coverage": mode_coverage(target, final)}


def _run_one(kwargs: dict) -> dict:
    """Process-pool worker: one (target, init) run on one thread (two 1-thread runs beat one 2-thread run)."""
    torch.set_num_threads(1)
    return train_toy(**kwargs)


# ---------------------------------------------------------------------------------------------------
# Plots (PIL only: no plotting library needed)
# ---------------------------------------------------------------------------------------------------

PANEL = 220
VIEW = (-4.0, 4.0)  # data window shown in each panel; points outside are drawn on the border in red


def _to_px(x: torch.Tensor) -> torch.Tensor:
    lo, hi = VIEW
    return ((x - lo) / (hi - lo) * (PANEL - 1)).round()


def _scatter(draw: ImageDraw.ImageDraw, ox: int, oy: int, x: torch.Tensor, color) -> None:
    lo, hi = VIEW
    outside = ((x < lo) | (x > hi)).any(1)
    p = _to_px(x.clamp(lo, hi))
    for (px, py), out in zip(p.tolist(), outside.tolist()):
        c = (220, 30, 30) if out else color
        draw.rectangle([ox + px - 1, oy + (PANEL - 1 - py) - 1, ox + px + 1, oy + (PANEL - 1 - py) + 1], fill=c)


def plot_evolution(results: list, path: str, target_samples: dict) -> None:
    cols = len(results[0]["snapshots"]) + 1
    img = Image.new("RGB", (cols * (PANEL + 10) + 10, len(results) * (PANEL + 30) + 10), "white")
    draw = ImageDraw.Draw(img)
    for r, res in enumerate(results):
        oy = 10 + r * (PANEL + 30)
        panels = [(f"step {s}", x, (30, 90, 200)) for s, x in sorted(res["snapshots"].items())]
        panels.append((f"target: {res['target']}", target_samples[res["target"]], (40, 150, 60)))
        for c, (title, x, color) in enumerate(panels):
            ox = 10 + c * (PANEL + 10)
            draw.rectangle([ox, oy + 18, ox + PANEL, oy + 18 + PANEL], outline=(180, 180, 180))
            label = f"{res['init']} | {title}" if c == 0 else title
            draw.text((ox + 2, oy + 2), label, fill="black")
            _scatter(draw, ox, oy + 18, x, color)
    img.save(path)


def plot_losses(results: list, path: str) -> None:
    """Field energy per run against the step, both axes log scale; dashed: each target's q = p noise floor."""
    W, H, pad = 760, 380, 50
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    curves = [[math.log10(max(v, 1e-12)) for v in res["raw_loss"]] for res in results]
    floors = [math.log10(max(res["loss_noise_floor"], 1e-12)) for res in results if "loss_noise_floor" in res]
    lo = min(min(min(c) for c in curves), min(floors, default=0.0))
    hi = max(max(c) for c in curves)
    n = max(len(c) for c in curves)
    xmax = math.log10(n + 1)
    x_px = lambda step: pad + math.log10(step + 1) / max(xmax, 1e-9) * (W - 10 - pad)
    y_px = lambda v: H - pad - (v - lo) / max(hi - lo, 1e-9) * (H - pad - 10)
    draw.rectangle([pad, 10, W - 10, H - pad], outline="black")
    for e in range(math.floor(lo), math.ceil(hi) + 1):
        y = y_px(e)
        if 10 <= y <= H - pad:
            draw.line([pad, y, W - 10, y], fill=(225, 225, 225))
            draw.text((5, y - 6), f"1e{e}", fill="black")
    for d in range(0, math.ceil(xmax) + 1):
        if 10 ** d <= n:
            x = x_px(10 ** d - 1)
            draw.line([x, 10, x, H - pad], fill=(235, 235, 235))
            draw.text((x - 8, H - pad + 3), f"{10 ** d}", fill="black")
    palette = [(30, 90, 200), (220, 120, 20), (40, 150, 60), (180, 40, 160), (120, 120, 120), (200, 40, 40)]
    seen_floor = set()
    for k, (res, c) in enumerate(zip(results, curves)):
        color = palette[k % len(palette)]
        # average the log energy over bins of equal width in log(step): single steps early, wide windows late
        edges = sorted({int(round(10 ** (xmax * j / 150))) - 1 for j in range(151)} | {0, len(c)})
        pts = []
        for a, b in zip(edges[:-1], edges[1:]):
            b = min(b, len(c))
            if a >= b:
                continue
            v = sum(c[a:b]) / (b - a)
            pts.append((x_px((a + b - 1) / 2), y_px(v)))
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        draw.text((pad + 10, 15 + 12 * k), f"{res['target']} / {res['init']}", fill=color)
        if "loss_noise_floor" in res and res["target"] not in seen_floor:
            seen_floor.add(res["target"])
            y = y_px(math.log10(max(res["loss_noise_floor"], 1e-12)))
            for x0 in range(pad, W - 10, 12):
                draw.line([x0, y, min(x0 + 6, W - 10), y], fill=(90, 90, 90), width=1)
            draw.text((W - 210, y - 12), f"q = p noise floor ({res['target']})", fill=(90, 90, 90))
    draw.text((W // 2 - 170, H - pad + 18), "step (log scale)    y: field energy sum_R mean V_R^2 (log scale)",
              fill="black")
    img.save(path)


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="drift-toy", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/toy", help="output directory")
    ap.add_argument("--steps", type=_positive_int, default=None,
                    help="Adam steps per (target, init) run (default: %s)" %
                    ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()))
    ap.add_argument("--rows", type=_positive_int, default=4, help="independent drifting problems per step")
    ap.add_argument("--per-row", type=_positive_int, default=128, help="generated and target samples per problem")
    ap.add_argument("--temperatures", default=",".join(map(str, TOY_TEMPERATURES)),
                    help="comma-separated R_list (see the module docstring for why the toy default is broader)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate of the generator")
    ap.add_argument("--lr-decay-frac", type=float, default=0.3,
                    help="fraction of the steps at the end over which the LR decays linearly to 0")
    ap.add_argument("--hidden", type=_positive_int, default=256, help="generator MLP width")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generator init, noise and target samples")
    ap.add_argument("--backend", default="auto", help="drifting-field backend: auto | reference | cpp | triton")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of " + ",".join(TARGETS))
    ap.add_argument("--inits", default=",".join(INITS), help="comma-separated subset of " + ",".join(INITS))
    ap.add_argument("--jobs", type=_positive_int, default=min(2, os.cpu_count() or 1),
                    help="runs in parallel, one thread each")
    args = ap.parse_args(argv)
    targets, inits = args.targets.split(","), args.inits.split(",")
    for t in targets:
        if t not in TARGETS:
            ap.error(f"unknown target {t!r}; choose from {','.join(TARGETS)}")
    for i in inits:
        if i not in INITS:
            ap.error(f"unknown init {i!r}; choose from {','.join(INITS)}")
    try:
        temperatures = tuple(float(r) for r in args.temperatures.split(","))
    except ValueError:
        ap.error(f"--temperatures must be comma-separated numbers, got {args.temperatures!r}")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    # longest runs first, so the pool's last runs are the short ones
    jobs = [dict(target=t, init=i, steps=args.steps, rows=args.rows, per_row=args.per_row, lr=args.lr,
                 lr_decay_frac=args.lr_decay_frac, hidden=args.hidden, seed=args.seed, backend=args.backend,
                 temperatures=temperatures) for t in targets for i in inits]
    order = sorted(range(len(jobs)), key=lambda k: -steps_for(jobs[k]["target"], args.steps))

    def report(res: dict) -> None:
        cov = res["coverage"]
        print(f"{res['target']:>12s} / {res['init']:<9s}  {res['steps']} steps  field energy {res['loss_start']:.3e} -> "
              f"{res['loss_end']:.3e} ({res['loss_ratio']:.0f}x lower; {res['end_over_floor']:.2f}x the q=p noise "
              f"floor)  mode fractions {[round(f, 2) for f in cov['mode_fractions']]}  off-support "
              f"{cov['off_support']:.3f}  [{time.time() - t0:.0f}s]", flush=True)

    results = [None] * len(jobs)
    if args.jobs > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(args.jobs, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
            futures = {k: pool.submit(_run_one, jobs[k]) for k in order}
            for k in order:
                results[k] = futures[k].result()
                report(results[k])
    else:
        for k in range(len(jobs)):
            results[k] = train_toy(**jobs[k])
            report(results[k])
    g = torch.Generator().manual_seed(12345)
    target_samples = {t: sample_target(t, 2000, g) for t in {r["target"] for r in results}}
    plot_evolution(results, os.path.join(args.out, "toy_evolution.png"), target_samples)
    plot_losses(results, os.path.join(args.out, "toy_loss.png"))
    metrics = [{k: v for k, v in r.items() if k not in ("snapshots", "raw_loss")} for r in results]
    with open(os.path.join(args.out, "toy_metrics.json"), "w") as f:
        json.dump({"steps": args.steps or DEFAULT_STEPS, "rows": args.rows, "per_row": args.per_row,
                   "temperatures": list(temperatures), "lr": args.lr, "lr_decay_frac": args.lr_decay_frac,
                   "hidden": args.hidden, "runs": metrics}, f, indent=2)
    print(f"wrote {args.out}/toy_evolution.png, toy_loss.png, toy_metrics.json in {time.time() - t0:.0f}s")
    return 0


def main(argv=None) -> int:
    """User errors are one `drift-toy: error: ...` line and exit code 2 (`--debug`: the traceback)."""
    return run_main(_main, argv, prog="drift-toy")


if __name__ == "__main__":
    raise SystemExit(main())
