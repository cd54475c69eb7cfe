"""`drift-mae`: pretrain the MAE-ResNet feature encoder (paper §4, App. A.3) on a drift-prep shard set.

    drift-mae --data DATA --out outputs/mae [--preset latent-w256|latent-w640|pixel-w256|pixel-w640|tiny]
              [--vae VAE_DIR] [--width 256] [--steps 30000] [--batch-size 8192] [--resume] ...
    torchrun --nproc-per-node 8 -m drift.mae_train --data ... --out ...        # DDP (NCCL; gloo on CPU)

Recipe: RandomResizedCrop(0.2-1) + flip from `drift.data.open_loader(mode="train")`; with ``--vae`` the
augmented images are encoded by the SD-VAE (a posterior sample x 0.18215) and the MAE is trained on latents
(the "latent-MAE"); a `drift-prep latents` directory as --data trains on the cached latents (random flip
only: a cheaper approximation of the official recipe); otherwise the MAE trains on pixels patchified ``patch_size`` x ``patch_size`` ("pixel-MAE"). Each step
zeroes every 2x2 patch of the 32x32 (patchified) grid with probability 0.5 and minimizes the l2 error on the
masked region (per sample: squared error summed over masked positions and channels / masked positions, as the
official loss). AdamW(0.9, 0.95), lr 4e-3, wd 0.01, linear warmup then constant, gradient-norm clip 2.0,
EMA 0.9995. The last ``cls_ft_steps`` steps add the classification fine-tune: a linear head on pooled layer4,
loss lambda * CE + (1 - lambda) * recon with lambda = cls_weight * min(1, (step - start) / cls_ramp_steps)
from 0 at the first fine-tune step (official).

Outputs in --out: ``config.json`` (resolved config), ``log.jsonl`` (one JSON object per logged step: step,
loss, recon, ce, acc, lr, cls_weight, mask_frac, img_per_s), checkpoints ``checkpoints/step_XXXXXXX/`` in the
`drift.checkpoint` layout (atomic; ``--resume auto`` continues from the newest with identical per-step losses),
and ``mae_encoder.pt`` (the EMA weights + architecture), which
`build_feature_extractor("mae-latent" | "mae-pixel" | "mae", weights=...)` loads (a checkpoint directory works too).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from drift import checkpoint as ckpt
from drift.dist import all_reduce_mean, cleanup_distributed, init_distributed, print0
from drift.ema import EMA
from drift.features.mae_resnet import MAEConfig, MAEResNet, random_patch_mask
from drift.cli import run_main
from drift.runlock import RunLock
from drift.tracking import cut_log, init_tracking


@dataclass
class MAETrainConfig:
    # --- data
    data: str = ""                  # drift-prep image (or latent) shard directory (required)
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
    max_grad_norm: float = 2.0      # global gradient-norm clip (official 2.0); 0 = off
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
    resume: str = ""                # "auto" (newest checkpoint in out, if any) or a checkpoint directory
    compile: bool = False           # torch.compile the model
    precision: str = "auto"         # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    device: str = "auto"            # auto | cpu | cuda
    threads: int = 0                # torch intra-op threads on CPU (0 = torch default)
    wandb: str = "disabled"         # online | offline | disabled
    wandb_project: str = "drift-mae"  # wandb project name
    progress: bool = True           # tqdm progress bar with ETA on rank 0


MAE_TRAIN_PRESETS = {
    # paper Table 3 / Table 8: ablation encoder (w256, 192 ep) and system-level (w640, 1280 ep + 3k cls ft)
    "latent-w256": dict(width=256, steps=30000),
    "latent-w640": dict(width=640, steps=200000, cls_ft_steps=3000),
    "pixel-w256": dict(width=256, steps=30000),
    "pixel-w640": dict(width=640, steps=200000, cls_ft_steps=3000),
    # small data (28-32 px) on a laptop
    # One intra-op thread: on 2 vCPUs two threads ran this model ~8x slower (18 against 150 img/s, RESULTS.md).
    "tiny": dict(width=16, layers="1,1,1,1", batch_size=64, steps=500, warmup_steps=50, lr=2e-3, cls_ft_steps=100,
                 cls_ramp_steps=50, log_every=10, ckpt_every=250, ema_decay=0.99, threads=1),
}


# ------------------------------------------------------------------------------------------------ config / CLI

def _help_texts() -> dict:
    """Field -> its trailing comment in the dataclass source (the comments double as --help)."""
    import inspect
    import re
    pat = re.compile(r"^\s+(\w+): [^#]*#\s*(.*)$")
    return {m.group(1): m.group(2) for m in map(pat.match, inspect.getsource(MAETrainConfig).splitlines()) if m}


def parse_cli(argv: Optional[List[str]] = None) -> MAETrainConfig:
    """Flags are generated from the MAETrainConfig fields (``--kebab-case``); ``--preset`` is applied first."""
    ap = argparse.ArgumentParser(prog="drift-mae", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(MAE_TRAIN_PRESETS), default=None,
                    help="named settings applied before the other flags")
    helps = _help_texts()
    for f in dataclasses.fields(MAETrainConfig):
        flag = "--" + f.name.replace("_", "-")
        h = f"{helps.get(f.name, '')} (default: {f.default!r})"
        if f.type in ("bool", bool):
            ap.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=h)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)
            ap.add_argument(flag, dest=f.name, type=typ, default=None, help=h)
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
    if cfg.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0 = torch default), got {cfg.threads}")
    if cfg.cls_ft_steps < 0 or cfg.cls_ft_steps > cfg.steps:
        raise ValueError(f"--cls-ft-steps must be in [0, steps={cfg.steps}], got {cfg.cls_ft_steps}")
    if not 0.0 <= cfg.cls_weight <= 1.0:
        raise ValueError(f"--cls-weight must be in [0, 1], got {cfg.cls_weight}")
    if not cfg.max_grad_norm >= 0.0:
        raise ValueError(f"--max-grad-norm must be >= 0 (0 = no clipping), got {cfg.max_grad_norm}")
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
    """lambda of 0-based `step`: 0 before the fine-tune phase (the last cls_ft_steps steps), then the official
    ramp cls_weight * min(1, (step - start) / max(1, cls_ramp_steps)), which is 0 at the phase's first step."""
    start = cfg.steps - cfg.cls_ft_steps
    if cfg.cls_ft_steps == 0 or step < start:
        return 0.0
    return cfg.cls_weight * min(1.0, (step - start) / max(1, cfg.cls_ramp_steps))


