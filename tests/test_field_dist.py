"""Two gloo processes holding halves of the rows reproduce the single-process field (global scale and RMS)."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.utils import make_field_inputs


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from drift.loss import drifting_loss
        gen, pos, neg, w = make_field_inputs(6, 5, 4, 3, 7, dtype=torch.float64)
        rows = slice(rank * 3, (rank + 1) * 3)
        g = gen[rows].clone().requires_grad_(True)
        loss, info = drifting_loss(g, pos[rows], neg[rows], w[rows], backend="reference",
                                   process_group=dist.group.WORLD)
        (grad,) = torch.autograd.grad(loss.sum(), g)
        torch.save({"loss": loss.detach(), "grad": grad, "scale": info["scale"], "rms": info["force_rms"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_single_process():
    from drift.loss import drifting_loss
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        mp.spawn(_worker, args=(2, init_file, d), nprocs=2, join=True)
        parts = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    gen, pos, neg, w = make_field_inputs(6, 5, 4, 3, 7, dtype=torch.float64)
    gen.requires_grad_(True)
    loss, info = drifting_loss(gen, pos, neg, w, backend="reference")
    (grad,) = torch.autograd.grad(loss.sum(), gen)
    torch.testing.assert_close(torch.cat([p["loss"] for p in parts]), loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts]), grad, rtol=1e-12, atol=1e-15)
    for p in parts:
        torch.testing.assert_close(p["scale"], info["scale"], rtol=1e-14, atol=0)
        torch.testing.assert_close(p["rms"], info["force_rms"], rtol=1e-12, atol=0)
    # without the process group each rank would normalize by its own half: that must differ (the test can fail)
    local, _ = drifting_loss(gen.detach()[:3], pos[:3], neg[:3], w[:3], backend="reference")
    assert not torch.allclose(local, loss.detach()[:3], rtol=1e-6)
