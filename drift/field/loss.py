"""The drifting loss (paper Eq. 6; official `drift_loss`): MSE between gen and the frozen target gen + V.

    loss[b] = mean_{i,s}( (gen/scale_inputs - sg(gen/scale_inputs + force))^2 )

Its value equals mean(force^2) per row; its gradient w.r.t. gen is -2 force / (G * S * scale_inputs), so
each optimizer step moves the generated samples along the drifting field. All math in fp32 (fp64 for
fp64 inputs) whatever the input dtype; the gradient is cast back to gen's dtype by autograd.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from drift.field.core import R_LIST_DEFAULT, compute_dtype
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
    x = gen.to(compute_dtype(gen, pos, neg)) / field.scale_inputs  # differentiable; scale_inputs is a constant
    goal = (x + field.force).detach()
    loss = ((x - goal) ** 2).mean(dim=(-1, -2))
    info = {"scale": field.scale, "scale_inputs": field.scale_inputs, "force_rms": field.force_rms}
    return loss, info
