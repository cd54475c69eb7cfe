"""Resume equality: 2N steps straight == N steps, kill, resume, N more (per-step losses and weights, CPU).

    pytest -q tests/test_resume.py
"""
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
