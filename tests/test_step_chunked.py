"""The label-chunked step (cfg.label_chunk, drift/step.py) against the plain step: same per-key losses, same
gradients (fp32 tolerance), under 2-rank gloo DDP too, and a chunked run resumes exactly.

    pytest -q tests/test_step_chunked.py
"""

import pytest
import torch

from drift import step as step_mod
from drift.config import TrainConfig
from drift.step import label_chunks
from drift.trainer import Trainer, train
from tests.trainer_utils import (assert_same_history, history, loader_factory, tiny, toy_images,
                                 train_two_gloo_ranks)


def _mae_weights(path):
    """A random MAE-ResNet (width 8, one block per stage, 1 channel) saved with its architecture."""
    from drift.features.mae_resnet import MAEConfig, MAEResNetEncoder
    cfg = MAEConfig(in_channels=1, patch_size=1, width=8, layers=(1, 2, 1, 1), every_k_block=1, num_classes=0)
    torch.manual_seed(3)
    enc = MAEResNetEncoder(cfg)
    torch.save({"state_dict": enc.state_dict(), "config": cfg.to_dict()}, path)
    return str(path)


def _step_grads(t: Trainer, batch, label_chunk: int, fused_loss: bool = False):
    """(per-key losses, force RMS, parameter gradients) of one forward/backward of `t` on `batch`."""
    t.cfg = t.cfg.replace(label_chunk=label_chunk, fused_loss=fused_loss)
    t.opt.zero_grad(set_to_none=True)
    out = t._forward_backward(batch)
    grads = {n: p.grad.detach().clone() for n, p in t.model.named_parameters()}
    t.opt.zero_grad(set_to_none=True)
    return ({k: float(v.detach()) for k, v in out["per_key"].items()},
            {k: float(v) for k, v in out["force_rms"].items()},
            grads, float(out["loss"].detach()))


def _assert_same(a, b):
    losses_a, rms_a, grads_a, total_a = a
    losses_b, rms_b, grads_b, total_b = b
    assert list(losses_a) == list(losses_b)
    for k in losses_a:
        assert losses_b[k] == pytest.approx(losses_a[k], rel=1e-5, abs=1e-7), k
        assert rms_b[k] == pytest.approx(rms_a[k], rel=1e-5, abs=1e-7), k
    assert total_b == pytest.approx(total_a, rel=1e-5)
    scale = max(float(g.abs().max()) for g in grads_a.values())
    assert scale > 0
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


def _whole_batch_generate(orig):
    """Trainer._generate that runs the generator on all of the rank's labels and returns the slice [lo, hi): the
    plain and the chunked step then see bitwise-identical samples. (The generator's matmuls round differently at
    other batch sizes on some CPUs, ~1e-9, and keys whose values barely differ across samples, such as the
    location means of a GroupNorm output, carry that noise into the field's distances.)"""
    def generate(self, batch, lo, hi, graph):
        G = self.cfg.gen_per_label
        return orig(self, batch, 0, self.nc_local, graph)[lo * G:hi * G]
    return generate


