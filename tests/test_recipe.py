"""The ImageNet recipe of README, end to end at toy sizes, through the console scripts a user types.

    pytest -q tests/test_recipe.py

Latent chain (the `ablation-B/2` preset):
  a tiny ImageFolder (JPEGs of odd sizes, a grayscale one, one file that is not an image)
  -> drift-prep imagefolder -> drift-prep latents (a tiny random SD-VAE in diffusers' directory format)
  -> drift-mae on the cached latents -> drift-train --preset ablation-B/2 (widths, depths and batch
  shrunk for a CPU), the MAE as --feature-weights -> kill -9 after a checkpoint -> --resume auto
  -> drift-sample through the VAE.
Pixel chain (the `B/16` preset with `mae-pixel+convnext`): the same, with drift-prep --size 64, a pixel
MAE and a tiny ConvNeXt-V2 file in the transformers key layout.

Each stage is a subprocess of the installed console script, so the test fails when any stage is
disconnected from the next (e.g. the trainer not reading latent shards). The assertions are what a user
would check: files exist and load, manifest counts add up, losses are finite and logged per key, the
resumed run's losses equal an uninterrupted run's, the sample grid has the expected size and is not constant.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tests.data_fixtures import save_tiny_vae

BIN = os.path.dirname(sys.executable)
CLASSES = ("n01440764", "n01443537", "n01484850")
PER_CLASS = 6
STEPS = 12  # both the uninterrupted and the resumed run end here; checkpoints every 4 steps


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled")
    return env


def run(cmd: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run an installed console script; fail the test with its output when it exits non-zero."""
    p = subprocess.run([os.path.join(BIN, cmd), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=_env())
    assert p.returncode == 0, f"{cmd} {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


def log_lines(run_dir) -> list:
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def make_imagefolder(root) -> int:
    """CLASSES x PER_CLASS small photos-like JPEGs of varied sizes, plus one grayscale JPEG and one file that
    is not an image (drift-prep must reject it and say so). Returns the number of files written."""
    rng = np.random.default_rng(0)
    n = 0
    for ci, c in enumerate(CLASSES):
        os.makedirs(root / c)
        for i in range(PER_CLASS):
            h, w = 64 + 8 * (i % 3), 72 + 4 * ci
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([(xx * (ci + 1) * 3) % 256, (yy * (i + 2) * 2) % 256, np.full_like(xx, 60 * ci)], -1)
            arr = np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / c / f"{c}_{i}.JPEG", quality=90)
            n += 1
    Image.fromarray(rng.integers(0, 256, (70, 70), dtype=np.uint8), "L").save(root / CLASSES[0] / "gray.JPEG")
    (root / CLASSES[1] / "notes.JPEG").write_bytes(b"this is not a JPEG")
    return n + 2  # + the grayscale JPEG and the non-image


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny random SD-VAE (downsampling 8x, 4 latent channels) saved in diffusers' directory format."""
    return save_tiny_vae(tmp_path_factory.mktemp("sd-vae"), 64)


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    """(ImageFolder root in the ImageNet train/ layout, number of files in it)."""
    src = tmp_path_factory.mktemp("imagenet") / "train"
    return src, make_imagefolder(src)


@pytest.fixture(scope="module")
def shards(imagefolder, tmp_path_factory):
    """drift-prep imagefolder on the tiny ImageFolder (original bytes), then drift-prep verify."""
    src, seen = imagefolder
    out = tmp_path_factory.mktemp("shards") / "in1k-train"
    run("drift-prep", "imagefolder", src, out, "--workers", "1", "--shard-size", "7", "--quiet")
    check_manifest(out, seen)
    run("drift-prep", "verify", out, "--workers", "1", "--quiet")
    return out


def check_manifest(out, seen: int) -> dict:
    m = json.load(open(out / "manifest.json"))
    assert m["num_samples"] == seen - 1 and len(m["rejected"]) == 1
    assert m["rejected"][0]["path"].endswith("notes.JPEG")
    assert m["num_samples"] + len(m["rejected"]) == m["files_seen"] == seen
    assert sum(s["num_samples"] for s in m["shards"]) == m["num_samples"]
    assert [m["classes"][str(i)] if isinstance(m["classes"], dict) else m["classes"][i]
            for i in range(3)] == list(CLASSES)
    return m


