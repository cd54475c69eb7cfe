"""The Triton drifting-field backend against the fp64 golden: interpreter tier and GPU tier (the launch-
configuration logic, which needs no kernel run, is in tests/kernels/test_field_tuning.py).

Run: TRITON_INTERPRET=1 pytest -m interp tests/kernels/test_drifting_field_triton.py   (CPU, tiny shapes)
     pytest -m gpu tests/kernels/test_drifting_field_triton.py                        (CUDA, real sizes)
The interpreter executes every program serially in numpy, so the interp cases are few and tiny.
Tolerance: 2x the fp32 reference backend's own error against fp64, plus a small floor (field_cases.py). It
holds for the 3xTF32 GEMMs because every S chunk is translated by the row's first sample before the
products, so their ~2^-20 relative error applies to centred coordinates, while the fp32 reference forms
|x|^2 + |t|^2 - 2 x.t on raw ones; test_field_triton_gpu_distance_precision is the hard case for it.

The stored route (pass 1 keeps each row's target Gram matrix K in the row's force output, passes 2 and 3
read it back) is held to the same rule: its distances come from the same centred dot products, and its
||c T||^2 = sum c K c^T is guarded per row (drift.kernels.field_launch.GRAM_RTOL); the degenerate case below
shows the guard is needed for that rule and that it fires.

GPU tests run the first launch candidate (the untuned default) unless they request the `autotuned` fixture,
because tuning compiles every candidate for every new shape key. With tuning off the stored route runs
wherever K fits (S >= 228 at the default row shape (G, U, P) = (64, 16, 64)), split over column blocks where
the rows are fewer than the SMs and the columns hold >= 2 copies of K, the recompute route elsewhere.
"""
import os

import pytest
import torch

from drift.field import dispatch, drifting_field, drifting_field_reference
from tests.kernels.field_cases import TIE_FLOOR, case_inputs, check_backend, golden, strided_inputs, tie_inputs
from tests.utils import assert_close_to_ref, max_abs_err

try:  # triton may be missing on CPU-only installs: the fixture below skips then
    from drift.kernels import field_device as device_code
    from drift.kernels import field_launch as launch
    from drift.kernels import field_tuning as tuning
except ImportError:
    device_code = launch = tuning = None

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_interp = pytest.mark.skipif(not INTERP, reason="set TRITON_INTERPRET=1 before pytest starts")


@pytest.fixture(autouse=True)
def _tuner_off(fresh_tuner):
    """Every test runs with tuning off and a clean config cache (tests/kernels/conftest.py)."""
    yield


@pytest.fixture
def autotuned(fresh_tuner, monkeypatch):
    """Tuning on (GPU tests of the tuned path)."""
    monkeypatch.setattr(tuning, "AUTOTUNE", True)


def _forced(bs, gram):
    """The same S chunk for all three passes, and pass 2 by the Gram or the streaming route."""
    return tuning.forced_configs(scale=tuning.Config(bs, 8, 1), sumsq=tuning.Config(bs, 8, 1, gram),
                              force=tuning.Config(bs, 8, 1))


def _forced_stored(bs):
    """All three passes on the stored route with S chunk bs."""
    cfg = tuning.Config(bs, 8, 1, False, True)
    return tuning.forced_configs(scale=cfg, sumsq=cfg, force=cfg)


def _forced_route(route, G, U, P, S):
    """A route ("recompute", "stored", "split") with its untuned default configurations, forced: the GPU tests
    then share compiled kernels with the untuned runs (and the benchmark's precompile at the default row shape)."""
    stored, split = route != "recompute", route == "split"
    cfg = {k: tuning.candidates(k, G, U, P, S, stored=stored, split=split)[0] for k in ("scale", "sumsq", "force")}
    if split:
        cfg["reduce"] = tuning.candidates("reduce", G, U, P, S)[0]
    return tuning.forced_configs(**cfg)


