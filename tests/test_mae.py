"""MAE-ResNet model: the 86 official keys, masking, the masked loss, decoder shapes, cls fine-tune loss."""
import os

import pytest
import torch

from drift.features import MAEConfig, MAEFeatures, MAEResNet, MAEResNetEncoder, build_feature_extractor
from drift.features.base import patchify, unpatchify
from drift.features.mae_resnet import masked_l2, num_groups, random_patch_mask

OFFICIAL_MAPS = ["conv1", "layer1_blk2", "layer1", "layer2_blk2", "layer2_blk4", "layer2", "layer3_blk2",
                 "layer3_blk4", "layer3_blk6", "layer3", "layer4_blk2", "layer4"]


def _tiny(**kw):
    d = dict(in_channels=4, patch_size=1, width=4, layers=(1, 2, 1, 1), num_classes=5)
    d.update(kw)
    return MAEConfig(**d)


@pytest.mark.parametrize("space", ["latent", "pixel"])
def test_official_w640_has_86_keys_with_official_shapes(space):
    cfg = MAEConfig(width=640, in_channels=4, patch_size=1) if space == "latent" else \
        MAEConfig(width=640, in_channels=3, patch_size=8)
    with torch.device("meta"):  # instant: no memory, no compute
        model = MAEResNet(cfg)
    enc = model.encoder
    assert enc.map_names() == OFFICIAL_MAPS
    x = torch.zeros(2, 4, 32, 32, device="meta") if space == "latent" else torch.zeros(2, 3, 256, 256, device="meta")
    feats = model.get_activations(x)
    assert len(feats) == 86
    c0 = 4 if space == "latent" else 192
    assert feats["global"].shape == (2, 1, 4096 if space == "latent" else 196608)
    assert feats["norm_x"].shape == (2, 1, c0)
    sizes = {"conv1": 32, "layer1": 32, "layer2": 16, "layer3": 8, "layer4": 4}
    for m in OFFICIAL_MAPS:
        stage = m.split("_")[0]
        hw = sizes[stage]
        c = 640 * (2 ** (int(stage[-1]) - 1) if stage != "conv1" else 1)
        assert feats[m].shape == (2, hw * hw, c), m
        assert feats[f"{m}_mean"].shape == feats[f"{m}_std"].shape == (2, 1, c)
        for p in (2, 4):
            assert feats[f"{m}_mean_{p}"].shape == feats[f"{m}_std_{p}"].shape == (2, (hw // p) ** 2, c)


def test_group_counts():
    assert num_groups(640) == 32 and num_groups(256) == 32 and num_groups(64) == 32
    # official `_choose_gn_groups`: min(32, C), lowered until it divides C (one channel per group below 32)
    assert num_groups(8) == 8 and num_groups(12) == 12 and num_groups(40) == 20 and num_groups(1) == 1
    assert num_groups(48) == 24 and num_groups(96) == 32 and num_groups(1920) == 32
    m = MAEResNetEncoder(MAEConfig(width=64))
    gns = [mod for mod in m.modules() if isinstance(mod, torch.nn.GroupNorm)]
    assert gns and all(g.num_groups == 32 and g.eps == 1e-6 for g in gns)  # Flax GroupNorm's epsilon
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules())


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 16, 16)
    p = patchify(x, 8)
    assert p.shape == (2, 192, 2, 2)
    assert torch.equal(unpatchify(p, 8), x)
    assert torch.equal(p[1, :, 1, 0].view(3, 8, 8), x[1, :, 8:16, 0:8])
    with pytest.raises(ValueError, match="not divisible by patch_size=8"):
        patchify(torch.randn(1, 3, 12, 12), 8)


def test_mask_ratio_and_structure():
    g = torch.Generator().manual_seed(0)
    m = random_patch_mask(64, 32, 32, generator=g)
    assert m.shape == (64, 1, 32, 32)
    assert abs(m.mean().item() - 0.5) < 0.02  # 16384 independent patches: sd 0.004
    blocks = m.view(64, 1, 16, 2, 16, 2)
    assert torch.equal(blocks.amin(dim=(3, 5)), blocks.amax(dim=(3, 5)))  # constant on each 2x2 patch
    with pytest.raises(ValueError, match="not divisible"):
        random_patch_mask(1, 5, 5)


