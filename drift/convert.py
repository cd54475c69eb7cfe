"""drift-convert: import the official released Flax weights into drift, without JAX (msgpack and numpy only).

    drift-convert gen models/gen/jax/latent_L_sota runs/latent_L_sota     # -> a drift run directory
    drift-sample runs/latent_L_sota --vae sd-vae-ft-mse --alpha 1.0 --out grid.png
    drift-convert mae models/mae/jax/mae_latent_640 weights/mae_latent_640.pt
    drift-train --preset L/2 --feature-weights weights/mae_latent_640.pt ...

DIR is one model folder of the official release, holding `ema_params.msgpack` (Flax's `msgpack_serialize` of the
EMA parameter tree, optionally wrapped in {"params": ...}) and `metadata.json` (its `model_config` holds the
constructor fields). Every tensor is mapped onto drift's modules; a tensor that is missing, left over, or of
the wrong shape is an error naming it, and so is a configuration drift's modules cannot express.

`gen` writes a checkpoint into the run directory OUT (`OUT/checkpoints/step_XXXXXXX/`, as the trainer writes
them; `model` and the one EMA copy both hold the released EMA weights; no optimizer state), which
`drift-sample OUT` and `drift-eval OUT` load. `mae` writes the file OUT in the format of `drift-mae`'s
`mae_encoder.pt` (architecture + the full MAE-ResNet: encoder, decoder and classifier head), which
`--feature-weights OUT` loads.

Parameter names (official -> drift). Generator, Dense kernels transposed, `.../TorchLinear_k/Dense_0` written
`TorchLinear_k`: `Embed_0` -> `y_embedder`; `noise_embeds_{0..S-1}` stacked in that order -> `style_embedder`;
`TimestepEmbedder_0/TorchLinear_{0,1}` -> `alpha_embedder.mlp.{0,2}`; `RMSNorm_0` -> `alpha_embedder.norm`; in
`LightningDiT_0/`: `TorchLinear_0` -> `x_embedder`, `TorchLinear_1` -> `prefix_proj`, `pos_embed`, `cls_embed`,
`blocks_i/{RMSNorm_0, RMSNorm_1}` -> `blocks.i.{norm1, norm2}`, `blocks_i/Attention_0/{TorchLinear_0, q_norm,
k_norm, TorchLinear_1}` -> `blocks.i.attn.{qkv, q_norm, k_norm, proj}`, `blocks_i/SwiGLUFFN_0/TorchLinear_{0,1}`
-> `blocks.i.mlp.w12` (W1 then W3 along the output dim), `SwiGLUFFN_0/TorchLinear_2` -> `blocks.i.mlp.w3`,
`blocks_i/TorchLinear_0` -> `blocks.i.adaLN_modulation.1`, `FinalLayer_0/{RMSNorm_0, TorchLinear_0,
TorchLinear_1}` -> `final_layer.{norm_final, adaLN_modulation.1, linear}`. Config: `n_cls_tokens` ->
`num_prefix_tokens`, `noise_coords` -> `num_style_tokens` (0 when `noise_classes` is 0), `noise_classes` -> the
codebook size (64 in drift).
MAE, conv kernels (kh, kw, in, out) -> (out, in, kh, kw), GroupNorm `scale` -> `weight`: `encoder/conv1, gn1` ->
`encoder.stem.{0,1}`; `encoder/stages_s/layers_k/{conv1, gn1, conv2, gn2, proj_conv, proj_gn}` ->
`encoder.stages.s.blocks.k.{conv1, norm1, conv2, norm2, shortcut.0, shortcut.1}`; `encoder/layer{s+1}_norm` ->
`encoder.stages.s.norm`; `decoder/bridge/{conv, gn}` -> `decoder.center.{0,1}`; `decoder/{up43, up32, up21,
up10}/{concat_norm_fn, proj/{conv, gn}, refine/{conv, gn}}` -> `decoder.ups.{0,1,2,3}.{norm, convs.0.{0,1},
convs.1.{0,1}}`; `decoder/head` -> `decoder.out`; `fc` -> `head`. The official pixel encoder flattens each p x p
patch as (i, j, c), drift as (c, i, j): the stem's input channels and the decoder head's output channels are
permuted accordingly. `patch_size` (the mask patch), `dropout_prob` and `use_bf16` only concern pretraining.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import msgpack
import numpy as np
import torch

from drift.cli import run_main

PARAMS_FILE = "ema_params.msgpack"
METADATA_FILE = "metadata.json"
_NDARRAY, _NPSCALAR = 1, 3  # flax.serialization's msgpack ext type codes (2, complex, never holds a parameter)
_CHUNKED = "__msgpack_chunked_array__"  # Flax splits arrays over 1 GiB into chunks under this marker

# The constructors' defaults, which the official loaders use for fields a metadata.json leaves out.
DITGEN_DEFAULTS = dict(num_classes=1001, noise_classes=0, noise_coords=1, input_size=32, in_channels=3,
                       n_cls_tokens=0, patch_size=2, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0,
                       out_channels=3, use_qknorm=False, use_swiglu=False, use_rope=False, use_rmsnorm=False,
                       use_bf16=False, attn_fp32=True, use_remat=False)
MAE_DEFAULTS = dict(num_classes=1000, in_channels=3, base_channels=64, patch_size=4, dropout_prob=0.0,
                    layers=[2, 2, 2, 2], use_bf16=False, input_patch_size=1)


class ConvertError(ValueError):
    """The release folder cannot be converted: a file, a tensor or a configuration field is wrong."""


# ------------------------------------------------------------------------------------------------ reading

def _ndarray(data: bytes) -> np.ndarray:
    shape, dtype_name, buf = msgpack.unpackb(data, raw=True)
    name = dtype_name.decode()
    if name == "bfloat16":  # not a numpy dtype: the upper half of a float32
        bits = np.frombuffer(buf, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(buf, dtype=np.dtype(name)).reshape(shape)


def _ext_hook(code: int, data: bytes):
    if code == _NDARRAY:
        return _ndarray(data)
    if code == _NPSCALAR:
        return _ndarray(data)[()]
    raise ConvertError(f"unsupported msgpack extension type {code} in a Flax parameter file")


def _unchunk(tree):
    if isinstance(tree, dict):
        if _CHUNKED in tree:
            shape = [tree["shape"][str(i)] for i in range(len(tree["shape"]))]
            chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
            return np.concatenate(chunks).reshape(shape)
        return {k: _unchunk(v) for k, v in tree.items()}
    return tree


def read_flax_msgpack(path: str) -> dict:
    """The tree `flax.serialization.msgpack_restore` would return: nested dicts of numpy arrays."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except ConvertError:
        raise
    except Exception as e:  # truncated or not msgpack
        raise ConvertError(f"{path} is not a Flax msgpack file (truncated or corrupt?): {type(e).__name__}: {e}") from e
    if not isinstance(tree, dict):
        raise ConvertError(f"{path} does not hold a parameter tree (a {type(tree).__name__} at the top)")
    return _unchunk(tree)


