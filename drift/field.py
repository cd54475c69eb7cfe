"""The drifting field V of "Generative Modeling via Drifting" (arXiv 2602.04770), official semantics.

For each of B independent problems (B = classes x feature locations) the field moves the G generated
samples toward the P positives and away from the generated samples themselves and U weighted
unconditional negatives (the CFG term). SPEC §3.1, step by step, with the official names in brackets:

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

Everything here is under stop-gradient: the field is a target, never differentiated (drift.loss builds
the differentiable loss on top). This module holds the readable reference backend, input validation
and the backend dispatch; fused backends (`cpp`, `triton`) are reached through `drift.backends`.

The batch may be given as any number of leading dims (`gen [*batch, G, S]`), so per-location vectors
of an `[N_c, G, C, H, W]` feature map can be passed as the strided view `[N_c, H*W, G, C]` without a copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist_

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


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------

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
    """Check shapes, dtypes, options and (optionally) values; return (neg, neg_weight) normalized.

    Raises ValueError naming the offending argument. U = 0 negatives become (None, None).
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


# ---------------------------------------------------------------------------------------------------
# Reference backend
# ---------------------------------------------------------------------------------------------------

def _all_reduce_sum(t: torch.Tensor, process_group) -> torch.Tensor:
    if process_group is None:
        return t
    dist_.all_reduce(t, op=dist_.ReduceOp.SUM, group=process_group)
    return t


@torch.no_grad()
def drifting_field_reference(gen, pos, neg=None, neg_weight=None, temperatures=R_LIST_DEFAULT,
                             normalization="xy", process_group=None) -> DriftField:
    """Plain-torch drifting field (the oracle for the fused backends). Inputs already validated.

    gen [*batch, G, S], pos [*batch, P, S], neg [*batch, U, S] or None, neg_weight [*batch, U] or None.
    Materializes [B, G, M] per temperature; readable rather than fast.
    """
    dt = compute_dtype(gen, pos, neg)
    batch = gen.shape[:-2]
    G, S = gen.shape[-2:]
    x = gen.detach().to(dt).reshape(-1, G, S)  # (B, G, S)
    B = x.shape[0]
    y_pos = pos.detach().to(dt).reshape(B, -1, S)  # (B, P, S)
    if neg is not None:
        y_neg = neg.detach().to(dt).reshape(B, -1, S)  # (B, U, S)
        w_neg = (neg_weight.detach().to(dt).reshape(B, -1) if neg_weight is not None
                 else torch.ones(B, y_neg.shape[1], dtype=dt, device=x.device))
    else:
        y_neg = x.new_zeros(B, 0, S)
        w_neg = x.new_zeros(B, 0)
    U = y_neg.shape[1]
    targets = torch.cat([x, y_neg, y_pos], dim=1)  # (B, M, S)
    tw = torch.cat([torch.ones(B, G, dtype=dt, device=x.device), w_neg,
                    torch.ones(B, y_pos.shape[1], dtype=dt, device=x.device)], dim=1)  # (B, M)

    # Step 2: expanded-form Euclidean distance with the official 1e-8 floor.
    x2 = (x * x).sum(-1, keepdim=True)  # (B, G, 1)
    t2 = (targets * targets).sum(-1).unsqueeze(1)  # (B, 1, M)
    dist = torch.sqrt(torch.clamp(x2 + t2 - 2 * x @ targets.transpose(1, 2), min=DIST_EPS))  # (B, G, M)

    # Step 3: one global scale: sum(dist*tw) / (G * sum_{b,m} tw), both sums all-reduced across ranks.
    sums = torch.stack([(dist * tw.unsqueeze(1)).sum(), tw.sum() * G])
    sums = _all_reduce_sum(sums, process_group)
    scale = sums[0] / sums[1]
    scale_inputs = torch.clamp(scale / math.sqrt(S), min=SCALE_EPS)

    # Step 4: normalized distance and self-mask on the gen-gen diagonal.
    dn = dist / torch.clamp(scale, min=SCALE_EPS)
    dn = dn + SELF_MASK * torch.eye(G, targets.shape[1], dtype=dt, device=x.device)

    xs = x / scale_inputs
    ts = targets / scale_inputs
    forces, sumsq = [], []
    for R in temperatures:
        logits = -dn / R
        if normalization == "xy":
            A = torch.sqrt(torch.clamp(logits.softmax(dim=-1) * logits.softmax(dim=-2), min=AFFINITY_EPS))
        elif normalization == "y":
            A = logits.softmax(dim=-1)
        else:  # "none": the raw kernel exp(-dn/R)
            A = torch.exp(logits)
        A = A * tw.unsqueeze(1)  # CFG weights after the softmax
        A_neg, A_pos = A[:, :, : G + U], A[:, :, G + U:]
        c = torch.cat([-A_neg * A_pos.sum(-1, keepdim=True), A_pos * A_neg.sum(-1, keepdim=True)], dim=-1)
        f = c @ ts - c.sum(-1, keepdim=True) * xs  # (B, G, S)
        forces.append(f)
        sumsq.append((f * f).sum())
    # Step 7: one RMS per temperature over all rows (and ranks).
    stats = torch.cat([torch.stack(sumsq), torch.tensor([B * G * S], dtype=dt, device=x.device)])
    stats = _all_reduce_sum(stats, process_group)
    ms = stats[:-1] / stats[-1]
    rms = torch.sqrt(torch.clamp(ms, min=RMS_EPS))
    force = sum(f / r for f, r in zip(forces, rms))
    loss = (force * force).mean(dim=(-1, -2))
    return DriftField(force=force.reshape(*batch, G, S), scale=scale, scale_inputs=scale_inputs,
                      loss=loss.reshape(batch), force_rms=torch.sqrt(ms))


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------

