"""The drifting loss (paper Eq. 6; official `drift_loss`): MSE between gen and the frozen target gen + V.

    loss[b] = mean_{i,s}( (gen/scale_inputs - sg(gen/scale_inputs + force))^2 )

Its value equals mean(force^2) per row; its gradient w.r.t. gen is -2 force / (G * S * scale_inputs), so
each optimizer step moves the generated samples along the drifting field. All math in fp32 (fp64 for
fp64 inputs) whatever the input dtype; the gradient is cast back to gen's dtype by autograd.

`fused_loss_from_field` builds the same loss from those two facts directly (value: the field's own
mean(force^2); gradient: -2 force / (G * S * scale_inputs) from the saved force): no per-key elementwise
kernels in the forward and one in the backward, equal to the formula above up to fp32 rounding (the formula's
x - (x + force) is -force up to rounding). drift/field/multi.py offers it for many keys (`fused=True`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from drift.field.core import R_LIST_DEFAULT, DriftField, compute_dtype
from drift.field.dispatch import drifting_field


def drifting_loss(gen: torch.Tensor, pos: torch.Tensor, neg: Optional[torch.Tensor] = None,
                  neg_weight: Optional[torch.Tensor] = None, *,
                  temperatures: Sequence[float] = R_LIST_DEFAULT, normalization: str = "xy",
                  backend: str = "auto", process_group=None, check_finite: bool = True):
    """Differentiable drifting loss for B independent problems.

    Shapes as in `drifting_field`: gen [*batch, G, S], pos [*batch, P, S], neg [*batch, U, S],
    neg_weight [*batch, U]. Returns `(loss, info)` with loss [*batch] (differentiable w.r.t. gen only) and
    info = {"scale", "scale_inputs", "force_rms"} (detached): the official `info` plus the per-temperature
    RMS of the raw force, a secondary convergence metric (the loss itself stays near len(temperatures) by
    construction).
    """
    field = drifting_field(gen, pos, neg, neg_weight, temperatures=temperatures, normalization=normalization,
                           backend=backend, process_group=process_group, check_finite=check_finite)
    return loss_from_field(gen, pos, neg, field)


def loss_from_field(gen: torch.Tensor, pos: torch.Tensor, neg: Optional[torch.Tensor], field: DriftField):
    """(loss [*batch], info) of `drifting_loss` from the field of (gen, pos, neg) (drift/field/multi.py uses it
    too, so the multi-key losses are the same ops on the same values)."""
    x = gen.to(compute_dtype(gen, pos, neg)) / field.scale_inputs  # differentiable; scale_inputs is a constant
    goal = (x + field.force).detach()
    loss = ((x - goal) ** 2).mean(dim=(-1, -2))
    info = {"scale": field.scale, "scale_inputs": field.scale_inputs, "force_rms": field.force_rms}
    return loss, info


class _FieldLoss(torch.autograd.Function):
    """loss = the field's per-row mean(force^2), with d loss[b] / d gen[b] = -2 force[b] / (G * S * scale_inputs)."""

    @staticmethod
    def forward(ctx, gen, force, loss, scale_inputs):
        ctx.save_for_backward(force, scale_inputs)
        ctx.gen_dtype = gen.dtype
        return loss.view_as(loss)  # (a view: no kernel; autograd attaches this node to it)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        force, scale_inputs = ctx.saved_tensors
        G, S = force.shape[-2:]
        coef = grad_loss * (-2.0 / (G * S)) / scale_inputs  # [*batch], small
        return (force * coef[..., None, None]).to(ctx.gen_dtype), None, None, None


def fused_loss_from_field(gen: torch.Tensor, pos: torch.Tensor, neg: Optional[torch.Tensor], field: DriftField):
    """(loss [*batch], info) as `loss_from_field`, the loss formed from the field's own value and force (module
    docstring); differentiable w.r.t. gen once (no double backward)."""
    loss = _FieldLoss.apply(gen, field.force, field.loss, field.scale_inputs)
    info = {"scale": field.scale, "scale_inputs": field.scale_inputs, "force_rms": field.force_rms}
    return loss, info
