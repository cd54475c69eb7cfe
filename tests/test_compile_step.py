"""Regional torch.compile of the step (cfg.compile): the repeated blocks are compiled in place, the warm-up
prints a progress line with the elapsed time, and the compiled run follows the eager one.

    pytest -q tests/test_compile_step.py
"""
import io
import time

import pytest

from drift.step import ProgressTicker, compile_regions
from drift.trainer import Trainer, train
from tests.trainer_utils import loader_factory, tiny, toy_images


def test_progress_ticker_prints_elapsed_lines():
    out = io.StringIO()
    with ProgressTicker("warming up", every=0.05, stream=out):
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert lines[0] == "warming up: started" and lines[-1].startswith("warming up: done in")
    ticks = [line for line in lines[1:-1] if line.endswith("s elapsed")]  # the periodic progress lines
    assert ticks and ticks[0].startswith("warming up: ")
    quiet = io.StringIO()
    with ProgressTicker("x", every=0.01, enabled=False, stream=quiet):
        time.sleep(0.05)
    assert quiet.getvalue() == ""


def test_compile_regions_picks_the_repeated_blocks():
    from drift.features.mae_resnet import MAEConfig, MAEFeatures, MAEResNetEncoder
    from drift.model import DriftDiT
    gen = DriftDiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=3, num_heads=2, num_classes=4)
    enc = MAEFeatures(MAEResNetEncoder(MAEConfig(in_channels=1, width=8, layers=(1, 2, 1, 1), num_classes=0)))
    keys = set(gen.state_dict()) | set(enc.state_dict())
    assert compile_regions(gen, enc) == 3 + 5
    assert set(gen.state_dict()) | set(enc.state_dict()) == keys  # state_dict names unchanged (no _orig_mod)


@pytest.mark.slow
def test_compiled_run_follows_the_eager_run(tmp_path, capfd):
    x, y = toy_images(n=64, size=8)
    eager = train(tiny(tmp_path / "e", max_steps=2), loader_factory=loader_factory(x, y))
    capfd.readouterr()
    t = Trainer(tiny(tmp_path / "c", max_steps=2, compile=True), loader_factory=loader_factory(x, y))
    try:
        compiled = t.run()
        assert t.compile_warmup_s > 0
    finally:
        t.close()
    err = capfd.readouterr()
    text = err.out + err.err
    assert "torch.compile warm-up (one step on throwaway inputs): started" in text
    assert "torch.compile warm-up (one step on throwaway inputs): done in" in text
    for a, b in zip(eager["history"], compiled["history"]):
        assert a["step"] == b["step"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["grad_norm"] == pytest.approx(a["grad_norm"],
                                                                                                     rel=1e-3)