def test_masked_loss_ignores_unmasked_predictions():
    g = torch.Generator().manual_seed(1)
    target = torch.randn(2, 3, 8, 8, generator=g)
    pred = torch.randn(2, 3, 8, 8, generator=g)
    mask = random_patch_mask(2, 8, 8, generator=g)
    loss = masked_l2(pred, target, mask)
    pred2 = pred + 10.0 * (1 - mask) * torch.randn(2, 3, 8, 8, generator=g)  # change only visible positions
    assert torch.equal(masked_l2(pred2, target, mask), loss)
    pred3 = pred + mask * 1.0
    assert masked_l2(pred3, target, mask) != loss
    # official: per sample, squared error summed over masked positions and channels / masked positions
    per_sample = [((pred[i] - target[i]) ** 2 * mask[i]).sum() / mask[i].sum() for i in range(2)]
    torch.testing.assert_close(loss, (per_sample[0] + per_sample[1]) / 2)
    # C times the per-element mean when the samples have equal masked counts
    same = torch.ones(2, 1, 8, 8)
    torch.testing.assert_close(masked_l2(pred, target, same), 3 * (pred - target).square().mean())
    # a sample without masked positions contributes 0 (official: +1e-8 in the denominator)
    none = mask.clone()
    none[1] = 0
    torch.testing.assert_close(masked_l2(pred, target, none), per_sample[0] / 2)


def test_model_loss_only_sees_masked_input_and_decoder_shapes():
    torch.manual_seed(0)
    model = MAEResNet(_tiny(in_channels=3, patch_size=2))
    x = torch.randn(2, 3, 16, 16)
    mask = random_patch_mask(2, 8, 8, generator=torch.Generator().manual_seed(3))
    pred, maps = model.reconstruct(x, mask)
    assert pred.shape == (2, 12, 8, 8)
    assert model.predict_image(pred).shape == x.shape
    loss, info = model.mae_loss(x, mask=mask)
    # changing the input where it is masked changes nothing the encoder sees; the target changes there,
    # so instead check invariance of the prediction
    mask_px = unpatchify(mask.expand(2, 12, 8, 8), 2)
    x2 = x + mask_px * torch.randn_like(x)
    pred2, _ = model.reconstruct(x2, mask)
    torch.testing.assert_close(pred2, pred)
    assert abs(info["mask_frac"].item() - mask.mean().item()) < 1e-6
    loss.backward()
    assert model.encoder.stem[0].weight.grad.abs().sum() > 0 and model.decoder.out.weight.grad.abs().sum() > 0


def test_cls_weight_mixes_losses():
    torch.manual_seed(0)
    model = MAEResNet(_tiny())
    x = torch.randn(3, 4, 8, 8)
    y = torch.tensor([0, 1, 4])
    mask = random_patch_mask(3, 8, 8, generator=torch.Generator().manual_seed(0))
    l0, i0 = model.mae_loss(x, None, mask=mask)
    assert "ce" not in i0 and torch.equal(l0, i0["recon"])
    lz, iz = model.mae_loss(x, y, cls_weight=0.0, mask=mask)
    torch.testing.assert_close(lz, l0)
    assert "ce" in iz and iz["ce"] > 0
    l1, i1 = model.mae_loss(x, y, cls_weight=0.1, mask=mask)
    torch.testing.assert_close(l1, 0.1 * i1["ce"] + 0.9 * i1["recon"])


def test_extractor_is_frozen_but_differentiable():
    ex = build_feature_extractor("mae", width=4, in_channels=1, patch_size=1, layers=(1, 1, 1, 1))
    assert not any(p.requires_grad for p in ex.parameters()) and not ex.training
    ex.train()
    assert not ex.training
    x = torch.randn(2, 1, 16, 16, requires_grad=True)
    feats = ex(x)
    # maps conv1, layer1..4 (one block per stage: no blk keys) at 16,16,8,4,2; layer4 (2x2) has no 4x4 keys
    assert len(feats) == 2 + 4 * 7 + 5
    sum(v.float().square().mean() for v in feats.values()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"expects x \[N, 1, H, W\]"):
        ex(torch.randn(2, 3, 16, 16))


# ------------------------------------------------------------------------------------------- drift-mae CLI

@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from data_prep.cli import main as prep
    from tests.data_fixtures import make_imagefolder
    src = tmp_path_factory.mktemp("mae_src")
    make_imagefolder(str(src), classes=("a", "b", "c"), per_class=4, size=(20, 18), fmt="PNG")
    out = tmp_path_factory.mktemp("mae_shards")
    assert prep(["imagefolder", str(src), str(out), "--size", "16", "--shard-size", "8", "--workers", "1",
                 "--quiet"]) == 0
    return str(out)


