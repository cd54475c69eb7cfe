"""Training configuration: one dataclass (`TrainConfig`), named presets, a CLI generated from the fields.

Field names follow the official release where it has one (gen_per_label, pos_per_sample, neg_per_sample,
train_batch_size, positive_bank_size, negative_bank_size, push_per_step, R_list, cfg_min, cfg_max,
neg_cfg_pw, no_cfg_frac, ema_decay). Preset numbers come from the paper (Tables 2, 8) and the official
configs (`configs/gen/*.yaml` of the official release). Stdlib only.

    cfg = TrainConfig.from_preset("demo", max_steps=100)
    cfg = parse_cli(["--preset", "B/2", "--lr", "3e-4"])      # --preset first, then the other flags
    cfg.save_json(path); TrainConfig.load_json(path)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as JSON next to every checkpoint."""

    # ----- model -----
    model: str = "DriftDiT-B/2"  # generator preset name in drift.model.DRIFT_MODELS
    hidden_size: int = 0  # override the preset's width (0 = preset value)
    depth: int = 0  # override the preset's number of blocks (0 = preset value)
    num_heads: int = 0  # override the preset's attention heads (0 = preset value)
    patch_size: int = 0  # override the preset's patch size (0 = preset value)
    num_prefix_tokens: int = -1  # override the 16 in-context tokens (-1 = preset value)
    num_style_tokens: int = -1  # override the 32 summed style tokens (-1 = preset value; 0 = none)
    attn_fp32: bool = False  # attention softmax in fp32 under autocast (official pixel/ablation configs)
    grad_checkpointing: bool = False  # recompute block activations in backward (saves memory)

    # ----- data -----
    data_path: str = ""  # drift-prep shard directory (images or latents)
    image_size: int = 0  # training resolution (0 = the stored size)
    augment: str = "center"  # loader mode: "center" crop or "train" (RandomResizedCrop 0.2-1 + flip)
    loader_backend: str = "auto"  # "auto" (DALI when importable) | "dali" | "pil"
    loader_threads: int = 2  # decoder threads per rank

    # ----- features -----
    features: str = "pixels"  # feature extractor (drift.features.build_feature_extractor name)
    feature_weights: str = ""  # local weights file of the encoder ("" = random init: tests/demos only)
    feature_vae: str = ""  # local SD-VAE weights: decode latents before a pixel encoder ("" = none)

    # ----- drifting field -----
    train_batch_size: int = 64  # N_c: class labels per step (global, split across ranks)
    gen_per_label: int = 64  # N_neg: generated samples per label (also its negatives)
    pos_per_sample: int = 64  # N_pos: positives per label, from its class queue
    neg_per_sample: int = 16  # N_unc: unconditional real negatives per label, from the global queue
    R_list: Tuple[float, ...] = (0.02, 0.05, 0.2)  # kernel temperatures
    normalization: str = "xy"  # kernel normalization: "xy" (official) | "y" | "none"
    field_backend: str = "auto"  # drifting field backend: "auto" | "reference" | "cpp" | "triton"

    # ----- step memory (drift/step.py; benchmarks/RESULTS.md "Trainer on GPU") -----
    label_chunk: int = 0  # labels per chunk of the label-chunked step, same losses and gradients (0 = one graph)
    bf16_keys: bool = False  # feature keys kept and passed to the field in bf16 (the field computes in fp32)
    fused_loss: bool = False  # loss and gradient straight from the field's force (equal up to fp32 rounding)

    # ----- CFG (alpha) -----
    alpha_dist: str = "power"  # alpha sampler: "power" (p ~ alpha^-k) | "mixed" (same as power) | "uniform"
    cfg_min: float = 1.0  # smallest training alpha
    cfg_max: float = 4.0  # largest training alpha
    neg_cfg_pw: float = 3.0  # k of the power law p(alpha) ~ alpha^-k
    no_cfg_frac: float = 0.0  # fraction of labels trained at alpha = 1 exactly (with any alpha_dist, official)

    # ----- queues -----
    positive_bank_size: int = 128  # per-class queue length
    negative_bank_size: int = 1000  # global (unconditional) queue length
    push_per_step: int = 64  # fresh reals pushed into both queues per step (per rank; the loader batch)
    queue_warmup_batches: int = 0  # extra loader batches pushed before step 0 (0 = until every class has items)
    queue_dtype: str = "float32"  # queue storage: "float32" | "uint8" (image data only: a quarter of the memory)

    # ----- optimization -----
    max_steps: int = 30000  # training steps
    lr: float = 2e-4  # peak learning rate (constant after warmup)
    warmup_steps: int = 5000  # linear warmup from 1e-6 to lr
    lr_decay_steps: int = 0  # linear decay to 0 over the last N steps (0 = constant to the end, official)
    weight_decay: float = 0.01  # AdamW weight decay (all parameters, official)
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.95  # AdamW beta2
    max_grad_norm: float = 2.0  # global gradient-norm clip

    # ----- EMA -----
    ema_decay: Tuple[float, ...] = (0.999,)  # one EMA copy of the generator per decay

    # ----- logging / checkpoints -----
    out_dir: str = "outputs/run"  # run directory (checkpoints, log.jsonl, config.json)
    log_every: int = 10  # steps between logged lines (the only host syncs of the step)
    ckpt_every: int = 1000  # steps between checkpoints (the last step is always saved)
    keep_ckpts: int = 3  # step-numbered checkpoints kept (older ones deleted; 0 = keep all)
    wandb: str = "disabled"  # "online" | "offline" | "disabled"
    wandb_project: str = "drift"  # wandb project name
    run_name: str = ""  # wandb run name ("" = out_dir's name)
    progress: bool = True  # tqdm progress bar on rank 0

    # ----- sampling / evaluation -----
    vae: str = ""  # local SD-VAE directory that decodes a latent model's samples (drift-sample/drift-eval)
    eval_every: int = 0  # steps between small FID evaluations of the EMA generator at checkpoints (0 = off)
    eval_samples: int = 5000  # samples per FID evaluation (validation-label rule, split over the ranks)
    eval_alpha: Tuple[float, ...] = (1.0,)  # CFG strengths of the FID evaluations (one fid/alpha=<a> each)
    eval_inception_weights: str = ""  # torch-fidelity Inception weights file for eval_every (local path)
    eval_ref_stats: str = ""  # reference stats .npz (mu/sigma or ref_mu/ref_sigma) for eval_every

    # ----- system -----
    seed: int = 0  # global seed (model init, per-step sampling streams, loader)
    device: str = "auto"  # "auto" (cuda when available) | "cpu" | "cuda"
    compile: bool = True  # torch.compile the generator and the encoder (warm-up, then state restored)
    precompile: bool = True  # compile the step's Triton field kernels in parallel processes before step 0 (GPU)
    bf16: bool = True  # bf16 autocast for generator and encoder on CUDA (never on CPU)
    threads: int = 0  # torch intra-op threads on CPU (0 = torch default)

    # ----- derived / helpers -----
    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first bad field; return self."""
        for f in fields(self):  # every field: its declared type, finite numbers, no null
            _coerce(f, getattr(self, f.name))
        pos_ints = ("train_batch_size", "gen_per_label", "pos_per_sample", "positive_bank_size",
                    "negative_bank_size", "push_per_step", "max_steps", "log_every", "ckpt_every", "loader_threads")
        for name in pos_ints:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("neg_per_sample", "warmup_steps", "lr_decay_steps", "keep_ckpts", "hidden_size", "depth", "num_heads",
                     "patch_size", "image_size", "threads", "queue_warmup_batches", "label_chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if self.gen_per_label < 2:
            raise ValueError("gen_per_label must be >= 2 (each generated sample needs another one as negative)")
        if not self.R_list or any(not (r > 0 and math.isfinite(r)) for r in self.R_list):
            raise ValueError(f"R_list must be non-empty positive temperatures, got {self.R_list}")
        if not self.ema_decay or any(not (0 <= d < 1) for d in self.ema_decay):
            raise ValueError(f"ema_decay must hold decays in [0, 1), got {self.ema_decay}")
        if len(set(self.ema_decay)) != len(self.ema_decay):  # one EMA copy per decay, keyed by the decay
            raise ValueError(f"ema_decay must not repeat a decay, got {self.ema_decay}")
        choices = {"augment": ("center", "train"), "loader_backend": ("auto", "dali", "pil"),
                   "normalization": ("xy", "y", "none"), "field_backend": ("auto", "reference", "cpp", "triton"),
                   "alpha_dist": ("power", "mixed", "uniform"), "wandb": ("online", "offline", "disabled"),
                   "device": ("auto", "cpu", "cuda"), "queue_dtype": ("float32", "uint8")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not (1.0 <= self.cfg_min <= self.cfg_max):
            raise ValueError(f"need 1 <= cfg_min <= cfg_max, got cfg_min={self.cfg_min}, cfg_max={self.cfg_max}")
        if not (0.0 <= self.no_cfg_frac <= 1.0):
            raise ValueError(f"no_cfg_frac must be in [0, 1], got {self.no_cfg_frac}")
        for name in ("lr", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not self.out_dir:
            raise ValueError("out_dir must not be empty")
        if self.num_prefix_tokens < -1:
            raise ValueError(f"num_prefix_tokens must be >= -1, got {self.num_prefix_tokens}")
        if self.num_style_tokens < -1:
            raise ValueError(f"num_style_tokens must be >= -1, got {self.num_style_tokens}")
        return self

    def model_kwargs(self) -> Dict[str, Any]:
        """Constructor overrides for the DRIFT_MODELS preset (only the non-default ones)."""
        kw: Dict[str, Any] = {}
        for name in ("hidden_size", "depth", "num_heads", "patch_size"):
            if getattr(self, name):
                kw[name] = getattr(self, name)
        if self.num_prefix_tokens >= 0:
            kw["num_prefix_tokens"] = self.num_prefix_tokens
        if self.num_style_tokens >= 0:
            kw["num_style_tokens"] = self.num_style_tokens
        if self.attn_fp32:
            kw["attn_fp32"] = True
        return kw

    # ----- (de)serialization -----
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for f in fields(self):
            if isinstance(d[f.name], tuple):
                d[f.name] = list(d[f.name])
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any], *, strict: bool = True) -> "TrainConfig":
        """Build from a dict (e.g. a checkpoint's JSON); unknown keys raise when strict, missing keys default."""
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object of field names to values, got {type(d).__name__}")
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown and strict:
            raise ValueError(f"unknown config keys {unknown}")
        kw = {}
        for k, v in d.items():
            if k not in names:
                continue
            kw[k] = _coerce(names[k], v)
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_json(self, path: str) -> None:
        from drift.schema import write_atomic
        write_atomic(path, self.to_json() + "\n")

    @classmethod
    def load_json(cls, path: str) -> "TrainConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TrainConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        d = dict(PRESETS[name])
        d.update(overrides)
        return cls.from_dict(d).validate()

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _coerce(f: dataclasses.Field, v: Any) -> Any:
    """Convert a JSON value to the field's declared type (lists -> tuples of floats); ValueError naming the key
    when it is not one (null, a string for a number or a list, NaN or infinity, a bool for a number)."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if v is None:
        raise ValueError(f"config key {f.name} is null; give a value, or leave the key out for the default")
    if t.startswith("Tuple"):
        if _is_number(v):
            v = [v]
        # a string is iterable: "12" would otherwise become (1.0, 2.0)
        if not isinstance(v, (list, tuple)) or not all(_is_number(x) for x in v):
            raise ValueError(f"config key {f.name} must be a list of numbers, got {v!r}")
        if not all(math.isfinite(x) for x in v):
            raise ValueError(f"config key {f.name} must hold finite numbers, got {v!r}")
        return tuple(float(x) for x in v)
    if t == "bool":
        if not isinstance(v, bool):
            raise ValueError(f"config key {f.name} must be a bool, got {v!r}")
        return v
    if t == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"config key {f.name} must be an int, got {v!r}")
        return v
    if t == "float":
        if not _is_number(v):
            raise ValueError(f"config key {f.name} must be a number, got {v!r}")
        if not math.isfinite(v):
            raise ValueError(f"config key {f.name} must be a finite number, got {v!r}")
        return float(v)
    if t == "str":
        if not isinstance(v, str):
            raise ValueError(f"config key {f.name} must be a string, got {v!r}")
        return v
    return v


# Shape-defining keys: a checkpoint can only be resumed by a config that agrees on these.
SHAPE_KEYS = ("model", "hidden_size", "depth", "num_heads", "patch_size", "num_prefix_tokens", "num_style_tokens",
              "image_size", "features", "positive_bank_size", "negative_bank_size", "ema_decay")


# ---------------------------------------------------------------------------------------------------
# Presets (paper Tables 2, 8; official configs). Only the differences from the dataclass defaults.
# ---------------------------------------------------------------------------------------------------

PRESETS: Dict[str, Dict[str, Any]] = {
    # Ablation default (B/2 latent, 100 epochs): N_c 64, N_pos 64, N_neg 64, N_unc 16, k = 3.
    "ablation-B/2": dict(model="DriftDiT-B/2", features="mae-latent", train_batch_size=64, gen_per_label=64,
                         pos_per_sample=64, neg_per_sample=16, lr=2e-4, weight_decay=0.01, warmup_steps=5000,
                         max_steps=30000, ema_decay=(0.999,), alpha_dist="power", neg_cfg_pw=3.0,
                         push_per_step=64, attn_fp32=True),
    # System-level latent B/2: N_c 128, N_pos 64 (official config; the paper's Table 8 says 128), k = 5.
    "B/2": dict(model="DriftDiT-B/2", features="mae-latent", train_batch_size=128, gen_per_label=64,
                pos_per_sample=64, neg_per_sample=32, lr=4e-4, weight_decay=0.0, warmup_steps=10000,
                max_steps=200000, ema_decay=(0.999, 0.9995, 0.9998, 0.9999), alpha_dist="power",
                neg_cfg_pw=5.0, push_per_step=128),
    # Latent L/2: 50% of labels at alpha = 1, the rest k = 3.
    "L/2": dict(model="DriftDiT-L/2", features="mae-latent", train_batch_size=128, gen_per_label=64,
                pos_per_sample=64, neg_per_sample=32, lr=4e-4, weight_decay=0.01, warmup_steps=10000,
                max_steps=200000, ema_decay=(0.999, 0.9995, 0.9998, 0.9999), alpha_dist="mixed",
                neg_cfg_pw=3.0, no_cfg_frac=0.5, push_per_step=64),
    # Pixel B/16 and L/16: MAE-ResNet + ConvNeXt-V2 features, RandomResizedCrop + flip on the reals.
    "B/16": dict(model="DriftDiT-B/16", features="mae-pixel+convnext", augment="train", train_batch_size=128,
                 gen_per_label=64, pos_per_sample=128, neg_per_sample=32, lr=2e-4, weight_decay=0.01,
                 warmup_steps=10000, max_steps=100000, ema_decay=(0.999, 0.9995, 0.9998, 0.9999),
                 alpha_dist="power", neg_cfg_pw=5.0, push_per_step=128, attn_fp32=True, grad_checkpointing=True),
    "L/16": dict(model="DriftDiT-L/16", features="mae-pixel+convnext", augment="train", train_batch_size=128,
                 gen_per_label=64, pos_per_sample=128, neg_per_sample=32, lr=4e-4, weight_decay=0.01,
                 warmup_steps=10000, max_steps=100000, ema_decay=(0.999, 0.9995, 0.9998, 0.9999),
                 alpha_dist="power", neg_cfg_pw=5.0, push_per_step=128, attn_fp32=True, grad_checkpointing=True),
    # CPU demo on Fashion-MNIST (28x28x1): a tiny DriftDiT, encoder-free multi-scale pixel features, N_c = 10.
    # Tuned by measurement (benchmarks/RESULTS.md, "Trainer"); trains in minutes on 2 cores.
    # Departures from the official recipe, each measured there: 4 style tokens instead of 32 (the summed style
    # embeddings otherwise drown the class embedding for hundreds of steps), lr 3e-3 with a linear cooldown
    # over the last 1000 steps (the run is 3000 steps, not 100k).
    "demo": dict(model="DriftDiT-N/4", hidden_size=64, depth=3, num_heads=4, num_prefix_tokens=4,
                 num_style_tokens=4,
                 features="pixel-multiscale", train_batch_size=10, gen_per_label=16, pos_per_sample=32,
                 neg_per_sample=8, lr=3e-3, weight_decay=0.01, warmup_steps=50, max_steps=3000,
                 lr_decay_steps=1000,
                 ema_decay=(0.99,), alpha_dist="power", neg_cfg_pw=3.0, no_cfg_frac=0.0, push_per_step=64,
                 positive_bank_size=128, negative_bank_size=1000, log_every=25, ckpt_every=500,
                 keep_ckpts=2, compile=False, device="cpu", out_dir="outputs/demo", loader_threads=1),
}

# Memory levers of the paper presets at their per-GPU shapes on one 8-GPU node (ablation: 8 labels per GPU, the
# others 16), chosen with benchmarks/memory_model.py (benchmarks/RESULTS.md, "Trainer on GPU"): the label-chunked
# step (exact), bf16 feature keys where 16 labels of MAE-640 keys need them, generator checkpointing for L/2.
# All five take the fused loss (no per-key elementwise kernels or fp32 key copies around the field); the pixel
# presets keep their image queues in uint8 (25 GB per rank instead of 101 GB).
PRESETS["ablation-B/2"].update(label_chunk=2, fused_loss=True)
PRESETS["B/2"].update(label_chunk=1, bf16_keys=True, fused_loss=True)
PRESETS["L/2"].update(label_chunk=1, bf16_keys=True, grad_checkpointing=True, fused_loss=True)
PRESETS["B/16"].update(label_chunk=1, bf16_keys=True, fused_loss=True, queue_dtype="uint8")
PRESETS["L/16"].update(label_chunk=1, bf16_keys=True, fused_loss=True, queue_dtype="uint8")

# Tiny preset for tests: seconds per step on one core.
PRESETS["tiny"] = dict(PRESETS["demo"], features="pixels", hidden_size=32, depth=1, num_heads=2, num_prefix_tokens=2,
                       train_batch_size=4, gen_per_label=4, pos_per_sample=4, neg_per_sample=2, max_steps=20,
                       warmup_steps=2, log_every=1, ckpt_every=10, positive_bank_size=16,
                       negative_bank_size=32, push_per_step=16, out_dir="outputs/tiny", progress=False,
                       lr=2e-3, lr_decay_steps=0, num_style_tokens=-1)


# ---------------------------------------------------------------------------------------------------
# CLI generated from the fields
# ---------------------------------------------------------------------------------------------------

def _help_texts() -> Dict[str, str]:
    """Field -> its trailing comment in this file (the dataclass comments double as --help)."""
    import inspect
    import re
    src = inspect.getsource(TrainConfig)
    out = {}
    for line in src.splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def build_parser(prog: str = "drift-train") -> argparse.ArgumentParser:
    """argparse parser with one `--kebab-case` flag per TrainConfig field (defaults None = "not given")."""
    p = argparse.ArgumentParser(prog=prog, description="Train a Drifting Model (see drift.config.TrainConfig).")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="named preset applied before other flags")
    p.add_argument("--config", default=None, help="JSON config file applied after the preset, before other flags")
    p.add_argument("--resume", default=None,
                   help="'auto' (latest checkpoint in out_dir, if any) or a checkpoint directory/step file")
    helps = _help_texts()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        t = f.type if isinstance(f.type, str) else str(f.type)
        h = helps.get(f.name, "")
        if t == "bool":
            p.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=h)
        elif t.startswith("Tuple"):
            p.add_argument(flag, dest=f.name, default=None, type=float, nargs="+", help=h)
        else:
            p.add_argument(flag, dest=f.name, default=None, type={"int": int, "float": float}.get(t, str), help=h)
    return p


def parse_cli(argv: Optional[Sequence[str]] = None, prog: str = "drift-train") -> Tuple[TrainConfig, argparse.Namespace]:
    """(config, namespace): preset first, then --config JSON, then explicit flags; validated."""
    ns = build_parser(prog).parse_args(argv)
    d: Dict[str, Any] = dict(PRESETS[ns.preset]) if ns.preset else {}
    if ns.config:
        with open(ns.config) as fh:
            try:
                extra = json.load(fh)
            except ValueError as e:
                raise ValueError(f"--config {ns.config}: not valid JSON ({e})") from None
        if not isinstance(extra, dict):
            raise ValueError(f"--config {ns.config}: must hold a JSON object of field names to values")
        d.update(extra)
    for f in fields(TrainConfig):
        v = getattr(ns, f.name)
        if v is not None:
            d[f.name] = v
    return TrainConfig.from_dict(d).validate(), ns


def config_diff(a: TrainConfig, b: TrainConfig, keys: Sequence[str] = SHAPE_KEYS) -> List[str]:
    """Human-readable differences between two configs on `keys`."""
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da[k]!r} != {db[k]!r}" for k in keys if da[k] != db[k]]
