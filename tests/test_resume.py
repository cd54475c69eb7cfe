"""Resume equality: 2N steps straight == N steps, kill, resume, N more (per-step losses and weights, CPU).

    pytest -q tests/test_resume.py
"""
import pytest
import torch

from drift.config import TrainConfig
from drift.trainer import Trainer, train
from tests.trainer_utils import loader_factory, toy_images


def _cfg(out, steps):
    # CFG negatives and a mixed alpha law on, so every random stream of the step is exercised.
    return TrainConfig.from_preset("tiny", out_dir=str(out), max_steps=steps, ckpt_every=3, threads=1,
                                   progress=False, neg_per_sample=2, alpha_dist="mixed", no_cfg_frac=0.5,
                                   ema_decay=(0.9, 0.99))


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    x, y = toy_images(n=40, size=8)  # 40 samples, batches of 16: the loader wraps epochs mid-run
    straight = train(_cfg(tmp_path / "a", 6), loader_factory=loader_factory(x, y))
    first = train(_cfg(tmp_path / "b", 3), loader_factory=loader_factory(x, y))
    second = train(_cfg(tmp_path / "b", 6), resume="auto", loader_factory=loader_factory(x, y))
    a = [(h["step"], h["loss"], h["grad_norm"]) for h in straight["history"]]
    b = [(h["step"], h["loss"], h["grad_norm"]) for h in first["history"] + second["history"]]
    assert a == b  # bitwise: same data, same random streams, same queue and optimizer states
    ta = Trainer(_cfg(tmp_path / "a", 6), resume="auto", loader_factory=loader_factory(x, y))
    tb = Trainer(_cfg(tmp_path / "b", 6), resume="auto", loader_factory=loader_factory(x, y))
    for p, q in zip(ta.model.parameters(), tb.model.parameters()):
        assert torch.equal(p, q)
    for d in (0.9, 0.99):
        for p, q in zip(ta.ema.models[d].parameters(), tb.ema.models[d].parameters()):
            assert torch.equal(p, q)
    assert torch.equal(ta.cq.data, tb.cq.data) and torch.equal(ta.gq.data, tb.gq.data)
    assert ta.loader.state_dict() == tb.loader.state_dict() and ta.step == tb.step == 6


def _log(out):
    import json
    with open(out / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def _die_at(monkeypatch, step):
    """Make Trainer.train_step raise when it reaches `step`, as a kill would stop the run there."""
    real = Trainer.train_step

    def step_or_die(self, s):
        if s == step:
            raise KeyboardInterrupt(f"killed at step {s}")
        return real(self, s)
    monkeypatch.setattr(Trainer, "train_step", step_or_die)
    return real


def test_log_holds_each_step_once_after_kill_and_resume(tmp_path, monkeypatch):
    """A run killed after logging steps past its last checkpoint, even mid-line, resumes to a log that equals
    the uninterrupted run's: every step once, in order, with the same values."""
    x, y = toy_images(n=40, size=8)
    straight = train(_cfg(tmp_path / "a", 8), loader_factory=loader_factory(x, y))
    real = _die_at(monkeypatch, 5)  # checkpoint at step 3; steps 3 and 4 logged after it
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "b", 8), loader_factory=loader_factory(x, y))
    with open(tmp_path / "b" / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # the kill landed mid-write
    monkeypatch.setattr(Trainer, "train_step", real)
    _die_at(monkeypatch, 7)  # a second kill: checkpoint at step 6, step 6 logged after it
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "b", 8), resume="auto", loader_factory=loader_factory(x, y))
    monkeypatch.setattr(Trainer, "train_step", real)
    train(_cfg(tmp_path / "b", 8), resume="auto", loader_factory=loader_factory(x, y))
    log_a, log_b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["step"] for r in log_b] == list(range(8))
    assert [(r["step"], r["loss"]) for r in log_b] == [(r["step"], r["loss"]) for r in log_a]
    assert [h["step"] for h in straight["history"]] == list(range(8))


def test_wandb_resumes_the_same_run_id(tmp_path, monkeypatch):
    import sys
    import types

    from drift import checkpoint as ckpt
    calls = []

    class FakeRun:
        def log(self, *a, **k):
            pass

        def finish(self):
            pass

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(kw) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    x, y = toy_images(n=40, size=8)
    train(_cfg(tmp_path / "b", 3).replace(wandb="offline"), loader_factory=loader_factory(x, y))
    train(_cfg(tmp_path / "b", 6).replace(wandb="offline"), resume="auto", loader_factory=loader_factory(x, y))
    assert len(calls) == 2 and calls[0]["id"] and calls[0]["id"] == calls[1]["id"]
    assert calls[1]["resume"] == "allow"
    meta = ckpt.read_meta(ckpt.latest_checkpoint(str(tmp_path / "b")))
    assert meta["loop_state"]["wandb_run_id"] == calls[0]["id"]
    train(_cfg(tmp_path / "c", 3).replace(wandb="offline"), loader_factory=loader_factory(x, y))
    assert calls[2]["id"] != calls[0]["id"]  # another run directory, another wandb run
