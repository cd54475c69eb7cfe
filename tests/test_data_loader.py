"""drift.data loaders: DALI (CPU decode here, "mixed" in the gpu tier) and the PIL fallback on the same shards."""
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from data_prep.cli import main
from drift import schema
from drift.data import build_loader, dali_available, rrc_params
from tests.data_fixtures import encode, make_bad_imagefolder, make_idx, noise_image, write

BACKENDS = [pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="DALI not installed")),
            "pil"]


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory):
    """37 distinct random 12x12 grayscale images in 5 classes, 3 shards (PNG: decoders must agree exactly)."""
    root = tmp_path_factory.mktemp("idx")
    arrays = make_idx(str(root / "src"), n_train=37, n_test=4, hw=(12, 12))
    assert main(["idx", str(root / "src"), str(root / "out"), "--shard-size", "13", "--workers", "1",
                 "--quiet"]) == 0
    return str(root / "out"), arrays["train"]


@pytest.fixture(scope="module")
def jpeg_data(tmp_path_factory):
    """RGB JPEGs (4:2:0, as cameras write them), 20 square 24x24 and 6 non-square, in 2 classes."""
    root = tmp_path_factory.mktemp("jpg")
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        for i in range(10):
            write(str(root / "sq" / c / f"{i}.jpg"), encode(noise_image(rng, 24, 24), "JPEG", quality=90))
        for i, (w, h) in enumerate(((30, 22), (22, 31), (40, 27))):
            write(str(root / "rect" / c / f"{i}.jpg"), encode(noise_image(rng, w, h), "JPEG", quality=90))
    for name in ("sq", "rect"):
        assert main(["imagefolder", str(root / name), str(root / (name + "_out")), "--shard-size", "7",
                     "--workers", "1", "--quiet"]) == 0
    return str(root / "sq_out"), str(root / "rect_out")


def take(loader, n_batches):
    xs, ys = zip(*(next(loader) for _ in range(n_batches)))
    return torch.cat(xs), torch.cat(ys)


def ids_of(images, source):
    """Map each loaded [1, H, W] uint8 image back to its index in the source array (images are distinct)."""
    lookup = {a.tobytes(): i for i, a in enumerate(source)}
    return [lookup[x[0].numpy().tobytes()] for x in images]


@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch_covers_every_sample_once(idx_data, backend):
    path, (images, labels) = idx_data
    with build_loader(path, 8, backend=backend, output="uint8", seed=3) as loader:
        assert (loader.num_classes, loader.num_samples, loader.channels, loader.image_size) == (5, 37, 1, 12)
        x, y = take(loader, 10)  # 80 samples: two full epochs and a bit
    assert x.shape == (80, 1, 12, 12) and x.dtype == torch.uint8 and y.dtype == torch.int64
    for e in range(2):
        ids = ids_of(x[37 * e: 37 * (e + 1)], images)
        assert sorted(ids) == list(range(37)), f"epoch {e} is not a permutation"
        assert y[37 * e: 37 * (e + 1)].tolist() == [int(labels[i]) for i in ids]  # labels travel with pixels
    assert ids_of(x[:37], images) != ids_of(x[37:74], images)  # reshuffled every epoch


@pytest.mark.skipif(not dali_available(), reason="DALI not installed")
def test_dali_and_pil_agree(idx_data, jpeg_data):
    path, (images, _) = idx_data
    got = {}
    for backend in ("dali", "pil"):
        with build_loader(path, 37, backend=backend, output="float") as loader:
            got[backend] = next(loader)
    (xd, yd), (xp, yp) = got["dali"], got["pil"]
    assert Counter(yd.tolist()) == Counter(yp.tolist())  # same label multiset over an epoch
    u8 = torch.from_numpy(images[:, None])
    ref = {i: (u8[i].float() - 127.5) / 127.5 for i in range(37)}
    for xs in (xd, xp):  # float output is (x - 127.5) / 127.5 for both, pixel for pixel (PNG decode is exact)
        ids = ids_of(((xs * 127.5) + 127.5).round().to(torch.uint8), images)
        for x, i in zip(xs, ids):
            torch.testing.assert_close(x, ref[i], atol=1e-6, rtol=0)
    # JPEG: libjpeg-turbo on both sides decodes identically at the stored size. Resampling (center crop to
    # another size) differs by filter rounding (measured max 2 of 255, mean < 0.3 for square images) and, for
    # non-square ones, by DALI resampling with the exact fractional scale of the long side (measured max 5,
    # mean < 0.9); the tolerances leave a small margin over those measurements
    sq, rect = jpeg_data
    for p, size, max_tol, mean_tol in ((sq, None, 0, 0.0), (sq, 16, 3, 0.5), (sq, 32, 3, 0.5), (rect, 16, 8, 1.2)):
        out = {}
        n = 20 if p == sq else 6  # one epoch
        for backend in ("dali", "pil"):
            with build_loader(p, n, backend=backend, output="uint8", image_size=size) as loader:
                out[backend] = next(loader)
        (a, la), (b, lb) = out["dali"], out["pil"]
        assert a.shape == b.shape == (n, 3, size or 24, size or 24)
        assert Counter(la.tolist()) == Counter(lb.tolist())
        for i in range(n):  # orders differ: pair each DALI image with its closest PIL image of the same label
            diff = (a[i:i + 1].int() - b.int()).abs()
            diff[lb != la[i]] = 255
            j = int(diff.amax(dim=(1, 2, 3)).argmin())
            assert int(diff[j].max()) <= max_tol and float(diff[j].float().mean()) <= mean_tol, (p, size, i)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_ranks_are_disjoint_and_cover_the_epoch(idx_data, backend):
    path, (images, _) = idx_data
    seen = []
    for rank in range(2):
        with build_loader(path, 6, backend=backend, output="uint8", rank=rank, world_size=2, seed=5) as loader:
            n = loader.local_epoch_size
            assert n in (18, 19)
            seen.append(ids_of(take(loader, 4)[0][:n], images))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(37))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["center", "train"])