@pytest.mark.parametrize("features", ["pixel-multiscale", "mae"])
@pytest.mark.parametrize("bf16_keys", [False, True])
def test_chunked_step_equals_the_plain_step(tmp_path, monkeypatch, features, bf16_keys):
    x, y = toy_images(n=64, size=8)
    kw = dict(features=features, train_batch_size=4, neg_per_sample=3, alpha_dist="uniform", cfg_min=1.0,
              cfg_max=3.0, bf16_keys=bf16_keys)
    if features == "mae":
        kw["feature_weights"] = _mae_weights(tmp_path / "mae.pt")
    t = Trainer(tiny(tmp_path, **kw), loader_factory=loader_factory(x, y))
    try:
        for _ in range(2):  # take the generator away from its zero-output init so every gradient is alive
            t.train_step(t.step)
            t.step += 1
        t._push_batch()
        batch = t._sample_inputs(t.step)
        t.model.train()
        whole = _whole_batch_generate(Trainer._generate)
        monkeypatch.setattr(Trainer, "_generate", whole)
        plain = _step_grads(t, batch, 0)
        assert len(plain[0]) > (20 if features == "mae" else 10)
        for chunk in (1, 3):  # equal chunks, and a shorter last chunk
            _assert_same(plain, _step_grads(t, batch, chunk))
        # A bookkeeping fault shows: the graph-free pass storing each label's keys in its neighbour's slots.
        def shifted(self, batch, lo, hi, graph):
            if not graph:
                lo, hi = (lo + 1) % self.nc_local, (lo + 1) % self.nc_local + (hi - lo)
            return whole(self, batch, lo, hi, graph)

        with monkeypatch.context() as m:
            m.setattr(Trainer, "_generate", shifted)
            wrong = _step_grads(t, batch, 1)
        with pytest.raises(AssertionError):
            _assert_same(plain, wrong)
    finally:
        t.close()


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_fused_loss_step_equals_the_plain_step(tmp_path, monkeypatch, backend):
    """cfg.fused_loss (the paper presets' loss: value and gradient straight from the field's force) gives the plain
    step's per-key losses and gradients, in the plain and in the chunked step; a wrong gradient scale shows."""
    if backend == "cpp":
        pytest.importorskip("drift._C")
    x, y = toy_images(n=64, size=8)
    t = Trainer(tiny(tmp_path, features="pixel-multiscale", train_batch_size=4, neg_per_sample=3,
                     alpha_dist="uniform", cfg_min=1.0, cfg_max=3.0, field_backend=backend),
                loader_factory=loader_factory(x, y))
    try:
        for _ in range(2):
            t.train_step(t.step)
            t.step += 1
        t._push_batch()
        batch = t._sample_inputs(t.step)
        t.model.train()
        monkeypatch.setattr(Trainer, "_generate", _whole_batch_generate(Trainer._generate))
        plain = _step_grads(t, batch, 0)
        _assert_same(plain, _step_grads(t, batch, 0, fused_loss=True))
        _assert_same(plain, _step_grads(t, batch, 1, fused_loss=True))
        # The fused gradient is -2 force / (G S scale_inputs): a factor off in it must fail the comparison.
        from drift.field import loss as loss_mod
        orig = loss_mod._FieldLoss.backward

        def doubled(ctx, grad):
            g = orig(ctx, grad)
            return (2 * g[0],) + tuple(g[1:])

        monkeypatch.setattr(loss_mod._FieldLoss, "backward", staticmethod(doubled))
        wrong = _step_grads(t, batch, 0, fused_loss=True)
        monkeypatch.setattr(loss_mod._FieldLoss, "backward", staticmethod(orig))
        with pytest.raises(AssertionError):
            _assert_same(plain, wrong)
    finally:
        t.close()


def test_label_chunks_cover_the_labels():
    assert label_chunks(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert label_chunks(4, 4) == [(0, 4)] and label_chunks(4, 1) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="chunk"):
        label_chunks(4, 0)
    with pytest.raises(ValueError, match="label_chunk"):
        TrainConfig.from_preset("tiny", label_chunk=-1)


def _cfg(out, steps, **kw):
    base = dict(out_dir=str(out), max_steps=steps, ckpt_every=3, threads=1, progress=False, neg_per_sample=2,
                alpha_dist="mixed", no_cfg_frac=0.5, features="pixel-multiscale")
    base.update(kw)
    return TrainConfig.from_preset("tiny", **base)


def test_chunked_run_resumes_exactly_and_follows_the_plain_run(tmp_path):
    x, y = toy_images(n=40, size=8)
    straight = train(_cfg(tmp_path / "a", 6, label_chunk=1), loader_factory=loader_factory(x, y))
    train(_cfg(tmp_path / "b", 3, label_chunk=1), loader_factory=loader_factory(x, y))
    second = train(_cfg(tmp_path / "b", 6, label_chunk=1), resume="auto", loader_factory=loader_factory(x, y))
    first = [(h["step"], h["loss"], h["grad_norm"]) for h in straight["history"]]
    assert first[3:] == [(h["step"], h["loss"], h["grad_norm"]) for h in second["history"]]  # bitwise
    plain = train(_cfg(tmp_path / "c", 6), loader_factory=loader_factory(x, y))
    for (s0, l0, g0), h in zip(first, plain["history"]):
        assert s0 == h["step"]
        assert l0 == pytest.approx(h["loss"], rel=1e-4) and g0 == pytest.approx(h["grad_norm"], rel=1e-3)


