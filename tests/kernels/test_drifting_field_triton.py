"""The Triton drifting-field backend against the fp64 golden: interpreter tier, CPU unit tests, GPU tier.

Run: TRITON_INTERPRET=1 pytest -m interp tests/kernels/test_drifting_field_triton.py   (CPU, tiny shapes)
     pytest -m gpu tests/kernels/test_drifting_field_triton.py                        (CUDA, real sizes)
     pytest tests/kernels/test_drifting_field_triton.py -m "not gpu and not interp"   (launch-config logic)
The interpreter executes every program serially in numpy, so the interp cases are few and tiny.
Tolerance: style §5.2 (2x the fp32 reference backend's own error against fp64, plus a small floor). It
holds for the 3xTF32 GEMMs because every S chunk is translated by the row's first sample before the
products, so their ~2^-20 relative error applies to centred coordinates, while the fp32 reference forms
|x|^2 + |t|^2 - 2 x.t on raw ones; test_field_triton_gpu_distance_precision is the hard case for it.

GPU tests run the first launch candidate (the untuned default) unless they request the `autotuned` fixture,
because tuning compiles every candidate for every new shape key.
"""
import os

import pytest
import torch

from drift import backends
from drift.field import drifting_field, drifting_field_reference
from tests.kernels.field_cases import TIE_FLOOR, case_inputs, check_backend, golden, strided_inputs, tie_inputs
from tests.utils import assert_close_to_ref, max_abs_err

try:  # the module (and triton) may be missing on CPU-only installs: the fixture below skips then
    from kernels import drifting_field as _kdf
except ImportError:
    _kdf = None

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_interp = pytest.mark.skipif(not INTERP, reason="set TRITON_INTERPRET=1 before pytest starts")


@pytest.fixture(autouse=True)
def kdf(monkeypatch):
    """The kernel module, with tuning off and a clean config cache for every test."""
    if _kdf is None or not backends.has_triton():
        pytest.skip("triton is not installed")
    monkeypatch.setattr(_kdf, "AUTOTUNE", False)
    _kdf.reset_tuning()
    yield _kdf
    _kdf.reset_tuning()


@pytest.fixture
def autotuned(kdf, monkeypatch):
    """Tuning on (GPU tests of the tuned path)."""
    monkeypatch.setattr(kdf, "AUTOTUNE", True)
    return kdf


def _forced(kdf, bs, gram):
    """The same S chunk for all three passes, and pass 2 by the Gram or the streaming route."""
    return kdf.forced_configs(scale=kdf.Config(bs, 8, 1), sumsq=kdf.Config(bs, 8, 1, gram),
                              force=kdf.Config(bs, 8, 1))


# ---------------------------------------------------------------------------------------------------
# Interpreter tier (CPU, fp32, tiny shapes)
# ---------------------------------------------------------------------------------------------------

