"""The reference drifting field against the fp64 golden oracle, its mathematical properties, and its errors.

Run: pytest tests/test_field.py. The golden (tests/golden/drift_loss_ref.py) is a numpy port of the official
math written independently of drift/field/reference.py; agreement in fp64 pins the semantics to rounding level.
"""
import numpy as np
import pytest
import torch

from drift.field import drifting_field
from tests.golden.drift_loss_ref import drift_loss_ref
from tests.utils import make_field_inputs

EPS32 = float(np.finfo(np.float32).eps)

# (B, G, P, U, S, feature scale): nice, weird (primes), U = 0, G = 1, P = 1, S = 1, huge and tiny scales.
_SHAPES = [
    (4, 8, 8, 4, 16, 1.0),
    (3, 7, 5, 3, 11, 1.0),
    (2, 6, 5, 0, 9, 1.0),
    (3, 1, 4, 2, 5, 1.0),
    (2, 5, 1, 3, 7, 1.0),
    (3, 4, 3, 2, 1, 1.0),
    (2, 9, 6, 3, 13, 1e4),
    (2, 9, 6, 3, 13, 1e-5),  # mean distance below 1e-3: the scale floors are active
]


def _np(t):
    return None if t is None else t.detach().double().numpy()


def _golden(gen, pos, neg=None, w=None, **kw):
    return drift_loss_ref(_np(gen), _np(pos), _np(neg), _np(w), **kw)


