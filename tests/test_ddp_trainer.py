"""Two-process gloo DDP run == single process with the same global batch (per-step losses, final weights).

    pytest -q tests/test_ddp_trainer.py

Both ranks see the same in-memory data stream (the test loader ignores the rank), so their queues equal the
single process's; rank r computes label slots [2r, 2r+2) of the 4, the field's scale and RMS are all-reduced,
and DDP averages the gradients.
"""
import multiprocessing as mp
import os
import socket

import pytest
import torch

from drift.config import TrainConfig


def _cfg(out):
    return TrainConfig.from_preset("tiny", out_dir=str(out), max_steps=4, ckpt_every=4, threads=1, progress=False,
                                   train_batch_size=4, neg_per_sample=2, alpha_dist="uniform", cfg_min=1.0,
                                   cfg_max=2.0)


def _worker(rank, world, port, out, q):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from drift.dist import cleanup_distributed
    from drift.trainer import train
    from tests.trainer_utils import loader_factory, toy_images
    try:
        x, y = toy_images(n=48, size=8)
        summary = train(_cfg(out), loader_factory=loader_factory(x, y))
        q.put((rank, [(h["step"], h["loss"], h["grad_norm"]) for h in summary["history"]]))
    except BaseException as e:  # report instead of hanging the parent
        q.put((rank, repr(e)))
        raise
    finally:
        cleanup_distributed()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_gloo_matches_single_process(tmp_path):
    from drift.sample import load_generator
    from drift.trainer import train
    from tests.trainer_utils import loader_factory, toy_images

    x, y = toy_images(n=48, size=8)
    single = train(_cfg(tmp_path / "single"), loader_factory=loader_factory(x, y))
    ref = [(h["step"], h["loss"], h["grad_norm"]) for h in single["history"]]

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path / "ddp"), q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs), results
    for r in (0, 1):
        got = results[r]
        assert not isinstance(got, str), got
        assert [s for s, _, _ in got] == [s for s, _, _ in ref]
        for (_, l1, g1), (_, l0, g0) in zip(got, ref):
            assert l1 == pytest.approx(l0, rel=1e-5, abs=1e-6)
            assert g1 == pytest.approx(g0, rel=1e-4, abs=1e-6)
    a, _ = load_generator(str(tmp_path / "single"), ema=False)
    b, _ = load_generator(str(tmp_path / "ddp"), ema=False)
    for p0, p1 in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p1, p0, rtol=1e-4, atol=1e-5)
