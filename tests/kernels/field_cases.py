"""Shared cases and checks for the fused drifting-field backends (cpp, triton) against the fp64 golden.

A backend passes a case when every output (force, loss, scale, scale_inputs, force_rms) is within
2 x (the fp32 reference backend's own error against the fp64 golden) + a small floor (flash-attention's
rule, tests/utils.py: assert_close_to_ref).
Both the backend and the fp32 reference see identical input values (same dtype, same tensors).
"""
from __future__ import annotations

import numpy as np
import torch

from drift.field import R_LIST_DEFAULT, drifting_field, drifting_field_reference
from tests.golden.drift_loss_ref import drift_loss_ref
from tests.utils import assert_close_to_ref, make_field_inputs, max_abs_err

FIELDS = ("force", "loss", "scale", "scale_inputs", "force_rms")


def _flat(t, tail):
    if t is None:
        return None
    return t.detach().double().reshape(-1, *t.shape[t.dim() - tail:]).numpy()


def golden(gen, pos, neg=None, w=None, temperatures=R_LIST_DEFAULT, normalization="xy"):
    """fp64 golden outputs as torch tensors, reshaped to the inputs' batch dims."""
    gold = drift_loss_ref(_flat(gen, 2), _flat(pos, 2), _flat(neg, 2), _flat(w, 1), R_list=tuple(temperatures),
                          normalization=normalization)
    batch = gen.shape[:-2]
    out = {k: torch.as_tensor(np.asarray(v), dtype=torch.float64) for k, v in gold.items()}
    out["force"] = out["force"].reshape(*batch, *gen.shape[-2:])
    out["loss"] = out["loss"].reshape(batch)
    return out


# Floor of the 2x rule, relative to each output's magnitude: 32 fp32 ulps. It only matters where the fp32
# reference happens to be nearly exact; the composite math (exp of logits up to 1/R = 50 times the distance
# error) costs any fp32 implementation O(10) ulps, and semantic errors show at 1e-3 or more.
FLOOR = 32 * float(torch.finfo(torch.float32).eps)


def check_backend(backend, gen, pos, neg=None, w=None, temperatures=R_LIST_DEFAULT, normalization="xy",
                  floor=FLOOR, res=None):
    """Run `backend` (unless `res` is given) and assert the 2x-reference-error rule on every output."""
    if res is None:
        res = drifting_field(gen, pos, neg, w, temperatures=temperatures, normalization=normalization,
                             backend=backend)
    base = drifting_field_reference(gen, pos, neg, w, temperatures=temperatures, normalization=normalization)
    gold = golden(gen, pos, neg, w, temperatures, normalization)
    for k in FIELDS:
        out, ref32, g = getattr(res, k), getattr(base, k), gold[k]
        assert out.dtype == ref32.dtype, f"{k}: dtype {out.dtype} != reference {ref32.dtype}"
        scale = max(1.0, float(g.abs().max())) if g.numel() else 1.0
        assert_close_to_ref(out, g, max_abs_err(ref32, g), floor * scale, name=f"{backend}.{k}")
    return res


# (B, G, P, U, S, feature scale, weights): nice, weird (primes), U = 0, G = 1, P = 1, S = 1, huge and tiny
# scales (the 1e-3 scale floors active), zero CFG weights.
SHAPES = [
    (4, 8, 8, 4, 32, 1.0, "random"),
    (3, 7, 5, 3, 13, 1.0, "random"),
    (2, 6, 5, 0, 9, 1.0, None),
    (3, 1, 4, 2, 5, 1.0, "ones"),
    (2, 5, 1, 3, 7, 1.0, "random"),
    (3, 4, 3, 2, 1, 1.0, "random"),
    (2, 9, 6, 3, 17, 1e4, "random"),
    (2, 9, 6, 3, 17, 1e-5, "random"),
    (2, 6, 4, 3, 8, 1.0, "zero"),
]


def case_inputs(B, G, P, U, S, scale, weights, dtype=torch.float32, seed=0, batch_shape=None):
    return make_field_inputs(B, G, P, U, S, scale=scale, dtype=dtype, weights=weights, batch_shape=batch_shape,
                             generator=torch.Generator().manual_seed(seed))


# Duplicated points put fp32 distances at sqrt(rounding noise of |x|^2 + |y|^2 - 2 x.y) instead of the 1e-4
# floor, and every implementation's noise differs (summation order, centring), so the 2x rule gets a larger
# floor there: 1e-4 of the force scale, still 100x below any semantic error.
TIE_FLOOR = 1e-4


def tie_inputs(B=2, G=5, P=4, U=3, S=6, seed=0):
    """Duplicates everywhere: pos and neg rows copied from gen, and one gen row repeated."""
    g = torch.Generator().manual_seed(seed)
    gen = torch.randn(B, G, S, generator=g)
    gen[:, 1] = gen[:, 0]
    pos = torch.cat([gen[:, :2], torch.randn(B, P - 2, S, generator=g)], 1)
    neg = gen[:, :U].clone()
    w = torch.rand(B, U, generator=g) * 2
    return gen, pos, neg, w


def strided_inputs(N=2, G=4, P=3, U=2, C=6, H=2, W=3, seed=0):
    """Per-location vectors of [N, n, C, H, W] maps as strided views [N, H*W, n, C] (inner stride H*W)."""
    g = torch.Generator().manual_seed(seed)

    def view(n):
        fmap = torch.randn(N, n, C, H, W, generator=g)
        return fmap.flatten(3).permute(0, 3, 1, 2)  # [N, HW, n, C], no copy

    gen, pos, neg = view(G), view(P) + 0.3, view(U)
    w = (torch.rand(N, U, H * W, generator=g) * 2).transpose(1, 2)  # [N, HW, U], non-contiguous
    assert not gen.is_contiguous() and gen.stride(-1) == H * W
    return gen, pos, neg, w
