"""The Triton backend's multi-key call (drift.kernels.field_multi: one launch per pass for each group of keys)
against per-key calls and the fp64 golden, under the interpreter.

Run: TRITON_INTERPRET=1 pytest -m interp tests/kernels/test_field_multi_triton.py   (CPU, tiny shapes)
     pytest -m gpu tests/kernels/test_field_multi_triton.py                        (CUDA, real row shapes)
A group's launch runs each key's rows with the same per-row code as a single-key launch, reads the key's own
global sums, and reduces each key's rows in the same order (field_device._segment_sum_kernel), so with the
same launch configuration (the interpreter never tunes) the results equal per-key calls bit for bit.
"""
import os

import pytest
import torch

from drift.field import drifting_field, drifting_field_multi, drifting_loss, drifting_loss_multi
from tests.kernels.field_cases import check_backend
from tests.field_multi_cases import (_with_grad, check_fused_against_fp64, check_two_ranks, mixed_items,
                                     run_two_ranks, trainer_item)

try:  # triton may be missing on CPU-only installs: the fixture skips then
    from drift.kernels import field_multi
    from drift.kernels import field_tuning as tuning
except ImportError:
    field_multi = tuning = None

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
interp = pytest.mark.skipif(not INTERP, reason="set TRITON_INTERPRET=1 before pytest")


@pytest.fixture(autouse=True)
def _tuner_off(fresh_tuner):
    """Tuning off, no on-disk store, clean caches (tests/kernels/conftest.py)."""
    yield


def _check_equal_per_key(items, fields):
    for it, f in zip(items, fields):
        ref = drifting_field(*it, backend="triton", check_finite=False)
        for k in ("force", "loss", "scale", "scale_inputs", "force_rms"):
            assert torch.equal(getattr(f, k), getattr(ref, k)), k


@pytest.mark.interp
@interp
def test_multi_triton_groups_keys_and_matches_per_key_bitwise():
    # Keys of one row shape and S share a launch, the others run alone or in their own group; a second call
    # with new tensors of the same shapes reuses the call plan with a new key table (checked on the group).
    items = mixed_items(n=1)
    _check_equal_per_key(items, drifting_field_multi(items, backend="triton", check_finite=False))
    sizes = sorted(field_multi.group_sizes(field_multi_items(items)))
    assert sizes[-1] == 3 and sum(sizes) == len(items), sizes
    items = [tuple(None if t is None else t.clone().add_(torch.randn(t.shape)) for t in it[:3]) + it[3:]
             for it in items]  # (clones keep the strides: the same signature, new data pointers)
    fields = drifting_field_multi(items, backend="triton", check_finite=False)
    assert len(field_multi._CALLS) == 1
    _check_equal_per_key([items[i] for i in (0, 1, 5)], [fields[i] for i in (0, 1, 5)])


def field_multi_items(items):
    """Items as drift.field hands them to the kernels (U = 0 negatives dropped)."""
    return [it if it[2] is None or it[2].shape[-2] else (it[0], it[1], None, None) for it in items]


@pytest.mark.interp
@interp
def test_multi_triton_losses_and_gradients_match_per_key():
    items = _with_grad(mixed_items(n=1)[:3])
    for it, (loss, info) in zip(items, drifting_loss_multi(items, backend="triton", check_finite=False)):
        ref, ref_info = drifting_loss(*it, backend="triton", check_finite=False)
        assert torch.equal(loss, ref) and torch.equal(info["force_rms"], ref_info["force_rms"])
        (g1,) = torch.autograd.grad(loss.sum(), it[0])
        (g2,) = torch.autograd.grad(ref.sum(), it[0])
        assert torch.equal(g1, g2)


@pytest.mark.interp
@interp
def test_multi_triton_fused_loss_matches_fp64_to_the_tolerance_rule():
    check_fused_against_fp64("triton", mixed_items(n=1)[:2])