# ----- 2-rank gloo DDP: the chunked step on two ranks == the plain step in one process -----

def _ddp_cfg(out, label_chunk):
    return TrainConfig.from_preset("tiny", out_dir=str(out), max_steps=3, ckpt_every=3, threads=1, progress=False,
                                   train_batch_size=4, neg_per_sample=2, alpha_dist="uniform", cfg_min=1.0,
                                   cfg_max=2.0, features="pixel-multiscale", label_chunk=label_chunk)


def test_chunked_step_under_two_rank_gloo_matches_the_plain_single_process(tmp_path):
    x, y = toy_images(n=48, size=8)
    ref = history(train(_ddp_cfg(tmp_path / "single", 0), loader_factory=loader_factory(x, y)))
    results = train_two_gloo_ranks(_ddp_cfg(tmp_path / "ddp", 1))
    for r in (0, 1):  # each rank holds 2 labels, chunked 1 + 1: no_sync on the first chunk, all-reduce on the last
        assert_same_history(results[r], ref)


def test_key_groups_split_by_bytes_in_order():
    keys = {"a": torch.empty(1, 100), "b": torch.empty(1, 10), "c": torch.empty(1, 10), "d": torch.empty(1, 30),
            "e": torch.empty(1, 60)}
    groups = step_mod.key_groups(keys, groups=4)  # budget max(210 / 4, 100) = 100 elements
    assert groups == [["a"], ["b", "c", "d"], ["e"]]
    assert [k for g in groups for k in g] == list(keys)
    assert step_mod.key_groups(keys, groups=1) == [list(keys)]


def test_bf16_matmul_weights_are_bit_identical_under_autocast():
    from drift.features.mae_resnet import MAEConfig, MAEFeatures, MAEResNetEncoder
    torch.manual_seed(1)
    ex = MAEFeatures(MAEResNetEncoder(MAEConfig(in_channels=4, width=16, layers=(1, 1, 1, 1), num_classes=0)))
    ex.freeze()
    x = torch.randn(3, 4, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = ex(x)
        n_conv = sum(m.weight.numel() for m in ex.modules() if isinstance(m, torch.nn.Conv2d))
        assert step_mod.bf16_matmul_weights(ex) == 2 * n_conv
        after = ex(x)
    assert all(m.weight.dtype == torch.bfloat16 for m in ex.modules() if isinstance(m, torch.nn.Conv2d))
    assert all(m.weight.dtype == torch.float32 for m in ex.modules() if isinstance(m, torch.nn.GroupNorm))
    for k in before:
        assert torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("label_chunk", [0, 1])
def test_field_calls_mirror_the_steps_field_calls(tmp_path, monkeypatch, label_chunk):
    """drift.step.field_calls (what drift/precompile.py compiles the Triton kernels for) lists the field calls the
    step really makes, item by item in shape, strides and dtype: in the plain step and per key group in the
    chunked one."""
    import drift.trainer as trainer_mod
    x, y = toy_images(n=64, size=8)
    t = Trainer(tiny(tmp_path, features="mae", feature_weights=_mae_weights(tmp_path / "mae.pt"),
                     train_batch_size=4, neg_per_sample=3, label_chunk=label_chunk), loader_factory=loader_factory(x, y))
    meta = lambda items: [tuple(None if v is None else (tuple(v.shape), v.stride(), v.dtype) for v in it)  # noqa
                          for it in items]
    seen = []
    orig = trainer_mod.drifting_loss_multi

    def spy(items, **kw):
        seen.append(meta(items))
        return orig(items, **kw)

    try:
        t._push_batch()
        batch = t._sample_inputs(0)
        t.model.train()
        monkeypatch.setattr(trainer_mod, "drifting_loss_multi", spy)
        t._forward_backward(batch)
        listed = [meta(items) for items in step_mod.field_calls(t, batch)]
    finally:
        t.close()
    assert len(seen) == (1 if label_chunk == 0 else len(step_mod.key_groups(t.features(x[:1]))))
    assert listed == seen
