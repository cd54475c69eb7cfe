"""The class-batched training step on a tiny preset: learning signal, sampling contract, crash path, drift-sample.

    pytest -q tests/test_trainer.py
"""
import json
import os

import pytest
import torch

from drift import checkpoint as ckpt
from drift.config import TrainConfig
from drift.sample import generate, load_generator, main as sample_main
from drift.trainer import NonFiniteLossError, Trainer, lr_at, step_seed, train
from tests.trainer_utils import loader_factory, tiny, toy_images


def test_step_reduces_the_loss_and_moves_samples_toward_the_data(tmp_path):
    x, y = toy_images(n=64, size=8)
    cfg = tiny(tmp_path, max_steps=60, lr=3e-3, warmup_steps=2, ckpt_every=1000)
    summary = train(cfg, loader_factory=loader_factory(x, y))
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 60
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)  # ~2 keys x 9 at the start; ~14.5-14.9 after 60 steps (seeds 0-2)
    # The samples themselves move toward the data: mean squared distance of each generated image to its nearest
    # training image, against the generator at init (its output is exactly 0). 60 steps take it to 0.64-0.79
    # of the start over seeds and backends. (Class identity takes this tiny generator hundreds of steps: the 32
    # summed style embeddings outweigh the class embedding in the conditioning vector at init.)
    model, _ = load_generator(cfg.out_dir, ema=False)
    labels = torch.arange(4).repeat_interleave(32)
    gen = generate(model, labels, seed=1)
    nearest = ((gen[:, None] - x[None]) ** 2).flatten(2).mean(-1).min(1).values.mean()
    nearest0 = (x ** 2).flatten(1).mean(1).min()
    assert nearest < 0.85 * nearest0, (float(nearest), float(nearest0))
    log = [json.loads(line) for line in open(os.path.join(cfg.out_dir, "log.jsonl"))]
    assert [r["step"] for r in log] == list(range(60))
    for key in ("step", "loss", "lr", "img_per_s", "grad_norm", "loss/global", "loss/norm_x", "force_rms/global"):
        assert key in log[0]
    assert log[0]["lr"] == pytest.approx(1e-6) and log[-1]["lr"] == pytest.approx(3e-3)


def test_sampled_inputs_follow_the_contract(tmp_path):
    x, y = toy_images(n=64, size=8)
    cfg = tiny(tmp_path, train_batch_size=4, neg_per_sample=3, alpha_dist="uniform", cfg_min=1.5, cfg_max=2.0)
    t = Trainer(cfg, loader_factory=loader_factory(x, y))
    t._push_batch()
    b = t._sample_inputs(5)
    pool = t.cq.last_labels.tolist()
    labels = b["labels"].tolist()
    for c in set(labels):  # without replacement from the latest batch's labels
        assert labels.count(c) <= pool.count(c)
    assert b["noise"].shape == (4 * cfg.gen_per_label, 1, 8, 8)
    assert b["pos"].shape == (4 * cfg.pos_per_sample, 1, 8, 8)
    assert b["unc"].shape == (4 * 3, 1, 8, 8)
    assert ((b["alpha"] >= 1.5) & (b["alpha"] <= 2.0)).all()
    # Positives of slot i come from its class queue (toy classes are recognisable by their bright quadrant).
    for i, c in enumerate(labels):
        pos = b["pos"][i * cfg.pos_per_sample:(i + 1) * cfg.pos_per_sample]
        r, q = divmod(c, 2)
        assert (pos[:, :, r * 4:(r + 1) * 4, q * 4:(q + 1) * 4].mean() > 0.3)
    # The same step draws the same inputs again; another step differs.
    again = t._sample_inputs(5)
    assert torch.equal(again["noise"], b["noise"]) and torch.equal(again["labels"], b["labels"])
    assert not torch.equal(t._sample_inputs(6)["noise"], b["noise"])
    seeds = [step_seed(0, 5, 1), step_seed(0, 5, 2), step_seed(1, 5, 1), step_seed(0, 6, 1), step_seed(0, 5)]
    assert len(set(seeds)) == len(seeds)  # run seed, step and slot each change the stream


