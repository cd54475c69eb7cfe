"""Two-process gloo DDP run == single process with the same global batch (per-step losses, final weights).

    pytest -q tests/test_ddp_trainer.py

Both ranks see the same in-memory data stream (the test loader ignores the rank), so their queues equal the
single process's; rank r computes label slots [2r, 2r+2) of the 4, the field's scale and RMS are all-reduced,
and DDP averages the gradients.
"""
import pytest
import torch

from drift.config import TrainConfig


def _cfg(out, backend="auto"):
    return TrainConfig.from_preset("tiny", out_dir=str(out), max_steps=4, ckpt_every=4, threads=1, progress=False,
                                   train_batch_size=4, neg_per_sample=2, alpha_dist="uniform", cfg_min=1.0,
                                   cfg_max=2.0, field_backend=backend)


# "reference" and the fused "cpp" backend (what "auto" picks on CPU when drift._C is built).
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_two_rank_gloo_matches_single_process(tmp_path, backend):
    from drift.sample import load_generator
    from drift.trainer import lr_at, train
    from tests.trainer_utils import assert_same_history, history, loader_factory, toy_images, train_two_gloo_ranks

    x, y = toy_images(n=48, size=8)
    ref = history(train(_cfg(tmp_path / "single", backend), loader_factory=loader_factory(x, y)))
    results = train_two_gloo_ranks(_cfg(tmp_path / "ddp", backend))
    for r in (0, 1):
        assert_same_history(results[r], ref)
    a, _ = load_generator(str(tmp_path / "single"), ema=False)
    b, _ = load_generator(str(tmp_path / "ddp"), ema=False)
    # The weights can only match to a fraction of how far Adam moved them: DDP averages two ranks' partial
    # gradient sums where one process sums all rows at once, and that last-bit difference is amplified by
    # Adam's normalization wherever a gradient is small and noisy (the alpha embedding here moves ~5% of a step
    # differently). A real DDP fault (a slot on the wrong rank, gradients summed instead of averaged, a field
    # sum not all-reduced) changes the losses and grad norms above by far more than their 1e-5 / 1e-4, and the
    # weights by a whole step; 5% of the summed learning rates of the run separates the two.
    cfg = _cfg(tmp_path / "single", backend)
    moved = sum(lr_at(cfg, s) for s in range(cfg.max_steps))
    for (name, p0), p1 in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p1, p0, rtol=0, atol=0.05 * moved, msg=lambda m: f"{name}: {m}")
