"""The 2-D toy of the paper (Figs. 3-4): a small MLP generator driven only by `drifting_loss`.

A one-step generator f(z) maps 16-D Gaussian noise to the plane. Each step draws fresh generated samples and
fresh samples of the target distribution and takes one Adam step on `drifting_loss(gen, pos)`; the generated
samples are their own negatives, exactly as in the image models. The step's samples are split into `--rows`
independent drifting problems of `--per-row` samples each, as the image models split theirs by class: the
official field is built for problems of ~64 samples (its 1e-3 affinity floor is small against 1/sqrt(G M)
there), and one problem of thousands of samples drowns the kernel in floor mass that pulls every sample
toward the mean of all positives. Two targets (the paper's bimodal mixture and
a checkerboard) and the paper's three initializations (between the modes, far away, collapsed onto one mode).

Outputs (in --out): `toy_evolution.png` (one row per target x init: samples at several steps, then the target),
`toy_loss.png` (the raw field energy over training, log scale), `toy_metrics.json`.

The plotted "loss" is the field energy of the paper's Fig. 4: the drifting loss before the per-temperature RMS
normalization, sum_R mean(V_R^2), taken back to data units (`info["force_rms"]` times `scale_inputs`). The
normalized loss that is optimized stays near len(R_list) by construction, so it says nothing about convergence.
The start and end values in toy_metrics.json average this energy over 8 fresh batches.

Temperatures: the official R_list (0.02, 0.05, 0.2) is tuned for high-dimensional features, whose pairwise
distances concentrate near their mean. In 2-D they spread widely: at R = 0.02 a generator sitting between the
two modes sees both at the affinity floor, feels no net pull and stays put. The toy therefore defaults to
(0.05, 0.2, 0.5); `--temperatures 0.02,0.05,0.2` shows the official set (it works from the far init).

    drift-toy --out outputs/toy                # ~1 min on 2 CPU cores
    drift-toy --out /tmp/toy --steps 300       # the short CI setting
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn as nn
from PIL import Image, ImageDraw

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

    def __init__(self, noise_dim: int = 16, hidden: int = 128, center=(0.0, 0.0), spread: float = 0.3):
        super().__init__()
        self.noise_dim = noise_dim
        self.net = nn.Sequential(nn.Linear(noise_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))
        self.center = nn.Parameter(torch.tensor(center, dtype=torch.float32))
        self.spread = spread

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.center + self.spread * self.net(z)


def make_generator(init: str, target: str, seed: int) -> ToyGenerator:
    """The paper's three starting points, relative to the target's modes."""
    torch.manual_seed(seed)
    if init == "between":  # between the modes (the origin is empty space for both targets)
        return ToyGenerator(center=(0.0, 0.5) if target == "checkerboard" else (0.0, 0.0), spread=1.0)
    if init == "far":  # far away from every mode
        return ToyGenerator(center=(7.0, 7.0), spread=1.0)
    if init == "collapsed":  # all mass on one mode
        return ToyGenerator(center=BIMODAL_CENTERS[0] if target == "bimodal" else (-1.5, -1.5), spread=0.2)
    raise ValueError(f"unknown init {init!r}; choose from {INITS}")


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------

TOY_TEMPERATURES = (0.05, 0.2, 0.5)


def field_energy(info: dict) -> float:
    """sum_R mean(V_R^2) in data units: the un-normalized drifting loss of the paper's Fig. 4."""
    return float((info["force_rms"] ** 2).sum() * info["scale_inputs"] ** 2)


@torch.no_grad()
def mean_energy(gen_model: nn.Module, target: str, rows: int, per_row: int, temperatures, backend: str = "auto",
                n_batches: int = 8, seed: int = 99) -> float:
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(n_batches):
        x = gen_model(torch.randn(rows * per_row, gen_model.noise_dim, generator=g)).view(rows, per_row, 2)
        y = sample_target(target, rows * per_row, g).view(rows, per_row, 2)
        _, info = drifting_loss(x, y, temperatures=temperatures, backend=backend, check_finite=False)
        total += field_energy(info)
    return total / n_batches