def test_lr_schedule():
    cfg = TrainConfig.from_preset("demo", lr=1e-3, warmup_steps=10, lr_decay_steps=0)
    assert lr_at(cfg, 0) == pytest.approx(1e-6)
    assert lr_at(cfg, 5) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert lr_at(cfg, 10) == lr_at(cfg, 10_000) == 1e-3
    # Optional linear cooldown over the last lr_decay_steps of max_steps.
    cfg = TrainConfig.from_preset("demo", lr=1e-3, warmup_steps=10, max_steps=100, lr_decay_steps=40)
    assert lr_at(cfg, 59) == 1e-3 and lr_at(cfg, 60) == 1e-3
    assert lr_at(cfg, 61) == pytest.approx(1e-3 * 39 / 40) and lr_at(cfg, 99) == pytest.approx(1e-3 / 40)
    with pytest.raises(ValueError, match="lr_decay_steps"):
        TrainConfig.from_preset("demo", lr_decay_steps=-1)


def test_non_finite_loss_writes_crash_checkpoint(tmp_path, monkeypatch):
    x, y = toy_images(n=64, size=8)
    cfg = tiny(tmp_path, max_steps=10, log_every=2)
    orig = Trainer._loss

    def poisoned(self, batch):
        out = orig(self, batch)
        if self.step >= 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Trainer, "_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="crash checkpoint") as e:
        train(cfg, loader_factory=loader_factory(x, y))
    crash = os.path.join(cfg.out_dir, "checkpoints", "crash_step_0000005")
    assert crash in str(e.value) and os.path.isfile(os.path.join(crash, "meta.json"))
    assert ckpt.read_meta(crash)["crash"] is True
    assert ckpt.latest_checkpoint(cfg.out_dir) is None  # a crash checkpoint is never resumed automatically


def test_drift_sample_grid(tmp_path):
    from PIL import Image
    x, y = toy_images(n=64, size=8)
    cfg = tiny(tmp_path, max_steps=2, ckpt_every=2)
    train(cfg, loader_factory=loader_factory(x, y))
    out = str(tmp_path / "grid.png")
    assert sample_main([cfg.out_dir, "--out", out, "--classes", "1", "3", "--per-class", "5"]) == 0
    img = Image.open(out)
    assert img.height == 2 * (8 + 2) * 2  # two labelled rows of 8 px cells, 2 px padding, scale 2
    model, meta = load_generator(cfg.out_dir)
    assert meta["step"] == 2 and not model.training
    a = generate(model, torch.tensor([0, 1]), seed=3)
    assert torch.equal(a, generate(model, torch.tensor([0, 1]), seed=3)) and a.shape == (2, 1, 8, 8)
    ema_w = next(iter(load_generator(cfg.out_dir)[0].parameters()))
    raw_w = next(iter(load_generator(cfg.out_dir, ema=False)[0].parameters()))
    assert not torch.equal(ema_w, raw_w)
    # User errors are one line and exit code 2 (the messages are checked in tests/test_sample.py).
    assert sample_main([cfg.out_dir, "--out", out, "--classes", "9"]) == 2
    assert sample_main([str(tmp_path), "--out", out]) == 2


def test_demo_end_to_end_short(tmp_path):
    """drift.demo on a fake IDX dataset: pack with drift-prep, train a few steps through the shard loader,
    write samples.png, metrics.json and log.jsonl."""
    from drift.demo import main as demo_main
    from tests.data_fixtures import write_fake_idx_dir
    data = write_fake_idx_dir(tmp_path / "idx", n_train=256, n_test=64)
    out = tmp_path / "demo"
    args = ["--data", str(data), "--packed", str(tmp_path / "packed"), "--out", str(out), "--num-eval", "64",
            "--classifier-epochs", "1", "--no-apt", "--max-steps", "3", "--hidden-size", "32", "--depth", "1",
            "--num-heads", "2", "--threads", "1", "--no-progress", "--ckpt-every", "2", "--log-every", "1"]
    assert demo_main(args) == 0
    m = json.load(open(out / "metrics.json"))
    for k in ("class_accuracy", "fd", "fd_real_floor", "fd_class_mean", "fd_over_class_mean", "meets_targets"):
        assert k in m
    assert m["step"] == 3 and m["num_eval"] == 64 and 0.0 <= m["class_accuracy"] <= 1.0
    assert (out / "samples.png").stat().st_size > 0
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [0, 1, 2]
    # A second invocation finds the packed data and the finished run, and only re-evaluates.
    assert demo_main(args) == 0
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [0, 1, 2]