@pytest.mark.interp
@needs_interp
@pytest.mark.parametrize("B,G,P,U,S,scale,weights", [
    (2, 5, 4, 3, 9, 1.0, "random"),     # weird sizes, weighted negatives
    (2, 1, 1, 0, 1, 1.0, None),         # G = P = S = 1, no negatives
    (2, 6, 5, 2, 20, 1e-5, "random"),   # scale floors active (several chunks: the routes test below)
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


# Both routes of pass 2 and two chunk widths, on the cases where they differ: several S chunks with a
# ragged last one (S=37), blocks padded inside (G=17 -> 32 rows, U=1 -> 16), no negatives, the other
# normalizations, ties, and a large common offset (the Gram blocks are formed from translated chunks).
_ROUTE_CASES = [
    ((2, 5, 4, 3, 37, 1.0, "random"), {}),
    ((1, 17, 16, 1, 21, 1.0, "ones"), {}),
    ((2, 6, 5, 0, 20, 1e-5, None), {}),
    ((2, 6, 5, 2, 20, 1.0, "random"), {"normalization": "y"}),
    ((2, 6, 5, 2, 20, 1.0, "zero"), {"normalization": "none", "temperatures": (0.1,)}),
]


@pytest.mark.interp
@needs_interp
@pytest.mark.parametrize("bs,gram", [(16, True), (32, True), (16, False), (32, False)])
def test_field_triton_interp_routes_and_chunks(kdf, bs, gram):
    with _forced(kdf, bs, gram):
        for (B, G, P, U, S, scale, weights), opts in _ROUTE_CASES:
            check_backend("triton", *case_inputs(B, G, P, U, S, scale, weights, seed=B + G + S), **opts)
        check_backend("triton", *tie_inputs(B=1, G=4, P=3, U=2, S=5), floor=TIE_FLOOR)
        gen, pos, neg, w = case_inputs(1, 4, 3, 2, 6, 1.0, "random", seed=9)
        check_backend("triton", gen + 300.0, pos + 300.0, neg + 300.0, w)


def _split_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(x_ptr, hi_ptr, lo_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        hi, lo = _kdf._split_tf32(tl.load(x_ptr + offs))
        tl.store(hi_ptr + offs, hi)
        tl.store(lo_ptr + offs, lo)

    return split_kernel


def _check_split(device):
    """_split_tf32: hi has a 10-bit mantissa, hi + lo == x exactly, |lo| <= 2^-11 |x| (round to nearest).
    These make the 3xTF32 product a_hi b_hi + a_hi b_lo + a_lo b_hi miss only a_lo b_lo (<= 2^-22 |ab|) and
    the truncation of the lo parts to TF32 inside the tensor cores (<= 2^-10 |lo| each), ~2^-20 in all."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, generator=g) * torch.logspace(-30, 30, 256)
    x[:3] = torch.tensor([0.0, 1.0 + 2.0 ** -11, -(1.0 + 2.0 ** -11)])  # ties round away from zero
    x = x.to(device)
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    _split_kernel()[(1,)](x, hi, lo, N=256)
    assert torch.equal(hi + lo, x)
    assert bool(((hi.view(torch.int32) & 0x1FFF) == 0).all())
    assert bool((lo.abs() <= x.abs() * 2.0 ** -11).all())
    assert hi[1] == 1.0 + 2.0 ** -10 and hi[2] == -(1.0 + 2.0 ** -10)


@pytest.mark.interp
@needs_interp
def test_field_triton_interp_split_is_exact():
    _check_split("cpu")


@pytest.mark.interp
@needs_interp
def test_field_triton_interp_warm_compile(kdf):
    # The benchmark's parallel precompile path: every (kernel, candidate) of compile_tasks launches on one row.
    tasks = kdf.compile_tasks(5, 3, 4, S_values=(20, 4096))
    assert {k for k, _ in tasks} == {"scale", "sumsq", "force"} and any(c.GRAM for _, c in tasks)
    for kernel, cfg in tasks[:3] + [t for t in tasks if t[1].GRAM][:1]:
        assert kdf.warm_compile(kernel, cfg, torch.float32, 5, 3, 4, S=20, device="cpu") == "ok"


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
# Launch candidates (plain Python: any tier)
# ---------------------------------------------------------------------------------------------------

def test_field_triton_candidates(kdf):
    for S in (1, 7, 64, 256, 640, 4096):
        for kernel in ("scale", "sumsq", "force"):
            cands = kdf.candidates(kernel, 64, 16, 64, S)
            assert cands and len(set(cands)) == len(cands)
            assert all(16 <= c.BS <= max(16, triton_next_pow2(S)) for c in cands)
            assert all(c.GRAM is False for c in cands) or kernel == "sumsq"
    # Pass 2's route: the Gram route where it needs under half the multiply-adds of streaming (with the
    # streaming default last, in case no Gram configuration fits), the streaming route only where it needs
    # under half of the Gram route's, both in between.
    assert kdf.gram_ratio(64, 16, 64, 4096, 3) < 0.5 and kdf.gram_ratio(64, 16, 64, 64, 3) > 2.0
    wide = kdf.candidates("sumsq", 64, 16, 64, 4096)
    assert all(c.GRAM for c in wide[:-1]) and wide[-1] == kdf.candidates("sumsq", 64, 16, 64, 64)[0]
    assert {c.GRAM for c in kdf.candidates("sumsq", 64, 16, 64, 64)} == {False}
    assert {c.GRAM for c in kdf.candidates("sumsq", 64, 16, 64, 256)} == {True, False}
    assert kdf.Config(32, 8, 2, True).label() == "BS32/w8/s2/gram"
    with pytest.raises(ValueError, match="unknown kernels"):
        with kdf.forced_configs(bogus=kdf.Config(16, 4, 1)):
            pass


def test_field_triton_tuner_logic(kdf, monkeypatch):
    # The tuner with a fake launch and fake timings: it keeps the fastest candidate that launches, logs the
    # others' times and the failures, launches the winner last, and later calls reuse it without timing.
    cands = [kdf.Config(32, 8, 1), kdf.Config(16, 8, 2), kdf.Config(64, 8, 2), kdf.Config(32, 8, 3)]
    fake_ms = {cands[0]: 3.0, cands[1]: 1.0, cands[3]: 2.0}
    calls = []

    def launch(c):
        calls.append(c)
        if c == cands[2]:
            raise RuntimeError("out of resource: shared memory, Required: 300000, Hardware limit: 232448")

    monkeypatch.setattr(kdf, "INTERPRETED", False)
    monkeypatch.setattr(kdf, "AUTOTUNE", True)
    monkeypatch.setattr(kdf, "_time_ms", lambda run, best: (run(), fake_ms[calls[-1]])[1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    assert kdf._tuned_launch("force", ("k",), cands, launch) == cands[1]
    assert calls[-1] == cands[1]
    (entry,) = kdf.tuning_log()
    assert entry["best"] == cands[1].label() and set(entry["times_ms"]) == {cands[i].label() for i in (0, 1, 3)}
    assert "shared memory" in entry["errors"][cands[2].label()]
    calls.clear()
    assert kdf._tuned_launch("force", ("k",), cands, launch) == cands[1] and calls == [cands[1]]
    # Tuning off: the first candidate that launches, no timing; a failure is logged, not raised.
    monkeypatch.setattr(kdf, "AUTOTUNE", False)
    assert kdf._tuned_launch("scale", ("k",), cands[2:], launch) == cands[3]
    assert kdf.tuning_log()[-1]["errors"].keys() == {cands[2].label()}
    with pytest.raises(RuntimeError, match="no launch configuration"):
        kdf._tuned_launch("sumsq", ("k",), cands[2:3], launch)


def triton_next_pow2(n):
    import triton
    return triton.next_power_of_2(n)


# ---------------------------------------------------------------------------------------------------
# GPU tier (real sizes, bf16, compile, every launch candidate, the tuner)
# ---------------------------------------------------------------------------------------------------

def _cuda(*ts):
    return [t.cuda() if t is not None else None for t in ts]


def _cpu_result(res):
    return type(res)(**{k: getattr(res, k).cpu() for k in ("force", "scale", "scale_inputs", "loss", "force_rms")})


def _check_on_gpu(gen, pos, neg, w, **opts):
    """Run the triton backend on CUDA copies of CPU inputs and check it against the golden on CPU."""
    res = drifting_field(*_cuda(gen, pos, neg, w), backend="triton", **opts)
    return check_backend("triton", gen, pos, neg, w, res=_cpu_result(res), **opts)


@pytest.mark.gpu
@pytest.mark.parametrize("B,G,P,U,S", [(64, 64, 64, 16, 256), (24, 64, 64, 16, 4096), (37, 13, 29, 7, 641),
                                       (16, 1, 1, 0, 1)])
def test_field_triton_gpu_matches_golden(B, G, P, U, S):
    _check_on_gpu(*case_inputs(B, G, P, U, S, 1.0, "random" if U else None, seed=S))


@pytest.mark.gpu
@pytest.mark.parametrize("gram", [True, False])
def test_field_triton_gpu_routes_on_ragged_shape(kdf, gram):
    # Non-power-of-two blocks and a ragged last chunk through both routes of pass 2.
    with _forced(kdf, 32, gram):
        _check_on_gpu(*case_inputs(37, 13, 29, 7, 641, 1.0, "random", seed=641))


def _short(e):
    return f"{type(e).__name__}: {str(e).strip()[:120]}"


def _out_of_resources():
    """The exception types a launch raises when a config does not fit (names differ across triton versions)."""
    import triton.runtime.errors as errors
    return tuple(getattr(errors, n) for n in ("OutOfResources", "PTXASError") if hasattr(errors, n))


@pytest.mark.gpu
def test_field_triton_gpu_every_candidate_matches_golden(kdf):
    # The tuner may pick any candidate, so each one must be right at the SPEC row shape. S = 256 is where
    # both routes of pass 2 are candidates; the passes are paired up so each candidate compiles once.
    gen, pos, neg, w = case_inputs(16, 64, 64, 16, 256, 1.0, "random", seed=21)
    cands = {k: kdf.candidates(k, 64, 16, 64, 256) for k in ("scale", "sumsq", "force")}
    n = max(len(c) for c in cands.values())
    ran, skipped = 0, []
    for i in range(n):
        cfg = {k: c[i % len(c)] for k, c in cands.items()}
        try:
            with kdf.forced_configs(**cfg):
                _check_on_gpu(gen, pos, neg, w)
            ran += 1
        except _out_of_resources() as e:  # the tuner drops these too
            skipped.append(({k: c.label() for k, c in cfg.items()}, _short(e)))
    print(f"{ran} pairings ran; did not fit: {skipped}")
    assert ran >= 1


@pytest.mark.gpu
def test_field_triton_gpu_autotuned_matches_golden(autotuned):
    kdf = autotuned
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    B = n_sm + 4  # more rows than SMs: the tuning bucket of real batches
    gen, pos, neg, w = case_inputs(B, 64, 64, 16, 256, 1.0, "random", seed=22)
    res = _check_on_gpu(gen, pos, neg, w)
    log = kdf.tuning_log()
    assert sorted(e["kernel"] for e in log) == ["force", "scale", "sumsq"], log
    for e in log:
        assert e["best"] in e["times_ms"] and all(t > 0 for t in e["times_ms"].values()), e
    # The choice is cached: a second call does not tune again and gives the same bits.
    again = drifting_field(*_cuda(gen, pos, neg, w), backend="triton")
    assert len(kdf.tuning_log()) == len(log)
    assert torch.equal(again.force.cpu(), res.force)


@pytest.mark.gpu
def test_field_triton_gpu_split_and_3xtf32_products(kdf):
    # The split on the GPU's compiler, then one _mma product [64, 256] x [256, 64] against fp64, relative to
    # sum_k |a_ik b_kj|: 3xTF32 is ~2^-20 per product (_check_split) plus the tensor cores' fp32 accumulation
    # (up to ~2^-23 sqrt(K) = 2^-19 when it truncates), so 2^-16 bounds it with margin; plain TF32 (2^-11 per
    # product, ~2^-11 / sqrt(K) = 2^-15 typical, a few times more at the worst of 4096 entries) exceeds it,
    # so the bound also shows the split path was taken.
    import triton
    import triton.language as tl

    _check_split("cuda")

    @triton.jit
    def mma_kernel(a_ptr, b_ptr, out_ptr, PREC: tl.constexpr):
        i = tl.arange(0, 64)
        k = tl.arange(0, 256)
        a = tl.load(a_ptr + i[:, None] * 256 + k[None, :])
        b = tl.load(b_ptr + k[:, None] * 64 + i[None, :])
        zero = tl.zeros((64, 64), dtype=tl.float32) * tl.load(a_ptr)
        tl.store(out_ptr + i[:, None] * 64 + i[None, :], _kdf._mma(a, b, zero, PREC))

    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(64, 256, generator=g).cuda(), torch.randn(256, 64, generator=g).cuda()
    exact = a.double() @ b.double()
    bound = (a.double().abs() @ b.double().abs()) * 2.0 ** -16
    out = torch.empty(64, 64, device="cuda")
    mma_kernel[(1,)](a, b, out, PREC="split", num_warps=8)
    assert bool(((out.double() - exact).abs() <= bound).all()), float(((out.double() - exact).abs() / bound).max())
    mma_kernel[(1,)](a, b, out, PREC="tf32", num_warps=8)  # plain TF32: the bound must be able to fail
    assert not bool(((out.double() - exact).abs() <= bound).all())


@pytest.mark.gpu
def test_field_triton_gpu_distance_precision():
    # A large common offset and S = 4096: plain TF32 products (10-bit mantissa) would miss the bound by
    # orders of magnitude; 3xTF32 plus the translation must stay within 2x the fp32 reference's error.
    gen, pos, neg, w = case_inputs(8, 64, 64, 16, 4096, 1.0, "random", seed=5)
    _check_on_gpu(gen + 30.0, pos + 30.0, neg + 30.0, w)


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
