"""Sampling (drift.sampler, drift-sample): per-index noise, the validation-label rule, rank chunks, the uint8
rule, the ADM npz layout, latent models decoded through a tiny random SD-VAE, and the CLI's errors.

    pytest -q tests/test_sample.py
"""
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from drift.fid import iter_npz_array
from drift.sample import main as sample_main
from drift.sampler import (generate, index_seed, is_latent, load_generator, rank_chunks, save_grid, to_uint8,
                           vae_path_for, validation_labels, write_adm_npz)
from tests.data_fixtures import save_tiny_vae
from tests.trainer_utils import toy_images, train_tiny

BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    x, y = toy_images(n=64, size=8)
    return train_tiny(tmp_path_factory.mktemp("pixel") / "run", x, y)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny randomly initialised AutoencoderKL in diffusers' directory format: 32x32x3 <-> 4x4x4."""
    return save_tiny_vae(tmp_path_factory.mktemp("vae"), 32)


@pytest.fixture(scope="module")
def latent_runs(tmp_path_factory, vae_dir):
    """Two latent checkpoints (4x4x4 scaled latents): one without a VAE in its config, one naming it."""
    g = torch.Generator().manual_seed(0)
    z, y = 0.8 * torch.randn(32, 4, 4, 4, generator=g), torch.arange(32) % 4
    root = tmp_path_factory.mktemp("latent")
    bare = train_tiny(root / "bare", z, y, kind="latents")
    named = train_tiny(root / "named", z, y, kind="latents", feature_vae=vae_dir)
    return bare, named


# ---------------------------------------------------------------------------------------------------
# Noise, labels, chunks
# ---------------------------------------------------------------------------------------------------

def test_per_index_noise_depends_only_on_seed_and_index(pixel_run):
    from drift.sampler import _index_noise
    model, _ = load_generator(pixel_run)
    idx = torch.arange(10)
    noise, style = _index_noise(model, idx, 5, "cpu")
    tail_noise, tail_style = _index_noise(model, idx[6:], 5, "cpu")  # rows 6..9 alone: the same draws
    assert torch.equal(tail_noise, noise[6:]) and torch.equal(tail_style, style[6:])
    assert not torch.equal(_index_noise(model, idx, 6, "cpu")[0], noise)  # the seed matters
    assert len({index_seed(5, i) for i in range(1000)}) == 1000 and index_seed(5, 0) != index_seed(6, 0)
    labels = validation_labels(idx, 4)
    a = generate(model, labels, seed=5, indices=idx, batch_size=2)
    assert torch.equal(a, generate(model, labels, seed=5, indices=idx, batch_size=2))  # deterministic
    # The same batches starting at index 6 (as a rank's chunk would): bit-identical rows.
    assert torch.equal(generate(model, labels[6:], seed=5, indices=idx[6:], batch_size=2), a[6:])
    # Other batch sizes change only the float rounding of the network, not the samples.
    assert torch.allclose(generate(model, labels, seed=5, indices=idx, batch_size=10), a, atol=1e-5)
    assert not torch.allclose(generate(model, labels, seed=6, indices=idx), a, atol=1e-3)


def test_stream_noise_is_the_recorded_one(pixel_run):
    """Without indices, noise then style come from one generator batch after batch (the demo's numbers)."""
    model, _ = load_generator(pixel_run)
    labels = torch.tensor([0, 1, 2, 3, 0])
    got = generate(model, labels, alpha=1.5, seed=3, batch_size=2)
    g = torch.Generator().manual_seed(3)
    want = []
    for i in range(0, 5, 2):
        n = len(labels[i:i + 2])
        noise = torch.randn(n, 1, 8, 8, generator=g)
        style = model.sample_style(n, g, "cpu")
        with torch.no_grad():
            want.append(model(noise, labels[i:i + 2], torch.full((n,), 1.5), style).clamp(-1, 1))
    assert torch.equal(got, torch.cat(want))


def test_validation_label_rule():
    labels = validation_labels(torch.arange(50 * 1000), 1000)
    assert torch.equal(torch.bincount(labels), torch.full((1000,), 50))
    assert torch.bincount(validation_labels(torch.arange(30), 10)).tolist() == [3] * 10  # prefixes stay balanced


@pytest.mark.parametrize("n,chunk,world", [(0, 4, 1), (10, 4, 1), (10, 4, 3), (23, 5, 8), (100, 7, 2)])
def test_rank_chunks_are_disjoint_and_cover_every_index(n, chunk, world):
    shares = [[i for s, e in rank_chunks(n, chunk, r, world) for i in range(s, e)] for r in range(world)]
    flat = [i for share in shares for i in share]
    assert sorted(flat) == list(range(n)) and len(set(flat)) == n
    # The chunks themselves never depend on the world size (so a resumed run finds them).
    assert sorted(c for r in range(world) for c in rank_chunks(n, chunk, r, world)) == rank_chunks(n, chunk)


