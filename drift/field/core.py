"""The leaf of drift.field: official constants, the result type, input validation, compute dtype, all-reduce.

The drifting field V of "Generative Modeling via Drifting" (arXiv 2602.04770; the official `drift_loss`).
For each of B independent problems (B = classes x feature locations) the field moves the G generated
samples toward the P positives and away from the generated samples themselves and U weighted
unconditional negatives (the CFG term). Step by step, with the official names in brackets:

    targets = [gen, neg, pos]  (M = G + U + P),  tw = [1, neg_weight, 1]          (old_gen, fixed_neg, fixed_pos)
    dist    = sqrt(max(|g|^2 + |t|^2 - 2 g.t, 1e-8))
    scale   = mean_{b,i,m}(dist * tw) / mean_{b,m}(tw)          one scalar over all rows (and all ranks)
    scale_inputs = max(scale / sqrt(S), 1e-3)
    dn      = dist / max(scale, 1e-3);  dn[b, i, i] += 100 for i < G                  (self-mask)
    for R in temperatures (R_list):
        A  = sqrt(max(softmax_m(-dn/R) * softmax_i(-dn/R), 1e-6)) * tw              (two-axis softmax)
        c- = -A[:, :, :G+U] * rowsum(A+);  c+ = A[:, :, G+U:] * rowsum(A-)
        force_R = c @ (targets / scale_inputs) - rowsum(c) * (gen / scale_inputs)
        force_R /= sqrt(max(mean_{b,i,s}(force_R^2), 1e-8))                         (one RMS over all rows)
    force = sum_R force_R;   loss[b] = mean_{i,s}(force^2)

Everything about the field is under stop-gradient: it is a target, never differentiated (drift.field.loss
builds the differentiable loss on top). This module imports nothing from drift, so every other module of
the package can import it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist_

# The official temperatures (R_list). The one place drift takes them from; kernels/, which may not import
# drift, keeps a copy that a test compares with this one.
R_LIST_DEFAULT = (0.02, 0.05, 0.2)
NORMALIZATIONS = ("xy", "y", "none")
BACKENDS = ("auto", "reference", "cpp", "triton")

# The official constants (drift_loss.py): distance floor, scale floors, self-mask, affinity floor, RMS floor.
DIST_EPS = 1e-8
SCALE_EPS = 1e-3
SELF_MASK = 100.0
AFFINITY_EPS = 1e-6
RMS_EPS = 1e-8


@dataclass
class DriftField:
    """Result of `drifting_field`. All tensors are detached, in the compute dtype (fp32, or fp64 for fp64 input)."""

    force: torch.Tensor  # [*batch, G, S]: sum over R of the RMS-normalized force, in scaled coordinates
    scale: torch.Tensor  # 0-d: global weighted mean distance (step 3)
    scale_inputs: torch.Tensor  # 0-d: max(scale / sqrt(S), 1e-3), the divisor of the inputs
    loss: torch.Tensor  # [*batch]: mean over (G, S) of force^2, the value of the drifting loss per row
    force_rms: torch.Tensor  # [len(R)]: RMS of each force_R before its normalization (a convergence signal)


def _check_tensor(name: str, t, min_dim: int = 3) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have shape [*batch, n, S] (at least {min_dim} dims), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_finite(name: str, t: torch.Tensor) -> None:
    # One host sync per tensor; the trainer turns this off (check_finite=False) and watches the loss instead.
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def validate_inputs(gen, pos, neg=None, neg_weight=None, *, temperatures=R_LIST_DEFAULT,
                    normalization="xy", backend="auto", check_finite=True):
    """Check shapes, dtypes, options and (optionally) values; return (neg, neg_weight, temperatures) normalized.

    Raises ValueError naming the offending argument. U = 0 negatives become (None, None); temperatures
    become a tuple of floats.
    """
    _check_tensor("gen", gen)
    _check_tensor("pos", pos)
    batch, (G, S) = gen.shape[:-2], gen.shape[-2:]
    if G < 1:
        raise ValueError(f"gen must hold at least one generated sample per row (G >= 1), got G={G}")
    if S < 1:
        raise ValueError(f"gen must have a feature dimension S >= 1, got S={S}")
    if pos.dim() != gen.dim() or pos.shape[:-2] != batch:
        raise ValueError(f"pos batch dims {tuple(pos.shape[:-2])} do not match gen batch dims {tuple(batch)}")
    if pos.shape[-1] != S:
        raise ValueError(f"pos feature dim S={pos.shape[-1]} does not match gen S={S}")
    if pos.shape[-2] < 1:
        raise ValueError("pos must hold at least one positive per row (P >= 1)")
    if neg is not None:
        _check_tensor("neg", neg)
        if neg.dim() != gen.dim() or neg.shape[:-2] != batch:
            raise ValueError(f"neg batch dims {tuple(neg.shape[:-2])} do not match gen batch dims {tuple(batch)}")
        if neg.shape[-1] != S:
            raise ValueError(f"neg feature dim S={neg.shape[-1]} does not match gen S={S}")
        U = neg.shape[-2]
        if neg_weight is not None:
            if not isinstance(neg_weight, torch.Tensor):
                raise ValueError(f"neg_weight must be a torch.Tensor, got {type(neg_weight).__name__}")
            if tuple(neg_weight.shape) != (*batch, U):
                raise ValueError(f"neg_weight must have shape {(*batch, U)} (batch dims of gen, U), "
                                 f"got {tuple(neg_weight.shape)}")
            if not neg_weight.is_floating_point():
                raise ValueError(f"neg_weight must be floating point, got {neg_weight.dtype}")
        if U == 0:
            neg, neg_weight = None, None
    elif neg_weight is not None:
        raise ValueError("neg_weight was given without neg")
    temps = tuple(float(r) for r in temperatures)
    if len(temps) == 0 or any(not (r > 0 and math.isfinite(r)) for r in temps):
        raise ValueError(f"temperatures must be a non-empty sequence of positive finite numbers, got {temperatures}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if check_finite and not torch.compiler.is_compiling():
        _check_finite("gen", gen)
        _check_finite("pos", pos)
        if neg is not None:
            _check_finite("neg", neg)
        if neg_weight is not None:
            _check_finite("neg_weight", neg_weight)
            if neg_weight.numel() and bool((neg_weight < 0).any()):
                raise ValueError("neg_weight must be non-negative")
    return neg, neg_weight, temps


def compute_dtype(*tensors) -> torch.dtype:
    """fp64 if any input is fp64, else fp32 (bf16/fp16 inputs are upcast; the official code is fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def all_reduce_sum(t: torch.Tensor, process_group) -> torch.Tensor:
    """Sum `t` in place over `process_group` and return it (no-op without a group).

    Every backend calls it on the same two global sums (the scale sums of step 3 and the per-temperature
    sums of squares of step 7), so ranks holding parts of the rows all get the single-process values."""
    if process_group is None:
        return t
    dist_.all_reduce(t, op=dist_.ReduceOp.SUM, group=process_group)
    return t