def train_args(preset: str, data, out, features_weights, extra=()) -> list:
    """drift-train flags: the paper preset, shrunk to CPU sizes (a user's smoke run of the recipe)."""
    return ["--preset", preset, "--data-path", data, "--feature-weights", features_weights, "--out-dir", out,
            "--hidden-size", 32, "--depth", 1, "--num-heads", 2, "--num-prefix-tokens", 2, "--num-style-tokens", 2,
            "--train-batch-size", 2, "--gen-per-label", 4, "--pos-per-sample", 4, "--neg-per-sample", 2,
            "--push-per-step", 8, "--positive-bank-size", 8, "--negative-bank-size", 16, "--warmup-steps", 2,
            "--ckpt-every", 4, "--keep-ckpts", 2, "--log-every", 1, "--no-compile", "--threads", 1,
            "--loader-threads", 1, "--no-progress", "--device", "cpu", *extra]


def train_kill_resume(args_for, tmp_path, killed_extra=()):
    """An uninterrupted run of STEPS steps, and a run killed (-9) after its first checkpoint then resumed
    with --resume auto (both with `killed_extra` flags); returns (straight log, resumed log, the two run
    directories)."""
    straight = tmp_path / "straight"
    run("drift-train", *args_for(straight, ["--max-steps", STEPS]))
    killed = tmp_path / "killed"
    # The killed run is told to train much longer (the LR schedule does not depend on max_steps), so it is
    # certainly still running when a checkpoint exists and a later step was logged.
    p = subprocess.Popen([os.path.join(BIN, "drift-train"),
                          *map(str, args_for(killed, ["--max-steps", 10_000, *killed_extra]))],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    deadline = time.time() + 300
    try:
        while time.time() < deadline and p.poll() is None:
            ck = killed / "checkpoints" / "step_0000004" / "meta.json"
            if ck.exists() and (killed / "log.jsonl").exists() and log_lines(killed)[-1]["step"] >= 5:
                break
            time.sleep(0.02)
        assert p.poll() is None, f"the run to be killed exited early:\n{p.stderr.read()[-4000:]}"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL
    run("drift-train", *args_for(killed, ["--max-steps", STEPS, "--resume", "auto", *killed_extra]))
    return log_lines(straight), log_lines(killed), straight, killed


def check_logs(straight, resumed):
    steps = [r["step"] for r in straight]
    assert steps == list(range(STEPS))
    rec = straight[-1]
    keys = [k for k in rec if k.startswith("loss/")]
    assert len(keys) >= 3 and "loss/global" in keys  # the loss is logged per feature key
    for r in straight:
        assert np.isfinite(r["loss"]) and all(np.isfinite(r[k]) for k in keys)
        assert r["loss"] == pytest.approx(sum(r[k] for k in keys), rel=1e-5)
    # The resumed run cut the killed run's lines past its checkpoint: every step is logged exactly once.
    assert [r["step"] for r in resumed] == steps
    by_step = {r["step"]: r for r in resumed}
    for s in steps:
        for k in ["loss"] + keys:
            assert by_step[s][k] == straight[s][k], f"step {s} {k}: resumed {by_step[s][k]} != {straight[s][k]}"


def check_grid(path, rows: int, per_row: int):
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.ndim == 3 and img.shape[0] >= rows * 8 and img.shape[1] >= per_row * 8
    assert img.std() > 1.0  # not a constant image
    return img


def test_latent_recipe_ablation_b2(shards, vae_dir, tmp_path):
    lat = tmp_path / "in1k-latents"
    run("drift-prep", "latents", shards, lat, "--vae", vae_dir, "--size", 64, "--batch-size", 4, "--device", "cpu",
        "--quiet")
    lm = json.load(open(lat / "manifest.json"))
    src = json.load(open(shards / "manifest.json"))
    assert lm["kind"] == "latents" and lm["num_samples"] == src["num_samples"] and lm["latent_shape"][1:] == [4, 8, 8]

    mae = tmp_path / "mae-latent"
    run("drift-mae", "--data", lat, "--out", mae, "--width", 16, "--layers", "1,1,1,1", "--batch-size", 8,
        "--steps", 6, "--warmup-steps", 2, "--log-every", 1, "--ckpt-every", 3, "--threads", 1, "--no-progress")
    assert (mae / "mae_encoder.pt").exists()

    def args_for(out, extra):
        return train_args("ablation-B/2", lat, out, mae / "mae_encoder.pt", extra)

    # The resumed run names its SD-VAE (--vae), so its samples decode without the flag; the other does not.
    straight, resumed, bare_run, run_dir = train_kill_resume(args_for, tmp_path, killed_extra=["--vae", vae_dir])
    check_logs(straight, resumed)
    assert any(k.startswith("loss/layer") or k.startswith("loss/stem") for k in straight[-1])  # MAE keys
    meta = json.load(open(run_dir / "checkpoints" / f"step_{STEPS:07d}" / "meta.json"))
    assert meta["data_kind"] == "latents" and meta["item_shape"] == [4, 8, 8]

    grid = tmp_path / "grid.png"
    run("drift-sample", run_dir, "--out", grid, "--per-class", 2)
    check_grid(grid, rows=3, per_row=2)
    run("drift-sample", bare_run, "--vae", vae_dir, "--out", tmp_path / "grid2.png", "--per-class", 2)
    check_grid(tmp_path / "grid2.png", rows=3, per_row=2)
    p = subprocess.run([os.path.join(BIN, "drift-sample"), str(bare_run), "--out", str(tmp_path / "g3.png")],
                       capture_output=True, text=True, env=_env())
    assert p.returncode == 2 and "--vae" in p.stderr and len(p.stderr.strip().splitlines()) == 1

    # drift-eval at a tiny N: a random Inception in torch-fidelity's format and synthetic reference stats.
    from tests.eval_fixtures import random_inception_file
    weights = random_inception_file(tmp_path / "inception.pth")
    stats = tmp_path / "ref_stats.npz"
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
    ev = tmp_path / "eval"
    out = run("drift-eval", run_dir, "--num-samples", 6, "--alpha", 1.0, 1.5, "--inception-weights", weights,
              "--ref-stats", stats, "--out", ev, "--device", "cpu", "--no-progress")
    rep = json.load(open(ev / "eval.json"))
    assert [r["alpha"] for r in rep["results"]] == [1.0, 1.5] and rep["num_samples"] == 6
    assert all(np.isfinite(r["fid"]) for r in rep["results"]) and "best FID" in out.stdout
    for r in rep["results"]:
        with np.load(r["samples"]) as z:  # ADM's layout: uint8 NHWC images in arr_0
            assert z["arr_0"].shape == (6, 64, 64, 3) and z["arr_0"].dtype == np.uint8


def test_pixel_recipe_b16(imagefolder, tmp_path):
    src, seen = imagefolder
    pix = tmp_path / "in1k-64"
    run("drift-prep", "imagefolder", src, pix, "--size", 64, "--workers", "1", "--quiet")
    check_manifest(pix, seen)

    mae = tmp_path / "mae-pixel"
    run("drift-mae", "--data", pix, "--out", mae, "--width", 16, "--layers", "1,1,1,1", "--batch-size", 8,
        "--steps", 6, "--warmup-steps", 2, "--log-every", 1, "--ckpt-every", 3, "--threads", 1, "--no-progress")
    from drift.features.convnext import ConvNeXtV2
    torch.manual_seed(0)
    cnx = tmp_path / "convnextv2-tiny.bin"
    # transformers' key layout (as in facebook/convnextv2-*); the architecture is read off the file
    sd = ConvNeXtV2(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)).state_dict()
    torch.save({f"convnextv2.{k}": v for k, v in sd.items()}, cnx)

    def args_for(out, extra):
        return train_args("B/16", pix, out, f"{mae / 'mae_encoder.pt'}+{cnx}", extra)

    straight, resumed, _, run_dir = train_kill_resume(args_for, tmp_path)
    check_logs(straight, resumed)
    assert any("cnx" in k or "convnext" in k for k in straight[-1])  # ConvNeXt keys are trained on
    grid = tmp_path / "grid.png"
    run("drift-sample", run_dir, "--out", grid, "--per-class", 2)
    check_grid(grid, rows=3, per_row=2)
