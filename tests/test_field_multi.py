"""The multi-key field (drift.field.drifting_field_multi / drifting_loss_multi) against per-key calls, on the CPU
backends (reference, cpp); the Triton backend's grouped launches are tested under the interpreter in
tests/kernels/test_field_multi_triton.py.

Run: pytest tests/test_field_multi.py
A multi-key call must give every key exactly what a call of drifting_loss on that key alone gives: the keys
have different scales and RMS (checked below, so a call that mixed them up would fail), and the fused backends
do the same per-row work in the same order, so the comparison is bitwise (losses, info, gradients).
"""

import pytest
import torch

from drift import _ext
from drift.field import DriftField, drifting_field, drifting_field_multi, drifting_loss, drifting_loss_multi
from drift.field import multi as multi_mod
from drift.field import three_pass
from tests.field_multi_cases import (_dist_items, _with_grad, check_fused_against_fp64, check_two_ranks, mixed_items,
                                     run_two_ranks, trainer_item)

BACKENDS = ["reference", pytest.param("cpp", marks=pytest.mark.skipif(not _ext.HAS_C_EXT,
                                                                       reason="drift._C is not built"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_multi_matches_per_key_calls_bitwise(backend, dtype):
    items = _with_grad(mixed_items(dtype))
    out = drifting_loss_multi(items, backend=backend)
    assert len(out) == len(items)
    scales = []
    for it, (loss, info) in zip(items, out):
        ref_loss, ref_info = drifting_loss(*it, backend=backend)
        assert loss.shape == it[0].shape[:-2] and loss.dtype == ref_loss.dtype
        assert torch.equal(loss, ref_loss)
        for k in ("scale", "scale_inputs", "force_rms"):
            assert torch.equal(info[k], ref_info[k]), k
        (g1,) = torch.autograd.grad(loss.sum(), it[0])
        (g2,) = torch.autograd.grad(ref_loss.sum(), it[0])
        assert torch.equal(g1, g2)
        scales.append(float(info["scale"]))
    # Every key has its own global scale: a call that pooled the keys' statistics would not match above.
    assert len({round(s, 4) for s in scales}) == len(scales)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_field_matches_per_key_fields(backend):
    items = mixed_items(torch.float64)
    fields = drifting_field_multi(items, temperatures=(0.05, 0.3), normalization="y", backend=backend)
    for it, f in zip(items, fields):
        ref = drifting_field(*it, temperatures=(0.05, 0.3), normalization="y", backend=backend)
        assert isinstance(f, DriftField)
        for k in ("force", "loss", "scale", "scale_inputs", "force_rms"):
            assert torch.equal(getattr(f, k), getattr(ref, k)), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_fused_loss_matches_fp64_to_the_tolerance_rule(backend):
    check_fused_against_fp64(backend, mixed_items())


def test_multi_accepts_short_tuples_and_drops_empty_negatives():
    gen, pos, neg, _ = trainer_item(2, 2, 4, 3, 2, 6)
    empty = neg[..., :0, :]  # U = 0: the same as no negatives
    out = drifting_loss_multi([(gen, pos), [gen, pos, empty], (gen, pos, None, None)], backend="reference")
    ref, _ = drifting_loss(gen, pos, backend="reference")
    for loss, _ in out:
        assert torch.equal(loss, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_runs_two_collectives_for_all_keys(backend, monkeypatch):
    # The fused backends all-reduce all keys' scale sums at once and all their sums of squares at once; the
    # reference (a loop of per-key calls) needs two per key. Counted with a stand-in for the collective.
    from drift.field import reference
    calls = []

    def fake_all_reduce(t, group):
        calls.append(t.numel())
        return t

    monkeypatch.setattr(three_pass, "all_reduce_sum", fake_all_reduce)
    monkeypatch.setattr(reference, "all_reduce_sum", fake_all_reduce)
    items = mixed_items()
    drifting_loss_multi(items, backend=backend, process_group=object())
    if backend == "reference":
        assert len(calls) == 2 * len(items)
    else:
        nR = 3
        assert calls == [2 * len(items), (nR + 1) * len(items)]


def test_multi_error_paths():
    gen, pos, neg, w = trainer_item(2, 2, 4, 3, 2, 6)
    with pytest.raises(ValueError, match="items is empty"):
        drifting_loss_multi([])
    with pytest.raises(ValueError, match="must be a sequence"):
        drifting_loss_multi(gen)
    with pytest.raises(ValueError, match=r"items\[1\] must be a tuple"):
        drifting_loss_multi([(gen, pos), (gen,)])
    with pytest.raises(ValueError, match=r"items\[1\]: pos feature dim S=5 does not match gen S=6"):
        drifting_loss_multi([(gen, pos), (gen, pos[..., :5])])
    with pytest.raises(ValueError, match=r"items\[0\]: neg_weight must have shape"):
        drifting_loss_multi([(gen, pos, neg, w[..., :1])])
    with pytest.raises(ValueError, match="temperatures must be"):
        drifting_loss_multi([(gen, pos)], temperatures=0.05)
    with pytest.raises(ValueError, match="normalization must be"):
        drifting_loss_multi([(gen, pos)], normalization="z")
    meta = tuple(t.to("meta") for t in (gen, pos))
    with pytest.raises(ValueError, match=r"items\[1\]\.gen is on meta.*one device"):
        drifting_field_multi([(gen, pos), meta], check_finite=False)


def test_multi_validation_cache_never_skips_a_check():
    # Without check_finite, a call signature seen before skips validation; a new signature is validated, and
    # check_finite=True scans the values on every call.
    gen, pos, neg, w = trainer_item(2, 2, 4, 3, 2, 6)
    multi_mod._validated.clear()
    drifting_loss_multi([(gen, pos, neg, w)], backend="reference", check_finite=False)
    assert len(multi_mod._validated) == 1
    with pytest.raises(ValueError, match=r"items\[0\]: pos feature dim"):
        drifting_loss_multi([(gen, pos[..., :5], neg, w)], backend="reference", check_finite=False)
    bad = pos.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"items\[0\]: pos contains NaN"):
        drifting_loss_multi([(gen, bad, neg, w)], backend="reference", check_finite=True)
    with pytest.raises(ValueError, match=r"items\[0\]: neg_weight must be non-negative"):
        drifting_loss_multi([(gen, pos, neg, -w)], backend="reference", check_finite=True)


# ---------------------------------------------------------------------------------------------------
# Two gloo ranks: every key's scale and RMS are global over both ranks' rows, with 2 collectives per call
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_two_ranks_equal_single_process(backend):
    n_keys = len(_dist_items())
    check_two_ranks(run_two_ranks(backend), backend, 2 * n_keys if backend == "reference" else 2)