def train_toy(target: str, init: str, *, steps: int = 800, rows: int = 8, per_row: int = 64, lr: float = 2e-3,
              seed: int = 0,
              temperatures=TOY_TEMPERATURES, snapshots=(0.0, 0.05, 0.2, 1.0), backend: str = "auto") -> dict:
    """Train one generator; returns snapshots of samples, the field-energy curve and coverage metrics."""
    gen_model = make_generator(init, target, seed)
    opt = torch.optim.Adam(gen_model.parameters(), lr=lr, betas=(0.9, 0.95))
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
        opt.step()
        raw_loss.append(field_energy(info))
    final = snaps[steps]
    end = mean_energy(gen_model, target, rows, per_row, temperatures, backend)
    return {"target": target, "init": init, "snapshots": snaps, "raw_loss": raw_loss,
            "loss_start": start, "loss_end": end, "loss_ratio": start / max(end, 1e-30),
            "coverage": mode_coverage(target, final)}


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
    W, H, pad = 700, 360, 50
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    curves = [[math.log10(max(v, 1e-12)) for v in res["raw_loss"]] for res in results]
    lo, hi = min(min(c) for c in curves), max(max(c) for c in curves)
    n = max(len(c) for c in curves)
    draw.rectangle([pad, 10, W - 10, H - pad], outline="black")
    for e in range(math.floor(lo), math.ceil(hi) + 1):
        y = H - pad - (e - lo) / max(hi - lo, 1e-9) * (H - pad - 10)
        if 10 <= y <= H - pad:
            draw.line([pad, y, W - 10, y], fill=(225, 225, 225))
            draw.text((5, y - 6), f"1e{e}", fill="black")
    palette = [(30, 90, 200), (220, 120, 20), (40, 150, 60), (180, 40, 160), (120, 120, 120), (200, 40, 40)]
    for k, (res, c) in enumerate(zip(results, curves)):
        win = max(1, len(c) // 100)
        pts = []
        for i in range(0, len(c), win):
            v = sum(c[i:i + win]) / len(c[i:i + win])
            pts.append((pad + i / max(n - 1, 1) * (W - 10 - pad), H - pad - (v - lo) / max(hi - lo, 1e-9) * (H - pad - 10)))
        draw.line(pts, fill=palette[k % len(palette)], width=2)
        draw.text((pad + 10, 15 + 12 * k), f"{res['target']} / {res['init']}", fill=palette[k % len(palette)])
    draw.text((W // 2 - 140, H - pad + 15), "step    (y: field energy sum_R mean V_R^2, log scale)", fill="black")
    img.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/toy", help="output directory")
    ap.add_argument("--steps", type=int, default=800, help="Adam steps per (target, init) run")
    ap.add_argument("--rows", type=int, default=8, help="independent drifting problems per step")
    ap.add_argument("--per-row", type=int, default=64, help="generated and target samples per problem")
    ap.add_argument("--temperatures", default=",".join(map(str, TOY_TEMPERATURES)),
                    help="comma-separated R_list (see the module docstring for why the toy default is broader)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto", help="drifting-field backend: auto | reference | cpp | triton")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of " + ",".join(TARGETS))
    ap.add_argument("--inits", default=",".join(INITS), help="comma-separated subset of " + ",".join(INITS))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results, t0 = [], time.time()
    for target in args.targets.split(","):
        for init in args.inits.split(","):
            res = train_toy(target, init, steps=args.steps, rows=args.rows, per_row=args.per_row, lr=args.lr,
                            seed=args.seed, backend=args.backend,
                            temperatures=tuple(float(r) for r in args.temperatures.split(",")))
            results.append(res)
            cov = res["coverage"]
            print(f"{target:>12s} / {init:<9s}  field energy {res['loss_start']:.3e} -> {res['loss_end']:.3e} "
                  f"({res['loss_ratio']:.0f}x lower)  mode fractions {[round(f, 2) for f in cov['mode_fractions']]}  "
                  f"off-support {cov['off_support']:.3f}  [{time.time() - t0:.0f}s]", flush=True)
    g = torch.Generator().manual_seed(12345)
    target_samples = {t: sample_target(t, 2000, g) for t in {r["target"] for r in results}}
    plot_evolution(results, os.path.join(args.out, "toy_evolution.png"), target_samples)
    plot_losses(results, os.path.join(args.out, "toy_loss.png"))
    metrics = [{k: v for k, v in r.items() if k not in ("snapshots", "raw_loss")} for r in results]
    with open(os.path.join(args.out, "toy_metrics.json"), "w") as f:
        json.dump({"steps": args.steps, "rows": args.rows, "per_row": args.per_row, "temperatures": args.temperatures,
                   "runs": metrics}, f, indent=2)
    print(f"wrote {args.out}/toy_evolution.png, toy_loss.png, toy_metrics.json in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