def test_rank_chunks_reject_bad_splits():
    for args in ((10, 0, 0, 1), (10, 4, 2, 2), (-1, 4, 0, 1)):
        with pytest.raises(ValueError, match="bad split"):
            rank_chunks(*args)


def test_uint8_rule_truncates_and_clips():
    x01 = torch.tensor([0.0, 0.5 / 255, 1.0 / 255 - 1e-6, 0.5, 254.999 / 255, 1.0, 1.2, -0.3], dtype=torch.float64)
    got = to_uint8((x01 * 2 - 1).view(1, 1, 1, -1))  # (1, 1, 1, 8) NCHW -> (1, 1, 8, 1) NHWC
    assert got.dtype == torch.uint8 and got.shape == (1, 1, 8, 1)
    assert got.flatten().tolist() == [0, 0, 0, 127, 254, 255, 255, 0]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 4, generator=g) * 2.4 - 1.2
    want = np.floor(np.clip((x.double().numpy() + 1) / 2 * 255, 0, 255)).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(to_uint8(x).numpy(), want)


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------

def test_adm_npz_layout(tmp_path):
    g = np.random.default_rng(0)
    arr = g.integers(0, 256, (7, 6, 6, 3), dtype=np.uint8)
    labels = np.arange(7) % 3
    path = str(tmp_path / "samples.npz")
    write_adm_npz(path, [arr[:4], arr[4:]], arr.shape, labels)
    with np.load(path) as z:
        assert sorted(z.files) == ["arr_0", "arr_1"]
        assert z["arr_0"].dtype == np.uint8 and np.array_equal(z["arr_0"], arr)
        assert z["arr_1"].dtype == np.int64 and np.array_equal(z["arr_1"], labels)
    with zipfile.ZipFile(path) as zf:  # uncompressed members, as np.savez writes and ADM's reader streams
        assert {i.filename: i.compress_type for i in zf.infolist()} == {"arr_0.npy": zipfile.ZIP_STORED,
                                                                        "arr_1.npy": zipfile.ZIP_STORED}
    assert np.array_equal(np.concatenate(list(iter_npz_array(path, "arr_0", 3))), arr)  # streamed, as ADM reads
    np.savez(tmp_path / "ref.npz", arr_0=arr, arr_1=labels)
    with np.load(tmp_path / "ref.npz") as a, np.load(path) as b:
        assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a.files)
    with pytest.raises(ValueError, match="6 samples written, expected 7"):
        write_adm_npz(str(tmp_path / "short.npz"), [arr[:6]], arr.shape, labels)
    assert sorted(os.listdir(tmp_path)) == ["ref.npz", "samples.npz"]  # no temp file left behind


def test_grid_takes_one_or_three_channels(tmp_path):
    with pytest.raises(ValueError, match="1 or 3 channels.*--vae"):
        save_grid(torch.zeros(2, 4, 8, 8), ["a"], 2, str(tmp_path / "g.png"))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# Latent models
# ---------------------------------------------------------------------------------------------------

def test_latent_rule_and_vae_resolution():
    meta = {"item_shape": [4, 32, 32], "config": {"feature_vae": "", "vae": ""}}
    assert is_latent(meta) and not is_latent({"item_shape": [3, 32, 32]})
    assert not is_latent({"item_shape": [4, 32, 32], "data_kind": "images"})  # the recorded kind wins
    assert is_latent({"item_shape": [3, 8, 8], "data_kind": "latents"})
    with pytest.raises(ValueError, match="latent model.*pass --vae DIR"):
        vae_path_for(meta)
    assert vae_path_for(meta, "flag") == "flag"
    assert vae_path_for(dict(meta, config={"vae": "run", "feature_vae": "feat"})) == "run"
    assert vae_path_for(dict(meta, config={"vae": "", "feature_vae": "feat"})) == "feat"
    assert vae_path_for({"item_shape": [3, 32, 32]}, "ignored") is None