# ------------------------------------------------------------------------------------------------ helpers

def _arch_fields(cfg: MAETrainConfig) -> dict:
    """Fields a checkpoint must agree on to be resumed (everything that shapes tensors or the trajectory)."""
    keys = ("data", "image_size", "vae", "width", "layers", "patch_size", "batch_size", "seed", "steps",
            "cls_ft_steps")
    return {k: getattr(cfg, k) for k in keys}


# ------------------------------------------------------------------------------------------------ training

def train(cfg: MAETrainConfig) -> dict:
    """Run (or resume) MAE pretraining; returns the last logged metrics. The output directory is locked for the
    run's whole life (drift/runlock.py): a second run on it is refused before it touches any file."""
    validate(cfg)
    info = init_distributed(cfg.device)
    lock = RunLock.acquire(cfg.out, info, log=print0)
    try:
        return _train(cfg, info)
    finally:
        lock.release()


def _train(cfg: MAETrainConfig, info) -> dict:
    from drift.data import open_loader
    from drift.schema import read_manifest

    dev, rank, world, is_main = info.device, info.rank, info.world_size, info.is_main
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the world size {world}")
    per_rank = cfg.batch_size // world
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda")
    if cfg.threads and dev.type == "cpu":
        torch.set_num_threads(cfg.threads)

    manifest = read_manifest(cfg.data)
    num_classes = manifest["num_classes"]
    cached_latents = manifest.get("kind") == "latents"
    if cached_latents and cfg.vae:
        raise ValueError(f"{cfg.data} already holds VAE latents; drop --vae")
    # drift-prep latents: no crop augmentation (the cache holds one crop), a random flip per sample;
    # image shards: RandomResizedCrop + flip.
    loader = open_loader(cfg.data, per_rank, mode="train", image_size=cfg.image_size or None, device=dev,
                         rank=rank, world_size=world, seed=cfg.seed, backend=cfg.loader_backend,
                         num_threads=cfg.num_threads)
    image_size = loader.image_size
    vae = None
    if cached_latents:
        in_ch, grid = loader.channels, image_size
        patch = cfg.patch_size or 1
    elif cfg.vae:
        from drift.features.vae import load_vae
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
    ema = EMA(model, [cfg.ema_decay])
    opt = torch.optim.AdamW(model.parameters(), lr=lr_at(cfg, 0), betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed * 1_000_003 + rank + 1)  # masks (+ VAE posterior)

    step = 0
    src = ckpt.resolve_checkpoint(cfg.resume, cfg.out) if cfg.resume else None
    if src is not None:
        step = _restore(src, cfg, mcfg, world, rank, model, ema, opt, loader, gen, dev)
        print0(f"drift-mae: resumed from {src} at step {step}")
    if is_main:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump({"train": dataclasses.asdict(cfg), "model": mcfg.to_dict(), "world_size": world}, f, indent=1)

    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    tracker = init_tracking(cfg.wandb, project=cfg.wandb_project, name=None, config=dataclasses.asdict(cfg),
                            dir=cfg.out, is_main=is_main)
    log_path = os.path.join(cfg.out, "log.jsonl")
    if is_main:
        cut_log(log_path, step + 1)  # a fresh run starts an empty log; a resumed one drops lines past its step
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
                loss, stats = net(x, y, cls_weight=cls_w, mask=mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            ema.update(model)
            step += 1
            imgs_since += cfg.batch_size
            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                vals = torch.stack([loss.detach().float(), stats["recon"].float(), stats["ce"].float(),
                                    stats["acc"].float(), stats["mask_frac"].float()])
                v = all_reduce_mean(vals).tolist()  # the one host sync per logged step
                if not all(math.isfinite(t) for t in v[:2]):
                    path = _save(cfg, mcfg, info, step, model, ema, opt, loader, gen, crash=True)
                    raise FloatingPointError(f"drift-mae: non-finite loss {v[0]} at step {step}; "
                                             f"crash checkpoint written to {path}")
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
                _save(cfg, mcfg, info, step, model, ema, opt, loader, gen)
        if is_main:
            export = {"config": mcfg.to_dict(), "ema": ema.models[ema.decays[0]].state_dict()}
            tmp = os.path.join(cfg.out, "mae_encoder.pt.tmp")
            torch.save(export, tmp)
            os.replace(tmp, os.path.join(cfg.out, "mae_encoder.pt"))
    finally:
        if bar is not None:
            bar.close()
        tracker.finish()
        if hasattr(loader, "close"):
            loader.close()
    return last


def _meta(cfg, mcfg, step, world, crash=False) -> dict:
    return {"kind": "drift-mae", "step": step, "config": dataclasses.asdict(cfg), "model_config": mcfg.to_dict(),
            "world_size": world, "crash": crash, "torch": torch.__version__}


def _save(cfg, mcfg, info, step, model, ema, opt, loader, gen, crash=False) -> str:
    """drift.checkpoint layout: rank 0 writes model/EMA/optimizer/meta, every rank its loader + RNG state."""
    rank_state = {"loader": loader.state_dict(), "gen": gen.get_state(), "rng_cpu": torch.get_rng_state(),
                  "rng_cuda": torch.cuda.get_rng_state(info.device) if info.device.type == "cuda" else None}
    return ckpt.save(cfg.out, step, rank=info.rank, is_main=info.is_main, model_state=model.state_dict(),
                     ema_state=ema.state_dict(), optim_state=opt.state_dict(),
                     meta=_meta(cfg, mcfg, step, info.world_size, crash), rank_state=rank_state, crash=crash,
                     keep=cfg.keep_ckpts)


def _restore(path, cfg, mcfg, world, rank, model, ema, opt, loader, gen, dev) -> int:
    state = ckpt.load_checkpoint(path, rank, map_location="cpu")
    meta = state["meta"]
    if meta.get("kind") != "drift-mae":
        raise ckpt.CheckpointError(f"checkpoint {path} is not a drift-mae checkpoint")
    if meta.get("model_config") != mcfg.to_dict():
        raise ckpt.CheckpointError(f"checkpoint {path} has model config {meta.get('model_config')}, "
                                   f"this run builds {mcfg.to_dict()}")
    mine = _arch_fields(cfg)
    saved = meta["config"]
    for k, v in mine.items():
        if saved.get(k) != v:
            raise ckpt.CheckpointError(f"checkpoint {path} was written with {k}={saved.get(k)!r}; "
                                       f"this run has {k}={v!r}")
    if int(meta["world_size"]) != world:
        raise ckpt.CheckpointError(f"checkpoint {path} was written by {meta['world_size']} rank(s); "
                                   f"this run has {world}")
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["optim"])
    r = state["rank"]
    loader.load_state_dict(r["loader"])
    gen.set_state(r["gen"])
    torch.set_rng_state(r["rng_cpu"])
    if r.get("rng_cuda") is not None and dev.type == "cuda":
        torch.cuda.set_rng_state(r["rng_cuda"], dev)
    return int(meta["step"])


def _main(argv: List[str]) -> int:
    try:
        cfg = parse_cli(argv)
        last = train(cfg)
    except FloatingPointError as e:
        print(str(e), file=sys.stderr)
        return 1
    finally:
        cleanup_distributed()
    if last:
        print0(f"drift-mae: step {last['step']} loss {last['loss']:.4f} recon {last['recon']:.4f} -> "
               f"{os.path.join(cfg.out, 'mae_encoder.pt')}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """User errors (bad flags, missing files, a checkpoint that does not fit, a run directory in use) are one
    `drift-mae: error: ...` line and exit code 2; `--debug` shows the traceback."""
    return run_main(_main, argv, prog="drift-mae")


if __name__ == "__main__":
    sys.exit(main())
