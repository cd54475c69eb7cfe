"""drift-convert against the official Flax code: the parity fixtures of tests/fixtures/official (made by its
make_fixtures.py under JAX) are converted and must give the official outputs to 1e-5 relative; broken
release folders are refused with an error naming the tensor, field or file.

Each fixture's `ema_params.msgpack` is rebuilt from its layout (recipe.py) and checked byte for byte against
the SHA-256 of the file Flax wrote.
"""
import json
import os
import shutil
import subprocess
import sys

import msgpack
import numpy as np
import pytest
import torch

from drift import convert
from drift.convert import ConvertError
from tests.fixtures.official import recipe

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "official", "models")
TOL = 1e-5  # relative error allowed against the official outputs (fp32 on both sides)
# The decoder runs 13 more conv + GroupNorm layers on top of the 33 of the encoder; the official fp32 outputs
# themselves are ~6e-6 off exact ones already at the encoder (Flax's GroupNorm takes E[x^2] - E[x]^2).
DECODER_TOL = 2e-5
MAES = ("mae_latent_w64", "mae_pixel_w64", "mae_latent_w32")


def _fixture(kind: str, name: str):
    d = os.path.join(FIXTURES, kind, "jax", name)
    with open(os.path.join(d, "layout.json")) as f:
        layout = json.load(f)
    with open(os.path.join(d, "metadata.json")) as f:
        meta = json.load(f)
    return layout, meta, np.load(os.path.join(d, "io.npz"))


def _write_release(path, tree_or_blob, meta) -> str:
    """A release folder: ema_params.msgpack (a tree to pack, or bytes) + metadata.json."""
    os.makedirs(path, exist_ok=True)
    blob = tree_or_blob if isinstance(tree_or_blob, bytes) else recipe.pack_flax_msgpack(tree_or_blob)
    with open(os.path.join(path, "ema_params.msgpack"), "wb") as f:
        f.write(blob)
    with open(os.path.join(path, "metadata.json"), "w") as f:
        json.dump(meta, f)
    return str(path)


def _stage(tmp_path, kind: str, name: str):
    """The fixture as the release ships it (checked equal to Flax's file), and its io.npz."""
    layout, meta, io = _fixture(kind, name)
    blob = recipe.build_msgpack(layout)
    with open(os.path.join(FIXTURES, kind, "jax", name, "ema_params.sha256")) as f:
        assert recipe.sha256(blob) == f.read().strip(), "rebuilt msgpack differs from the file Flax wrote"
    return _write_release(tmp_path / name, blob, meta), io


def _cli(*args):
    """Run the installed console script, as a user would."""
    exe = os.path.join(os.path.dirname(sys.executable), "drift-convert")
    assert os.path.isfile(exe), f"{exe} is not installed (run `make build`)"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300)


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


# ------------------------------------------------------------------------------------------------ parity

def test_generator_matches_official_through_the_cli(tmp_path):
    from drift.sampler import is_latent, load_generator
    src, io = _stage(tmp_path, "gen", "tiny_gen")
    out = tmp_path / "run"
    r = _cli("gen", src, out)
    assert r.returncode == 0, r.stderr
    model, meta = load_generator(str(out))  # what drift-sample and drift-eval load
    assert meta["step"] == 1234 and is_latent(meta) and meta["num_classes"] == 10
    x = torch.from_numpy(io["x"]).permute(0, 3, 1, 2)  # official noise is BHWC
    with torch.no_grad():
        y = model(x, torch.from_numpy(io["labels"]).long(), torch.from_numpy(io["cfg_scale"]),
                  torch.from_numpy(io["noise_labels"]).long())
    err = _rel(y.permute(0, 2, 3, 1).double().numpy(), io["samples"].astype(np.float64))
    assert err <= TOL, f"generator output differs from the official one by {err:.2e} (relative)"


def _sketch_errors(feats, io, x, patch: int):
    """{key: relative error of its sketch against the official one}; official layouts where ours differ."""
    n, c = x.shape[:2]
    errs = {}
    for k, v in feats.items():
        if k == "global":  # the official flattens BHWC
            v = v.reshape(x.shape).permute(0, 2, 3, 1).reshape(n, 1, -1)
        elif k == "norm_x" and patch > 1:  # patch channels: ours (c, i, j), official (i, j, c)
            v = v.reshape(n, 1, c, patch, patch).permute(0, 1, 3, 4, 2).reshape(n, 1, -1)
        assert tuple(v.shape) == tuple(io[f"shape_{k}"]), k
        errs[k] = _rel(recipe.sketch(v.double().numpy()), io[f"sketch_{k}"])
    return errs