def degenerate_inputs(B=1, S=32, ratio=300.0, seed=0):
    """One generated sample x with its positives at x + v and x - v + e and its negatives at x + u and
    x - u + e' (|v| = |u| = ratio, e, e' ~ N(0, 1)): the attractions and repulsions nearly cancel, so
    ||force|| is ~ratio times smaller than the targets' spread around x. A Gram estimate of ||force||^2 then
    loses ~ratio^2 of its relative precision, while the streaming sum (and the reference) lose ~ratio. At
    ratio 300 the unguarded stored route's loss error is ~4x the streaming route's (interpreter, Xeon with
    AVX-512; it missed the 2x rule against torch's reference by ~20x on an AMD EPYC, where the guarded route met
    it), since passes 2 and 3 form the force in different orders while the reference normalizes the very force
    it has."""
    g = torch.Generator().manual_seed(seed)

    def unit():
        v = torch.randn(B, 1, S, generator=g)
        return v / v.norm(dim=-1, keepdim=True)

    x = torch.randn(B, 1, S, generator=g)
    v, u = unit() * ratio, unit() * ratio
    pos = torch.cat([x + v, x - v + torch.randn(B, 1, S, generator=g)], 1)
    neg = torch.cat([x + u, x - u + torch.randn(B, 1, S, generator=g)], 1)
    return x, pos, neg, None


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
def test_field_triton_interp_routes_and_chunks(bs, gram):
    with _forced(bs, gram):
        for (B, G, P, U, S, scale, weights), opts in _ROUTE_CASES:
            check_backend("triton", *case_inputs(B, G, P, U, S, scale, weights, seed=B + G + S), **opts)
        check_backend("triton", *tie_inputs(B=1, G=4, P=3, U=2, S=5), floor=TIE_FLOOR)
        gen, pos, neg, w = case_inputs(1, 4, 3, 2, 6, 1.0, "random", seed=9)
        check_backend("triton", gen + 300.0, pos + 300.0, neg + 300.0, w)


# The stored route needs K (G*M + U^2 + U*P + P^2 floats) to fit in a row's G*S outputs, so its cases pick S
# accordingly; otherwise the same edge cases as above: several chunks with a ragged last one (S=37, 53),
# padded blocks (G=17 -> 32, U=1 -> 16, P=16), no negatives with the scale floors active, weights (random,
# ones, zero), the other normalizations, ties and a large common offset.
_STORED_CASES = [
    ((2, 5, 4, 3, 37, 1.0, "random"), {}),
    ((1, 17, 16, 1, 53, 1.0, "ones"), {}),
    ((2, 6, 5, 0, 20, 1e-5, None), {}),
    ((2, 6, 5, 2, 20, 1.0, "random"), {"normalization": "y"}),
    ((2, 6, 5, 2, 20, 1.0, "zero"), {"normalization": "none", "temperatures": (0.1,)}),
]


@pytest.mark.interp
@needs_interp
@pytest.mark.parametrize("bs", [16, 32])
def test_field_triton_interp_stored_route(bs):
    with _forced_stored(bs):
        for (B, G, P, U, S, scale, weights), opts in _STORED_CASES:
            assert tuning.stored_fits(G, U, P, S)
            res = check_backend("triton", *case_inputs(B, G, P, U, S, scale, weights, seed=B + G + S), **opts)
            assert res.force.shape == (B, G, S) and res.force.is_contiguous()
        check_backend("triton", *tie_inputs(B=1, G=4, P=3, U=2, S=16), floor=TIE_FLOOR)
        gen, pos, neg, w = case_inputs(1, 4, 3, 2, 16, 1.0, "random", seed=9)
        check_backend("triton", gen + 300.0, pos + 300.0, neg + 300.0, w)
        # A non-contiguous feature axis (strided views of [N, n, C, H, W] maps) and two batch dims.
        gen, pos, neg, w = strided_inputs(N=1, G=3, P=2, U=2, C=20, H=1, W=2)
        check_backend("triton", gen, pos, neg, w)


