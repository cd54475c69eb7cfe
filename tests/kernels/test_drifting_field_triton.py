"""The Triton drifting-field backend against the fp64 golden: interpreter tier and GPU tier.

Run: TRITON_INTERPRET=1 pytest -m interp tests/kernels/test_drifting_field_triton.py   (CPU, tiny shapes)
     pytest -m gpu tests/kernels/test_drifting_field_triton.py                        (CUDA, real sizes)
The interpreter executes every program serially in numpy, so the interp cases are few and tiny.
Tolerance: style §5.2 (2x the fp32 reference backend's own error against fp64, plus a small floor).
"""
import os

import pytest
import torch

from drift import backends
from drift.field import drifting_field, drifting_field_reference
from tests.kernels.field_cases import TIE_FLOOR, case_inputs, check_backend, golden, strided_inputs, tie_inputs
from tests.utils import assert_close_to_ref, max_abs_err

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_interp = pytest.mark.skipif(not INTERP, reason="set TRITON_INTERPRET=1 before pytest starts")


@pytest.fixture(autouse=True)
def _triton_available():
    if not backends.has_triton():
        pytest.skip("triton is not installed")


# ---------------------------------------------------------------------------------------------------
# Interpreter tier (CPU, fp32, tiny shapes)
# ---------------------------------------------------------------------------------------------------

@pytest.mark.interp
@needs_interp
@pytest.mark.parametrize("B,G,P,U,S,scale,weights", [
    (2, 5, 4, 3, 9, 1.0, "random"),     # weird sizes, weighted negatives
    (2, 1, 1, 0, 1, 1.0, None),         # G = P = S = 1, no negatives
    (2, 6, 5, 2, 20, 1e-5, "random"),   # scale floors active; S spans two chunks of 16
])
def test_field_triton_interp_matches_golden(B, G, P, U, S, scale, weights):
    check_backend("triton", *case_inputs(B, G, P, U, S, scale, weights, seed=B * 100 + G * 10 + S))


@pytest.mark.interp
@needs_interp
def test_field_triton_interp_views_ties_and_options():
    gen, pos, neg, w = strided_inputs(N=1, G=3, P=2, U=2, C=5, H=1, W=2)
    res = check_backend("triton", gen, pos, neg, w)
    assert res.force.shape == gen.shape
    check_backend("triton", *tie_inputs(B=1, G=4, P=3, U=2, S=5), normalization="y", temperatures=(0.05, 0.3),
                  floor=TIE_FLOOR)
    gen, pos, neg, w = case_inputs(1, 4, 3, 2, 6, 1.0, "random", seed=9)
    check_backend("triton", gen + 300.0, pos + 300.0, neg + 300.0, w, normalization="none")
    # fp64 inputs compute in fp64 (the floors are fp32 literals in the kernel: ~1e-9 relative at the floor).
    gen, pos, neg, w = case_inputs(2, 4, 3, 2, 6, 1.0, "random", dtype=torch.float64, seed=3)
    res = drifting_field(gen, pos, neg, w, backend="triton")
    gold = golden(gen, pos, neg, w)
    assert res.force.dtype == torch.float64
    torch.testing.assert_close(res.force, gold["force"], rtol=0, atol=1e-8)
    torch.testing.assert_close(res.scale, gold["scale"].reshape(()), rtol=1e-12, atol=0)


@pytest.mark.interp
@needs_interp
def test_field_triton_interp_compiles_fullgraph():
    gen, pos, neg, w = case_inputs(1, 4, 3, 2, 6, 1.0, "random", seed=12)

    def f(g, p, n, nw):
        res = drifting_field(g, p, n, nw, backend="triton", check_finite=False)
        return res.force, res.loss

    eager = f(gen, pos, neg, w)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(gen, pos, neg, w)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_field_triton_needs_cuda_or_interpreter():
    if INTERP:
        pytest.skip("the interpreter accepts CPU tensors")
    gen, pos, neg, w = case_inputs(1, 3, 2, 1, 4, 1.0, "random")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        drifting_field(gen, pos, neg, w, backend="triton")


# ---------------------------------------------------------------------------------------------------
# GPU tier (real sizes, bf16, compile)
# ---------------------------------------------------------------------------------------------------

def _cuda(*ts):
    return [t.cuda() if t is not None else None for t in ts]


@pytest.mark.gpu
@pytest.mark.parametrize("B,G,P,U,S", [(64, 64, 64, 16, 256), (24, 64, 64, 16, 4096), (37, 13, 29, 7, 641),
                                       (16, 1, 1, 0, 1)])
def test_field_triton_gpu_matches_golden(B, G, P, U, S):
    gen, pos, neg, w = _cuda(*case_inputs(B, G, P, U, S, 1.0, "random" if U else None, seed=S))
    res = drifting_field(gen, pos, neg, w, backend="triton")
    cpu = [t.cpu() if t is not None else None for t in (gen, pos, neg, w)]
    res_cpu = type(res)(**{k: getattr(res, k).cpu() for k in ("force", "scale", "scale_inputs", "loss",
                                                               "force_rms")})
    check_backend("triton", *cpu, res=res_cpu)


@pytest.mark.gpu
def test_field_triton_gpu_distance_precision():
    # A large common offset and S = 4096: plain TF32 products (10-bit mantissa) would miss the bound by
    # orders of magnitude; tf32x3 plus centring must stay within 2x the fp32 reference's error.
    gen, pos, neg, w = case_inputs(8, 64, 64, 16, 4096, 1.0, "random", seed=5)
    gen, pos, neg = gen + 30.0, pos + 30.0, neg + 30.0
    res = drifting_field(*_cuda(gen, pos, neg, w), backend="triton")
    res_cpu = type(res)(**{k: getattr(res, k).cpu() for k in ("force", "scale", "scale_inputs", "loss",
                                                               "force_rms")})
    check_backend("triton", gen, pos, neg, w, res=res_cpu)


@pytest.mark.gpu
def test_field_triton_gpu_bf16_strided_and_compile():
    gen, pos, neg, w = strided_inputs(N=4, G=64, P=64, U=16, C=256, H=4, W=4)
    gen, pos, neg, w = [t.cuda().bfloat16() for t in (gen, pos, neg, w)]
    res = drifting_field(gen, pos, neg, w, backend="triton")
    ref = drifting_field_reference(gen, pos, neg, w)
    ref64 = drifting_field_reference(gen.double(), pos.double(), neg.double(), w.double())
    assert_close_to_ref(res.force, ref64.force, max_abs_err(ref.force, ref64.force), 1e-5, "bf16.force")

    def f(g, p, n, nw):
        r = drifting_field(g, p, n, nw, backend="triton", check_finite=False)
        return r.force, r.loss

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)(gen, pos, neg, w)
    torch.testing.assert_close(compiled[0], res.force, rtol=0, atol=0)
    assert backends.resolve("auto", "cuda") == "triton"
