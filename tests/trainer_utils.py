"""Test helpers for the trainer tests: a deterministic in-memory loader with the drift.data contract."""
from __future__ import annotations

import os

import torch


class TensorLoader:
    """Infinite (images [B, C, H, W] in [-1, 1], labels int64 [B]) batches drawn from fixed tensors.

    Order is a pure function of (seed, epoch), so `state_dict()` is just the number of batches served.
    Rank and world size are ignored on purpose: every rank sees the same stream, which makes a DDP run
    comparable to a single process holding the same data.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int = 0,
                 num_classes: int = None):
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.seed = seed
        self.num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
        self.channels, self.image_size = images.shape[1], images.shape[2]
        self.num_samples = images.shape[0]
        self.served = 0

    def __iter__(self):
        return self

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))

    def __next__(self):
        idx = []
        for k in range(self.served * self.batch_size, (self.served + 1) * self.batch_size):
            epoch, pos = divmod(k, self.num_samples)
            idx.append(int(self._order(epoch)[pos]))
        self.served += 1
        idx = torch.tensor(idx)
        return self.images[idx].clone(), self.labels[idx].clone()

    def state_dict(self) -> dict:
        return {"served": self.served, "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, sd: dict) -> None:
        if sd["batch_size"] != self.batch_size or sd["seed"] != self.seed:
            raise ValueError("loader state from another loader configuration")
        self.served = int(sd["served"])


def toy_images(n: int = 96, num_classes: int = 4, size: int = 8, seed: int = 0):
    """Class-dependent blobs: class c is a bright square at a class-specific place plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    x = -torch.ones(n, 1, size, size)
    for c in range(num_classes):
        r, q = divmod(c, 2)
        x[labels == c, :, r * size // 2:(r + 1) * size // 2, q * size // 2:(q + 1) * size // 2] = 0.8
    x = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return x, labels


def loader_factory(images, labels, seed: int = 0):
    def make(cfg, info):
        return TensorLoader(images, labels, cfg.push_per_step, seed=seed)
    return make


def tiny(tmp_path, **kw):
    """The "tiny" preset writing into tmp_path/run, one thread, no progress bar; `kw` overrides fields."""
    from drift.config import TrainConfig
    base = dict(out_dir=str(tmp_path / "run"), threads=1, progress=False)
    base.update(kw)
    return TrainConfig.from_preset("tiny", **base)


def train_tiny(out_dir, images, labels, kind=None, **kw) -> str:
    """Six steps of the tiny preset on in-memory data: a real checkpoint in seconds (no warmup, EMA decay 0.5,
    so the EMA generator has moved from its zero-output init). `kind="latents"` makes the loader say it
    serves SD-VAE latents (as the latent shard loader does), which the checkpoint records."""
    base = dict(out_dir=str(out_dir), threads=1, progress=False, max_steps=6, ckpt_every=6, lr=1e-2,
                warmup_steps=0, ema_decay=(0.5,))
    from drift.config import TrainConfig
    from drift.trainer import train
    cfg = TrainConfig.from_preset("tiny", **dict(base, **kw))
    make = loader_factory(images, labels)

    def factory(c, info):
        loader = make(c, info)
        if kind is not None:
            loader.kind, loader.vae_scale = kind, 0.18215
        return loader

    train(cfg, loader_factory=factory)
    return cfg.out_dir


def history(summary) -> list:
    """[(step, loss, grad_norm)] of a train() summary."""
    return [(h["step"], h["loss"], h["grad_norm"]) for h in summary["history"]]


def _gloo_worker(rank, world, port, cfg, q):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from drift.dist import cleanup_distributed
    from drift.trainer import train
    try:
        x, y = toy_images(n=48, size=8)
        q.put((rank, history(train(cfg, loader_factory=loader_factory(x, y)))))
    except BaseException as e:  # report instead of hanging the parent
        q.put((rank, repr(e)))
        raise
    finally:
        cleanup_distributed()


def train_two_gloo_ranks(cfg) -> dict:
    """Train `cfg` on 2 spawned gloo ranks over toy_images(48, 8) (every rank sees the same stream);
    {rank: [(step, loss, grad_norm)]}, after checking both processes exited cleanly."""
    import multiprocessing as mp
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_gloo_worker, args=(r, 2, port, cfg, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs), results
    for got in results.values():
        assert not isinstance(got, str), got
    return results


def assert_same_history(got, ref, rel_loss=1e-5, rel_grad=1e-4):
    """Per-step losses and grad norms of two runs agree (a DDP run against the single process)."""
    import pytest
    assert [s for s, _, _ in got] == [s for s, _, _ in ref]
    for (_, l1, g1), (_, l0, g0) in zip(got, ref):
        assert l1 == pytest.approx(l0, rel=rel_loss, abs=1e-6)
        assert g1 == pytest.approx(g0, rel=rel_grad, abs=1e-6)