def _mae_args(data, out, *extra):
    return ["--data", data, "--out", out, "--width", "4", "--layers", "1,1,1,1", "--batch-size", "4",
            "--steps", "4", "--warmup-steps", "2", "--log-every", "1", "--ckpt-every", "2", "--keep-ckpts", "3",
            "--cls-ft-steps", "2", "--cls-ramp-steps", "2", "--loader-backend", "pil", "--no-progress",
            "--num-threads", "1", *extra]


def _log(out):
    import json
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_drift_mae_runs_resumes_exactly_and_exports(tmp_path, tiny_shards):
    import json
    import shutil

    from drift.mae_train import cls_weight_at, lr_at, main, parse_cli
    out = str(tmp_path / "run")
    assert main(_mae_args(tiny_shards, out)) == 0
    full = _log(out)
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    # official ramp (step - start) / warmup over the last 2 steps: 0 at the phase's first step
    assert [r["cls_weight"] for r in full] == [0.0, 0.0, 0.0, 0.05]
    assert all(r["ce"] > 0 and 0.3 < r["mask_frac"] < 0.7 for r in full)
    cfg = parse_cli(_mae_args(tiny_shards, out))
    assert lr_at(cfg, 0) == pytest.approx(1e-6) and lr_at(cfg, 1) == pytest.approx((4e-3 + 1e-6) / 2)
    assert lr_at(cfg, 100) == 4e-3 and cls_weight_at(cfg, 1) == 0.0
    # resume from the step-2 checkpoint: steps 3-4 must repeat the uninterrupted losses exactly
    res = str(tmp_path / "resumed")
    shutil.copytree(out, res)
    shutil.rmtree(os.path.join(res, "checkpoints", "step_0000004"))
    os.remove(os.path.join(res, "checkpoints", "latest"))  # as if killed before step 4 was saved
    assert main(_mae_args(tiny_shards, res, "--resume", "auto")) == 0
    again = _log(res)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(full, again):
        assert a["loss"] == b["loss"] and a["recon"] == b["recon"], (a, b)
    # the export loads as a feature extractor and equals the EMA encoder of the final checkpoint
    ex = build_feature_extractor("mae", weights=os.path.join(out, "mae_encoder.pt"))
    ck_dir = os.path.join(out, "checkpoints", "step_0000004")
    ck = torch.load(os.path.join(ck_dir, "model.pt"), weights_only=True)
    with open(os.path.join(ck_dir, "meta.json")) as f:
        cfg_m = MAEConfig.from_dict(json.load(f)["model_config"])
    assert cfg_m.in_channels == 3 and cfg_m.patch_size == 1 and cfg_m.num_classes == 3
    m = MAEResNet(cfg_m)
    m.load_state_dict(ck["ema"]["0.9995"])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(ex(x)["layer4"], MAEFeatures(m.encoder)(x)["layer4"])
    # the checkpoint directory itself also loads as weights
    ex2 = build_feature_extractor("mae", weights=ck_dir)
    torch.testing.assert_close(ex2(x)["layer4"], ex(x)["layer4"])


