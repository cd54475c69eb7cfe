"""fp64 golden oracle of the official `drift_loss` (lambertae/drifting, drift_loss.py; arXiv 2602.04770 Alg. 2, App. A.6-A.7).

Written step by step from the math of the official `drift_loss` (the step list in drift/field/core.py) with
numpy in float64, independently of the torch reference backend in drift/field/reference.py, so that the two
can check each other. Names follow the official
function: `gen`, `fixed_pos`, `fixed_neg`, `weight_neg`, `R_list`. Rows are processed one at a time
(explicit loops over B) except for the two global reductions, which are the point of the exercise.
"""
from __future__ import annotations

import numpy as np


def _softmax(z: np.ndarray, axis: int) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def drift_loss_ref(gen, fixed_pos, fixed_neg=None, weight_neg=None, R_list=(0.02, 0.05, 0.2),
                   normalization="xy"):
    """Golden field and loss.

    gen [B, Cg, S], fixed_pos [B, Cp, S], fixed_neg [B, Cn, S] or None, weight_neg [B, Cn] or None.
    Returns dict(force [B, Cg, S], loss [B], scale, scale_inputs, force_rms [len(R_list)]).
    """
    gen = np.asarray(gen, dtype=np.float64)
    pos = np.asarray(fixed_pos, dtype=np.float64)
    B, Cg, S = gen.shape
    if fixed_neg is None:
        neg = np.zeros((B, 0, S))
        wn = np.zeros((B, 0))
    else:
        neg = np.asarray(fixed_neg, dtype=np.float64)
        wn = np.ones(neg.shape[:2]) if weight_neg is None else np.asarray(weight_neg, dtype=np.float64)
    Cn = neg.shape[1]

    # 1. targets and their weights, one row at a time.
    rows = []
    for b in range(B):
        targets = np.concatenate([gen[b], neg[b], pos[b]], axis=0)  # [M, S]
        w = np.concatenate([np.ones(Cg), wn[b], np.ones(pos.shape[1])])  # [M]
        sq = (gen[b] ** 2).sum(1)[:, None] + (targets ** 2).sum(1)[None, :] - 2.0 * gen[b] @ targets.T
        dist = np.sqrt(np.maximum(sq, 1e-8))  # [Cg, M]
        rows.append((targets, w, dist))

    # 2. global scale: weighted mean distance over every (b, i, m), divided by the mean target weight.
    num = sum((dist * w[None, :]).sum() for _, w, dist in rows)
    cnt = B * Cg * rows[0][2].shape[1]
    mean_w = sum(w.sum() for _, w, _ in rows) / (B * rows[0][2].shape[1])
    scale = (num / cnt) / mean_w
    scale_inputs = max(scale / np.sqrt(S), 1e-3)

    # 3. per temperature, per row: affinities, cross-weighted coefficients, force.
    forces = {R: np.zeros_like(gen) for R in R_list}
    for b, (targets, w, dist) in enumerate(rows):
        dn = dist / max(scale, 1e-3)
        for i in range(Cg):
            dn[i, i] += 100.0
        x_s = gen[b] / scale_inputs
        t_s = targets / scale_inputs
        for R in R_list:
            logits = -dn / R
            if normalization == "xy":
                a = np.sqrt(np.maximum(_softmax(logits, 1) * _softmax(logits, 0), 1e-6))
            elif normalization == "y":
                a = _softmax(logits, 1)
            else:
                a = np.exp(logits)
            a = a * w[None, :]
            a_neg, a_pos = a[:, : Cg + Cn], a[:, Cg + Cn:]
            coef = np.concatenate([-a_neg * a_pos.sum(1, keepdims=True), a_pos * a_neg.sum(1, keepdims=True)], 1)
            forces[R][b] = coef @ t_s - coef.sum(1, keepdims=True) * x_s

    # 4. one RMS per temperature over every (b, i, s); sum the normalized fields.
    force = np.zeros_like(gen)
    rms_raw = []
    for R in R_list:
        ms = (forces[R] ** 2).mean()
        rms_raw.append(np.sqrt(ms))
        force += forces[R] / np.sqrt(max(ms, 1e-8))

    # 5. goal and loss: loss[b] = mean over (Cg, S) of (x_s - sg(x_s + force))^2 = mean(force^2).
    goal = gen / scale_inputs + force
    loss = ((gen / scale_inputs - goal) ** 2).mean(axis=(1, 2))
    return {"force": force, "loss": loss, "scale": scale, "scale_inputs": scale_inputs,
            "force_rms": np.array(rms_raw)}
