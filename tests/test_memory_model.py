"""benchmarks/memory_model.py: its instruments, its width extrapolation, and its peaks against a live-memory
tracker on the real step (plain and label-chunked) at a small size.

    pytest -q tests/test_memory_model.py
"""
import pytest
import torch
import torch.nn.functional as F

from benchmarks import memory_model as mm

PRESET = "ablation-B/2"
# 1 head of 64, a one-block-per-stage MAE, 16x16 latents: each measured step takes a fraction of a second
SMALL = dict(hidden=64, layers=(1, 1, 1, 1), gen=2, pos=2, unc=1, image_size=16)
_FITS = {}


def _fit(widths=(32, 64), bf16_keys=False):
    key = (widths, bf16_keys)
    if key not in _FITS:
        _FITS[key] = mm.fit_coefficients(PRESET, widths=widths, bf16_keys=bf16_keys, log=lambda *a: None, **SMALL)
    return _FITS[key]


def test_cuda_autocast_policy_runs_group_norm_in_fp32_under_cpu_autocast():
    x = torch.randn(2, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.group_norm(x.bfloat16(), 4).dtype == torch.bfloat16  # the CPU policy
        with mm.cuda_autocast_policy():
            y = F.group_norm(x.bfloat16(), 4)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.group_norm(x.bfloat16().float(), 4))
    assert F.group_norm(x, 4).dtype == torch.float32  # restored


def test_live_tracker_follows_allocations_and_frees():
    tr = mm.LiveTracker()
    with tr:
        a = torch.empty(1000)
        b = a.view(10, 100)  # a view: no new storage
        c = torch.empty(500, dtype=torch.float64)
        assert tr.current == 4000 + 4000
        del a, c
        assert tr.current == 4000  # `b` keeps a's storage alive
        tr.mark()
        del b
        d = torch.empty(10)
    assert tr.current == 40 and tr.peak == 4000
    del d


def test_width_extrapolation_matches_a_direct_measurement():
    """Per-sample terms fitted at encoder widths 32 and 64 predict a direct measurement at width 128."""
    co, direct = _fit((32, 64)), _fit((96, 128))
    lin = mm.Coefficients._lin
    for name in ("enc", "loss", "gen_keys", "real_keys", "keys_unsaved"):
        want, got = lin(getattr(direct, name), 128), lin(getattr(co, name), 128)
        assert got == pytest.approx(want, rel=0.02), name
    assert lin(co.enc, 128) > 3 * lin(co.loss, 128) > 0  # the encoder keeps several times what the loss does
    # Generator terms are measured at the generator's own width: per block, and the same at any encoder width.
    assert co.gen[1] > 0 and co.gen == pytest.approx(direct.gen, rel=1e-6)


# plain (peak in the field), chunked with the peak in a chunk's backward (C), in bf16 keys, and in the field pass (B)
@pytest.mark.parametrize("labels,chunk,bf16_keys", [(3, 0, False), (4, 1, False), (4, 2, True), (12, 1, False)])
def test_predicted_peak_matches_the_tracked_step(tmp_path, labels, chunk, bf16_keys):
    """The model's peak (without the state that exists before the step) against the live bytes the real step
    allocates, at a size the CPU runs in a second; the coefficients come from other label counts (1 and 2)
    and other widths (32 and 64)."""
    width, depth = 48, 2
    co = _fit(bf16_keys=bf16_keys)
    cfg = mm.small_config(PRESET, labels, width=width, depth=depth, label_chunk=chunk, bf16_keys=bf16_keys,
                          tmp=str(tmp_path), hidden=SMALL["hidden"], layers=SMALL["layers"], gen=SMALL["gen"],
                          pos=SMALL["pos"], unc=SMALL["unc"], image_size=SMALL["image_size"])
    tracked = mm.measure_step(cfg, image_size=SMALL["image_size"]).peak
    shape = mm.item_shape_of(cfg, SMALL["image_size"])
    fixed = mm.fixed_bytes(cfg, shape, 4, width, SMALL["layers"])
    in_step = {k: fixed[k] for k in ("gradients", "autocast weight copies")}  # allocated inside the step
    layout = mm.key_layout(width, shape, SMALL["layers"])
    pred = mm.predict(co, cfg, labels, chunk, width, depth, in_step, layout)
    assert pred["peak"] == pytest.approx(tracked, rel=0.1), (pred["peak"] / 2**20, tracked / 2**20, pred["phases"])
