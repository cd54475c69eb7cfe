"""The Triton kernels of the paper presets' training step compile for the GPUs they run on, checked on a CPU.

A trainer at the preset's per-GPU shapes lives on a fake CUDA device (drift.precompile.fake_cuda_trainer); its step's field calls
are listed with drift.precompile.field_variants and every kernel variant they launch is compiled for the
target GPU by Triton and ptxas (drift.kernels.aot): the compile the interpreter tier never does. On an H100
(sm_90) every variant of the latent presets must compile and fit in shared memory; where a candidate does not
fit (the pixel presets' 128 positives, an A100), the launch falls back to its next candidate, as it would on
that GPU, and that one must compile and fit. Also: the parallel precompile fills Triton's cache with exactly
what the launches look up, and a kernel that does not compile is reported, not hidden.

    pytest -q tests/kernels/test_gpu_compile.py     (triton installed, TRITON_INTERPRET unset; no GPU)
"""
import os

import pytest
import torch

from drift.kernels import HAS_TRITON

if HAS_TRITON:
    from drift.kernels import aot
pytestmark = [pytest.mark.skipif(not HAS_TRITON or not aot.available(),
                                 reason="needs triton's JIT (installed, TRITON_INTERPRET unset)"),
              pytest.mark.slow]  # (Triton + ptxas compiles: ~1-4 s per kernel variant, cached on disk after)

H100_SHARED = aot.TARGETS["sm90"][2] if HAS_TRITON else 0
KERNELS = {"_field_scale_kernel", "_field_sumsq_kernel", "_field_force_kernel", "_segment_sum_kernel"}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh Triton cache for the test (and its worker processes)."""
    d = tmp_path / "triton-cache"
    d.mkdir()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(d))
    return d


def _trainer(preset, labels, **kw):
    from drift.precompile import fake_cuda_trainer
    return fake_cuda_trainer(preset, labels, **kw)


def _check_fallbacks(log, limit):
    """Every error is a candidate over `limit` bytes of shared memory (none fails to compile), and every kernel
    has variants that fit. (That the call returned shows each launch found one: a launch with no candidate
    left raises.)"""
    for v in log:
        assert v.error is None or (v.error.startswith("out of resource") and v.shared > limit), \
            f"{v.kernel} ({v.options}): {v.error}"
    for name in {v.kernel for v in log}:
        assert any(v.error is None and v.shared <= limit for v in log if v.kernel == name), name


@pytest.mark.parametrize("preset, labels, options, calls", [
    ("ablation-B/2", 8, {}, "chunked"),          # the ablation's share of one 8-GPU node: 4 chunks of 2 labels
    ("ablation-B/2", 2, {}, "plain"),            # one chunk: the plain step, keys as strided encoder views
    ("B/2", 4, {"width": 640}, "chunked"),       # bf16 keys of the MAE-640 (4 of the 16 labels: same kernels)
])
def test_latent_presets_field_kernels_compile_for_h100(preset, labels, options, calls):
    from drift.precompile import fake_batch, field_variants
    from drift.step import field_calls
    tr = _trainer(preset, labels, feature_options=options)
    with tr.fake_mode, torch.compiler.set_stance("force_eager"):
        n_calls = len(field_calls(tr, fake_batch(tr)))
    assert (n_calls > 1) == (calls == "chunked")  # the chunked step calls the field once per key group
    log = field_variants(tr, "sm90", compile=True)
    assert KERNELS <= {v.kernel for v in log}
    bad = [f"{v.kernel} ({v.options}): {v.error}" for v in log if v.error]
    assert not bad, bad
    assert all(0 < v.shared <= H100_SHARED for v in log)
    assert all(v.spills in (0, None) for v in log), [(v.kernel, v.spills) for v in log if v.spills]


def test_pixel_preset_field_kernels_compile_for_h100_with_fallbacks():
    """B/16 (128 positives per label): pass 2's stored and Gram routes need ~400 KB of shared memory for its
    rows, more than an H100 has; their launches fall back to the streaming kernel, which compiles and fits."""
    from drift.precompile import field_variants
    tr = _trainer("B/16", 2)
    log = field_variants(tr, "sm90", compile=True)
    assert KERNELS <= {v.kernel for v in log}
    _check_fallbacks(log, H100_SHARED)


def test_parallel_precompile_for_a100_fills_the_cache_the_launches_read(cache_dir):
    """compile_field in worker processes, for an A100: its first round finds candidates over the A100's 163 KB
    (pass 3's 177 KB configurations), the next compiles what their launches fall back to; afterwards the
    step's launches find every variant in Triton's cache (they compile nothing new) and each fits."""
    from drift.precompile import compile_field, field_variants
    tr = _trainer("ablation-B/2", 8)
    out = compile_field(tr, "sm80", jobs=2)
    assert out["rounds"] >= 2 and out["over_shared_memory"] > 0 and not out["errors"], out
    entries = set(os.listdir(cache_dir))
    assert len(entries) >= out["variants"]
    log = field_variants(tr, "sm80", compile=True)
    assert len(log) == out["variants"]
    _check_fallbacks(log, aot.TARGETS["sm80"][2])
    assert set(os.listdir(cache_dir)) == entries


def test_a_kernel_that_does_not_compile_is_reported():
    import triton
    import triton.language as tl

    @triton.jit
    def broken(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.no_such_function(offs))

    x = torch.empty(64)
    with aot.record("sm90") as log:
        with pytest.raises(RuntimeError, match="does not compile for sm90"):
            broken[(1,)](x, BLOCK=64)
    assert len(log) == 1 and log[0].kernel == "broken" and "no_such_function" in log[0].error


def test_record_refuses_unknown_targets_and_nesting():
    with pytest.raises(ValueError, match="target"):
        with aot.record("sm75"):
            pass
    with aot.record("sm90"):
        assert aot.active()["sms"] == 132
        with pytest.raises(RuntimeError, match="nest"):
            with aot.record("sm80"):
                pass
    assert aot.active() is None and aot.sms() == 0


def test_compile_field_lists_a_real_trainers_step(tmp_path, cache_dir):
    """The path precompile_field takes on a GPU, on a real (CPU) Trainer: its modules run under a FakeTensorMode
    of their own, the chunked step's field calls are listed and compiled in a worker."""
    from drift.precompile import compile_field
    from drift.trainer import Trainer
    from tests.trainer_utils import loader_factory, tiny, toy_images
    x, y = toy_images(n=16, size=8)
    t = Trainer(tiny(tmp_path, features="pixel-multiscale", label_chunk=2, train_batch_size=4),
                loader_factory=loader_factory(x, y))
    try:
        out = compile_field(t, "sm90", jobs=2)
    finally:
        t.close()
    assert out["variants"] >= 4 and out["rounds"] == 1 and not out["errors"] and out["over_shared_memory"] == 0
    assert len(os.listdir(cache_dir)) >= out["variants"]


def test_precompile_is_a_no_op_without_cuda(tmp_path):
    from drift.precompile import precompile_field
    from tests.trainer_utils import loader_factory, tiny, toy_images
    from drift.trainer import Trainer
    x, y = toy_images(n=16, size=8)
    t = Trainer(tiny(tmp_path), loader_factory=loader_factory(x, y))
    try:
        assert precompile_field(t) is None
    finally:
        t.close()
