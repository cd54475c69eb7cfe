"""Checkpoint files: atomic layout, pruning, and clear errors for corrupt or foreign checkpoints.

    pytest -q tests/test_checkpoint.py
"""
import hashlib
import json
import os

import pytest

from drift import checkpoint as ckpt
from drift.config import TrainConfig
from drift.trainer import Trainer, train
from tests.trainer_utils import loader_factory, toy_images

X, Y = toy_images(n=48, size=8)


def _cfg(out, **kw):
    base = dict(out_dir=str(out), max_steps=4, ckpt_every=1, keep_ckpts=2, threads=1, progress=False)
    base.update(kw)
    return TrainConfig.from_preset("tiny", **base)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(_cfg(out), loader_factory=loader_factory(X, Y))
    return out


def _digest(root):
    h = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            h[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return h


def test_layout_latest_and_pruning(run_dir):
    root = ckpt.ckpt_root(str(run_dir))
    assert ckpt.list_checkpoints(str(run_dir)) == [3, 4]  # keep_ckpts=2
    assert open(os.path.join(root, "latest")).read().strip() == "step_0000004"
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]
    d = ckpt.latest_checkpoint(str(run_dir))
    assert sorted(os.listdir(d)) == ["meta.json", "model.pt", "optim.pt", "rank00000.pt"]
    meta = ckpt.read_meta(d)
    assert meta["step"] == 4 and meta["world_size"] == 1 and meta["config"]["model"] == "DriftDiT-N/4"
    state = ckpt.load_checkpoint(d, 0)  # weights_only loads of every file
    assert set(state["rank"]) == {"queues", "loader", "rng"} and "0.99" in state["ema"]
    assert json.load(open(os.path.join(run_dir, "config.json")))["max_steps"] == 4


def test_interrupted_write_leaves_previous_checkpoint(run_dir, tmp_path):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    tmp = os.path.join(ckpt.ckpt_root(str(out)), ckpt.step_name(5) + ".tmp")  # a save killed mid-write
    os.makedirs(tmp)
    open(os.path.join(tmp, "model.pt"), "wb").write(b"partial")
    assert ckpt.latest_checkpoint(str(out)).endswith("step_0000004")
    t = Trainer(_cfg(out, max_steps=5), resume="auto", loader_factory=loader_factory(X, Y))
    assert t.step == 4


@pytest.mark.parametrize("victim, content, match", [
    ("model.pt", b"not a torch file", "model.pt is corrupt"),
    ("rank00000.pt", b"", "rank00000.pt is corrupt"),
    ("meta.json", b"{broken", "meta.json is corrupt"),
])
def test_corrupt_checkpoint_is_a_clear_error_and_nothing_is_overwritten(run_dir, tmp_path, victim, content, match):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    d = ckpt.latest_checkpoint(str(out))
    open(os.path.join(d, victim), "wb").write(content)
    before = _digest(out)
    with pytest.raises(ckpt.CheckpointError, match=match):
        Trainer(_cfg(out, max_steps=6), resume="auto", loader_factory=loader_factory(X, Y))
    assert _digest(out) == before


def test_checkpoint_of_another_config_is_refused(run_dir, tmp_path):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    before = _digest(out)
    with pytest.raises(ckpt.CheckpointError, match="hidden_size: 32 != 48"):
        Trainer(_cfg(out, hidden_size=48, max_steps=6), resume="auto", loader_factory=loader_factory(X, Y))
    other = TrainConfig.from_preset("demo", out_dir=str(out), threads=1, progress=False)
    with pytest.raises(ckpt.CheckpointError, match="another configuration"):
        Trainer(other, resume="auto", loader_factory=loader_factory(X, Y))
    assert _digest(out) == before


def test_missing_resume_path_is_a_clear_error(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        Trainer(_cfg(tmp_path / "r"), resume=str(tmp_path / "nope"), loader_factory=loader_factory(X, Y))
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint"):
        ckpt.read_meta(str(tmp_path))