def _forced_split(bs, J):
    """All passes on the split stored route, J column blocks per row (S must give >= J blocks of 128)."""
    part, force = tuning.Config(bs, 8, 1, False, True, True), tuning.Config(bs, 8, 1, False, True, True)
    return tuning.forced_configs(scale=part, sumsq=tuning.Config(bs, 8, 1, False, True), force=force, split=J)


@pytest.mark.interp
@needs_interp
@pytest.mark.parametrize("J", [2, 3])
def test_field_triton_interp_split_route(J):
    # The split stored route: J column blocks per row (128 columns each, the last one wider), partial Gram
    # matrices summed per row, pass 3 per block from the block's own copy of K; with a ragged last chunk, no
    # negatives, weights, the other normalizations and a large offset. Its distances and sums are those of
    # the stored route up to the order of the S sums (blocks), so the same rule holds.
    S = 128 * J + 45
    with _forced_split(16, J):
        for (B, G, P, U, _, scale, weights), opts in [((2, 5, 4, 3, 0, 1.0, "random"), {}),
                                                      ((1, 6, 5, 0, 0, 1e-5, None), {"normalization": "y"}),
                                                      ((2, 3, 2, 2, 0, 1.0, "zero"), {"normalization": "none"})]:
            res = check_backend("triton", *case_inputs(B, G, P, U, S, scale, weights, seed=B + G + J), **opts)
            assert res.loss.shape == (B,)
        gen, pos, neg, w = case_inputs(1, 4, 3, 2, S, 1.0, "random", seed=9)
        check_backend("triton", gen + 300.0, pos + 300.0, neg + 300.0, w)
    with pytest.raises(ValueError, match="do not split"):
        with _forced_split(16, 2):
            drifting_field(*case_inputs(1, 4, 3, 2, 200, 1.0, "random"), backend="triton")


@pytest.mark.interp
@needs_interp
def test_field_triton_interp_stored_guard(monkeypatch):
    # Where ||force|| << the targets' spread the Gram estimate of pass 2 loses ~ratio^2 of its precision where
    # streaming loses ~ratio: the guard streams those rows instead, with the sums of squares (so RMS and loss)
    # of always streaming, bit for bit, and the unguarded estimate is clearly worse. The yardstick is the
    # streaming route itself: at this cancellation every fp32 route sits at its noise floor, and how far below
    # it torch's own fp32 reference lands depends on the CPU's matmul kernels (the 2x rule against it holds on
    # AMD EPYC and misses by ~1.4x for every route on a Xeon with AVX-512), so the 2x rule is checked with the
    # floor of such noise-floor cases (TIE_FLOOR, 1e-4 of the output's scale).
    gen, pos, neg, w = degenerate_inputs()
    gold = golden(gen, pos, neg, w)
    with _forced_stored(16):
        guarded = drifting_field(gen, pos, neg, w, backend="triton")
        monkeypatch.setattr(launch, "GRAM_RTOL", 0.0)  # always stream
        streamed = drifting_field(gen, pos, neg, w, backend="triton")
        monkeypatch.setattr(launch, "GRAM_RTOL", 1e30)  # never stream
        unguarded = drifting_field(gen, pos, neg, w, backend="triton")
    assert torch.equal(guarded.force_rms, streamed.force_rms) and torch.equal(guarded.loss, streamed.loss)
    err = lambda r: float((r.loss.double() - gold["loss"]).abs().max())  # noqa: E731
    assert err(unguarded) > 2 * err(streamed)
    check_backend("triton", gen, pos, neg, w, floor=TIE_FLOOR, res=guarded)
    # Ordinary inputs stay on the Gram estimate (the guard leaves them alone): same bits as never streaming.
    gen, pos, neg, w = case_inputs(2, 5, 4, 3, 37, 1.0, "random", seed=3)
    with _forced_stored(16):
        never = drifting_field(gen, pos, neg, w, backend="triton")
        monkeypatch.setattr(launch, "GRAM_RTOL", 2.0 ** -14)
        default = drifting_field(gen, pos, neg, w, backend="triton")
    assert torch.equal(never.force_rms, default.force_rms)


