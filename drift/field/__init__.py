"""The drifting field and loss of "Generative Modeling via Drifting" (arXiv 2602.04770), official semantics.

    from drift.field import drifting_field, drifting_loss, drifting_loss_multi
    res = drifting_field(gen, pos, neg, neg_weight)          # DriftField: force, scale, scale_inputs, loss, force_rms
    loss, info = drifting_loss(gen, pos, neg, neg_weight)   # loss [*batch], differentiable w.r.t. gen
    out = drifting_loss_multi([(gen_k, pos_k, neg_k, w_k), ...])   # [(loss_k, info_k)]: many keys, 2 collectives

Modules, each importing only those listed before it (tests/test_layering.py checks it):
    core.py          constants (R_LIST_DEFAULT, the official floors), DriftField, validation, compute dtype, all-reduce
    reference.py     the readable torch backend, the oracle
    three_pass.py    the FieldOps protocol of the fused backends and the driver that strings their passes together
    cpp_driver.py    the C++ backend (drift._C) on that protocol
    tune_cache.py    the on-disk store of the Triton tuner's results (given to drift.kernels by triton_driver)
    triton_driver.py the Triton backend (drift.kernels) on that protocol
    dispatch.py      backend choice and `drifting_field`
    loss.py          `drifting_loss`
    multi.py         `drifting_field_multi`, `drifting_loss_multi`: all feature keys of a step in one call
"""
from drift.field.core import BACKENDS, NORMALIZATIONS, R_LIST_DEFAULT, DriftField, compute_dtype, validate_inputs
from drift.field.dispatch import drifting_field
from drift.field.loss import drifting_loss
from drift.field.multi import drifting_field_multi, drifting_loss_multi
from drift.field.reference import drifting_field_reference

__all__ = ["BACKENDS", "NORMALIZATIONS", "R_LIST_DEFAULT", "DriftField", "compute_dtype", "drifting_field",
           "drifting_field_multi", "drifting_field_reference", "drifting_loss", "drifting_loss_multi",
           "validate_inputs"]