@pytest.fixture
def scratch(tmp_path):
    """tmp_path, emptied after the test: a width-64 fixture is a 110 MB msgpack plus its converted copy, and
    pytest keeps the temporary directories of recent runs."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize("name", MAES)
def test_mae_matches_official(scratch, name):
    tmp_path = scratch
    from drift.features import build_feature_extractor, read_weights
    from drift.features.mae_resnet import MAEResNet, MAEConfig
    src, io = _stage(tmp_path, "mae", name)
    out = str(tmp_path / f"{name}.pt")
    if name == "mae_pixel_w64":
        r = _cli("mae", src, out)
        assert r.returncode == 0, r.stderr
    else:
        assert convert.convert_mae(src, out) == out
    # What `--feature-weights OUT` builds for the trainer's extractor name.
    ex = build_feature_extractor("mae-pixel" if "pixel" in name else "mae-latent", weights=out)
    shape = tuple(int(s) for s in io["input_shape"])
    x = torch.from_numpy(recipe.uniform_inputs(int(io["input_seed"]), shape)).permute(0, 3, 1, 2)
    with torch.no_grad():
        feats = ex(x)
    official = {k[len("sketch_"):] for k in io.files if k.startswith("sketch_")} - {"recon"}
    assert set(feats) == official and len(feats) == 86
    errs = _sketch_errors(feats, io, x, ex.encoder.cfg.patch_size)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= TOL, f"{name}: key {worst} differs from the official one by {errs[worst]:.2e}"

    # The decoder and the classifier head, which only pretraining uses, converted as well.
    sd, cfg = read_weights(out)
    with torch.device("meta"):
        model = MAEResNet(MAEConfig.from_dict(cfg))
    model.to_empty(device="cpu").load_state_dict(sd)
    p, n = cfg["patch_size"], x.shape[0]
    with torch.no_grad():
        pred, maps = model.reconstruct(x, torch.zeros(n, 1, 32, 32))
        logits = model.head(maps["layer4"].mean(dim=(2, 3)))
    pred = pred.reshape(n, -1, p, p, 32, 32).permute(0, 4, 5, 2, 3, 1)  # -> official (h, w, i, j, c)
    assert _rel(recipe.sketch(pred.double().numpy()), io["sketch_recon"]) <= DECODER_TOL
    assert _rel(logits.double().numpy(), io["logits"].astype(np.float64)) <= TOL


def test_params_wrapper_is_accepted(tmp_path):
    layout, meta, _ = _fixture("gen", "tiny_gen")
    tree = recipe.fill(layout)
    plain = _write_release(tmp_path / "plain", tree, meta)
    wrapped = _write_release(tmp_path / "wrapped", {"params": tree}, meta)
    kw = convert.generator_kwargs(meta["model_config"])
    a = convert.convert_generator_state(convert.read_params(plain), kw)
    b = convert.convert_generator_state(convert.read_params(wrapped), kw)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ refusals

def _drop(tree, path):
    *head, last = path.split("/")
    for k in head:
        tree = tree[k]
    del tree[last]


def _add(tree, path, value):
    *head, last = path.split("/")
    for k in head:
        tree = tree.setdefault(k, {})
    tree[last] = value


def _changed_generator(tmp_path, change, path) -> str:
    layout, meta, _ = _fixture("gen", "tiny_gen")
    tree = recipe.fill(layout)
    if change == "missing":
        _drop(tree, path)
    else:
        _add(tree, path, np.ones(64, np.float32))
    return _write_release(tmp_path / "src", tree, meta)


@pytest.mark.parametrize("change,path", [
    ("missing", "LightningDiT_0/blocks_1/Attention_0/k_norm/weight"),
    ("extra", "LightningDiT_0/blocks_2/RMSNorm_0/weight"),
])
def test_cli_refuses_a_missing_or_extra_generator_tensor(tmp_path, change, path):
    r = _cli("gen", _changed_generator(tmp_path, change, path), tmp_path / "out")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("drift-convert: error:") and repr(path) in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,path", [
    ("missing", "noise_embeds_31/embedding"),
    ("missing", "LightningDiT_0/TorchLinear_1/Dense_0/bias"),
    ("extra", "LightningDiT_0/FinalLayer_0/TorchLinear_2/Dense_0/kernel"),
    ("extra", "noise_embeds_32/embedding"),
])
def test_generator_tensor_errors_name_the_tensor(tmp_path, change, path):
    with pytest.raises(ConvertError, match=repr(path)):
        convert.convert_generator(_changed_generator(tmp_path, change, path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_mae_refuses_a_missing_or_extra_tensor(tmp_path):
    layout, meta, _ = _fixture("mae", "mae_latent_w32")
    tree = recipe.fill(layout)
    _drop(tree, "encoder/stages_2/layers_0/proj_gn/scale")
    with pytest.raises(ConvertError, match="'encoder/stages_2/layers_0/proj_gn/scale'"):
        convert.convert_mae(_write_release(tmp_path / "a", tree, meta), str(tmp_path / "a.pt"))
    tree = recipe.fill(layout)
    _add(tree, "encoder/stages_0/layers_0/proj_conv/kernel", np.ones((1, 1, 32, 32), np.float32))
    with pytest.raises(ConvertError, match="'encoder/stages_0/layers_0/proj_conv/kernel' has no place"):
        convert.convert_mae(_write_release(tmp_path / "b", tree, meta), str(tmp_path / "b.pt"))
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists()


def test_wrong_shape_and_config_are_refused(tmp_path):
    layout, meta, _ = _fixture("gen", "tiny_gen")
    tree = recipe.fill(layout)
    tree["LightningDiT_0"]["pos_embed"] = np.zeros((1, 15, 64), np.float32)
    with pytest.raises(ConvertError, match="'LightningDiT_0/pos_embed' has shape"):
        convert.convert_generator(_write_release(tmp_path / "a", tree, meta), str(tmp_path / "a_out"))
    layout, mae_meta, _ = _fixture("mae", "mae_latent_w32")  # metadata of another input than the weights'
    bad = dict(mae_meta, model_config=dict(mae_meta["model_config"], in_channels=3))
    with pytest.raises(ConvertError, match=r"'encoder/conv1/kernel' has shape \(3, 3, 4, 32\)"):
        convert.convert_mae(_write_release(tmp_path / "m", recipe.fill(layout), bad), str(tmp_path / "m.pt"))
    layout, meta, _ = _fixture("gen", "tiny_gen")
    for field, value, msg in [("noise_classes", 128, "noise_classes=128"), ("use_rope", False, "use_rope=False"),
                              ("cond_dim", 32, "cond_dim=32"), ("mystery", 1, "unknown model_config field 'mystery'"),
                              ("out_channels", 3, "out_channels=3")]:
        bad = dict(meta, model_config=dict(meta["model_config"], **{field: value}))
        with pytest.raises(ConvertError, match=msg):
            convert.convert_generator(_write_release(tmp_path / field, b"", bad), str(tmp_path / f"{field}_out"))


def test_cli_errors_name_the_file(tmp_path):
    layout, meta, _ = _fixture("gen", "tiny_gen")
    src = _write_release(tmp_path / "src", recipe.fill(layout), meta)
    os.remove(os.path.join(src, "metadata.json"))
    r = _cli("gen", src, tmp_path / "out")
    assert r.returncode == 2 and "metadata.json" in r.stderr and "Traceback" not in r.stderr
    # a truncated download
    _write_release(tmp_path / "src", recipe.build_msgpack(layout)[:1000], meta)
    r = _cli("gen", src, tmp_path / "out")
    assert r.returncode == 2 and "ema_params.msgpack is not a Flax msgpack file" in r.stderr
    # a generator given to `mae`, and an output that exists
    _write_release(tmp_path / "src", recipe.fill(layout), meta)
    with pytest.raises(ConvertError, match="use `drift-convert gen`"):
        convert.convert_mae(src, str(tmp_path / "w.pt"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    with pytest.raises(ConvertError, match="already exists"):
        convert.convert_generator(src, str(tmp_path / "taken"))
    assert (tmp_path / "taken" / "x").read_text() == "keep"


# ------------------------------------------------------------------------------------------------ the reader

def test_reader_decodes_bfloat16_and_chunked_arrays(tmp_path):
    values = np.array([[1.0, -2.5, 0.15625], [0.001953125, 65280.0, -0.0]], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)  # exact: every value fits in bfloat16
    big = np.arange(10, dtype=np.float32)
    tree = {"a": {"w": msgpack.ExtType(1, msgpack.packb(((2, 3), "bfloat16", bf16.tobytes()), use_bin_type=True))},
            "b": {"__msgpack_chunked_array__": True, "shape": {"0": 2, "1": 5},
                  "chunks": {"0": big[:6], "1": big[6:]}}}
    path = tmp_path / "p.msgpack"
    path.write_bytes(recipe.pack_flax_msgpack(tree))
    flat = convert.flatten(convert.read_flax_msgpack(str(path)))
    assert flat["a/w"].dtype == np.float32 and np.array_equal(flat["a/w"], values)
    assert np.array_equal(flat["b"], big.reshape(2, 5))


def test_patch_permutation_matches_the_official_patchify():
    c, p = 3, 4
    x = torch.randn(2, c, 8, 8)
    from drift.features.base import patchify
    ours = patchify(x, p)  # [N, c*p*p, 2, 2], channels (c, i, j)
    # official: "b (h1 h2) (w1 w2) c -> b h1 w1 (h2 w2 c)"
    theirs = x.permute(0, 2, 3, 1).reshape(2, 2, p, 2, p, c).permute(0, 1, 3, 2, 4, 5).reshape(2, 2, 2, -1)
    perm = convert._patch_permutation(c, p)
    assert torch.equal(ours.permute(0, 2, 3, 1), theirs[..., perm])