def drifting_field(gen: torch.Tensor, pos: torch.Tensor, neg: Optional[torch.Tensor] = None,
                   neg_weight: Optional[torch.Tensor] = None, *,
                   temperatures: Sequence[float] = R_LIST_DEFAULT, normalization: str = "xy",
                   backend: str = "auto", process_group=None, check_finite: bool = True) -> DriftField:
    """Compute the drifting field for B independent problems (SPEC §3.1-3.2).

    Args:
      gen: [*batch, G, S] generated samples (these are also negatives for each other, self-masked).
      pos: [*batch, P, S] positives (data of the row's class).
      neg: optional [*batch, U, S] unconditional real negatives (U may be 0).
      neg_weight: optional [*batch, U] non-negative weights of `neg` (default 1); CFG uses
        w = (alpha - 1)(N_neg - 1)/N_unc.
      temperatures: the official R_list.
      normalization: "xy" (official two-axis softmax), "y" (row softmax over targets only) or "none"
        (raw kernel exp(-d/R)); weights are applied after the normalization in all three.
      backend: "auto" | "reference" | "cpp" | "triton" (see drift.backends).
      process_group: if given, the scale sums and per-temperature sums of squares are all-reduced over
        it, so ranks holding parts of the rows get the single-process result.
      check_finite: scan inputs for NaN/Inf and weights for negatives (a host sync; trainers turn it off).

    Inputs may be fp32/bf16/fp16 (computed in fp32) or fp64 (computed in fp64), and non-contiguous.
    Nothing here is differentiated: use drift.loss.drifting_loss for the training loss.
    """
    neg, neg_weight, temps = validate_inputs(gen, pos, neg, neg_weight, temperatures=temperatures,
                                             normalization=normalization, backend=backend,
                                             check_finite=check_finite)
    from drift import backends  # local import: backends lazily pulls in the fused kernels

    impl = backends.field_impl(backend, gen)
    return impl(gen, pos, neg, neg_weight, temps, normalization, process_group)