@pytest.mark.interp
@interp
@pytest.mark.parametrize("route", ["stored", "recompute-gram"])
def test_multi_triton_routes_match_golden_and_per_key(route):
    # S = 24 holds a row's Gram matrix (97 floats at G, U, P = 5, 3, 4) in its 5 x 24 output: the stored route.
    items = [trainer_item(2, L, 5, 4, 3, 24, seed=20 + L) for L in (1, 3, 2)]
    if route == "stored":
        cfg = tuning.Config(16, 8, 1, False, True)
        forced = dict(scale=cfg, sumsq=cfg, force=cfg)
    else:
        forced = dict(scale=tuning.Config(16, 8, 1), sumsq=tuning.Config(16, 8, 1, True),
                      force=tuning.Config(16, 8, 1))
    with tuning.forced_configs(**forced):
        fields = drifting_field_multi(items, backend="triton", check_finite=False)
        _check_equal_per_key(items, fields)
    assert field_multi.group_sizes(items) == [3]
    for it, f in zip(items, fields):
        check_backend("triton", *it, res=f)


@pytest.mark.interp
@interp
def test_multi_triton_misaligned_key_runs_unaligned_variant():
    # A key whose data starts at an odd element: the kernels may not assume 16-byte aligned offsets (AL = 1).
    base = [trainer_item(2, 2, 5, 4, 3, 8, seed=s) for s in (30, 31)]
    g = torch.randn(2 * 5 * 2 * 8 + 1)[1:].view(2, 5, 2, 8).transpose(1, 2)  # (n, L, G, S) at element offset 1
    items = [base[0], (g,) + base[1][1:]]
    fields = drifting_field_multi(items, backend="triton", check_finite=False)
    _check_equal_per_key(items, fields)
    (unit,) = field_multi._call_plan(items)
    assert unit.plan.al == 1
    fields = drifting_field_multi(base, backend="triton", check_finite=False)
    (unit,) = field_multi._call_plan(base)
    assert unit.plan.al == 4  # fp32: offsets and strides multiples of 4 elements
    _check_equal_per_key(base, fields)


@pytest.mark.interp
@interp
def test_multi_triton_forced_split_is_refused_for_a_group():
    items = [trainer_item(2, L, 5, 4, 3, 256, seed=40 + L) for L in (1, 2)]
    cfg = tuning.Config(32, 8, 1, False, True, True)
    with pytest.raises(ValueError, match="multi-key launch"):
        with tuning.forced_configs(scale=cfg, sumsq=tuning.Config(32, 8, 1, False, True), force=cfg):
            drifting_field_multi(items, backend="triton", check_finite=False)


@pytest.mark.interp
@interp
def test_multi_triton_two_ranks_equal_single_process():
    # Two gloo ranks (each interpreting the kernels on its half of every key's labels): 2 collectives per call,
    # for two keys in one launch group.
    check_two_ranks(run_two_ranks("triton", n_items=2), "triton", 2, n_items=2)


@pytest.mark.gpu
def test_multi_triton_gpu_matches_per_key_and_golden():
    # Real row shapes (G, U, P = 64, 16, 64), stored route: a group of four keys at S = 256 and one of two at
    # S = 640 (fp32, contiguous features: the variants the benchmark's precompile covers), each key equal to a
    # single-key call bit for bit (the untuned default configuration is the same for both), and each within
    # the 2x rule of the fp64 golden.
    torch.manual_seed(0)
    items = [tuple(t.cuda() if t is not None else None for t in trainer_item(2, L, 64, 64, 16, S, seed=50 + L))
             for L, S in ((1, 256), (4, 256), (16, 256), (64, 256), (2, 640), (8, 640))]
    fields = drifting_field_multi(items, backend="triton", check_finite=False)
    assert sorted(field_multi.group_sizes(items)) == [2, 4]
    _check_equal_per_key(items, fields)
    for it, f in zip(items[1:5:3], fields[1:5:3]):
        cpu = tuple(t.cpu() if t is not None else None for t in it)
        check_backend("triton", *cpu, res=type(f)(**{k: getattr(f, k).cpu() for k in (
            "force", "scale", "scale_inputs", "loss", "force_rms")}))
