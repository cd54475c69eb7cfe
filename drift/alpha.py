"""CFG strength samplers for training (paper App. A.7, official `train.py`).

One alpha per class label per step, shared by that label's N_neg generated samples:

    "power"    p(alpha) ~ alpha^-k on [cfg_min, cfg_max], inverse CDF: with e = 1 - k and u ~ U(0, 1),
               alpha = (cfg_min^e + u (cfg_max^e - cfg_min^e))^(1/e)   (k = 1: log-uniform)
    "mixed"    the same as "power" (the name the L/2 preset uses for its 50% at alpha = 1)
    "uniform"  alpha ~ U(cfg_min, cfg_max)

then, whatever the sampler, alpha = 1 with probability no_cfg_frac (official: `cfg = where(u2 < no_cfg_frac,
1, cfg)` after the power law, its only sampler; L/2: no_cfg_frac 0.5, k = 3).

The label's unconditional reals enter its drifting field with the CFG weight `cfg_weight` (official
`train.py`): w = (alpha - 1)(N_neg - 1)/N_unc, so alpha = 1 turns the CFG term off.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

ALPHA_DISTS = ("power", "mixed", "uniform")


def power_law_icdf(u: torch.Tensor, cfg_min: float, cfg_max: float, k: float) -> torch.Tensor:
    """Inverse CDF of p(alpha) ~ alpha^-k on [cfg_min, cfg_max], evaluated at u in [0, 1] (fp64 math)."""
    if not (0 < cfg_min <= cfg_max):
        raise ValueError(f"need 0 < cfg_min <= cfg_max, got {cfg_min}, {cfg_max}")
    u = u.double()
    if cfg_min == cfg_max:
        return torch.full_like(u, cfg_min)
    e = 1.0 - k
    if abs(e) < 1e-12:  # k = 1: log-uniform
        return torch.exp(math.log(cfg_min) + u * (math.log(cfg_max) - math.log(cfg_min)))
    lo, hi = cfg_min ** e, cfg_max ** e
    return (lo + u * (hi - lo)) ** (1.0 / e)


def sample_alpha(n: int, *, dist: str = "power", cfg_min: float = 1.0, cfg_max: float = 4.0,
                 neg_cfg_pw: float = 3.0, no_cfg_frac: float = 0.0,
                 generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """n training alphas (float32 [n]); draws exactly 2n uniforms whatever `dist` (a fixed RNG budget)."""
    if dist not in ALPHA_DISTS:
        raise ValueError(f"dist must be one of {ALPHA_DISTS}, got {dist!r}")
    if not (0.0 <= no_cfg_frac <= 1.0):
        raise ValueError(f"no_cfg_frac must be in [0, 1], got {no_cfg_frac}")
    if not (1.0 <= cfg_min <= cfg_max):
        raise ValueError(f"need 1 <= cfg_min <= cfg_max, got cfg_min={cfg_min}, cfg_max={cfg_max}")
    device = generator.device if (device is None and generator is not None) else device
    u = torch.rand(2, n, generator=generator, device=device, dtype=torch.float64)
    if dist == "uniform":
        a = cfg_min + u[0] * (cfg_max - cfg_min)
    else:
        a = power_law_icdf(u[0], cfg_min, cfg_max, neg_cfg_pw)
    a = torch.where(u[1] < no_cfg_frac, torch.ones_like(a), a)
    return a.float()


def cfg_weight(alpha, gen_per_label: int, neg_per_sample: int):
    """Official weight of a label's N_unc unconditional negatives: w = (alpha - 1)(N_neg - 1)/N_unc.

    `alpha` is a float or a tensor of per-label alphas (the result has its type); 0 when N_unc = 0.
    """
    if neg_per_sample == 0:
        return alpha * 0.0
    return (alpha - 1.0) * (gen_per_label - 1) / neg_per_sample
