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


def _copy(run_dir, tmp_path):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    return out, [os.path.join(ckpt.ckpt_root(str(out)), ckpt.step_name(s)) for s in (3, 4)]


@pytest.mark.parametrize("victim, content, match", [
    ("model.pt", b"not a torch file", r"model.pt is corrupt or unreadable: 16 bytes where meta.json records \d+"),
    ("rank00000.pt", b"", r"rank00000.pt is corrupt or unreadable: 0 bytes"),
    ("meta.json", b"{broken", "meta.json is corrupt"),
])
def test_corrupt_checkpoint_is_named_and_auto_falls_back(run_dir, tmp_path, capsys, victim, content, match):
    out, (older, newest) = _copy(run_dir, tmp_path)
    open(os.path.join(newest, victim), "wb").write(content)
    before = _digest(out)
    with pytest.raises(ckpt.CheckpointError, match=match):  # asked for by name: a clear error
        Trainer(_cfg(out, max_steps=6), resume=newest, loader_factory=loader_factory(X, Y))
    assert _digest(out) == before
    t = Trainer(_cfg(out, max_steps=6), resume="auto", loader_factory=loader_factory(X, Y))
    assert t.step == 3  # --resume auto: the newest checkpoint that verifies
    printed = capsys.readouterr().out
    assert "skipping step_0000004" in printed and victim in printed
    t.close()
    assert _digest(out) == before  # nothing overwritten


def test_meta_lists_every_file_with_size_and_sha256(run_dir):
    d = ckpt.latest_checkpoint(str(run_dir))
    files = ckpt.read_meta(d)["files"]
    assert sorted(files) == ["model.pt", "optim.pt", "rank00000.pt"]
    for name, rec in files.items():
        data = open(os.path.join(d, name), "rb").read()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("damage", ["swap", "truncate"])
def test_swapped_or_truncated_file_is_detected(run_dir, tmp_path, capsys, damage):
    """A same-shape model.pt from another step loads fine as a state dict; only the recorded hash tells."""
    import shutil
    out, (older, newest) = _copy(run_dir, tmp_path)
    if damage == "swap":
        shutil.copyfile(os.path.join(older, "model.pt"), os.path.join(newest, "model.pt"))
        victim, match = "model.pt", "sha256 .* differs from meta.json"
    else:
        data = open(os.path.join(newest, "optim.pt"), "rb").read()
        open(os.path.join(newest, "optim.pt"), "wb").write(data[: len(data) // 2])
        victim, match = "optim.pt", "truncated or replaced"
    with pytest.raises(ckpt.CheckpointError, match=f"{victim}.*{match}"):
        ckpt.load_checkpoint(newest, 0)
    with pytest.raises(ckpt.CheckpointError, match=victim):
        Trainer(_cfg(out, max_steps=6), resume=newest, loader_factory=loader_factory(X, Y))
    t = Trainer(_cfg(out, max_steps=6), resume="auto", loader_factory=loader_factory(X, Y))
    assert t.step == 3 and f"skipping step_0000004: checkpoint file {os.path.join(newest, victim)}" in \
        capsys.readouterr().out
    t.close()
    if damage == "swap":
        with pytest.raises(ckpt.CheckpointError, match="model.pt"):
            ckpt.load_for_sampling(newest)


def test_newest_complete_checkpoint_wins_over_a_stale_pointer(run_dir, tmp_path):
    out, (older, newest) = _copy(run_dir, tmp_path)
    with open(os.path.join(ckpt.ckpt_root(str(out)), "latest"), "w") as f:
        f.write("step_0000003\n")  # killed between the rename of step 4 and the pointer update
    assert ckpt.latest_checkpoint(str(out)) == newest
    t = Trainer(_cfg(out, max_steps=6), resume="auto", loader_factory=loader_factory(X, Y))
    assert t.step == 4
    t.close()


def test_every_checkpoint_corrupt_is_an_error_naming_each(run_dir, tmp_path):
    out, dirs = _copy(run_dir, tmp_path)
    for d in dirs:
        open(os.path.join(d, "optim.pt"), "ab").write(b"x")
    before = _digest(out)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint .* verifies: step_0000004: .*step_0000003: "):
        Trainer(_cfg(out, max_steps=6), resume="auto", loader_factory=loader_factory(X, Y))
    assert _digest(out) == before


def test_checkpoint_without_hashes_still_loads_and_says_so(run_dir, tmp_path, capsys):
    out, (older, newest) = _copy(run_dir, tmp_path)
    meta = json.load(open(os.path.join(newest, "meta.json")))
    del meta["files"]  # as written before hashes were recorded
    json.dump(meta, open(os.path.join(newest, "meta.json"), "w"))
    t = Trainer(_cfg(out, max_steps=6), resume="auto", loader_factory=loader_factory(X, Y))
    printed = capsys.readouterr().out
    assert t.step == 4 and "has no file hashes" in printed and "loading it unverified" in printed
    t.close()


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


def test_malformed_file_list_is_a_clear_error(run_dir, tmp_path):
    out, (older, newest) = _copy(run_dir, tmp_path)
    meta = json.load(open(os.path.join(newest, "meta.json")))
    meta["files"]["model.pt"] = {"size": "big"}
    json.dump(meta, open(os.path.join(newest, "meta.json"), "w"))
    with pytest.raises(ckpt.CheckpointError, match="malformed entry for model.pt"):
        ckpt.load_checkpoint(newest, 0)
    meta["files"] = ["model.pt"]
    json.dump(meta, open(os.path.join(newest, "meta.json"), "w"))
    with pytest.raises(ckpt.CheckpointError, match="'files' must map file names"):
        ckpt.verify_checkpoint(newest)
