"""Inputs and checks shared by the multi-key field tests (tests/test_field_multi.py on the CPU backends,
tests/kernels/test_field_multi_triton.py on Triton): trainer-shaped keys, the fused-loss check against fp64, and
a two-rank gloo run of the multi-key call."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from drift.field import drifting_field, drifting_loss, drifting_loss_multi
from tests.utils import assert_close_to_ref, max_abs_err

FLOOR = 32 * float(torch.finfo(torch.float32).eps)  # (tests/kernels/field_cases.py's floor of the 2x rule)


def trainer_item(n, L, G, P, U, S, *, scale=1.0, dtype=torch.float32, seed=0, weights=True):
    """One feature key as the trainer passes it: [n*G, L, S] features viewed as [n, L, G, S] (strided, no copy),
    and the per-label CFG weight expanded over (L, U) with stride 0."""
    g = torch.Generator().manual_seed(seed)

    def feats(rows, shift=0.0):
        f = (torch.randn(n * rows, L, S, generator=g) + shift) * scale
        return f.to(dtype).view(n, rows, L, S).transpose(1, 2)

    gen, pos = feats(G), feats(P, 0.4)
    neg = feats(U) if U else None
    w = (torch.rand(n, generator=g) * 3).view(n, 1, 1).expand(n, L, U) if U and weights else None
    return gen, pos, neg, w


def mixed_items(dtype=torch.float32, n=2):
    """Keys of one step's kinds (n labels): shared S and row shape (different L), another S, a key without
    negatives, one without weights, one with a single batch dim, one with three, one with a much larger feature
    scale. The first two and the sixth share a Triton launch group."""
    items = [trainer_item(n, 3, 5, 4, 3, 8, seed=1, dtype=dtype), trainer_item(n, 1, 5, 4, 3, 8, seed=2, dtype=dtype),
             trainer_item(n, 4, 5, 4, 3, 11, seed=3, dtype=dtype), trainer_item(n, 2, 5, 4, 0, 8, seed=4, dtype=dtype),
             trainer_item(n, 2, 5, 4, 3, 8, seed=5, dtype=dtype, weights=False),
             trainer_item(n, 2, 5, 4, 3, 8, seed=6, dtype=dtype, scale=50.0)]
    g = torch.Generator().manual_seed(7)
    one = (torch.randn(3, 5, 6, generator=g).to(dtype), torch.randn(3, 4, 6, generator=g).to(dtype), None, None)
    three = tuple(torch.randn(n, 2, 2, k, 8, generator=g).to(dtype) for k in (5, 4, 3)) + (
        torch.rand(n, 2, 2, 3, generator=g).to(dtype),)
    return items + [one, three]


def _with_grad(items):
    return [(it[0].detach().clone().requires_grad_(True),) + tuple(it[1:]) for it in items]


def check_fused_against_fp64(backend, items):
    """fused=True losses and gradients against fp64 drifting_loss on the same values: within 2x the error of
    the exact-ops fp32 loss (plain drifting_loss) plus a floor of 32 ulps of the value's size."""
    items = _with_grad(items)
    fused = drifting_loss_multi(items, backend=backend, check_finite=False, fused=True)
    for i, (it, (loss, info)) in enumerate(zip(items, fused)):
        plain, _ = drifting_loss(*it, backend=backend, check_finite=False)
        it64 = _with_grad([tuple(None if t is None else t.detach().double() for t in it)])[0]
        gold, _ = drifting_loss(*it64, backend="reference")
        grads = [torch.autograd.grad(x.sum(), it[0])[0] for x in (loss, plain)]
        (g64,) = torch.autograd.grad(gold.sum(), it64[0])
        assert loss.dtype == plain.dtype and grads[0].dtype == it[0].dtype
        for name, out, base, ref in (("loss", loss, plain, gold), ("grad", grads[0], grads[1], g64)):
            floor = FLOOR * max(1.0, float(ref.detach().abs().max()))
            assert_close_to_ref(out.detach(), ref, max_abs_err(base.detach(), ref), floor, name=f"{i}.{name}")
        assert info["scale"] == drifting_field(*it, backend=backend, check_finite=False).scale


def _dist_items():
    """fp64 keys whose labels (first batch dim, 4 of them) the two ranks split in halves."""
    return [trainer_item(4, 3, 5, 4, 3, 8, seed=11, dtype=torch.float64),
            trainer_item(4, 1, 5, 4, 3, 8, seed=12, dtype=torch.float64),
            trainer_item(4, 2, 5, 4, 3, 13, seed=13, dtype=torch.float64),
            trainer_item(4, 2, 5, 4, 0, 8, seed=14, dtype=torch.float64)]


def _half(it, rank):
    rows = slice(2 * rank, 2 * rank + 2)
    return tuple(None if t is None else t[rows] for t in it)


def _dist_worker(rank, world, init_file, out_dir, backend, n_items):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from drift.field import drifting_loss_multi as multi
        count = []
        real = dist.all_reduce
        dist.all_reduce = lambda *a, **k: (count.append(1), real(*a, **k))[1]
        items = _with_grad([_half(it, rank) for it in _dist_items()[:n_items]])
        out = multi(items, backend=backend, process_group=dist.group.WORLD, check_finite=False)
        dist.all_reduce = real
        res = {"collectives": len(count)}
        for i, (it, (loss, info)) in enumerate(zip(items, out)):
            (grad,) = torch.autograd.grad(loss.sum(), it[0])
            res[i] = {"loss": loss.detach(), "grad": grad, "scale": info["scale"], "rms": info["force_rms"]}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_two_ranks(backend, n_items=None):
    """Run the multi-key call on two gloo ranks (halves of every key's labels) for the first n_items keys of
    _dist_items (all by default); [rank 0 result, rank 1]."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_dist_worker, args=(2, os.path.join(d, "init"), d, backend, n_items), nprocs=2, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=True) for r in range(2)]


def check_two_ranks(parts, backend, collectives, n_items=None):
    """Each rank's part of every key equals the single-process multi-key result (global statistics)."""
    items = _with_grad(_dist_items()[:n_items])
    out = drifting_loss_multi(items, backend=backend, check_finite=False)
    assert [p["collectives"] for p in parts] == [collectives, collectives]
    for i, (it, (loss, info)) in enumerate(zip(items, out)):
        (grad,) = torch.autograd.grad(loss.sum(), it[0])
        torch.testing.assert_close(torch.cat([p[i]["loss"] for p in parts]), loss.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(torch.cat([p[i]["grad"] for p in parts]), grad, rtol=1e-12, atol=1e-15)
        for p in parts:
            torch.testing.assert_close(p[i]["scale"], info["scale"], rtol=1e-14, atol=0)
            torch.testing.assert_close(p[i]["rms"], info["force_rms"], rtol=1e-12, atol=0)
        # Each rank on its own half (no process group) normalizes differently: the test can fail.
        local, _ = drifting_loss(*_half(it, 0), backend=backend)
        assert not torch.allclose(local.detach(), loss.detach()[:2], rtol=1e-6)