def test_state_dict_resumes_exactly(idx_data, backend, mode):
    path, _ = idx_data
    kw = dict(backend=backend, mode=mode, image_size=10, seed=11)
    with build_loader(path, 7, **kw) as loader:
        take(loader, 3)
        sd = json.loads(json.dumps(loader.state_dict()))  # must survive a JSON checkpoint
        assert sd["samples_consumed"] == 21 and sd["epoch"] == 0
        expected = take(loader, 6)  # crosses the epoch boundary at sample 37
    with build_loader(path, 7, **kw) as resumed:
        resumed.load_state_dict(sd)
        sd_again = resumed.state_dict()  # a checkpoint saved right after resuming, before any batch
        got = take(resumed, 6)
        assert resumed.state_dict()["epoch"] == 1
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    with build_loader(path, 7, **kw) as again:
        again.load_state_dict(sd_again)
        assert torch.equal(take(again, 6)[0], expected[0])
    with build_loader(path, 7, **kw) as a, build_loader(path, 7, **kw) as b:  # same seed, same stream
        first = take(a, 4)
        assert torch.equal(first[0], take(b, 4)[0])
    with build_loader(path, 7, **{**kw, "seed": 12}) as c:
        assert not torch.equal(first[0], take(c, 4)[0])
    with build_loader(path, 5, **kw) as other, pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="closed"):
        next(other)


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_mode_crops_and_flips(jpeg_data, backend):
    sq, _ = jpeg_data
    with build_loader(sq, 20, backend=backend, output="uint8") as loader:
        center = next(loader)
    with build_loader(sq, 20, backend=backend, output="uint8", mode="train", image_size=16, seed=1) as loader:
        x, y = take(loader, 2)
    assert x.shape == (40, 3, 16, 16)
    # an epoch of random crops: no crop equals the center crop resized, and the two epochs differ
    assert not torch.equal(x[:20], x[20:])
    assert Counter(y[:20].tolist()) == Counter(center[1].tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_packed_bad_input_decodes(tmp_path, backend):
    """What drift-prep keeps or normalizes (CMYK, 16-bit, palette, alpha, EXIF, gray JPEG, BMP, jpg+png mixed)
    must be readable by the loader's decoder: one full epoch, labels as counted in the manifest."""
    make_bad_imagefolder(str(tmp_path / "src"))
    assert main(["imagefolder", str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "1", "--quiet"]) == 0
    m = schema.read_manifest(str(tmp_path / "out"))
    with build_loader(str(tmp_path / "out"), m["num_samples"], backend=backend, mode="train",
                      image_size=16) as loader:
        x, y = next(loader)
    assert x.shape == (m["num_samples"], 3, 16, 16) and torch.isfinite(x).all()
    assert Counter(y.tolist()) == {i: c for i, c in enumerate(m["class_counts"]) if c}


def test_rrc_params_follow_the_scale_and_ratio_ranges():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(2000):
        left, top, w, h = rrc_params(rng, 64, 48)
        assert 0 <= left and left + w <= 64 and 0 <= top and top + h <= 48
        areas.append(w * h / (64 * 48))
    areas = np.array(areas)
    assert areas.min() >= 0.18 and areas.max() <= 1.0 and 0.45 < areas.mean() < 0.65
    assert rrc_params(rng, 200, 10)[2:] == (13, 10)  # extreme aspect: ratio clamped to 4/3 → central crop


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_override(idx_data, jpeg_data, backend):
    path, _ = idx_data
    with build_loader(path, 4, backend=backend, channels=3, output="uint8") as loader:
        x, _ = next(loader)
    assert x.shape == (4, 3, 12, 12) and torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    with build_loader(jpeg_data[0], 4, backend=backend, channels=1) as loader:
        assert loader.channels == 1 and next(loader)[0].shape == (4, 1, 24, 24)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output", ["float", "uint8"])
def test_batches_are_contiguous_nchw(jpeg_data, backend, output):
    """Channels-last batches crash the CPU backward of strided 1x1 convs in torch 2.14; the loader hands out NCHW."""
    with build_loader(jpeg_data[0], 4, backend=backend, mode="train", output=output) as loader:
        x, _ = next(loader)
    assert x.is_contiguous() and x.shape == (4, 3, 24, 24)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_shards_give_errors_naming_them(tmp_path, idx_data, backend):
    import shutil

    src, _ = idx_data
    path = tmp_path / "copy"
    shutil.copytree(src, path)
    data = (path / "shard-000001.tar").read_bytes()
    (path / "shard-000001.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="shard-000001.tar.*truncated"):
        build_loader(str(path), 4, backend=backend)
    (path / "shard-000001.tar").write_bytes(data)
    os.remove(path / "shard-000002.idx")
    with pytest.raises(FileNotFoundError, match="shard-000002"):
        build_loader(str(path), 4, backend=backend)
    shutil.copy(os.path.join(src, "shard-000002.idx"), path / "shard-000002.idx")
    # same length, one image's bytes zeroed: caught by the header scan before any decoding
    idx = schema.parse_index((path / "shard-000000.idx").read_text())
    blob = bytearray((path / "shard-000000.tar").read_bytes())
    off, size, _ = idx[4]["png"]
    blob[off:off + size] = b"\0" * size
    (path / "shard-000000.tar").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=f"shard-000000.tar.* at byte {off}"):
        build_loader(str(path), 37, backend=backend)


def test_bad_arguments(idx_data, tmp_path):
    path, _ = idx_data
    for kw, msg in ((dict(mode="random"), "mode"), (dict(output="half"), "output"), (dict(backend="cv2"), "backend"),
                    (dict(rank=2, world_size=2), "rank"), (dict(channels=2), "channels"),
                    (dict(image_size=0), "image_size"), (dict(seed=-1), "seed"), (dict(device="cuda"), "CUDA")):
        if kw.get("device") == "cuda" and torch.cuda.is_available():
            continue
        with pytest.raises(ValueError, match=msg):
            build_loader(path, 4, **{"backend": "pil", **kw})
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(path, 0)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        build_loader(str(tmp_path), 4)


def test_index_in_another_component_order(tmp_path, idx_data):
    """Indexes from other writers (e.g. image before cls) go through the general parser: same samples."""
    import shutil
    from drift.data import ShardSet

    src, _ = idx_data
    path = tmp_path / "copy"
    shutil.copytree(src, path)
    for f in path.glob("*.idx"):
        lines = f.read_text().splitlines()
        swapped = [" ".join(ln.split(" ")[4:] + ln.split(" ")[:4]) for ln in lines[1:]]
        f.write_text("\n".join([lines[0]] + swapped) + "\n")
    assert ShardSet(str(path)).samples == ShardSet(src).samples


def test_auto_falls_back_to_pil_without_dali(idx_data, monkeypatch):
    import drift.data as data

    monkeypatch.setattr(data, "dali_available", lambda: False)
    with data.build_loader(idx_data[0], 4) as loader:
        assert isinstance(loader, data.PilLoader) and next(loader)[0].shape == (4, 1, 12, 12)
    with pytest.raises(ImportError, match="nvidia.dali"):
        data.build_loader(idx_data[0], 4, backend="dali")


def test_mixed_sizes_need_image_size(jpeg_data):
    _, rect = jpeg_data
    with pytest.raises(ValueError, match="image_size"):
        build_loader(rect, 4, backend="pil")


@pytest.mark.gpu
@pytest.mark.skipif(not dali_available(), reason="DALI not installed")
def test_dali_mixed_decode_on_gpu(jpeg_data, idx_data):
    sq, _ = jpeg_data
    for mode in ("center", "train"):
        with build_loader(sq, 20, backend="dali", device="cuda", mode=mode, image_size=16, seed=2) as loader:
            x, y = take(loader, 2)
            assert x.is_cuda and y.is_cuda and x.shape == (40, 3, 16, 16) and y.dtype == torch.int64
            assert -1 <= float(x.min()) and float(x.max()) <= 1
            sd = loader.state_dict()
            expected = take(loader, 2)
        with build_loader(sq, 20, backend="dali", device="cuda", mode=mode, image_size=16, seed=2) as resumed:
            resumed.load_state_dict(sd)
            got = take(resumed, 2)
        assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    # nvJPEG vs libjpeg-turbo: same label multiset, pixels within IDCT/upsampling rounding at the stored size
    with build_loader(sq, 20, backend="dali", device="cuda", output="uint8") as g, \
            build_loader(sq, 20, backend="pil", output="uint8") as c:
        (a, la), (b, lb) = next(g), next(c)
    assert Counter(la.tolist()) == Counter(lb.tolist())
    a = a.cpu()
    for i in range(20):
        diff = (a[i:i + 1].int() - b.int()).abs()
        diff[lb != la[i].cpu()] = 255
        assert int(diff.amax(dim=(1, 2, 3)).min()) <= 8