def test_drift_mae_errors(tmp_path, tiny_shards, capsys):
    from drift.mae_train import main
    out = str(tmp_path / "run")
    assert main(_mae_args(tiny_shards, out, "--steps", "2")) == 0
    assert main(_mae_args(tiny_shards, out, "--steps", "2", "--width", "8", "--resume", "auto")) == 2
    assert "model config" in capsys.readouterr().err
    assert main(_mae_args(tiny_shards, out, "--steps", "2", "--lr", "1e-3", "--batch-size", "6",
                          "--resume", "auto")) == 2
    assert "batch_size=4; this run has batch_size=6" in capsys.readouterr().err
    ck = os.path.join(out, "checkpoints", "step_0000002", "model.pt")
    with open(ck, "r+b") as f:
        f.truncate(100)
    assert main(_mae_args(tiny_shards, out, "--steps", "2", "--resume", "auto")) == 2
    assert "model.pt is corrupt or unreadable" in capsys.readouterr().err
    assert main(["--out", out]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert main(_mae_args(tiny_shards, out, "--cls-ft-steps", "9")) == 2
    assert main(_mae_args(tiny_shards, out, "--threads", "-1")) == 2
    assert "--threads must be >= 0" in capsys.readouterr().err
    assert main(_mae_args(str(tmp_path / "missing"), out)) == 2


def test_channels_last_input_gives_same_result():
    # loaders hand out HWC-strided batches; the encoder must treat them like contiguous ones
    torch.manual_seed(0)
    model = MAEResNet(_tiny(in_channels=3))
    x = torch.randn(4, 8, 8, 3).permute(0, 3, 1, 2)
    mask = random_patch_mask(4, 8, 8, generator=torch.Generator().manual_seed(0))
    for inp in (x, x.contiguous()):
        model.zero_grad()
        loss, _ = model(inp, mask=mask)
        loss.backward()
        if inp is x:
            ref = (loss.detach(), model.encoder.stages[1].blocks[0].shortcut[0].weight.grad.clone())
    torch.testing.assert_close(loss.detach(), ref[0])
    torch.testing.assert_close(model.encoder.stages[1].blocks[0].shortcut[0].weight.grad, ref[1])


def test_drift_mae_nonfinite_loss_writes_crash_checkpoint(tmp_path, tiny_shards, monkeypatch, capsys):
    from drift.mae_train import main
    orig = MAEResNet.mae_loss

    def nan_loss(self, *a, **k):
        loss, info = orig(self, *a, **k)
        return loss * float("nan"), info

    monkeypatch.setattr(MAEResNet, "mae_loss", nan_loss)
    out = str(tmp_path / "run")
    assert main(_mae_args(tiny_shards, out, "--steps", "2")) == 1
    assert "non-finite loss nan at step 1" in capsys.readouterr().err
    assert os.path.isfile(os.path.join(out, "checkpoints", "crash_step_0000001", "model.pt"))
    assert not os.path.exists(os.path.join(out, "mae_encoder.pt"))


def test_initialization_is_flax_lecun_normal():
    torch.manual_seed(0)
    model = MAEResNet(MAEConfig(width=64, in_channels=4, patch_size=1, num_classes=10)).requires_grad_(False)
    for name, w in [("encoder.stages.0.blocks.0.conv1", model.encoder.stages[0].blocks[0].conv1.weight),
                    ("encoder.stages.3.blocks.1.conv2", model.encoder.stages[3].blocks[1].conv2.weight),
                    ("decoder.ups.0.convs.0.0", model.decoder.ups[0].convs[0][0].weight),
                    ("head", model.head.weight)]:
        # jax lecun_normal: a unit normal truncated to [-2, 2], scaled to variance exactly 1 / fan_in
        fan_in = w[0].numel()
        assert abs(float(w.std()) * fan_in ** 0.5 - 1.0) < 0.03, name
        assert float(w.abs().max()) <= 2.0 / 0.87962566103423978 / fan_in ** 0.5 + 1e-7, name
    assert float(model.decoder.out.bias.abs().max()) == 0.0 and float(model.head.bias.abs().max()) == 0.0
    gn = model.encoder.stem[1]
    assert torch.equal(gn.weight, torch.ones(64)) and torch.equal(gn.bias, torch.zeros(64))


def test_drift_mae_clips_at_two_and_ramps_from_zero():
    from drift.mae_train import MAETrainConfig, cls_weight_at, parse_cli
    cfg = parse_cli(["--data", "d"])
    assert cfg.max_grad_norm == 2.0  # official train_mae.py: clip_by_global_norm(2.0)
    with pytest.raises(ValueError, match="--max-grad-norm"):
        parse_cli(["--data", "d", "--max-grad-norm", "-1"])
    c = MAETrainConfig(data="d", steps=100, cls_ft_steps=10, cls_ramp_steps=4, cls_weight=0.1)
    # official: finetune_cls * min(1, (step - start) / max(1, warmup)), start = steps - cls_ft_steps
    assert [cls_weight_at(c, s) for s in (89, 90, 91, 93, 94, 99)] == \
        [0.0, 0.0, pytest.approx(0.025), pytest.approx(0.075), 0.1, 0.1]
    c0 = MAETrainConfig(data="d", steps=100, cls_ft_steps=10, cls_ramp_steps=0, cls_weight=0.1)
    assert [cls_weight_at(c0, s) for s in (90, 91)] == [0.0, 0.1]


def test_group_norm_of_single_values_gives_the_bias():
    # one channel per group on a 1x1 map of one sample: torch's GroupNorm refuses it, Flax returns the bias
    from drift.features.mae_resnet import group_norm
    gn = group_norm(8)
    assert gn.num_groups == 8
    with torch.no_grad():
        gn.bias.copy_(torch.randn(8))
    x = torch.randn(1, 8, 1, 1)
    torch.testing.assert_close(gn(x), gn.bias.view(1, 8, 1, 1))
    # torch's own path (two samples) agrees up to its rounding of x - mean(x) over one value
    torch.testing.assert_close(gn(torch.cat([x, torch.randn(1, 8, 1, 1)]))[:1], gn(x), atol=1e-4, rtol=0)
    assert torch.isnan(gn(torch.full((1, 8, 1, 1), float("nan")))).all()
