"""SD-VAE wrapper and the latent cache: encode/decode round trip on a tiny random AutoencoderKL,
`drift-prep latents` (flips, resume, errors) and `drift.latent_data` (one flip per sample, exact resume)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep import latents as latmod
from data_prep import pack as packmod
from drift.features import DecodeFirst, WeightsError, build_feature_extractor, load_vae
from drift.latent_data import LatentShards, build_latent_loader, is_latent_dir
from tests.data_fixtures import save_tiny_vae

SIZE = 32  # images; latents are 4 x 4 x 4


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae"), SIZE)


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    from data_prep.cli import main as prep
    src = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        os.makedirs(src / c)
        for i in range(4):
            arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(arr).save(src / c / f"{i}.png")
    out = tmp_path_factory.mktemp("shards")
    assert prep(["imagefolder", str(src), str(out), "--size", str(SIZE), "--shard-size", "3", "--workers", "1",
                 "--quiet"]) == 0
    return str(out)


def test_vae_roundtrip_and_decode_grad(vae_dir):
    vae = load_vae(vae_dir)
    assert not any(p.requires_grad for p in vae.parameters())
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    z = vae.encode(x, sample=False)
    assert z.shape == (2, 4, SIZE // 8, SIZE // 8)
    raw = vae.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(z, raw * 0.18215)
    zs = vae.encode(x, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(zs, z)  # a posterior sample differs from the mean
    zz = z.clone().requires_grad_(True)
    y = vae.decode(zz)
    assert y.shape == x.shape
    torch.testing.assert_close(y, vae.vae.decode(z / 0.18215).sample)
    y.square().sum().backward()
    assert zz.grad is not None and zz.grad.abs().sum() > 0


def test_decode_first_extractor(vae_dir):
    ex = build_feature_extractor("mae", vae=vae_dir, in_channels=3, patch_size=2, width=4, layers=(1, 1, 1, 1))
    assert isinstance(ex, DecodeFirst) and ex.input_space == "latent"
    z = torch.randn(2, 4, 4, 4, requires_grad=True)
    f = ex(z)
    assert f["global"].shape == (2, 1, 64)  # the vanilla term stays on the generator's latent
    assert f["norm_x"].shape == (2, 1, 12)  # RMS of the patchified decoded image
    # squared: the plain sum of a group-normalized map's channel means is identically 0 (zero gradient)
    f["layer1_mean"].square().sum().backward()
    assert z.grad.abs().sum() > 0


def test_vae_errors(tmp_path):
    with pytest.raises(WeightsError, match="VAE directory not found: .*nowhere"):
        load_vae(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="empty has no config.json"):
        load_vae(tmp_path / "empty")


def test_prep_latents_flips_roundtrip_and_loader(tmp_path, vae_dir, image_shards):
    out = str(tmp_path / "lat")
    assert latmod.main([image_shards, out, "--vae", vae_dir, "--size", str(SIZE), "--batch-size", "2",
                        "--posterior", "mean", "--device", "cpu", "--quiet"]) == 0
    m = json.load(open(os.path.join(out, "manifest.json")))
    src_m = json.load(open(os.path.join(image_shards, "manifest.json")))
    assert m["kind"] == "latents" and m["num_samples"] == src_m["num_samples"] == 8
    assert m["latent_shape"] == [2, 4, 4, 4] and len(m["shards"]) == len(src_m["shards"]) == 3
    assert is_latent_dir(out) and not is_latent_dir(image_shards)
    # each stored pair equals a direct encode of the ADM-cropped image and of its mirror
    data = LatentShards(out)
    vae = load_vae(vae_dir)
    key_img = {}
    for s in src_m["shards"]:
        for key, img, cls in latmod._read_source_shard(image_shards, s["name"]):
            key_img[key] = (latmod._to_array(img, SIZE), int(cls))
    keys = []
    for s in m["shards"]:
        with open(os.path.join(out, s["index"])) as f:
            keys += [line.split(" ")[3].split(".")[0] for line in f.read().splitlines()[1:]]
    for i, key in enumerate(keys):
        arr, label = key_img[key]
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        ref = vae.encode(torch.cat([x, x.flip(-1)]), sample=False)
        for flip in (0, 1):
            z, y = data.get(i, flip)
            assert y == label
            torch.testing.assert_close(torch.from_numpy(z), ref[flip], rtol=1e-4, atol=1e-5)
    data.close()
    # loader: one flip per sample, labels in range, exact resume
    ld = build_latent_loader(out, 3, seed=1)
    batches = [next(ld) for _ in range(5)]  # crosses an epoch boundary (2 batches per epoch)
    assert batches[0][0].shape == (3, 4, 4, 4) and batches[0][0].dtype == torch.float32
    assert batches[0][1].dtype == torch.int64 and int(batches[0][1].max()) < 2
    assert (ld.channels, ld.image_size, ld.num_classes, ld.num_samples) == (4, 4, 2, 8)
    with pytest.raises(ValueError, match="holds 4x4 latents, image_size=32"):
        build_latent_loader(out, 3, image_size=32)
    ld2 = build_latent_loader(out, 3, seed=1)
    next(ld2), next(ld2), next(ld2)
    state = ld2.state_dict()
    ld3 = build_latent_loader(out, 3, seed=1)
    ld3.load_state_dict(state)
    for ref_b in batches[3:]:
        b = next(ld3)
        assert torch.equal(b[0], ref_b[0]) and torch.equal(b[1], ref_b[1])
    with pytest.raises(ValueError, match="seed=1"):
        build_latent_loader(out, 3, seed=2).load_state_dict(state)
    # both flips are used over many epochs
    ld4 = build_latent_loader(out, 8, seed=0)
    seen = torch.stack([next(ld4)[0].sum(dim=(1, 2, 3)) for _ in range(8)])
    assert len(torch.unique(seen.round(decimals=4))) > 8
    # ranks split each epoch
    a, b = build_latent_loader(out, 2, rank=0, world_size=2), build_latent_loader(out, 2, rank=1, world_size=2)
    assert not torch.equal(next(a)[0], next(b)[0])
    # The trainer's entry point picks the loader from the directory itself; the image loader refuses latents.
    from drift.data import build_loader, open_loader
    lat = open_loader(out, 3, seed=1)
    assert lat.kind == "latents" and lat.classes == src_m["classes"] and lat.vae_scale == pytest.approx(0.18215)
    assert torch.equal(next(lat)[0], batches[0][0])
    img = open_loader(image_shards, 3, backend="pil")
    assert img.kind == "images" and next(img)[0].shape == (3, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="holds drift-prep latents"):
        build_loader(out, 3, backend="pil")


def test_prep_latents_resume_is_byte_identical(tmp_path, vae_dir, image_shards, monkeypatch):
    args = ["--vae", vae_dir, "--size", str(SIZE), "--batch-size", "4", "--device", "cpu", "--quiet"]
    full = str(tmp_path / "full")
    assert latmod.main([image_shards, full] + args) == 0
    part = str(tmp_path / "part")
    monkeypatch.setenv(packmod.FAIL_ENV, "1")
    with pytest.raises(RuntimeError, match="injected failure"):
        latmod.main([image_shards, part] + args)
    monkeypatch.delenv(packmod.FAIL_ENV)
    assert not os.path.exists(os.path.join(part, "manifest.json"))
    with open(os.path.join(part, "shard-000002.tar.partial"), "wb") as f:  # a half-written leftover
        f.write(b"garbage")
    assert latmod.main([image_shards, part] + args) == 0
    for name in sorted(os.listdir(full)):
        if name.endswith((".tar", ".idx")):
            assert open(os.path.join(full, name), "rb").read() == open(os.path.join(part, name), "rb").read(), name
    assert not any(n.endswith(".partial") for n in os.listdir(part))


def test_prep_latents_and_loader_errors(tmp_path, vae_dir, image_shards, capsys):
    assert latmod.main([image_shards, str(tmp_path / "o"), "--vae", str(tmp_path / "novae"), "--quiet"]) == 2
    assert "novae" in capsys.readouterr().err
    assert latmod.main([str(tmp_path / "nosrc"), str(tmp_path / "o"), "--vae", vae_dir, "--quiet"]) == 2
    assert "manifest.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a latent shard directory"):
        build_latent_loader(image_shards, 2)
    out = str(tmp_path / "lat")
    assert latmod.main([image_shards, out, "--vae", vae_dir, "--size", str(SIZE), "--device", "cpu", "--quiet"]) == 0
    tar = os.path.join(out, "shard-000001.tar")
    with open(tar, "r+b") as f:
        f.truncate(600)
    with pytest.raises(ValueError, match="shard-000001.tar is truncated"):
        build_latent_loader(out, 2)


def test_drift_mae_on_latents(tmp_path, vae_dir, image_shards):
    """Latent-MAE pretraining both ways: VAE-encoding augmented images on the fly, and from a latent cache."""
    from drift.mae_train import main as mae_main
    common = ["--width", "4", "--layers", "1,1,1,1", "--batch-size", "4", "--steps", "2", "--log-every", "1",
              "--loader-backend", "pil", "--no-progress", "--num-threads", "1"]
    out = str(tmp_path / "onthefly")
    assert mae_main(["--data", image_shards, "--out", out, "--vae", vae_dir] + common) == 0
    ex = build_feature_extractor("mae-latent", weights=os.path.join(out, "mae_encoder.pt"))
    assert ex.encoder.cfg.in_channels == 4 and ex.encoder.cfg.patch_size == 1
    assert ex(torch.randn(2, 4, 4, 4))["conv1"].shape == (2, 16, 4)
    lat = str(tmp_path / "lat")
    assert latmod.main([image_shards, lat, "--vae", vae_dir, "--size", str(SIZE), "--device", "cpu", "--quiet"]) == 0
    out2 = str(tmp_path / "cached")
    assert mae_main(["--data", lat, "--out", out2] + common) == 0
    with open(os.path.join(out2, "log.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    assert mae_main(["--data", lat, "--out", out2, "--vae", vae_dir] + common) == 2  # latents twice: refused