@pytest.mark.interp
@needs_interp
def test_field_triton_interp_stored_fp64_and_compile():
    # fp64 on the stored route (K in fp64, exact dots): as tight as the recompute route's fp64 check above.
    gen, pos, neg, w = case_inputs(2, 4, 3, 2, 16, 1.0, "random", dtype=torch.float64, seed=3)
    with _forced_stored(16):
        res = drifting_field(gen, pos, neg, w, backend="triton")
    gold = golden(gen, pos, neg, w)
    assert res.force.dtype == torch.float64
    torch.testing.assert_close(res.force, gold["force"], rtol=0, atol=1e-8)
    torch.testing.assert_close(res.scale, gold["scale"].reshape(()), rtol=1e-12, atol=0)
    torch.testing.assert_close(res.force_rms, gold["force_rms"], rtol=1e-9, atol=0)

    # torch.compile traces pass 3's in-place write into pass 1's buffer (a mutating custom op).
    gen, pos, neg, w = case_inputs(1, 4, 3, 2, 16, 1.0, "random", seed=12)

    def f(g, p, n, nw):
        r = drifting_field(g, p, n, nw, backend="triton", check_finite=False)
        return r.force, r.loss, r.scale, r.force_rms

    with _forced_stored(16):
        eager = f(gen, pos, neg, w)
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(gen, pos, neg, w)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.interp
@needs_interp
def test_field_triton_interp_default_route_and_plan_cache(monkeypatch):
    # Untuned, the stored route runs where K fits and the recompute route elsewhere; a repeated call reuses
    # the launch plan (no shape work, no candidate lists) and gives the same bits.
    fits = case_inputs(2, 5, 4, 3, 37, 1.0, "random", seed=4)
    small = case_inputs(2, 5, 4, 3, 9, 1.0, "random", seed=5)
    first = check_backend("triton", *fits)
    check_backend("triton", *small)
    routes = {key[3]: route for key, route in tuning.ROUTES.items()}  # key[3] is S
    assert routes == {37: 1, 9: 0}  # stored, recompute (no SM count under the interpreter: no split)
    n_plans = len(launch._PLANS)

    def boom(*a, **k):
        raise AssertionError("a repeated call redid per-shape work")

    monkeypatch.setattr(launch, "_make_plan", boom)
    monkeypatch.setattr(launch, "candidates", boom)
    again = drifting_field(*fits, backend="triton")
    assert len(launch._PLANS) == n_plans
    for k in ("force", "loss", "scale", "scale_inputs", "force_rms"):
        assert torch.equal(getattr(first, k), getattr(again, k)), k