def _check_fp64(res, gold, rtol=1e-10):
    tol = rtol * max(1.0, float(np.abs(gold["force"]).max()))
    assert res.force.dtype == torch.float64
    np.testing.assert_allclose(res.force.numpy(), gold["force"], rtol=0, atol=tol)
    np.testing.assert_allclose(res.loss.numpy(), gold["loss"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res.scale.item(), gold["scale"], rtol=1e-9)  # expanded-form cancellation at huge scales
    np.testing.assert_allclose(res.scale_inputs.item(), gold["scale_inputs"], rtol=1e-9)
    np.testing.assert_allclose(res.force_rms.numpy(), gold["force_rms"], rtol=1e-10, atol=1e-300)


def _fp32_bound(gold):
    # fp32 error model: the expanded-form distance and the 1/R <= 50 logit amplification cost O(10) ulps of the
    # force magnitude in practice (measured ~13); 64 ulps leaves room without hiding a semantic error, which shows
    # up at the 1e-2 level or more.
    return 64 * EPS32 * max(1.0, float(np.abs(gold["force"]).max()))


@pytest.mark.parametrize("B,G,P,U,S,scale", _SHAPES)
@pytest.mark.parametrize("weights", ["random", "ones"])
def test_reference_matches_golden(B, G, P, U, S, scale, weights):
    gen, pos, neg, w = make_field_inputs(B, G, P, U, S, scale=scale, dtype=torch.float64, weights=weights,
                                         generator=torch.Generator().manual_seed(B * 1000 + G * 10 + S))
    gold = _golden(gen, pos, neg, w)
    _check_fp64(drifting_field(gen, pos, neg, w, backend="reference"), gold)
    # the same values in fp32: computed in fp32 by the reference, within the fp32 error model
    res32 = drifting_field(gen.float(), pos.float(), None if neg is None else neg.float(),
                           None if w is None else w.float(), backend="reference")
    assert res32.force.dtype == torch.float32
    gold32 = _golden(gen.float(), pos.float(), None if neg is None else neg.float(), None if w is None else w.float())
    err = np.abs(res32.force.double().numpy() - gold32["force"]).max()
    assert err <= _fp32_bound(gold32), (err, _fp32_bound(gold32))
    np.testing.assert_allclose(res32.scale.item(), gold32["scale"], rtol=1e-5)


@pytest.mark.parametrize("normalization", ["y", "none"])
def test_other_normalizations_match_golden(normalization):
    gen, pos, neg, w = make_field_inputs(3, 6, 5, 4, 8, dtype=torch.float64)
    gold = _golden(gen, pos, neg, w, normalization=normalization)
    _check_fp64(drifting_field(gen, pos, neg, w, normalization=normalization, backend="reference"), gold)


def test_custom_temperatures_match_golden():
    gen, pos, neg, w = make_field_inputs(2, 5, 4, 3, 6, dtype=torch.float64)
    temps = (0.05, 0.1, 0.3, 1.0)
    gold = _golden(gen, pos, neg, w, R_list=temps)
    _check_fp64(drifting_field(gen, pos, neg, w, temperatures=temps, backend="reference"), gold)


def test_ties_and_duplicates():
    """Duplicated points (gen rows repeated, positives equal to gen rows, all-equal distances) stay finite and exact."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    gen = torch.cat([base, base], dim=1)  # every generated point appears twice
    pos = torch.cat([base[:, :2], base[:, :2] + 1.0], dim=1)  # two positives coincide with generated points
    neg = torch.zeros(2, 2, 6, dtype=torch.float64)  # identical negatives
    w = torch.full((2, 2), 0.7, dtype=torch.float64)
    gold = _golden(gen, pos, neg, w)
    _check_fp64(drifting_field(gen, pos, neg, w, backend="reference"), gold)
    same = torch.ones(1, 4, 3, dtype=torch.float64)  # every distance is the 1e-8 floor
    res = drifting_field(same, same.clone(), backend="reference")
    # the field is exactly zero in exact arithmetic (every target equals x); what is left is rounding noise,
    # which the RMS floor (1e-8 on the mean square) keeps from being blown up to unit size
    assert torch.isfinite(res.force).all() and res.force.abs().max() < 1e-6
    gold = _golden(same, same.clone())
    assert np.abs(gold["force"]).max() < 1e-6
    np.testing.assert_allclose(res.scale.item(), gold["scale"], rtol=1e-12)


def test_zero_weights_equal_no_negatives_in_force_direction():
    """w = 0 removes the negatives from the force (they still enter the row softmax before weighting, as upstream)."""
    gen, pos, neg, _ = make_field_inputs(2, 5, 4, 3, 6, dtype=torch.float64)
    w0 = torch.zeros(2, 3, dtype=torch.float64)
    gold = _golden(gen, pos, neg, w0)
    _check_fp64(drifting_field(gen, pos, neg, w0, backend="reference"), gold)


def test_batch_dims_and_strided_views_match_flat():
    """Two leading batch dims given as a non-contiguous view of an [N_c, G, C, H, W] map equal the flat computation."""
    g = torch.Generator().manual_seed(5)
    n_c, G, P, C, H, W = 3, 4, 5, 6, 2, 3
    fmap_gen = torch.randn(n_c * G, C, H, W, generator=g, dtype=torch.float64)
    fmap_pos = torch.randn(n_c * P, C, H, W, generator=g, dtype=torch.float64) + 0.3
    # per-location vectors as strided views: [N_c, H*W, G, C] without copying
    v_gen = fmap_gen.view(n_c, G, C, H * W).permute(0, 3, 1, 2)
    v_pos = fmap_pos.view(n_c, P, C, H * W).permute(0, 3, 1, 2)
    assert not v_gen.is_contiguous() and v_gen.data_ptr() == fmap_gen.data_ptr()
    res = drifting_field(v_gen, v_pos, backend="reference")
    flat = drifting_field(v_gen.reshape(-1, G, C), v_pos.reshape(-1, P, C), backend="reference")
    assert res.force.shape == (n_c, H * W, G, C) and res.loss.shape == (n_c, H * W)
    torch.testing.assert_close(res.force.reshape(-1, G, C), flat.force, rtol=0, atol=1e-12)
    _check_fp64(flat, _golden(v_gen.reshape(-1, G, C), v_pos.reshape(-1, P, C)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_computed_in_fp32(dtype):
    gen, pos, neg, w = make_field_inputs(2, 5, 4, 3, 8, dtype=dtype)
    res = drifting_field(gen, pos, neg, w, backend="reference")
    assert res.force.dtype == torch.float32
    up = drifting_field(gen.float(), pos.float(), neg.float(), w.float(), backend="reference")
    torch.testing.assert_close(res.force, up.force, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------

def test_force_shrinks_when_p_equals_q():
    """With positives and generated samples from one distribution the field is sampling noise: relative to the
    field toward a shifted distribution (same n, same kernel), it shrinks as the sample count grows.

    The raw magnitude itself is not comparable across n (the 1e-3 affinity floor adds O(n * 1e-3) mass), which is
    why the official code normalizes each temperature's field by its RMS; the ratio is the meaningful quantity.
    Broad temperatures are used so the kernel averages over many samples in 8-D.
    """
    temps = (0.2, 0.5, 1.0)

    def raw_rms(n, shift):
        out = []
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            gen = torch.randn(4, n, 8, generator=g, dtype=torch.float64)
            pos = torch.randn(4, n, 8, generator=g, dtype=torch.float64) + shift
            out.append(drifting_field(gen, pos, temperatures=temps, backend="reference").force_rms)
        return torch.stack(out).mean(0)

    ratio_small = raw_rms(16, 0.0) / raw_rms(16, 1.0)
    ratio_large = raw_rms(256, 0.0) / raw_rms(256, 1.0)
    assert (ratio_large < 0.5 * ratio_small).all(), (ratio_small, ratio_large)
    assert (ratio_large < 0.3).all(), ratio_large


@pytest.mark.parametrize("normalization", ["y", "none"])
def test_swapping_positives_and_negatives_flips_the_field(normalization):
    """V_{p,q} = -V_{q,p}: with G = 1 the self column vanishes exactly under row-only / raw kernels (exp(-100/R) = 0),
    so exchanging the positive and (unit-weight) negative sets must negate the field exactly; p = q gives zero."""
    g = torch.Generator().manual_seed(11)
    gen = torch.randn(3, 1, 6, generator=g, dtype=torch.float64)
    a = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
    b = torch.randn(3, 5, 6, generator=g, dtype=torch.float64) + 0.4
    ones = torch.ones(3, 5, dtype=torch.float64)
    f_ab = drifting_field(gen, pos=a, neg=b, neg_weight=ones, normalization=normalization, backend="reference").force
    f_ba = drifting_field(gen, pos=b, neg=a, neg_weight=ones, normalization=normalization, backend="reference").force
    torch.testing.assert_close(f_ab, -f_ba, rtol=1e-9, atol=1e-12)
    raw = drifting_field(gen, pos=a, neg=a.clone(), neg_weight=ones, normalization=normalization,
                         backend="reference").force_rms
    assert (raw < 1e-12).all()


def test_attraction_points_toward_positives():
    """A lone generated point far from a tight positive cluster is pulled toward it."""
    gen = torch.zeros(1, 1, 2, dtype=torch.float64)
    pos = torch.tensor([[[3.0, 0.0], [3.1, 0.1], [2.9, -0.1]]], dtype=torch.float64)
    neg = torch.tensor([[[-1.0, 0.0]]], dtype=torch.float64)
    f = drifting_field(gen, pos, neg, backend="reference").force[0, 0]
    assert f[0] > 0 and abs(f[1]) < abs(f[0])


# ---------------------------------------------------------------------------------------------------
# Errors: every ValueError path names its argument
# ---------------------------------------------------------------------------------------------------

def _ok():
    return make_field_inputs(2, 3, 4, 2, 5)


@pytest.mark.parametrize("mutate,match", [
    (lambda g, p, n, w: (g[0], p, n, w), "gen"),  # wrong rank
    (lambda g, p, n, w: (g, p[0], n, w), "pos"),
    (lambda g, p, n, w: (g, p, n[0], w), "neg"),
    (lambda g, p, n, w: (g, p[:1], n, w), "pos batch"),  # mismatched B
    (lambda g, p, n, w: (g, p, n[:1], w), "neg batch"),
    (lambda g, p, n, w: (g, p[..., :4], n, w), "pos feature dim"),  # mismatched S
    (lambda g, p, n, w: (g, p, n[..., :4], w), "neg feature dim"),
    (lambda g, p, n, w: (g[:, :0], p, n, w), "G >= 1"),
    (lambda g, p, n, w: (g, p[:, :0], n, w), "P >= 1"),
    (lambda g, p, n, w: (g.long(), p, n, w), "gen must be a floating"),
    (lambda g, p, n, w: (g.tolist(), p, n, w), "gen must be a torch.Tensor"),
    (lambda g, p, n, w: (g, p, n, w[:, :1]), "neg_weight must have shape"),
    (lambda g, p, n, w: (g, p, n, w[0]), "neg_weight must have shape"),
    (lambda g, p, n, w: (g, p, n, -w), "neg_weight must be non-negative"),
    (lambda g, p, n, w: (g, p, None, w), "neg_weight was given without neg"),
    (lambda g, p, n, w: (g.index_fill(1, torch.tensor([0]), float("nan")), p, n, w), "gen contains NaN"),
    (lambda g, p, n, w: (g, p.index_fill(1, torch.tensor([0]), float("inf")), n, w), "pos contains NaN or Inf"),
    (lambda g, p, n, w: (g, p, n.index_fill(1, torch.tensor([0]), float("nan")), w), "neg contains NaN"),
    (lambda g, p, n, w: (g, p, n, w.index_fill(1, torch.tensor([0]), float("inf"))), "neg_weight contains"),
])
def test_bad_input_raises_value_error(mutate, match):
    args = mutate(*_ok())
    with pytest.raises(ValueError, match=match):
        drifting_field(*args, backend="reference")


@pytest.mark.parametrize("kw,match", [
    ({"backend": "cuda-magic"}, "backend"),
    ({"normalization": "x"}, "normalization"),
    ({"temperatures": ()}, "temperatures"),
    ({"temperatures": (0.02, -1.0)}, "temperatures"),
    ({"temperatures": (float("nan"),)}, "temperatures"),
])
def test_bad_options_raise_value_error(kw, match):
    with pytest.raises(ValueError, match=match):
        drifting_field(*_ok(), **kw)


def test_check_finite_false_skips_value_scans():
    gen, pos, neg, w = _ok()
    gen = gen.clone()
    gen[0, 0, 0] = float("nan")
    res = drifting_field(gen, pos, neg, w, backend="reference", check_finite=False)
    assert torch.isnan(res.force).any()  # garbage in, garbage out, but no host sync was spent on checking


def test_default_temperatures_come_from_one_constant():
    # drift.field.core.R_LIST_DEFAULT is the official R_list; every default of the field's entry points is that
    # object, and the training config (stdlib only, so it keeps its own tuple) holds the same numbers.
    import inspect

    from drift.config import TrainConfig
    from drift.field import R_LIST_DEFAULT, drifting_field_reference, drifting_loss
    from drift.field.cpp_driver import drifting_field_cpp
    from drift.field.triton_driver import drifting_field_triton

    assert R_LIST_DEFAULT == (0.02, 0.05, 0.2)
    for fn in (drifting_field, drifting_loss):
        assert inspect.signature(fn).parameters["temperatures"].default is R_LIST_DEFAULT, fn
    for fn in (drifting_field_reference, drifting_field_cpp, drifting_field_triton):
        assert inspect.signature(fn).parameters["temperatures"].default is R_LIST_DEFAULT, fn
    assert tuple(TrainConfig().R_list) == R_LIST_DEFAULT
