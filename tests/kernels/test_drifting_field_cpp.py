"""The C++ drifting-field backend (torch.ops.drift.field_*, driven by drift/field/cpp_driver.py) against the
fp64 golden, opcheck, compile, DDP.

Run: pytest tests/kernels/test_drifting_field_cpp.py (needs `make build`). Tolerance: each output within 2x
the fp32 reference backend's own error against the fp64 golden plus a small floor (tests/kernels/field_cases.py).
"""
import os

import pytest
import torch
import torch.distributed as dist

from drift import _ext
from drift.field import DriftField, R_LIST_DEFAULT, dispatch, drifting_field
from drift.field.cpp_driver import gram_floats
from tests.kernels.field_cases import (SHAPES, case_inputs, check_backend, golden, strided_inputs,
                                       tie_inputs, TIE_FLOOR)

pytestmark = pytest.mark.skipif(not _ext.HAS_C_EXT, reason="drift._C is not built (make build)")


@pytest.mark.parametrize("B,G,P,U,S,scale,weights", SHAPES)
def test_field_cpp_matches_golden(B, G, P, U, S, scale, weights):
    check_backend("cpp", *case_inputs(B, G, P, U, S, scale, weights, seed=B * 100 + G * 10 + S))


# Row tiles take different code paths by size (csrc/drifting_field.cpp, csrc/field_row.h): below AVX-512, GEMMs
# of more than 2^15 multiply-adds go to the BLAS and smaller ones are inline loops; the AVX-512 GEMM runs all
# of them in 12 x 32 register tiles, with masked partial tiles. Pass 2 gets ||force_R||^2 from the block
# triangle of the targets' Gram matrix when S is wide (the Gram route), by forming the forces when S is
# narrow. SHAPES are all small and narrow; these cover the rest: wide row tiles with the Gram route (with
# and without negatives, one generated sample, one positive, sizes that leave partial tiles everywhere), a
# Gram route small enough for the inline loops, a narrow tile on the BLAS, and the many-row, 4-feature shape
# of per-location pixel keys.
GRAM_ROUTE = [(2, 16, 24, 8, 256), (2, 12, 20, 0, 200), (3, 1, 1, 0, 40), (2, 2, 3, 1, 64), (2, 9, 1, 5, 70),
              (3, 4, 3, 2, 40), (2, 45, 37, 11, 300)]


@pytest.mark.parametrize("B,G,P,U,S", GRAM_ROUTE + [(2, 64, 96, 24, 8), (50, 16, 32, 8, 4)])
def test_field_cpp_blas_and_direct_paths(B, G, P, U, S):
    # The state's size tells the route: the Gram route adds the [neg, pos] blocks of T T^T to X T^T and the norms.
    M = G + U + P
    _, gram = torch.ops.drift.field_scale_sums(*case_inputs(1, G, P, U, S, 1.0, "random"))
    assert gram.shape[1] == (G * M + M + U * (U + P) + P * P if (B, G, P, U, S) in GRAM_ROUTE else G * M + M)
    assert gram.shape[1] == gram_floats(G, U, P, S)  # the fake kernel's rule (torch.compile) is the op's
    check_backend("cpp", *case_inputs(B, G, P, U, S, 1.0, "random", seed=B + G + S))


@pytest.mark.parametrize("B,G,P,U,S", [(3, 7, 5, 3, 13), (2, 16, 24, 8, 256)])
def test_field_cpp_every_isa_matches_golden(B, G, P, U, S, monkeypatch):
    # The row code is compiled for baseline x86-64, AVX2+FMA and AVX-512; the CPU's best one runs, and
    # DRIFT_FIELD_ISA caps it, so every variant this CPU can run is checked.
    inputs = case_inputs(B, G, P, U, S, 1.0, "random", seed=S)
    best = torch.ops.drift.field_cpu_isa()
    order = ["baseline", "avx2", "avx512"]
    for isa in order[: order.index(best) + 1]:
        monkeypatch.setenv("DRIFT_FIELD_ISA", isa)
        assert torch.ops.drift.field_cpu_isa() == isa
        check_backend("cpp", *inputs)
    monkeypatch.setenv("DRIFT_FIELD_ISA", "sse9")
    with pytest.raises(RuntimeError, match="DRIFT_FIELD_ISA must be 'auto', 'baseline', 'avx2' or 'avx512'"):
        drifting_field(*inputs, backend="cpp")


