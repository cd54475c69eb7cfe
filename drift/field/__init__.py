"""The drifting field and loss of "Generative Modeling via Drifting" (arXiv 2602.04770), official semantics.

    from drift.field import drifting_field, drifting_loss
    res = drifting_field(gen, pos, neg, neg_weight)          # DriftField: force, scale, scale_inputs, loss, force_rms
    loss, info = drifting_loss(gen, pos, neg, neg_weight)   # loss [*batch], differentiable w.r.t. gen

Modules, each importing only those listed before it (tests/test_field_layering.py checks it):
    core.py          constants (R_LIST_DEFAULT, the official floors), DriftField, validation, compute dtype, all-reduce
    reference.py     the readable torch backend, the oracle
    three_pass.py    the FieldOps protocol of the fused backends and the driver that strings their passes together
    cpp_driver.py    the C++ backend (drift._C) on that protocol
    triton_driver.py the Triton backend (drift.kernels) on that protocol
    dispatch.py      backend choice and `drifting_field`
    loss.py          `drifting_loss`
"""
from drift.field.core import BACKENDS, NORMALIZATIONS, R_LIST_DEFAULT, DriftField, compute_dtype, validate_inputs
from drift.field.dispatch import drifting_field
from drift.field.loss import drifting_loss
from drift.field.reference import drifting_field_reference

__all__ = ["BACKENDS", "NORMALIZATIONS", "R_LIST_DEFAULT", "DriftField", "compute_dtype", "drifting_field",
           "drifting_field_reference", "drifting_loss", "validate_inputs"]
