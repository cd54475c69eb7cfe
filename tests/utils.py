"""Test helpers: the fp64 tolerance rule (a result passes when its error against an fp64 reference is at most
2x that of plain torch in the same dtype, plus a small floor) and input factories for the drifting field."""
from __future__ import annotations

import torch


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, base_err: float, floor: float, name: str = "out",
                        k: int = 5) -> None:
    """Pass iff max|out - ref64| <= 2 * base_err + floor (flash-attention's rule, upcast to fp64).

    `base_err` is the error of plain torch in the same dtype against the same fp64 reference, so the bound
    scales with how hard the inputs make the problem. On failure, report the count and the first k offenders.
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    diff = (out.double() - ref64.double()).abs()
    bound = 2.0 * base_err + floor
    bad = diff > bound
    if bool(bad.any()) or not bool(torch.isfinite(out).all()):
        idx = bad.nonzero()[:k].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{diff.numel()} elements exceed {bound:.3e} (2*{base_err:.3e} + {floor:.1e}); "
            f"max err {diff.max().item():.3e}; first at {idx}: "
            f"{[(out[tuple(i)].item(), ref64[tuple(i)].item()) for i in idx]}")


def make_field_inputs(B, G, P, U, S, *, scale=1.0, dtype=torch.float32, weights="random", generator=None,
                      batch_shape=None):
    """Random (gen, pos, neg, neg_weight) in `dtype`; positives shifted from gen so the field is not trivial.

    `batch_shape` replaces (B,) by several leading dims. `weights`: "random" (U(0, 3)), "ones", "zero" or None.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    shape = tuple(batch_shape) if batch_shape is not None else (B,)
    gen = (torch.randn(*shape, G, S, generator=g) * scale).to(dtype)
    pos = ((torch.randn(*shape, P, S, generator=g) + 0.5) * scale).to(dtype)
    neg = (torch.randn(*shape, U, S, generator=g) * 1.5 * scale).to(dtype) if U > 0 else None
    if U == 0 or weights is None:
        w = None
    elif weights == "random":
        w = (torch.rand(*shape, U, generator=g) * 3).to(dtype)
    elif weights == "ones":
        w = torch.ones(*shape, U, dtype=dtype)
    elif weights == "zero":
        w = torch.zeros(*shape, U, dtype=dtype)
    else:
        raise ValueError(weights)
    return gen, pos, neg, w