@pytest.mark.parametrize("normalization", ["y", "none"])
def test_field_cpp_normalizations(normalization):
    check_backend("cpp", *case_inputs(3, 6, 5, 3, 11, 1.0, "random", seed=7), normalization=normalization)


def test_field_cpp_temperatures_and_ties():
    check_backend("cpp", *tie_inputs(), temperatures=(0.03, 0.5), floor=TIE_FLOOR)
    # Every input equal: all distances hit the 1e-8 floor and the force vanishes (centred targets are equal,
    # so only rounding of their common mean is left; the fp32 reference leaves ~1e-2 of cancellation noise).
    x = torch.randn(1, 1, 5).expand(2, 4, 5)
    res = check_backend("cpp", x, x[:, :3], x[:, :2], torch.ones(2, 2), floor=TIE_FLOOR)
    assert float(res.force.abs().max()) < 1e-5


def test_field_cpp_common_offset():
    # A large shared offset makes the expanded-form distance cancel; the centred tiles stay accurate.
    gen, pos, neg, w = case_inputs(3, 8, 6, 4, 24, 1.0, "random", seed=3)
    check_backend("cpp", gen + 300.0, pos + 300.0, neg + 300.0, w)


def test_field_cpp_strided_views_and_two_batch_dims():
    gen, pos, neg, w = strided_inputs()
    res = check_backend("cpp", gen, pos, neg, w)
    assert res.force.shape == gen.shape and res.loss.shape == gen.shape[:2]
    # Three batch dims, read in place as well.
    gen, pos, neg, w = case_inputs(0, 5, 4, 3, 7, 1.0, "random", seed=5, batch_shape=(2, 2, 3))
    check_backend("cpp", gen, pos, neg, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_field_cpp_half_inputs(dtype):
    gen, pos, neg, w = case_inputs(3, 7, 6, 3, 12, 1.0, "random", dtype=dtype, seed=11)
    res = check_backend("cpp", gen, pos, neg, w)
    assert res.force.dtype == torch.float32


def test_field_cpp_fp64_matches_golden_tightly():
    gen, pos, neg, w = case_inputs(3, 7, 5, 3, 13, 1.0, "random", dtype=torch.float64, seed=2)
    res = drifting_field(gen, pos, neg, w, backend="cpp")
    gold = golden(gen, pos, neg, w)
    assert res.force.dtype == torch.float64
    torch.testing.assert_close(res.force, gold["force"], rtol=0, atol=1e-9)
    torch.testing.assert_close(res.loss, gold["loss"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.scale, gold["scale"].reshape(()), rtol=1e-12, atol=0)
    torch.testing.assert_close(res.force_rms, gold["force_rms"], rtol=1e-9, atol=0)


def test_field_cpp_mixed_input_dtypes():
    gen, pos, neg, w = case_inputs(2, 5, 4, 3, 9, 1.0, "random", seed=4)
    check_backend("cpp", gen, pos.bfloat16(), neg, w)


def test_field_cpp_opcheck():
    gen, pos, neg, w = case_inputs(2, 5, 4, 3, 9, 1.0, "random", seed=1)
    temps = list(R_LIST_DEFAULT)
    scale = torch.tensor(3.0)
    rms = torch.tensor([0.5, 1.0, 2.0])
    torch.library.opcheck(torch.ops.drift.field_scale_sums.default, (gen, pos, neg, w))
    torch.library.opcheck(torch.ops.drift.field_scale_sums.default, (gen, pos, None, None))
    _, gram = torch.ops.drift.field_scale_sums(gen, pos, neg, w)
    torch.library.opcheck(torch.ops.drift.field_sumsq.default, (gen, pos, neg, w, gram, scale, temps, "xy"))
    _, coef = torch.ops.drift.field_sumsq(gen, pos, neg, w, gram, scale, temps, "y")
    torch.library.opcheck(torch.ops.drift.field_force.default, (gen, pos, neg, coef, scale, rms))
    # The Gram route's larger state: the fake kernel gives the same shape.
    wide = case_inputs(2, 5, 4, 3, 90, 1.0, "random", seed=1)
    torch.library.opcheck(torch.ops.drift.field_scale_sums.default, wide)
    _, gram = torch.ops.drift.field_scale_sums(*wide)
    torch.library.opcheck(torch.ops.drift.field_sumsq.default, (*wide, gram, scale, temps, "xy"))


def test_field_cpp_compiles_fullgraph():
    gen, pos, neg, w = case_inputs(2, 5, 4, 3, 9, 1.0, "random", seed=6)

    def f(g, p, n, nw):
        res = drifting_field(g, p, n, nw, check_finite=False)  # "auto" -> cpp on CPU
        return res.force, res.loss, res.force_rms

    eager = f(gen, pos, neg, w)
    torch._dynamo.reset()
    dispatch._override(None)  # empties the backend cache: the first resolution now happens while tracing
    # aot_eager runs dynamo + AOT tracing through the fake kernels (what fullgraph needs) without the
    # seconds of C++ code generation inductor would add to the CPU suite.
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(gen, pos, neg, w)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_field_cpp_errors():
    gen, pos, neg, w = case_inputs(2, 5, 4, 3, 9, 1.0, "random", seed=6)
    meta = [t.to("meta") for t in (gen, pos, neg, w)]
    with pytest.raises(ValueError, match="backend='cpp' runs on CPU tensors only, but gen is on meta"):
        drifting_field(*meta, backend="cpp", check_finite=False)
    with pytest.raises(RuntimeError, match="neg dtype differs from gen dtype"):
        torch.ops.drift.field_scale_sums(gen, pos, neg.double(), w)
    _, gram = torch.ops.drift.field_scale_sums(gen, pos, neg, w)
    one = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="normalization must be"):
        torch.ops.drift.field_sumsq(gen, pos, neg, w, gram, one, [0.1], "xx")
    with pytest.raises(RuntimeError, match="gram must be the"):
        torch.ops.drift.field_sumsq(gen, pos, None, None, gram, one, [0.1], "xy")
    with pytest.raises(RuntimeError, match="gram has dtype"):
        torch.ops.drift.field_sumsq(gen, pos, neg, w, gram.double(), one, [0.1], "xy")
    _, coef = torch.ops.drift.field_sumsq(gen, pos, neg, w, gram, one, [0.1, 0.2, 0.3], "xy")
    with pytest.raises(RuntimeError, match="coef must be the .* with one rms per temperature"):
        torch.ops.drift.field_force(gen, pos, neg, coef, one, torch.ones(2))
    with pytest.raises(RuntimeError, match="coef has dtype"):
        torch.ops.drift.field_force(gen, pos, neg, coef.double(), one, torch.ones(3))


def test_auto_uses_cpp_on_cpu():
    dispatch._override(None)
    assert dispatch.resolve("auto", "cpu") == "cpp"
    gen, pos, neg, w = case_inputs(2, 5, 4, 3, 9, 1.0, "random", seed=8)
    a = drifting_field(gen, pos, neg, w)
    b = drifting_field(gen, pos, neg, w, backend="cpp")
    torch.testing.assert_close(a.force, b.force, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# process_group: two gloo ranks holding halves of the rows get the single-process field
# ---------------------------------------------------------------------------------------------------

def _rank_main(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gen, pos, neg, w = case_inputs(4, 6, 5, 3, 10, 1.0, "random", seed=21)
        sl = slice(rank * 2, rank * 2 + 2)
        res = drifting_field(gen[sl], pos[sl], neg[sl], w[sl], backend="cpp", process_group=dist.group.WORLD)
        torch.save({"force": res.force, "loss": res.loss, "scale": res.scale, "force_rms": res.force_rms},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_field_cpp_process_group(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for k in ("scale", "force_rms"):  # every rank holds the same global values
        torch.testing.assert_close(parts[0][k], parts[1][k], rtol=0, atol=0)
    gen, pos, neg, w = case_inputs(4, 6, 5, 3, 10, 1.0, "random", seed=21)
    scale = parts[0]["scale"]
    combined = DriftField(force=torch.cat([p["force"] for p in parts]), scale=scale,
                          scale_inputs=torch.clamp(scale / 10 ** 0.5, min=1e-3),
                          loss=torch.cat([p["loss"] for p in parts]), force_rms=parts[0]["force_rms"])
    # The split run differs from a single process only by the order of the global fp32 sums.
    check_backend("cpp", gen, pos, neg, w, res=combined)
    whole = drifting_field(gen, pos, neg, w, backend="cpp")
    torch.testing.assert_close(combined.force, whole.force, rtol=1e-4, atol=1e-5)
