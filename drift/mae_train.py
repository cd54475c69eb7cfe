"""`drift-mae`: pretrain the MAE-ResNet feature encoder (paper §4, App. A.3; SPEC §4) on a drift-prep shard set.

    drift-mae --data DATA --out outputs/mae [--preset latent-w256|latent-w640|pixel-w256|pixel-w640|tiny]
              [--vae VAE_DIR] [--width 256] [--steps 30000] [--batch-size 8192] [--resume] ...
    torchrun --nproc-per-node 8 -m drift.mae_train --data ... --out ...        # DDP (NCCL; gloo on CPU)

Recipe: RandomResizedCrop(0.2-1) + flip from `drift.data.build_loader(mode="train")`; with ``--vae`` the
augmented images are encoded by the SD-VAE (a posterior sample x 0.18215) and the MAE is trained on latents
(the "latent-MAE"), otherwise on pixels patchified ``patch_size`` x ``patch_size`` ("pixel-MAE"). Each step
zeroes every 2x2 patch of the 32x32 (patchified) grid with probability 0.5 and minimizes the l2 error on the
masked region (sum / count). AdamW(0.9, 0.95), lr 4e-3, wd 0.01, linear warmup then constant, EMA 0.9995.
The last ``cls_ft_steps`` steps add the classification fine-tune: a linear head on pooled layer4, loss
lambda * CE + (1 - lambda) * recon with lambda ramping 0 -> cls_weight over ``cls_ramp_steps``.

Outputs in --out: ``config.json`` (resolved config), ``log.jsonl`` (one JSON object per logged step: step,
loss, recon, ce, acc, lr, cls_weight, mask_frac, img_per_s), checkpoints ``ckpt/step_XXXXXXXX.pt`` (atomic;
``--resume`` continues from the newest with identical per-step losses), and ``mae_encoder.pt`` (the EMA weights
+ architecture), which `build_feature_extractor("mae-latent" | "mae-pixel" | "mae", weights=...)` loads.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from drift.encoders.mae_resnet import MAEConfig, MAEResNet, random_patch_mask


@dataclass
class MAETrainConfig:
    # --- data
    data: str = ""                  # drift-prep image shard directory (required)
    image_size: int = 0             # training crop size; 0 = the stored size (256 for ImageNet packs)
    vae: str = ""                   # SD-VAE directory: train a latent MAE on VAE latents of the augmented images
    loader_backend: str = "auto"    # auto (DALI if importable) | dali | pil
    num_threads: int = 2            # loader threads per rank
    # --- model (paper §8.1)
    width: int = 256                # C; stages C, 2C, 4C, 8C (paper: 256 ablation, 640 system-level)
    layers: str = "3,4,6,3"         # basic blocks per stage
    patch_size: int = 0             # input patchify; 0 = auto: 1 for latents, image_size // 32 for pixels
    # --- optimization (official MAE config)
    batch_size: int = 8192          # global batch (split evenly over ranks)
    steps: int = 30000              # total steps (30k for w256 ~ 192 ep; 200k for w640 ~ 1280 ep)
    lr: float = 4e-3                # peak learning rate
    weight_decay: float = 0.01      # AdamW decoupled weight decay (all parameters)
    beta1: float = 0.9              # AdamW beta1
    beta2: float = 0.95             # AdamW beta2
    warmup_steps: int = 4000        # linear warmup from 1e-6, then constant
    ema_decay: float = 0.9995       # EMA of the weights; the exported encoder is the EMA
    max_grad_norm: float = 0.0      # global-norm clip; 0 = off (the official recipe does not clip)
    # --- classification fine-tune (the last cls_ft_steps of `steps`)
    cls_ft_steps: int = 0           # 3000 for the system-level encoders, 0 for the ablation default
    cls_weight: float = 0.1         # final lambda of lambda * CE + (1 - lambda) * recon
    cls_ramp_steps: int = 1000      # lambda ramps linearly 0 -> cls_weight over these steps
    # --- run
    out: str = "outputs/mae"        # output directory
    seed: int = 0                   # model init, loader order and masks
    log_every: int = 10             # steps between log.jsonl lines (the only host syncs)
    ckpt_every: int = 1000          # steps between checkpoints (one is also written at the end)
    keep_ckpts: int = 2             # newest checkpoints kept
    resume: bool = False            # continue from the newest checkpoint in out/ckpt
    compile: bool = False           # torch.compile the model
    precision: str = "auto"         # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    device: str = "auto"            # auto | cpu | cuda
    wandb: str = "disabled"         # online | offline | disabled
    wandb_project: str = "drift-mae"
    progress: bool = True           # tqdm progress bar with ETA on rank 0


MAE_TRAIN_PRESETS = {
    # paper Table 3 / Table 8: ablation encoder (w256, 192 ep) and system-level (w640, 1280 ep + 3k cls ft)
    "latent-w256": dict(width=256, steps=30000),
    "latent-w640": dict(width=640, steps=200000, cls_ft_steps=3000),
    "pixel-w256": dict(width=256, steps=30000),
    "pixel-w640": dict(width=640, steps=200000, cls_ft_steps=3000),
    # small data (28-32 px) on a laptop
    "tiny": dict(width=16, layers="1,1,1,1", batch_size=64, steps=500, warmup_steps=50, lr=2e-3, cls_ft_steps=100,
                 cls_ramp_steps=50, log_every=10, ckpt_every=250, ema_decay=0.99),
}


# ------------------------------------------------------------------------------------------------ config / CLI

def parse_cli(argv: Optional[List[str]] = None) -> MAETrainConfig:
    """Flags are generated from the MAETrainConfig fields (``--kebab-case``); ``--preset`` is applied first."""
    ap = argparse.ArgumentParser(prog="drift-mae", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(MAE_TRAIN_PRESETS), default=None)
    for f in dataclasses.fields(MAETrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            ap.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)
            ap.add_argument(flag, dest=f.name, type=typ, default=None)
    a = ap.parse_args(argv)
    values = dict(MAE_TRAIN_PRESETS[a.preset]) if a.preset else {}
    values.update({k: v for k, v in vars(a).items() if k != "preset" and v is not None})
    cfg = MAETrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: MAETrainConfig) -> None:
    if not cfg.data:
        raise ValueError("--data is required (a drift-prep shard directory)")
    for name in ("batch_size", "steps", "width", "log_every", "ckpt_every", "keep_ckpts"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.cls_ft_steps < 0 or cfg.cls_ft_steps > cfg.steps:
        raise ValueError(f"--cls-ft-steps must be in [0, steps={cfg.steps}], got {cfg.cls_ft_steps}")
    if not 0.0 <= cfg.cls_weight <= 1.0:
        raise ValueError(f"--cls-weight must be in [0, 1], got {cfg.cls_weight}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"--precision must be auto, bf16 or fp32, got {cfg.precision!r}")
    if cfg.wandb not in ("online", "offline", "disabled"):
        raise ValueError(f"--wandb must be online, offline or disabled, got {cfg.wandb!r}")
    layers = parse_layers(cfg.layers)
    if not layers or min(layers) < 1:
        raise ValueError(f"--layers must be positive block counts like 3,4,6,3, got {cfg.layers!r}")


def parse_layers(text: str):
    try:
        return tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers, got {text!r}") from None


# ------------------------------------------------------------------------------------------------ schedules

def lr_at(cfg: MAETrainConfig, step: int) -> float:
    """Linear warmup from 1e-6 to cfg.lr over warmup_steps, then constant (official)."""
    if cfg.warmup_steps <= 0 or step >= cfg.warmup_steps:
        return cfg.lr
    return 1e-6 + (cfg.lr - 1e-6) * step / cfg.warmup_steps


def cls_weight_at(cfg: MAETrainConfig, step: int) -> float:
    """0 before the fine-tune phase; then a linear ramp to cfg.cls_weight over cls_ramp_steps."""
    start = cfg.steps - cfg.cls_ft_steps
    if cfg.cls_ft_steps == 0 or step < start:
        return 0.0
    if cfg.cls_ramp_steps <= 0:
        return cfg.cls_weight
    return cfg.cls_weight * min(1.0, (step - start + 1) / cfg.cls_ramp_steps)


# ------------------------------------------------------------------------------------------------ helpers

def _dist_env():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, local, world


def _ckpt_dir(cfg) -> str:
    return os.path.join(cfg.out, "ckpt")


def _ckpt_path(cfg, step: int) -> str:
    return os.path.join(_ckpt_dir(cfg), f"step_{step:08d}.pt")


def list_checkpoints(cfg) -> List[str]:
    d = _ckpt_dir(cfg)
    if not os.path.isdir(d):
        return []
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.startswith("step_") and f.endswith(".pt"))


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # readers never see a half-written checkpoint


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        e = [p for p in ema.parameters()]
        m = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(e, m, 1.0 - decay)
        for be, bm in zip(ema.buffers(), model.buffers()):
            be.copy_(bm)


def _arch_fields(cfg: MAETrainConfig) -> dict:
    """Fields a checkpoint must agree on to be resumed (everything that shapes tensors or the trajectory)."""
    keys = ("data", "image_size", "vae", "width", "layers", "patch_size", "batch_size", "seed")
    return {k: getattr(cfg, k) for k in keys}


# ------------------------------------------------------------------------------------------------ training

def train(cfg: MAETrainConfig) -> dict:
    """Run (or resume) MAE pretraining; returns the last logged metrics."""
    from drift.data import build_loader
    from drift.schema import read_manifest

    validate(cfg)
    rank, local_rank, world = _dist_env()
    if cfg.device == "auto":
        dev = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(cfg.device if cfg.device != "cuda" else f"cuda:{local_rank}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    pg = None
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        pg = dist.group.WORLD
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the world size {world}")
    per_rank = cfg.batch_size // world
    is_main = rank == 0
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda")

    manifest = read_manifest(cfg.data)
    num_classes = manifest["num_classes"]
    loader = build_loader(cfg.data, per_rank, mode="train", image_size=cfg.image_size or None, device=dev,
                          rank=rank, world_size=world, seed=cfg.seed, backend=cfg.loader_backend,
                          num_threads=cfg.num_threads)
    image_size = loader.image_size
    vae = None
    if cfg.vae:
        from drift.encoders.vae import load_vae
        vae = load_vae(cfg.vae, device=dev)
        in_ch, grid = 4, image_size // 8
        patch = cfg.patch_size or 1
    else:
        in_ch = loader.channels
        patch = cfg.patch_size or max(1, image_size // 32)
        grid = image_size
    if grid % patch or (grid // patch) % 2:
        raise ValueError(f"input grid {grid} must be divisible by patch_size={patch} into an even grid "
                         f"(2x2 masking)")
    mcfg = MAEConfig(in_channels=in_ch, patch_size=patch, width=cfg.width, layers=parse_layers(cfg.layers),
                     num_classes=num_classes)

    torch.manual_seed(cfg.seed)  # identical init on every rank
    model = MAEResNet(mcfg).to(dev)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr_at(cfg, 0), betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed * 1_000_003 + rank + 1)  # masks (+ VAE posterior)

    step = 0
    if cfg.resume:
        ckpts = list_checkpoints(cfg)
        if ckpts:
            step = _load_checkpoint(ckpts[-1], cfg, mcfg, model, ema, opt, loader, gen, dev)
            if is_main:
                print(f"drift-mae: resumed from {ckpts[-1]} at step {step}")
    if is_main:
        os.makedirs(_ckpt_dir(cfg), exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump({"train": dataclasses.asdict(cfg), "model": mcfg.to_dict(), "world_size": world}, f, indent=1)

    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    tracker = _make_tracker(cfg, is_main)
    log_path = os.path.join(cfg.out, "log.jsonl")
    if is_main and not cfg.resume and os.path.exists(log_path):
        os.remove(log_path)
    if is_main and cfg.resume:
        _truncate_log(log_path, step)
    bar = None
    if is_main and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=step, desc="drift-mae", unit="step", dynamic_ncols=True)
    last = {}
    t_last, imgs_since = time.perf_counter(), 0
    cls_w = torch.zeros((), device=dev)
    try:
        while step < cfg.steps:
            x, y = next(loader)
            if vae is not None:
                with torch.no_grad():
                    x = vae.encode(x, generator=gen)
            lr = lr_at(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            lam = cls_weight_at(cfg, step)
            cls_w.fill_(lam)
            n, _, h, w = x.shape
            mask = random_patch_mask(n, h // patch, w // patch, generator=gen, device=dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                loss, info = net(x, y, cls_weight=cls_w, mask=mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            _ema_update(ema, model, cfg.ema_decay)
            step += 1
            imgs_since += cfg.batch_size
            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                vals = torch.stack([loss.detach().float(), info["recon"].float(), info["ce"].float(),
                                    info["acc"].float(), info["mask_frac"].float()])
                if pg is not None:
                    import torch.distributed as dist
                    dist.all_reduce(vals, group=pg)
                    vals /= world
                v = vals.tolist()  # the one host sync per logged step
                if not all(math.isfinite(t) for t in v[:2]):
                    _save_checkpoint(cfg, mcfg, step, model, ema, opt, loader, gen, is_main, crash=True)
                    raise FloatingPointError(f"drift-mae: non-finite loss {v[0]} at step {step}; "
                                             f"crash checkpoint written to {_ckpt_dir(cfg)}")
                now = time.perf_counter()
                last = {"step": step, "loss": v[0], "recon": v[1], "ce": v[2], "acc": v[3], "mask_frac": v[4],
                        "lr": lr, "cls_weight": lam, "img_per_s": imgs_since / max(now - t_last, 1e-9)}
                t_last, imgs_since = now, 0
                if is_main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(last) + "\n")
                    tracker.log(last, step=step)
                    if bar is not None:
                        bar.set_postfix(loss=f"{v[0]:.4f}", img_s=f"{last['img_per_s']:.0f}")
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                _save_checkpoint(cfg, mcfg, step, model, ema, opt, loader, gen, is_main)
        if is_main:
            _atomic_save({"config": mcfg.to_dict(), "ema": ema.state_dict()}, os.path.join(cfg.out, "mae_encoder.pt"))
    finally:
        if bar is not None:
            bar.close()
        tracker.finish()
        if hasattr(loader, "close"):
            loader.close()
    return last


def _save_checkpoint(cfg, mcfg, step, model, ema, opt, loader, gen, is_main, crash=False):
    # every rank's loader and mask-generator position differ; gather them so rank 0 can write one file
    state = {"loader": loader.state_dict(), "gen": gen.get_state()}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_rank = [state]
    if world > 1:
        import torch.distributed as dist
        per_rank = [None] * world
        dist.all_gather_object(per_rank, state)
    if not is_main:
        return
    obj = {
        "step": step, "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
        "config": mcfg.to_dict(), "train_config": _arch_fields(cfg), "per_rank": per_rank,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    path = _ckpt_path(cfg, step) if not crash else os.path.join(_ckpt_dir(cfg), f"crash_{step:08d}.pt")
    os.makedirs(_ckpt_dir(cfg), exist_ok=True)
    _atomic_save(obj, path)
    if not crash:
        for old in list_checkpoints(cfg)[:-cfg.keep_ckpts]:
            os.remove(old)


def _load_checkpoint(path, cfg, mcfg, model, ema, opt, loader, gen, dev) -> int:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is unreadable (truncated or corrupt?): {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict) or "model" not in obj or "step" not in obj:
        raise ValueError(f"checkpoint {path} is not a drift-mae checkpoint")
    if obj.get("config") != mcfg.to_dict():
        raise ValueError(f"checkpoint {path} has model config {obj.get('config')}, this run builds {mcfg.to_dict()}")
    mine = _arch_fields(cfg)
    for k, v in obj.get("train_config", {}).items():
        if mine.get(k) != v:
            raise ValueError(f"checkpoint {path} was written with {k}={v!r}; this run has {k}={mine.get(k)!r}")
    rank, _, world = _dist_env()
    per_rank = obj["per_rank"]
    if len(per_rank) != world:
        raise ValueError(f"checkpoint {path} was written by {len(per_rank)} rank(s); this run has {world}")
    model.load_state_dict(obj["model"])
    ema.load_state_dict(obj["ema"])
    opt.load_state_dict(obj["optimizer"])
    loader.load_state_dict(per_rank[rank]["loader"])
    gen.set_state(per_rank[rank]["gen"])
    torch.set_rng_state(obj["rng_cpu"])
    if obj.get("rng_cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(obj["rng_cuda"])
    return int(obj["step"])


def _truncate_log(path: str, step: int) -> None:
    """Drop log lines past the resumed step (written after the checkpoint by the interrupted run)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(lines)


class _NoTracker:
    def log(self, *a, **k):
        pass

    def finish(self):
        pass


def _make_tracker(cfg, is_main):
    if not is_main or cfg.wandb == "disabled":
        return _NoTracker()
    try:
        from drift import tracking
    except ImportError:
        raise RuntimeError("--wandb needs drift.tracking, which is not available in this checkout") from None
    return tracking.init(project=cfg.wandb_project, mode=cfg.wandb, config=dataclasses.asdict(cfg),
                         dir=cfg.out)


def main(argv: Optional[List[str]] = None) -> int:
    try:
        cfg = parse_cli(argv)
        last = train(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"drift-mae: error: {e}", file=sys.stderr)
        return 2
    if last:
        print(f"drift-mae: step {last['step']} loss {last['loss']:.4f} recon {last['recon']:.4f} -> "
              f"{os.path.join(cfg.out, 'mae_encoder.pt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