def flatten(tree: dict, prefix: str = "") -> Dict[str, np.ndarray]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


class Tensors:
    """The release's flat parameters, handed out once each; every error names the tensor and the file."""

    def __init__(self, flat: Dict[str, np.ndarray], source: str):
        self.flat, self.source = dict(flat), source

    def take(self, path: str, shape: Sequence[int]) -> torch.Tensor:
        """The tensor at `path` as a writable float32 torch tensor; it must have the official `shape`."""
        if path not in self.flat:
            raise ConvertError(f"{self.source}: missing tensor {path!r}")
        a = self.flat.pop(path)
        if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
            raise ConvertError(f"{self.source}: {path!r} is not a float array")
        if tuple(a.shape) != tuple(shape):
            raise ConvertError(f"{self.source}: tensor {path!r} has shape {tuple(a.shape)}, but the model that "
                               f"metadata.json describes needs {tuple(shape)}")
        return torch.from_numpy(np.array(a, dtype=np.float32))

    def check_all_taken(self) -> None:
        if self.flat:
            left = sorted(self.flat)
            raise ConvertError(f"{self.source}: tensor {left[0]!r} has no place in the drift model "
                               f"({len(left)} left over: {', '.join(left[:5])}{', ...' if len(left) > 5 else ''})")


class StateBuilder:
    """Fills drift's state_dict, key by key, from official tensors; `expected` (a state_dict of the drift model,
    e.g. on the meta device) gives every shape, so the official shapes are checked before any reshaping."""

    def __init__(self, tensors: Tensors, expected: Dict[str, torch.Tensor]):
        self.tensors, self.expected, self.sd = tensors, expected, {}

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.expected[key].shape)

    def copy(self, key: str, path: str) -> None:
        """Same layout on both sides (embeddings, norm scales, position tables)."""
        self.sd[key] = self.tensors.take(path, self.shape(key))

    def dense(self, key: str, path: str) -> None:
        """A Flax Dense (kernel [in, out], bias) -> `key`.weight [out, in], `key`.bias."""
        out_f, in_f = self.shape(f"{key}.weight")
        self.sd[f"{key}.weight"] = self.tensors.take(f"{path}/kernel", (in_f, out_f)).t().contiguous()
        self.sd[f"{key}.bias"] = self.tensors.take(f"{path}/bias", (out_f,))

    def conv(self, key: str, path: str, perm_in: Optional[torch.Tensor] = None,
             perm_out: Optional[torch.Tensor] = None) -> None:
        """A Flax Conv kernel (kh, kw, in, out) -> `key`.weight (out, in, kh, kw) (+ bias if drift has one);
        perm_in / perm_out reorder the input / output channels (drift channel k = official channel perm[k])."""
        o, i, kh, kw = self.shape(f"{key}.weight")
        w = self.tensors.take(f"{path}/kernel", (kh, kw, i, o)).permute(3, 2, 0, 1)
        if perm_in is not None:
            w = w[:, perm_in]
        if perm_out is not None:
            w = w[perm_out]
        self.sd[f"{key}.weight"] = w.contiguous()
        if f"{key}.bias" in self.expected:
            b = self.tensors.take(f"{path}/bias", (o,))
            self.sd[f"{key}.bias"] = b if perm_out is None else b[perm_out]

    def group_norm(self, key: str, path: str) -> None:
        """A Flax GroupNorm (scale, bias) -> `key`.weight, `key`.bias."""
        self.sd[f"{key}.weight"] = self.tensors.take(f"{path}/scale", self.shape(f"{key}.weight"))
        self.sd[f"{key}.bias"] = self.tensors.take(f"{path}/bias", self.shape(f"{key}.bias"))

    def done(self) -> Dict[str, torch.Tensor]:
        """The state_dict, once every official tensor is used and every drift key is set."""
        self.tensors.check_all_taken()
        unset = sorted(set(self.expected) - set(self.sd))
        if unset:  # a gap in the mapping itself, not in the user's file
            raise AssertionError(f"conversion leaves drift keys unset: {unset[:5]}")
        return self.sd


