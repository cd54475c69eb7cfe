"""The drifting field and loss for many feature keys at once: what a training step needs (~86-99 keys).

    from drift.field import drifting_loss_multi
    items = [(gen_k, pos_k, neg_k, w_k) for k in keys]        # each as for drifting_loss; neg, w may be None
    for (loss_k, info_k) in drifting_loss_multi(items, process_group=pg):   # in item order
        ...

Semantics: exactly those of calling `drifting_loss` (`drifting_field`) on every item on its own. Each item has
its own global scale and per-temperature RMS (over its rows on all ranks); the items only share the work:
  - 2 collectives for all items together (one all-reduce of every item's scale sums, one of every item's sums
    of squares), instead of 2 per item: 2 per step instead of ~172;
  - the Triton backend runs each pass once per group of keys with the same row shape, S, dtype and feature
    stride (17 launch units for the ablation's 86 keys; drift.kernels.field_multi), the C++ backend its
    passes per key between the two collectives, the reference one key after the other (with its own
    collectives per key);
  - the host work per call is one signature of the inputs: validation is done once per signature of all the
    items (unless check_finite, which scans every input on every call: a host sync per tensor).
Results match per-item calls bit for bit on the fused backends wherever the per-row work and the order of the
row reductions are unchanged (a multi-key launch reduces each key's rows in the same order as a single-key
one; a tuned configuration can differ between the two, and then the fp32 results differ in rounding only).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Sequence, Tuple

import torch

from drift.field.core import R_LIST_DEFAULT, DriftField, validate_inputs
from drift.field.dispatch import multi_impl
from drift.field.loss import fused_loss_from_field, loss_from_field

VALIDATED_CACHE_SIZE = 16
_validated: "OrderedDict[tuple, tuple]" = OrderedDict()  # signature of a call -> temperatures (validated)


def _as_items(items) -> List[tuple]:
    """Items as 4-tuples (gen, pos, neg, neg_weight); each given as a tuple/list of 2 to 4 entries."""
    if isinstance(items, (torch.Tensor, str, bytes)) or not isinstance(items, Sequence):
        raise ValueError(f"items must be a sequence of (gen, pos[, neg[, neg_weight]]) tuples, "
                         f"got {type(items).__name__}")
    if len(items) == 0:
        raise ValueError("items is empty: give at least one (gen, pos[, neg[, neg_weight]]) tuple")
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, (tuple, list)) or not 2 <= len(it) <= 4:
            raise ValueError(f"items[{i}] must be a tuple (gen, pos[, neg[, neg_weight]]), got "
                             f"{type(it).__name__}" + (f" of length {len(it)}" if isinstance(it, (tuple, list))
                                                       else ""))
        out.append(tuple(it) + (None,) * (4 - len(it)))
    return out


def _meta(t) -> tuple:
    return (t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else (type(t),)


def _validate(items: List[tuple], temperatures, normalization: str, backend: str, check_finite: bool):
    """(items with U = 0 negatives dropped, temperatures as a tuple); ValueError naming items[i] and the
    argument. Without check_finite a signature seen before skips the checks (they depend on it alone)."""
    try:
        temperatures = tuple(temperatures)
    except TypeError:
        raise ValueError(f"temperatures must be a non-empty sequence of positive finite numbers, "
                         f"got {temperatures!r}") from None
    sig = None
    if not check_finite:
        sig = (tuple(tuple(_meta(t) for t in it) for it in items), temperatures, normalization, backend)
        temps = _validated.get(sig)
        if temps is not None:
            _validated.move_to_end(sig)
            return [it if it[2] is None or it[2].shape[-2] else (it[0], it[1], None, None) for it in items], temps
    out, temps = [], None
    device = items[0][0].device if isinstance(items[0][0], torch.Tensor) else None
    for i, (gen, pos, neg, w) in enumerate(items):
        try:
            neg, w, temps = validate_inputs(gen, pos, neg, w, temperatures=temperatures,
                                            normalization=normalization, backend=backend, check_finite=check_finite)
        except ValueError as e:
            raise ValueError(f"items[{i}]: {e}") from None
        for name, t in (("gen", gen), ("pos", pos), ("neg", neg), ("neg_weight", w)):
            if t is not None and t.device != device:
                raise ValueError(f"items[{i}].{name} is on {t.device}, but items[0].gen is on {device}: all items "
                                 "must be on one device")
        out.append((gen, pos, neg, w))
    if sig is not None:
        _validated[sig] = temps
        if len(_validated) > VALIDATED_CACHE_SIZE:
            _validated.popitem(last=False)
    return out, temps


def drifting_field_multi(items, *, temperatures: Sequence[float] = R_LIST_DEFAULT, normalization: str = "xy",
                         backend: str = "auto", process_group=None, check_finite: bool = True) -> List[DriftField]:
    """`drifting_field` for every item of `items`, a sequence of (gen, pos, neg, neg_weight) with shapes
    gen [*batch_k, G_k, S_k], pos [*batch_k, P_k, S_k], neg [*batch_k, U_k, S_k] or None, neg_weight
    [*batch_k, U_k] or None (shorter tuples leave the tail None). The items may differ in every size; all must
    be on one device. Options as in drifting_field, for all items. Returns the DriftFields in item order."""
    items, temps = _validate(_as_items(items), temperatures, normalization, backend, check_finite)
    return multi_impl(backend, items[0][0])(items, temps, normalization, process_group)


def drifting_loss_multi(items, *, temperatures: Sequence[float] = R_LIST_DEFAULT, normalization: str = "xy",
                        backend: str = "auto", process_group=None, check_finite: bool = True,
                        fused: bool = False) -> List[Tuple[torch.Tensor, dict]]:
    """`drifting_loss` for every item (shapes and options as in drifting_field_multi): [(loss [*batch_k],
    info_k)] in item order, each loss differentiable w.r.t. its gen, info_k = {"scale", "scale_inputs",
    "force_rms"} (detached).

    fused=False: each loss is built by drifting_loss's own ops (bit for bit its result). fused=True: from the
    field's value and saved force (drift/field/loss.py, fused_loss_from_field): the same loss and gradient up
    to fp32 rounding, with no elementwise kernels per key in the forward and one in the backward (~5 and ~5
    otherwise, ~900 launches a step at 86 keys), and no fp32 copies of the keys beyond the force."""
    items = _as_items(items)
    fields = drifting_field_multi(items, temperatures=temperatures, normalization=normalization, backend=backend,
                                  process_group=process_group, check_finite=check_finite)
    build = fused_loss_from_field if fused else loss_from_field
    return [build(gen, pos, neg, f) for (gen, pos, neg, _), f in zip(items, fields)]
