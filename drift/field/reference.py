"""The "reference" backend: the drifting field in plain torch, readable rather than fast (the oracle).

The math is the step list in drift/field/core.py. It materializes [B, G, M] per temperature and runs on
any device and in fp64, so the fused backends (drift/field/cpp_driver.py, drift/field/triton_driver.py)
are tested against it and against the numpy golden in tests/golden/.
"""
from __future__ import annotations

import math

import torch

from drift.field.core import (AFFINITY_EPS, DIST_EPS, R_LIST_DEFAULT, RMS_EPS, SCALE_EPS, SELF_MASK, DriftField,
                              all_reduce_sum, compute_dtype)


@torch.no_grad()
def drifting_field_reference(gen, pos, neg=None, neg_weight=None, temperatures=R_LIST_DEFAULT,
                             normalization="xy", process_group=None) -> DriftField:
    """Plain-torch drifting field. Inputs already validated (drift.field.core.validate_inputs).

    gen [*batch, G, S], pos [*batch, P, S], neg [*batch, U, S] or None, neg_weight [*batch, U] or None.
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
    sums = all_reduce_sum(sums, process_group)
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
    stats = all_reduce_sum(stats, process_group)
    ms = stats[:-1] / stats[-1]
    rms = torch.sqrt(torch.clamp(ms, min=RMS_EPS))
    force = sum(f / r for f, r in zip(forces, rms))
    loss = (force * force).mean(dim=(-1, -2))
    return DriftField(force=force.reshape(*batch, G, S), scale=scale, scale_inputs=scale_inputs,
                      loss=loss.reshape(batch), force_rms=torch.sqrt(ms))


def drifting_field_reference_multi(items, temperatures=R_LIST_DEFAULT, normalization="xy",
                                   process_group=None):
    """The reference for many items (gen, pos, neg, neg_weight), one after the other: each item's global sums
    are all-reduced on their own (2 collectives per item), and no item's intermediates outlive its call."""
    return [drifting_field_reference(*it, temperatures=temperatures, normalization=normalization,
                                     process_group=process_group) for it in items]