def _split_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(x_ptr, hi_ptr, lo_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        hi, lo = device_code._split_tf32(tl.load(x_ptr + offs))
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
def test_field_triton_gpu_routes_on_ragged_shape(gram):
    # Non-power-of-two blocks and a ragged last chunk through both routes of pass 2.
    with _forced(32, gram):
        _check_on_gpu(*case_inputs(37, 13, 29, 7, 641, 1.0, "random", seed=641))


def _short(e):
    return f"{type(e).__name__}: {str(e).strip()[:120]}"


def _out_of_resources():
    """The exception types a launch raises when a config does not fit (names differ across triton versions)."""
    import triton.runtime.errors as errors
    return tuple(getattr(errors, n) for n in ("OutOfResources", "PTXASError") if hasattr(errors, n))


@pytest.mark.gpu
def test_field_triton_gpu_every_candidate_matches_golden():
    # The tuner may pick any candidate, so each one must be right at the default row shape. S = 256 is where
    # both routes of pass 2 are candidates; the passes are paired up so each candidate compiles once.
    _check_candidate_pairings(S=256, seed=21)


def _check_candidate_pairings(S, seed, **route):
    """Run every launch candidate of the three passes at the default row shape against the golden, paired up so
    each candidate compiles once; candidates that do not fit are skipped, as the tuner drops them."""
    gen, pos, neg, w = case_inputs(16, 64, 64, 16, S, 1.0, "random", seed=seed)
    cands = {k: tuning.candidates(k, 64, 16, 64, S, **route) for k in ("scale", "sumsq", "force")}
    n = max(len(c) for c in cands.values())
    ran, skipped = 0, []
    for i in range(n):
        cfg = {k: c[i % len(c)] for k, c in cands.items()}
        try:
            with tuning.forced_configs(**cfg):
                _check_on_gpu(gen, pos, neg, w)
            ran += 1
        except _out_of_resources() as e:
            skipped.append(({k: c.label() for k, c in cfg.items()}, _short(e)))
    print(f"{ran} pairings ran {route}; did not fit: {skipped}")
    assert ran >= 1


@pytest.mark.gpu
@pytest.mark.parametrize("rows,S", [("many", 64), ("many", 256), ("few", 640)])
def test_field_triton_gpu_autotuned_matches_golden(autotuned, rows, S):
    # S = 64: K does not fit the output, the recompute route only (no route decision). S = 256 with more rows
    # than SMs: the recompute and stored routes are tuned whole and timed, then the faster one runs; with 8
    # rows at S = 640 the split stored route is a third contender.
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    B = n_sm + 4 if rows == "many" else 8  # more rows than SMs: the tuning bucket of real batches
    gen, pos, neg, w = case_inputs(B, 64, 64, 16, S, 1.0, "random", seed=22)
    res = _check_on_gpu(gen, pos, neg, w)
    log = tuning.tuning_log()
    routes = [e for e in log if e["kernel"] == "route"]
    if S == 64:
        assert not routes and sorted(e["kernel"] for e in log) == ["force", "scale", "sumsq"], log
    else:
        (route,) = routes
        names = {"recompute", "stored"} | ({"split"} if rows == "few" else set())
        assert set(route["times_ms"]) == names, route
        kernels = [e for e in log if e["kernel"] != "route"]  # the route entry names the winner in its "route"
        assert sorted(e["kernel"] for e in kernels if e["route"] == "stored") == ["force", "scale", "sumsq"], log
        if rows == "few":
            split = sorted(e["kernel"] for e in kernels if e["route"] == "split")
            assert split == ["force", "reduce", "scale", "sumsq"], log
        print(f"route {route['best']}: {route['times_ms']}")
    for e in log:
        assert e["best"] in e["times_ms"] and all(t > 0 for t in e["times_ms"].values()), e
    # The choice is cached: a second call does not tune again and gives the same bits.
    again = drifting_field(*_cuda(gen, pos, neg, w), backend="triton")
    assert len(tuning.tuning_log()) == len(log)
    assert torch.equal(again.force.cpu(), res.force)


@pytest.mark.gpu
@pytest.mark.parametrize("B,G,P,U,S,offset", [(64, 64, 64, 16, 640, 0.0), (37, 13, 29, 7, 641, 0.0),
                                              (8, 64, 64, 16, 4096, 30.0)])
def test_field_triton_gpu_stored_route_matches_golden(B, G, P, U, S, offset):
    # The stored route at the default row shape, on a ragged one (padded blocks, ragged last chunk) and, with a
    # large common offset at S = 4096, the hard case for distances from a Gram matrix (K_gg + K_mm - 2 K_gm,
    # of translated chunks: the same dot products as the recompute route's).
    assert tuning.stored_fits(G, U, P, S)
    gen, pos, neg, w = case_inputs(B, G, P, U, S, 1.0, "random", seed=S)
    with _forced_route("stored", G, U, P, S):
        _check_on_gpu(gen + offset, pos + offset, neg + offset, w)


@pytest.mark.gpu
def test_field_triton_gpu_every_stored_candidate_matches_golden():
    # Every stored-route candidate at S = 640 (K fits from S = 228), paired up as above.
    _check_candidate_pairings(S=640, seed=23, stored=True)


@pytest.mark.gpu
@pytest.mark.parametrize("B,G,P,U,S,offset", [(8, 64, 64, 16, 4096, 0.0), (8, 64, 64, 16, 640, 30.0),
                                              (5, 13, 29, 7, 641, 0.0)])
def test_field_triton_gpu_split_route_matches_golden(B, G, P, U, S, offset):
    # The split stored route with the blocks the rows get on this GPU (one program per SM: 16 blocks at
    # S = 4096, 2 at 640 and 641), at the default row shape (with a large offset) and a ragged one.
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    J, W = tuning.split_blocks(G, U, P, S, B, n_sm)
    assert J >= 2, (J, W)
    gen, pos, neg, w = case_inputs(B, G, P, U, S, 1.0, "random", seed=S + 1)
    with _forced_route("split", G, U, P, S):
        _check_on_gpu(gen + offset, pos + offset, neg + offset, w)


@pytest.mark.gpu
def test_field_triton_gpu_every_split_candidate_matches_golden():
    # Every split-route candidate (pass 1 per block, reduction, pass 3 per block) at 8 rows, S = 4096.
    gen, pos, neg, w = case_inputs(8, 64, 64, 16, 4096, 1.0, "random", seed=24)
    cands = {k: tuning.candidates(k, 64, 16, 64, 4096, stored=True, split=True) for k in ("scale", "force", "reduce")}
    n = max(len(c) for c in cands.values())
    ran, skipped = 0, []
    for i in range(n):
        cfg = {k: c[i % len(c)] for k, c in cands.items()}
        try:
            with tuning.forced_configs(sumsq=tuning.Config(32, 8, 1, False, True), **cfg):
                _check_on_gpu(gen, pos, neg, w)
            ran += 1
        except _out_of_resources() as e:  # the tuner drops these too
            skipped.append(({k: c.label() for k, c in cfg.items()}, _short(e)))
    print(f"{ran} split pairings ran; did not fit: {skipped}")
    assert ran >= 1


@pytest.mark.gpu
def test_field_triton_gpu_stored_guard(monkeypatch):
    # The degenerate case of the interpreter test with 3xTF32 products. Here the 2x rule is out of reach for
    # any route (3xTF32's ~2^-20 per product times the ~300x cancellation exceeds 2x the fp32 reference's
    # error), so the test checks the mechanism: the guard streams every temperature (same bits as always
    # streaming), and its loss (the observable most sensitive to the RMS: the force is normalized by it) is
    # >= 5x closer to fp64 than with the unguarded Gram estimate, whose error grows with the square of the
    # cancellation, the streamed one's linearly (the interpreter shows ~40x).
    gen, pos, neg, w = degenerate_inputs()
    gold = golden(gen, pos, neg, w)

    def run(rtol):
        monkeypatch.setattr(launch, "GRAM_RTOL", rtol)
        return _cpu_result(drifting_field(*_cuda(gen, pos, neg, w), backend="triton"))

    with _forced_route("stored", 1, 2, 2, 32):
        guarded, streamed, never = run(2.0 ** -14), run(0.0), run(1e30)
    assert torch.equal(guarded.force_rms, streamed.force_rms) and torch.equal(guarded.force, streamed.force)
    err_guarded = max_abs_err(guarded.loss, gold["loss"])
    err_never = max_abs_err(never.loss, gold["loss"])
    print(f"loss error: guarded {err_guarded:.3e}, unguarded {err_never:.3e}")
    assert not err_never <= 5 * err_guarded  # (a NaN from a negative unguarded estimate passes too)


@pytest.mark.gpu
def test_field_triton_gpu_split_and_3xtf32_products():
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
        tl.store(out_ptr + i[:, None] * 64 + i[None, :], device_code._mma(a, b, zero, PREC))

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
    assert dispatch.resolve("auto", "cuda") == "triton"