def read_metadata(src: str) -> dict:
    """metadata.json of a release folder (checked to hold a `model_config` object)."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"no such release folder: {src}")
    path = os.path.join(src, METADATA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{src} lacks {METADATA_FILE} (a release folder holds {PARAMS_FILE} + {METADATA_FILE})")
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError as e:
        raise ConvertError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise ConvertError(f"{path} has no 'model_config' object")
    return meta


def read_params(src: str) -> Tensors:
    """The flat parameters of a release folder's ema_params.msgpack (a {"params": ...} wrapper removed)."""
    path = os.path.join(src, PARAMS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{src} lacks {PARAMS_FILE} (a release folder holds {PARAMS_FILE} + {METADATA_FILE})")
    tree = read_flax_msgpack(path)
    if set(tree) == {"params"} and isinstance(tree["params"], dict):
        tree = tree["params"]
    return Tensors(flatten(tree), path)


def _fields(cfg: dict, defaults: dict, path: str) -> dict:
    """`cfg` completed with the constructor's defaults (as the official loaders build it); unknown fields refused."""
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise ConvertError(f"{path}: unknown model_config field {unknown[0]!r}")
    return dict(defaults, **cfg)


# ------------------------------------------------------------------------------------------------ generator

def generator_kwargs(model_config: dict, source: str = METADATA_FILE) -> dict:
    """DriftDiT constructor arguments for an official DitGen `model_config` (ConvertError if not expressible)."""
    from drift.model import STYLE_CODEBOOK_SIZE
    if "cond_dim" not in model_config:
        raise ConvertError(f"{source}: model_config lacks 'cond_dim' (DitGen has no default for it; is this an "
                           f"MAE? use `drift-convert mae`)")
    c = _fields(model_config, dict(DITGEN_DEFAULTS, cond_dim=None), source)
    for flag in ("use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm"):
        if c[flag] is not True:
            raise ConvertError(f"{source}: model_config {flag}={c[flag]!r}; drift's generator has only the "
                               f"released architecture (all four of qk-norm, SwiGLU, RoPE, RMSNorm)")
    if float(c["mlp_ratio"]) != 4.0:
        raise ConvertError(f"{source}: model_config mlp_ratio={c['mlp_ratio']!r}; drift's SwiGLU width needs 4.0")
    if c["cond_dim"] != c["hidden_size"]:
        raise ConvertError(f"{source}: model_config cond_dim={c['cond_dim']} differs from "
                           f"hidden_size={c['hidden_size']}; drift's conditioning has the hidden width")
    if c["out_channels"] != c["in_channels"]:
        raise ConvertError(f"{source}: model_config out_channels={c['out_channels']} differs from "
                           f"in_channels={c['in_channels']}")
    styles = int(c["noise_coords"]) if c["noise_classes"] > 0 else 0
    if styles and c["noise_classes"] != STYLE_CODEBOOK_SIZE:
        raise ConvertError(f"{source}: model_config noise_classes={c['noise_classes']}; drift's style "
                           f"codebooks have {STYLE_CODEBOOK_SIZE} entries")
    return dict(input_size=int(c["input_size"]), patch_size=int(c["patch_size"]), in_channels=int(c["in_channels"]),
                hidden_size=int(c["hidden_size"]), depth=int(c["depth"]), num_heads=int(c["num_heads"]),
                num_classes=int(c["num_classes"]), num_prefix_tokens=int(c["n_cls_tokens"]),
                num_style_tokens=styles, attn_fp32=bool(c["attn_fp32"]))


def _train_config(kw: dict, ema_decay: float, out_dir: str):
    """A TrainConfig whose generator is exactly `kw`: the preset of that architecture when there is one."""
    from drift.config import TrainConfig
    from drift.model import DRIFT_MODELS, build_generator_model
    base = dict(hidden_size=kw["hidden_size"], depth=kw["depth"], num_heads=kw["num_heads"],
                patch_size=kw["patch_size"], num_prefix_tokens=kw["num_prefix_tokens"],
                num_style_tokens=kw["num_style_tokens"], attn_fp32=kw["attn_fp32"], image_size=kw["input_size"],
                features="mae-latent" if kw["in_channels"] == 4 else "mae-pixel+convnext",
                ema_decay=(ema_decay,), out_dir=out_dir, compile=False)
    want = dict(kw, out_channels=None, style_codebook_size=None, grad_checkpointing=False)
    for name in DRIFT_MODELS:  # paper presets first; the first whose defaults do not override `kw`
        cfg = TrainConfig(model=name, **base).validate()
        with torch.device("meta"):
            got = build_generator_model(cfg, kw["num_classes"], kw["input_size"], kw["in_channels"]).config
        if all(got[k] == v for k, v in want.items() if v is not None):
            return cfg
    raise ConvertError(f"no drift generator preset can express {kw}")


def convert_generator_state(tensors: Tensors, kw: dict) -> Dict[str, torch.Tensor]:
    """drift's DriftDiT state_dict from the official tensors (module docstring has the mapping)."""
    from drift.model import DriftDiT
    with torch.device("meta"):
        expected = DriftDiT(**kw).state_dict()
    st = StateBuilder(tensors, expected)
    st.copy("y_embedder.weight", "Embed_0/embedding")
    S, D = kw["num_style_tokens"], kw["hidden_size"]
    codebook = (expected["style_embedder.weight"].shape[0] // S, D) if S else (0, D)
    # the S codebooks stacked in order: row i * 64 + s of drift's table is entry s of noise_embeds_i
    st.sd["style_embedder.weight"] = torch.cat(
        [tensors.take(f"noise_embeds_{i}/embedding", codebook) for i in range(S)] + [torch.zeros(0, D)])
    st.dense("alpha_embedder.mlp.0", "TimestepEmbedder_0/TorchLinear_0/Dense_0")
    st.dense("alpha_embedder.mlp.2", "TimestepEmbedder_0/TorchLinear_1/Dense_0")
    st.copy("alpha_embedder.norm.weight", "RMSNorm_0/weight")
    g = "LightningDiT_0"
    st.dense("x_embedder", f"{g}/TorchLinear_0/Dense_0")
    st.copy("pos_embed", f"{g}/pos_embed")
    if kw["num_prefix_tokens"] > 0:
        st.dense("prefix_proj", f"{g}/TorchLinear_1/Dense_0")
        st.copy("cls_embed", f"{g}/cls_embed")
    else:  # DitGen has neither without prefix tokens; drift keeps a projection it never uses
        st.sd.update({"prefix_proj.weight": torch.zeros(D, D), "prefix_proj.bias": torch.zeros(D),
                      "cls_embed": torch.zeros(1, 0, D)})
    hidden = expected["blocks.0.mlp.w12.bias"].shape[0] // 2 if kw["depth"] else 0
    for i in range(kw["depth"]):
        b, k = f"{g}/blocks_{i}", f"blocks.{i}"
        st.copy(f"{k}.norm1.weight", f"{b}/RMSNorm_0/weight")
        st.copy(f"{k}.norm2.weight", f"{b}/RMSNorm_1/weight")
        st.dense(f"{k}.attn.qkv", f"{b}/Attention_0/TorchLinear_0/Dense_0")
        st.copy(f"{k}.attn.q_norm.weight", f"{b}/Attention_0/q_norm/weight")
        st.copy(f"{k}.attn.k_norm.weight", f"{b}/Attention_0/k_norm/weight")
        st.dense(f"{k}.attn.proj", f"{b}/Attention_0/TorchLinear_1/Dense_0")
        # SwiGLU: silu(x W1) * (x W3) with W1, W3 two Dense layers; drift's w12 holds W1 then W3
        up = [f"{b}/SwiGLUFFN_0/TorchLinear_{j}/Dense_0" for j in (0, 1)]
        st.sd[f"{k}.mlp.w12.weight"] = torch.cat([tensors.take(f"{p}/kernel", (D, hidden)).t() for p in up])
        st.sd[f"{k}.mlp.w12.bias"] = torch.cat([tensors.take(f"{p}/bias", (hidden,)) for p in up])
        st.dense(f"{k}.mlp.w3", f"{b}/SwiGLUFFN_0/TorchLinear_2/Dense_0")
        st.dense(f"{k}.adaLN_modulation.1", f"{b}/TorchLinear_0/Dense_0")
    st.copy("final_layer.norm_final.weight", f"{g}/FinalLayer_0/RMSNorm_0/weight")
    st.dense("final_layer.adaLN_modulation.1", f"{g}/FinalLayer_0/TorchLinear_0/Dense_0")
    st.dense("final_layer.linear", f"{g}/FinalLayer_0/TorchLinear_1/Dense_0")
    return st.done()


def convert_generator(src: str, out: str) -> str:
    """Convert a release generator folder into the run directory `out`; returns the checkpoint directory."""
    from drift import checkpoint as ckpt
    _refuse_existing(out)
    meta = read_metadata(src)  # the configuration is checked before the (large) weights are read
    kw = generator_kwargs(meta["model_config"], os.path.join(src, METADATA_FILE))
    decay = float(meta.get("ema_decay", 0.999))
    if not 0.0 <= decay < 1.0:
        raise ConvertError(f"{os.path.join(src, METADATA_FILE)}: ema_decay={decay} is not in [0, 1)")
    cfg = _train_config(kw, decay, out)
    sd = convert_generator_state(read_params(src), kw)
    step = int(meta.get("step", 0))
    info = {k: v for k, v in meta.items() if k != "model_config"}
    run_meta = {"step": step, "config": cfg.to_dict(), "world_size": 1, "loop_state": {},
                "num_classes": kw["num_classes"], "item_shape": [kw["in_channels"], kw["input_size"], kw["input_size"]],
                # official rule (inference.py): a 4-channel generator outputs SD-VAE latents
                "data_kind": "latents" if kw["in_channels"] == 4 else "images",
                "class_names": [str(i) for i in range(kw["num_classes"])], "crash": False,
                "torch": torch.__version__,
                "converted_from": dict(info, source=os.path.abspath(src), model_config=meta["model_config"])}
    # The release holds only EMA weights: they are both the model and its one EMA copy (same tensors, stored once).
    return ckpt.save(out, step, rank=0, is_main=True, model_state=sd, ema_state={f"{decay:g}": sd}, optim_state={},
                     meta=run_meta, rank_state={})


# ------------------------------------------------------------------------------------------------ MAE

def mae_config(model_config: dict, tensors: Tensors, source: str = METADATA_FILE):
    """drift's MAEConfig for an official MAEResNetJAX `model_config` (+ the classifier's size from `fc`)."""
    from drift.features.mae_resnet import MAEConfig
    if "cond_dim" in model_config:
        raise ConvertError(f"{source}: model_config field 'cond_dim' belongs to a generator; use "
                           f"`drift-convert gen`")
    c = _fields(model_config, MAE_DEFAULTS, source)
    fc = tensors.flat.get("fc/kernel")
    if fc is None:
        raise ConvertError(f"{tensors.source}: missing tensor 'fc/kernel'")
    if "num_classes" in model_config and int(model_config["num_classes"]) != fc.shape[-1]:
        raise ConvertError(f"{source}: model_config num_classes={model_config['num_classes']}, but 'fc/kernel' "
                           f"has {fc.shape[-1]} outputs")
    return MAEConfig(in_channels=int(c["in_channels"]), patch_size=int(c["input_patch_size"]),
                     width=int(c["base_channels"]), layers=tuple(int(n) for n in c["layers"]), every_k_block=2,
                     num_classes=int(fc.shape[-1]))


def _patch_permutation(channels: int, p: int) -> torch.Tensor:
    """perm with drift_channel[k] = official_channel[perm[k]]: drift orders a patch (c, i, j), Flax (i, j, c)."""
    c, i, j = torch.meshgrid(torch.arange(channels), torch.arange(p), torch.arange(p), indexing="ij")
    return ((i * p + j) * channels + c).reshape(-1)


def convert_mae_state(tensors: Tensors, cfg) -> Dict[str, torch.Tensor]:
    """drift's MAEResNet state_dict (encoder, decoder, head) from the official tensors (module docstring)."""
    from drift.features.mae_resnet import MAEResNet
    with torch.device("meta"):
        expected = MAEResNet(cfg).state_dict()
    st = StateBuilder(tensors, expected)
    perm = _patch_permutation(cfg.in_channels, cfg.patch_size)
    st.conv("encoder.stem.0", "encoder/conv1", perm_in=perm)
    st.group_norm("encoder.stem.1", "encoder/gn1")
    for s, n in enumerate(cfg.layers):
        for k in range(n):
            o, d = f"encoder/stages_{s}/layers_{k}", f"encoder.stages.{s}.blocks.{k}"
            st.conv(f"{d}.conv1", f"{o}/conv1")
            st.group_norm(f"{d}.norm1", f"{o}/gn1")
            st.conv(f"{d}.conv2", f"{o}/conv2")
            st.group_norm(f"{d}.norm2", f"{o}/gn2")
            if f"{d}.shortcut.0.weight" in expected:  # both sides project the shortcut where the shape changes
                st.conv(f"{d}.shortcut.0", f"{o}/proj_conv")
                st.group_norm(f"{d}.shortcut.1", f"{o}/proj_gn")
        st.group_norm(f"encoder.stages.{s}.norm", f"encoder/layer{s + 1}_norm")
    st.conv("decoder.center.0", "decoder/bridge/conv")
    st.group_norm("decoder.center.1", "decoder/bridge/gn")
    n = len(cfg.layers)
    for i in range(n):  # up43, up32, up21, up10 for four stages
        o, d = f"decoder/up{n - i}{n - i - 1}", f"decoder.ups.{i}"
        st.group_norm(f"{d}.norm", f"{o}/concat_norm_fn")
        st.conv(f"{d}.convs.0.0", f"{o}/proj/conv")
        st.group_norm(f"{d}.convs.0.1", f"{o}/proj/gn")
        st.conv(f"{d}.convs.1.0", f"{o}/refine/conv")
        st.group_norm(f"{d}.convs.1.1", f"{o}/refine/gn")
    st.conv("decoder.out", "decoder/head", perm_out=perm)
    st.dense("head", "fc")
    return st.done()


def convert_mae(src: str, out: str) -> str:
    """Convert a release MAE folder into the weights file `out` (drift-mae's `mae_encoder.pt` format)."""
    _refuse_existing(out)
    meta = read_metadata(src)
    tensors = read_params(src)
    cfg = mae_config(meta["model_config"], tensors, os.path.join(src, METADATA_FILE))
    sd = convert_mae_state(tensors, cfg)
    info = {k: v for k, v in meta.items() if k != "model_config"}
    export = {"config": cfg.to_dict(), "ema": sd,
              "converted_from": dict(info, source=os.path.abspath(src), model_config=meta["model_config"])}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    torch.save(export, tmp)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------------------------ CLI

def _refuse_existing(out: str) -> None:
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out)):
        raise ConvertError(f"{out} already exists; choose a new output path (nothing was overwritten)")


def _main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="drift-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="kind", required=True, metavar="{gen,mae}")
    g = sub.add_parser("gen", help="a generator folder -> a drift run directory (drift-sample / drift-eval)")
    g.add_argument("dir", help="release folder with ema_params.msgpack + metadata.json (models/gen/jax/<name>)")
    g.add_argument("out", help="new run directory to write the checkpoint into")
    m = sub.add_parser("mae", help="an MAE-ResNet folder -> a weights file for --feature-weights")
    m.add_argument("dir", help="release folder with ema_params.msgpack + metadata.json (models/mae/jax/<name>)")
    m.add_argument("out", help="new weights file to write (e.g. weights/mae_latent_640.pt)")
    a = p.parse_args(argv)
    path = convert_generator(a.dir, a.out) if a.kind == "gen" else convert_mae(a.dir, a.out)
    print(path)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_main, argv, prog="drift-convert")


if __name__ == "__main__":
    sys.exit(main())