def test_latent_grid_is_decoded_through_the_vae(latent_runs, vae_dir, tmp_path, capsys):
    from PIL import Image
    bare, named = latent_runs
    out = str(tmp_path / "grid.png")
    assert sample_main([bare, "--vae", vae_dir, "--out", out, "--classes", "0", "2", "--per-class", "3"]) == 0
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[0] == 2 * (32 + 2) * 2  # two rows of decoded 32x32 cells, 2 px padding, scale 2
    cells = img[:, -3 * 34 * 2:]
    assert cells.std() > 1.0  # decoded images, not a constant
    # The run's config names the VAE: no flag needed.
    assert sample_main([named, "--out", str(tmp_path / "named.png"), "--per-class", "2"]) == 0
    # No VAE anywhere: one line naming what is missing and the flag, exit code 2, nothing written.
    capsys.readouterr()
    assert sample_main([bare, "--out", str(tmp_path / "none.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("drift-sample: error:") and "latent model" in err and "--vae" in err
    assert not os.path.exists(tmp_path / "none.png")


def test_latent_samples_to_npz_are_decoded_uint8(latent_runs, vae_dir, tmp_path):
    bare, _ = latent_runs
    path = str(tmp_path / "s.npz")
    assert sample_main([bare, "--vae", vae_dir, "--out-npz", path, "--num-samples", "6", "--batch-size", "4"]) == 0
    with np.load(path) as z:
        assert z["arr_0"].shape == (6, 32, 32, 3) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].tolist() == [0, 1, 2, 3, 0, 1]
    model, meta = load_generator(bare)
    from drift.sampler import load_decoder
    idx = torch.arange(6)
    want = generate(model, validation_labels(idx, 4), indices=idx, decode=load_decoder(meta, vae_dir), as_uint8=True)
    with np.load(path) as z:
        assert np.array_equal(z["arr_0"], want.numpy())


# ---------------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------------

def test_drift_sample_npz_and_pngs(pixel_run, tmp_path):
    from PIL import Image
    npz, pngs = str(tmp_path / "out" / "s.npz"), str(tmp_path / "pngs")
    assert sample_main([pixel_run, "--out-npz", npz, "--png-dir", pngs, "--num-samples", "5", "--seed", "2"]) == 0
    with np.load(npz) as z:
        arr, labels = z["arr_0"], z["arr_1"]
    assert arr.shape == (5, 8, 8, 1) and labels.tolist() == [0, 1, 2, 3, 0]
    assert sorted(os.listdir(pngs)) == [f"{i:06d}.png" for i in range(5)] + ["labels.txt"]
    assert np.array_equal(np.asarray(Image.open(os.path.join(pngs, "000003.png"))), arr[3, :, :, 0])
    assert np.loadtxt(os.path.join(pngs, "labels.txt"), dtype=int).tolist() == labels.tolist()
    # Default N: 50 per class (the validation-label rule).
    assert sample_main([pixel_run, "--out-npz", str(tmp_path / "d.npz")]) == 0
    with np.load(tmp_path / "d.npz") as z:
        assert np.bincount(z["arr_1"]).tolist() == [50] * 4


@pytest.mark.parametrize("extra,message", [
    (["--per-class", "0"], "--per-class must be >= 1"),
    (["--max-grid-classes", "0"], "--max-grid-classes must be >= 1"),
    (["--out", "DIR/"], "--out must name a .png file"),
    (["--out", "grid.jpg"], "--out must end in .png"),
    (["--out-npz", "s.npy"], "--out-npz must end in .npz"),
    (["--out-npz", "s.npz", "--num-samples", "0"], "--num-samples must be >= 1"),
    (["--classes", "9"], "--classes [9] outside [0, 4)"),
])
def test_drift_sample_bad_flags_are_one_line_errors(pixel_run, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert sample_main([pixel_run, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("drift-sample: error:") and message in err, err
    assert os.listdir(tmp_path) == []  # nothing written, no temp files
    assert not any(f.endswith((".tmp", ".tmp.png")) for f in os.listdir(pixel_run))


def test_drift_sample_names_a_directory_without_checkpoints(tmp_path, capsys):
    capsys.readouterr()
    assert sample_main([str(tmp_path), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"drift-sample: error: {tmp_path} is neither a checkpoint directory nor a run directory "
                   f"with checkpoints")
    with pytest.raises(Exception, match="neither"):  # --debug keeps the traceback
        sample_main([str(tmp_path), "--debug"])


def test_drift_sample_console_script(pixel_run, tmp_path):
    out = str(tmp_path / "grid.png")
    r = subprocess.run([os.path.join(BIN, "drift-sample"), pixel_run, "--out", out, "--per-class", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == out and os.path.getsize(out) > 0
    r = subprocess.run([os.path.join(BIN, "drift-sample"), pixel_run, "--per-class", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == "drift-sample: error: --per-class must be >= 1, got 0"
