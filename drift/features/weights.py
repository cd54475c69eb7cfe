"""Loading pretrained encoder weights from local files, with errors that name the file and the key.

Accepted formats (chosen by content, not by name):
* a safetensors file (``*.safetensors``, e.g. the `transformers` ``model.safetensors``);
* a `drift.checkpoint` directory (``meta.json`` + ``model.pt``, e.g. a drift-mae checkpoint): its EMA weights
  and the architecture in meta.json's ``model_config``;
* a ``torch.save`` file of a state_dict (``{name: tensor}``), or of a dict holding one under
  ``"state_dict"``, ``"model"`` or ``"ema"`` (``"ema"`` preferred: `drift-mae` checkpoints and exports),
  optionally with a ``"config"`` dict describing the architecture. Loaded with ``weights_only=True``.

Nothing is ever downloaded: weights only come from paths given by the user.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import nn


class WeightsError(ValueError):
    """A weights file is missing, unreadable or does not fit the model."""


def _is_safetensors(path: str) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < os.path.getsize(path)


def read_weights(path: str) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """Read a weights file -> (state_dict, config or None). Raises WeightsError naming `path`."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta.json")) \
            and os.path.isfile(os.path.join(path, "model.pt")):
        return _read_checkpoint_dir(path)
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin", "encoder.pt", "model.pt"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise WeightsError(f"weights directory {path} holds no model.safetensors / pytorch_model.bin / "
                               f"encoder.pt / model.pt")
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file
            return dict(load_file(path, device="cpu")), None
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as e:  # truncated zip, bad pickle, bad safetensors header, ...
        raise WeightsError(f"cannot read weights file {path} (truncated or corrupt?): {type(e).__name__}: {e}") from e
    config = None
    if isinstance(obj, Mapping):
        config = obj.get("config") if isinstance(obj.get("config"), Mapping) else None
        for k in ("ema", "state_dict", "model"):
            if isinstance(obj.get(k), Mapping):
                obj = obj[k]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path} does not hold a state_dict of tensors")
    return dict(obj), (dict(config) if config is not None else None)


def _read_checkpoint_dir(path: str) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """A `drift.checkpoint` directory (e.g. from drift-mae): the first EMA copy of model.pt, and the
    architecture from meta.json's ``model_config``."""
    import json
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        obj = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read checkpoint {path} (truncated or corrupt?): {type(e).__name__}: {e}") from e
    ema = obj.get("ema") if isinstance(obj, Mapping) else None
    if isinstance(ema, Mapping) and ema and all(isinstance(v, Mapping) for v in ema.values()):
        sd = ema[sorted(ema)[0]]  # one copy per decay: take the first
    elif isinstance(ema, Mapping) and ema:
        sd = ema
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        sd = obj["model"]
    else:
        raise WeightsError(f"checkpoint {path}/model.pt holds no model or EMA state")
    cfg = meta.get("model_config") if isinstance(meta, Mapping) else None
    return dict(sd), (dict(cfg) if isinstance(cfg, Mapping) else None)


def strip_prefixes(sd: Dict[str, torch.Tensor], prefixes: Iterable[str]) -> Dict[str, torch.Tensor]:
    """Drop a leading prefix (e.g. ``_orig_mod.``, ``module.``) from every key that has it."""
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def load_into(module: nn.Module, path: str, sd: Optional[Dict[str, torch.Tensor]] = None, *,
              select: Optional[str] = None, ignore_prefixes: Iterable[str] = ()) -> None:
    """Strictly load `path` (or an already read `sd`) into `module`.

    `select`: keep only keys under this prefix and strip it (e.g. ``"encoder."`` from a full MAE file).
    `ignore_prefixes`: file keys to drop (heads the extractor does not use).
    Any missing, unexpected or wrongly shaped key raises WeightsError naming `path` and the first such key.
    """
    if sd is None:
        sd, _ = read_weights(path)
    sd = strip_prefixes(sd, ("_orig_mod.", "module."))
    if select is not None:
        sd = {k[len(select):]: v for k, v in sd.items() if k.startswith(select)}
        if not sd:
            raise WeightsError(f"weights file {path} has no keys under {select!r}")
    ignore = tuple(ignore_prefixes)
    if ignore:
        sd = {k: v for k, v in sd.items() if not k.startswith(ignore)}
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing:
        raise WeightsError(f"weights file {path} does not match the model: missing key {missing[0]!r} "
                           f"({len(missing)} missing, {len(unexpected)} unexpected)")
    if unexpected:
        raise WeightsError(f"weights file {path} does not match the model: unexpected key {unexpected[0]!r} "
                           f"({len(unexpected)} unexpected)")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise WeightsError(f"weights file {path} does not match the model: key {k!r} has shape "
                               f"{tuple(sd[k].shape)} in the file, {tuple(v.shape)} in the model")
    module.load_state_dict(sd, strict=True)
