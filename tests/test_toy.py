"""The 2-D toy (paper Figs. 3-4): the generator driven only by drifting_loss finds both modes."""
import json
import os

from drift import toy


def test_toy_far_init_covers_both_modes_and_field_energy_falls():
    res = toy.train_toy("bimodal", "far", steps=300, seed=0, backend="reference")
    frac = res["coverage"]["mode_fractions"]
    assert min(frac) > 0.3, frac  # both modes hold a fair share (0.5 each in the target)
    assert res["coverage"]["off_support"] < 0.25, res["coverage"]
    # from far away the field energy falls by orders of magnitude (121x at the default 800 steps)
    assert res["loss_ratio"] > 30, (res["loss_start"], res["loss_end"])


def test_toy_cli_writes_pngs_and_metrics(tmp_path):
    out = tmp_path / "toy"
    assert toy.main(["--out", str(out), "--steps", "3", "--targets", "checkerboard", "--inits", "collapsed"]) == 0
    for name in ("toy_evolution.png", "toy_loss.png", "toy_metrics.json"):
        assert os.path.getsize(out / name) > 0
    runs = json.loads((out / "toy_metrics.json").read_text())["runs"]
    assert runs[0]["target"] == "checkerboard" and len(runs[0]["coverage"]["mode_fractions"]) == 8
