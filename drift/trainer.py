"""The Drifting Model trainer: class-batched step (paper Alg. 1, §4 batching), DDP, compile, checkpoints.

    from drift.config import TrainConfig
    from drift.trainer import train
    summary = train(TrainConfig.from_preset("demo", data_path="data/fmnist"))

One step (paper Alg. 1 with the official class batching, `train.py` of the official release):
  1. push the latest loader batch (push_per_step reals) into the class queues and the global queue;
  2. sample N_c labels without replacement from that batch's labels, one alpha per label;
  3. per label: N_neg noises and style indices -> generator; N_pos positives from its class queue and
     N_unc unconditional reals from the global queue, with CFG weight w = (alpha - 1)(N_neg - 1)/N_unc;
  4. features of all three (generated with gradient); per key the field over rows (label, location)
     grouped without copies ([N_c*G, L, D] -> [N_c, L, G, D]); loss = sum over keys of the row mean;
  5. AdamW(0.9, 0.95), linear warmup from 1e-6 then constant LR, clip 2.0, EMA update(s).
Steps 3-4 hold every label's graph at once, or, with cfg.label_chunk, run chunk by chunk against the field of
all labels with the same losses and gradients (drift/step.py: the memory lever of the paper presets). cfg.compile
compiles the generator's and the encoder's blocks in place (regional compilation) in a warm-up step.

Randomness. Every random draw of step s comes from generators seeded by (seed, s) - one shared by all ranks
for the labels and alphas, one per global label slot for its noise, style and queue draws - so a resumed run
replays the uninterrupted run exactly, and a DDP run computes the same slots as a single process holding
the same data (rank r handles slots [r*N_c/W, (r+1)*N_c/W)). Queues are per rank (official per-host banks).

DDP: the field's scale and per-temperature RMS are all-reduced over ranks (process_group), DDP averages the
gradients, so W ranks reproduce the single-process step. The step makes no host sync except every
`log_every` steps (loss, grad norm, finiteness), where a non-finite loss writes a crash checkpoint and raises.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from drift import checkpoint as ckpt
from drift.alpha import cfg_weight, sample_alpha
from drift.config import TrainConfig
from drift.dist import DistInfo, barrier, init_distributed, print0
from drift.ema import EMA
from drift.field import drifting_loss_multi
from drift.model import build_generator_model
from drift.runlock import RunLock
from drift.step import (PhaseTimer, ProgressTicker, bf16_matmul_weights, chunked_forward_backward, compile_regions,
                        phase)
from drift.tracking import cut_log, init_tracking, log_size, new_run_id

LR_START = 1e-6  # official: linear warmup starts at 1e-6
_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant for seed mixing


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN/Inf (after a crash checkpoint was written)."""


def step_seed(seed: int, step: int, slot: int = -1) -> int:
    """Deterministic 63-bit seed for (run seed, step, slot); slot -1 is the step's shared stream."""
    x = (seed * _MIX + (step + 1) * 0xBF58476D1CE4E5B9 + (slot + 2) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 31
    return x & ((1 << 63) - 1)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup from 1e-6 to cfg.lr over warmup_steps, then constant (official schedule); with
    lr_decay_steps > 0, a linear decay over the run's last lr_decay_steps steps (step max_steps - 1 gets
    lr / lr_decay_steps), the short-run option the small presets use."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return LR_START + (cfg.lr - LR_START) * step / cfg.warmup_steps
    left = cfg.max_steps - step
    if cfg.lr_decay_steps > 0 and left < cfg.lr_decay_steps:
        return cfg.lr * max(left, 0) / cfg.lr_decay_steps
    return cfg.lr


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def build_features(cfg: TrainConfig, device):
    from drift.features import build_feature_extractor
    if cfg.features == "pixels":
        ex = build_feature_extractor("pixels")
    else:
        kw: Dict[str, Any] = {"weights": cfg.feature_weights or None}
        if cfg.feature_vae:
            kw["vae"] = cfg.feature_vae
        ex = build_feature_extractor(cfg.features, **kw)
    return ex.to(device)


class Trainer:
    """Holds the run state; `run()` trains to cfg.max_steps. Use `train(cfg)` for the one-call form."""

    def __init__(self, cfg: TrainConfig, *, resume: Optional[str] = None,
                 loader_factory: Optional[Callable[[TrainConfig, DistInfo], Any]] = None,
                 info: Optional[DistInfo] = None):
        self.cfg = cfg.validate()
        self.info = info if info is not None else init_distributed(cfg.device)
        # One run per run directory, locked before any file of it is touched; held until close() or exit.
        self.run_lock = RunLock.acquire(cfg.out_dir, self.info, log=print0)
        try:
            self._setup(resume, loader_factory)
        except BaseException:
            self.run_lock.release()
            raise

    def close(self) -> None:
        """Close the loader and release the run directory."""
        close = getattr(getattr(self, "loader", None), "close", None)
        if close is not None:
            close()
        self.run_lock.release()

    def _setup(self, resume: Optional[str], loader_factory) -> None:
        from drift.queues import ClassQueues, GlobalQueue

        cfg = self.cfg
        self.device = self.info.device
        if cfg.threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.threads)
        W = self.info.world_size
        if cfg.train_batch_size % W:
            raise ValueError(f"train_batch_size={cfg.train_batch_size} must be divisible by the {W} ranks")
        self.nc_local = cfg.train_batch_size // W
        self.pg = dist.group.WORLD if self.info.is_ddp else None

        # ----- data -----
        if loader_factory is not None:
            self.loader = loader_factory(cfg, self.info)
        else:
            if not cfg.data_path:
                raise ValueError("data_path is empty: point --data-path at a drift-prep shard directory")
            from drift.data import open_loader  # image shards or drift-prep latents, told by the directory
            self.loader = open_loader(cfg.data_path, cfg.push_per_step, mode=cfg.augment,
                                      image_size=cfg.image_size or None, device=self.device, rank=self.info.rank,
                                      world_size=W, seed=cfg.seed, backend=cfg.loader_backend,
                                      num_threads=cfg.loader_threads)
        self.num_classes = int(self.loader.num_classes)
        self.item_shape = (int(self.loader.channels), int(self.loader.image_size), int(self.loader.image_size))

        # ----- model, EMA, features, optimizer -----
        torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts it)
        self.model = build_generator_model(cfg, self.num_classes, self.item_shape[1], self.item_shape[0])
        self.model.to(self.device)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.features = build_features(cfg, self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr_at(cfg, 0),
                                     betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
        if cfg.queue_dtype == "uint8" and getattr(self.loader, "kind", "images") != "images":
            raise ValueError(f"queue_dtype='uint8' stores images on the uint8 grid; {cfg.data_path or 'the data'} "
                             f"holds {self.loader.kind}: use queue_dtype='float32'")
        qdt = torch.uint8 if cfg.queue_dtype == "uint8" else torch.float32
        self.cq = ClassQueues(self.num_classes, cfg.positive_bank_size, self.item_shape, self.device, dtype=qdt)
        self.gq = GlobalQueue(cfg.negative_bank_size, self.item_shape, self.device, dtype=qdt)
        self.step = 0
        self.loop_state: Dict[str, Any] = {"train_time_s": 0.0}

        # Two handles on the generator: `model` (the plain module: state_dict, EMA, sampling, the chunked step's
        # graph-free pass) and `gen_fn` (what a step with a graph calls: `ddp`, the DDP wrapper, under torchrun).
        # cfg.compile compiles the repeated blocks of the generator and the encoder in place (regional
        # compilation: one compile per block shape instead of one of the whole model; drift/step.py).
        if cfg.compile:
            n_regions = compile_regions(self.model, self.features)
            print0(f"torch.compile: {n_regions} blocks of the generator and the encoder compiled regionally "
                   "(compiled in the warm-up step before training)")
        self.ddp = None
        if self.info.is_ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.model, device_ids=ids)
        self.gen_fn = self.ddp if self.ddp is not None else self.model
        self.phase_timer: Optional[PhaseTimer] = None  # set by benchmarks/bench_train.py's instrumented run
        self.compile_warmup_s: Optional[float] = None
        self.precompile_info: Optional[dict] = None

        self.out_dir = cfg.out_dir
        if self.info.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
        barrier()
        ckpt_dir = ckpt.resolve_checkpoint(resume, self.out_dir) if resume else None
        if ckpt_dir is not None:
            self._restore(ckpt_dir)
        else:
            self._fill_queues()
        self.autocast = (self.device.type == "cuda" and cfg.bf16)
        if self.autocast:  # bit-identical under autocast, half the encoder's weight memory (drift/step.py)
            bf16_matmul_weights(self.features)

    # ------------------------------------------------------------------------------------------------
    # Queues
    # ------------------------------------------------------------------------------------------------
    def _push_batch(self) -> None:
        images, labels = next(self.loader)
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        self.cq.push(images, labels, check=False)
        self.gq.push(images)

    def _fill_queues(self) -> None:
        """Before step 0: push batches until every class seen so far holds min(N_pos, bank) items.

        Classes that never appear are never drawn (labels come from the loaded batches), so they do not
        block; the loop stops after queue_warmup_batches, or at most ~2 local epochs of data."""
        cfg = self.cfg
        need = min(cfg.pos_per_sample, cfg.positive_bank_size)
        if cfg.queue_warmup_batches:
            cap = cfg.queue_warmup_batches
        else:
            local = int(getattr(self.loader, "num_samples", 0)) // max(self.info.world_size, 1)
            cap = max(1, math.ceil(2 * local / cfg.push_per_step)) if local else 1000
        n = 0
        while n < cap:
            self._push_batch()
            n += 1
            counts = self.cq.count()
            if not cfg.queue_warmup_batches and bool((counts[counts > 0] >= need).all()):
                break
        self.loop_state["fill_batches"] = n

    # ------------------------------------------------------------------------------------------------
    # The step
    # ------------------------------------------------------------------------------------------------
    def _sample_inputs(self, step: int):
        """Labels, alphas, noise, style, positives and unconditional negatives of this rank's slots."""
        cfg, dev = self.cfg, self.device
        G, P, U = cfg.gen_per_label, cfg.pos_per_sample, cfg.neg_per_sample
        g = _generator(dev, step_seed(cfg.seed, step))
        pool = self.cq.last_labels  # labels of the latest loader batch on this rank
        nc = cfg.train_batch_size
        keys = torch.rand(pool.shape[0], generator=g, device=dev)
        if nc <= pool.shape[0]:
            labels = pool[keys.argsort()[:nc]]
        else:  # a batch smaller than N_c: with replacement (documented deviation)
            labels = pool[torch.randint(pool.shape[0], (nc,), generator=g, device=dev)]
        alpha = sample_alpha(nc, dist=cfg.alpha_dist, cfg_min=cfg.cfg_min, cfg_max=cfg.cfg_max,
                             neg_cfg_pw=cfg.neg_cfg_pw, no_cfg_frac=cfg.no_cfg_frac, generator=g, device=dev)
        lo = self.info.rank * self.nc_local
        labels, alpha = labels[lo:lo + self.nc_local], alpha[lo:lo + self.nc_local]
        noise, style, pos, unc = [], [], [], []
        for i in range(self.nc_local):
            gi = _generator(dev, step_seed(cfg.seed, step, lo + i))
            noise.append(torch.randn(G, *self.item_shape, generator=gi, device=dev))
            style.append(self.model.sample_style(G, gi, dev))
            pos.append(self.cq.sample(labels[i:i + 1], P, gi, check=False))
            if U:
                unc.append(self.gq.sample(1, U, gi, check=False))
        out = {
            "labels": labels, "alpha": alpha,
            "noise": torch.cat(noise), "style": torch.cat(style),  # (n*G, C, H, W), (n*G, 32)
            "pos": torch.cat(pos).flatten(0, 1),  # (n*P, C, H, W)
            "unc": torch.cat(unc).flatten(0, 1) if U else None,  # (n*U, C, H, W)
        }
        return out

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def _generate(self, batch, lo: int, hi: int, graph: bool) -> torch.Tensor:
        """Generated samples of label slots [lo, hi): (hi-lo)*G items [*, C, H, W]. `graph=False` (the chunked
        step's first pass, under no_grad) bypasses the DDP wrapper, which has nothing to do without a graph."""
        G = self.cfg.gen_per_label
        labels = batch["labels"][lo:hi].repeat_interleave(G)
        alpha = batch["alpha"][lo:hi].repeat_interleave(G)
        fn = self.gen_fn if graph else self.model
        return fn(batch["noise"][lo * G:hi * G], labels, alpha, batch["style"][lo * G:hi * G])

    def _reals(self, batch, lo: int, hi: int) -> torch.Tensor:
        """Positives then unconditional negatives of label slots [lo, hi), one batch for one encoder call."""
        P, U = self.cfg.pos_per_sample, self.cfg.neg_per_sample
        pos = batch["pos"][lo * P:hi * P]
        return torch.cat([pos, batch["unc"][lo * U:hi * U]]) if U else pos

    def _split_reals(self, f_real: Dict[str, torch.Tensor], n: int):
        """Keys of `_reals` over n labels -> (positive keys [n*P, L, D], negative keys [n*U, L, D] or None)."""
        P, U = self.cfg.pos_per_sample, self.cfg.neg_per_sample
        if not U:
            return f_real, None
        return {k: v[:n * P] for k, v in f_real.items()}, {k: v[n * P:] for k, v in f_real.items()}

    def _encode(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Feature keys of x; with cfg.bf16_keys cast to bf16 (the field computes in fp32 either way)."""
        f = self.features(x)
        if self.cfg.bf16_keys:
            f = {k: v.to(torch.bfloat16) for k, v in f.items()}
        return f

    def _cfg_weight(self, batch) -> Optional[torch.Tensor]:
        """(n,) weight of each label's unconditional negatives, None without them."""
        cfg = self.cfg
        return cfg_weight(batch["alpha"], cfg.gen_per_label, cfg.neg_per_sample) if cfg.neg_per_sample else None

    def _key_items(self, f_gen, f_pos, f_unc, w) -> List[tuple]:
        """The field's (gen, pos, neg, neg_weight) item of every key, rows grouped per label without copies.

        f_gen / f_pos / f_unc map key -> [n*G | n*P | n*U, L, D] (f_unc None without negatives), w [n] the
        weight of the unconditional negatives; each item is ([n, L, G, D], [n, L, P, D], [n, L, U, D] or None,
        [n, L, U] or None)."""
        cfg = self.cfg
        G, P = cfg.gen_per_label, cfg.pos_per_sample
        items = []
        for k, fg in f_gen.items():
            L, D = fg.shape[1:]
            n = fg.shape[0] // G
            gk = fg.view(n, G, L, D).transpose(1, 2)  # (n, L, G, D)
            pk = f_pos[k].view(n, P, L, D).transpose(1, 2)  # (n, L, P, D)
            nk = wk = None
            if f_unc is not None:
                U = f_unc[k].shape[0] // n
                nk = f_unc[k].view(n, U, L, D).transpose(1, 2)  # (n, L, U, D)
                wk = w.view(n, 1, 1).expand(n, L, U).to(torch.float32)
            items.append((gk, pk, nk, wk))
        return items

    def _key_losses(self, f_gen, f_pos, f_unc, w):
        """The field of every key: ({key: loss, the mean over its (label, location) rows}, {key: mean force RMS}).

        Arguments as for `_key_items`. The one place the step calls the field."""
        cfg = self.cfg
        keys = list(f_gen)
        # All keys in one call: each keeps its own global scale and RMS (the result equals per-key drifting_loss
        # calls bit for bit), with 2 all-reduces instead of 2 per key and one launch per pass and group of keys.
        # cfg.fused_loss: each loss and its gradient straight from the field's value and force (no elementwise
        # kernels per key, no fp32 copies of the keys; drift/field/loss.py), equal up to fp32 rounding.
        out = drifting_loss_multi(self._key_items(f_gen, f_pos, f_unc, w), temperatures=cfg.R_list,
                                  normalization=cfg.normalization, backend=cfg.field_backend, process_group=self.pg,
                                  check_finite=False, fused=cfg.fused_loss)
        per_key = {k: lk.mean() for k, (lk, _) in zip(keys, out)}  # mean over (label, location) rows
        rms = {k: info["force_rms"].mean() for k, (_, info) in zip(keys, out)}
        return per_key, rms

    def _loss(self, batch) -> Dict[str, Any]:
        """The plain step's forward: every label of the rank in one graph. {"loss": the sum of the key losses
        (keys weigh equally), "per_key": {key: loss}, "force_rms": {key: mean force RMS}}."""
        n, timer = self.nc_local, self.phase_timer
        with self._autocast():
            with phase(timer, "generator"):
                x = self._generate(batch, 0, n, graph=True)  # (n*G, C, H, W)
            with phase(timer, "encoder"):
                f_gen = self._encode(x)
                with torch.no_grad():
                    f_pos, f_unc = self._split_reals(self._encode(self._reals(batch, 0, n)), n)
        with phase(timer, "field"):
            per_key, rms = self._key_losses(f_gen, f_pos, f_unc, self._cfg_weight(batch))
        total = None
        for lk in per_key.values():
            total = lk if total is None else total + lk
        return {"loss": total, "per_key": per_key, "force_rms": rms}

    def _forward_backward(self, batch) -> Dict[str, Any]:
        """Forward and backward of one step (plain, or label-chunked when cfg.label_chunk splits the rank's
        labels: drift/step.py); the gradients are left in the parameters' .grad."""
        chunk = self.cfg.label_chunk
        if 0 < chunk < self.nc_local:
            return chunked_forward_backward(self, batch)
        out = self._loss(batch)
        with phase(self.phase_timer, "backward"):
            out["loss"].backward()
        return out

    def train_step(self, step: int) -> Dict[str, Any]:
        """One optimizer step (no host sync). Returns device tensors for logging."""
        cfg = self.cfg
        with phase(self.phase_timer, "data"):
            self._push_batch()
            batch = self._sample_inputs(step)
        self.model.train()
        out = self._forward_backward(batch)
        with phase(self.phase_timer, "optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            lr = lr_at(cfg, step)
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.ema.update(self.model)
        out["grad_norm"] = grad_norm
        out["lr"] = lr
        return out

    def precompile_field(self) -> None:
        """With cfg.precompile on a GPU: compile the Triton kernels of the step's field in parallel processes
        before the first step (drift/precompile.py); the summary is kept in `precompile_info`."""
        if self.cfg.precompile:
            from drift.precompile import precompile_field
            self.precompile_info = precompile_field(self)

    def warmup_compile(self) -> None:
        """Run the compiled forward/backward once on throwaway inputs, then restore every touched state.

        Compilation happens outside the measured/trained trajectory: parameters, gradients and the global
        RNG are put back exactly, and no queue, loader or optimizer state is advanced. Rank 0 prints a
        progress line with the elapsed time while it compiles; `compile_warmup_s` keeps the total."""
        if not self.cfg.compile:
            return
        params = [p.detach().clone() for p in self.model.parameters()]
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None
        batch = self._sample_inputs(-1)  # the step -1 stream is never used for training
        self.model.train()
        with ProgressTicker("torch.compile warm-up (one step on throwaway inputs)", enabled=self.info.is_main) as t:
            self._forward_backward(batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        self.compile_warmup_s = t.elapsed
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, saved in zip(self.model.parameters(), params):
                p.copy_(saved)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)

    # ------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------
    def _rank_state(self) -> dict:
        st = {"queues": {"class": self.cq.state_dict(), "global": self.gq.state_dict()},
              "loader": self.loader.state_dict(), "rng": {"torch": torch.get_rng_state()}}
        if self.device.type == "cuda":
            st["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)
        return st

    def _class_names(self) -> List[str]:
        names = getattr(self.loader, "classes", None)
        if isinstance(names, dict):
            return [str(names.get(str(i), names.get(i, i))) for i in range(self.num_classes)]
        if isinstance(names, (list, tuple)) and len(names) == self.num_classes:
            return [str(n) for n in names]
        return [str(i) for i in range(self.num_classes)]

    def save(self, crash: bool = False) -> str:
        if self.info.is_main:  # what log.jsonl holds at this checkpoint: a resume from it cuts the log back to this
            self.loop_state["log_bytes"] = log_size(os.path.join(self.out_dir, "log.jsonl"))
        meta = {"step": self.step, "config": self.cfg.to_dict(), "world_size": self.info.world_size,
                "loop_state": dict(self.loop_state), "num_classes": self.num_classes,
                "item_shape": list(self.item_shape), "torch": torch.__version__, "crash": crash,
                "class_names": self._class_names(), "data_kind": getattr(self.loader, "kind", "images")}
        if meta["data_kind"] == "latents":  # samples are SD-VAE latents x vae_scale: decode z / vae_scale
            meta["vae_scale"] = getattr(self.loader, "vae_scale", None)
        return ckpt.save(self.out_dir, self.step, rank=self.info.rank, is_main=self.info.is_main,
                         model_state=self.model.state_dict(), ema_state=self.ema.state_dict(),
                         optim_state=self.opt.state_dict(), meta=meta, rank_state=self._rank_state(),
                         crash=crash, keep=self.cfg.keep_ckpts)

    def _restore(self, ckpt_dir: str) -> None:
        state = ckpt.load_checkpoint(ckpt_dir, self.info.rank, map_location=self.device)
        meta = state["meta"]
        ckpt.check_compatible(meta, self.cfg, self.info.world_size, ckpt_dir)
        if meta.get("item_shape") and tuple(meta["item_shape"]) != self.item_shape:
            raise ckpt.CheckpointError(f"checkpoint {ckpt_dir} was trained on items of shape "
                                       f"{tuple(meta['item_shape'])}, the data gives {self.item_shape}")
        try:
            self.model.load_state_dict(state["model"], strict=True)
            self.ema.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["optim"])
            self.cq.load_state_dict(state["rank"]["queues"]["class"])
            self.gq.load_state_dict(state["rank"]["queues"]["global"])
            self.loader.load_state_dict(state["rank"]["loader"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ckpt.CheckpointError(f"checkpoint {ckpt_dir} does not fit this run: {e}") from e
        torch.set_rng_state(state["rank"]["rng"]["torch"].cpu())
        if self.device.type == "cuda" and "cuda" in state["rank"]["rng"]:
            torch.cuda.set_rng_state(state["rank"]["rng"]["cuda"].cpu(), self.device)
        self.step = int(meta["step"])
        self.loop_state.update(meta.get("loop_state", {}))
        print0(f"resumed from {ckpt_dir} at step {self.step}")

    # ------------------------------------------------------------------------------------------------
    # FID during training (cfg.eval_every)
    # ------------------------------------------------------------------------------------------------
    def _training_fid(self):
        from drift.evaluate import TrainingFID
        return TrainingFID(self.cfg, self.device, num_classes=self.num_classes, item_shape=self.item_shape,
                           data_kind=getattr(self.loader, "kind", "images"))

    def evaluate_fid(self, fid_eval, wb, log_path: str) -> Dict[str, Any]:
        """FID of the first EMA generator (every rank makes its share); rank 0 logs it to log.jsonl and wandb."""
        t0 = time.time()
        rec = {"step": self.step, **fid_eval(self.ema.models[self.ema.decays[0]], self.info.rank,
                                             self.info.world_size)}
        rec["eval_time_s"] = time.time() - t0
        if self.info.is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            wb.log(rec, step=self.step)
        return rec

    # ------------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        cfg, info = self.cfg, self.info
        fid_eval = self._training_fid() if cfg.eval_every else None  # checks its files before the first step
        wb = init_tracking(cfg.wandb, project=cfg.wandb_project,
                           name=cfg.run_name or os.path.basename(os.path.abspath(cfg.out_dir)),
                           config=cfg.to_dict(), dir=cfg.out_dir, is_main=info.is_main,
                           run_id=self.loop_state.setdefault("wandb_run_id", new_run_id()))
        if info.is_main:
            cfg.save_json(os.path.join(cfg.out_dir, "config.json"))
        log_path = os.path.join(cfg.out_dir, "log.jsonl")
        start = self.step
        if info.is_main and start == 0 and os.path.exists(log_path):
            os.remove(log_path)  # a fresh run starts a fresh log
        elif info.is_main and start > 0:  # a resumed one drops what was logged after its checkpoint, then appends
            dropped = cut_log(log_path, start, self.loop_state.get("log_bytes"))
            if dropped:
                print0(f"{log_path}: dropped {dropped} line(s) logged after the checkpoint of step {start}")
        bar = None
        if info.is_main and cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.max_steps, initial=start, unit="step", dynamic_ncols=True)
        self.precompile_field()
        self.warmup_compile()
        imgs_per_step = cfg.train_batch_size * cfg.gen_per_label  # generated images per step, all ranks
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        history: List[dict] = []
        t_window, steps_window = time.time(), 0
        t_run = time.time()
        train_time0 = float(self.loop_state.get("train_time_s", 0.0))
        while True:
            last_step = self.step >= cfg.max_steps
            if fid_eval is not None and self.step > start and (last_step or self.step % cfg.eval_every == 0):
                self.evaluate_fid(fid_eval, wb, log_path)
            if self.step > start and (last_step or self.step % cfg.ckpt_every == 0):
                self.loop_state["train_time_s"] = train_time0 + time.time() - t_run
                self.save()
            if last_step:
                break
            out = self.train_step(self.step)
            finite &= torch.isfinite(out["loss"])
            steps_window += 1
            step_done = self.step
            self.step += 1
            if (step_done % cfg.log_every == 0) or self.step >= cfg.max_steps:
                # (CPU action) the only host syncs: reduce across ranks, then read the values.
                vals = torch.stack([out["loss"].detach(), out["grad_norm"].detach().float()]
                                   + [v.detach() for v in out["per_key"].values()]
                                   + [v.detach() for v in out["force_rms"].values()])
                if info.is_ddp:
                    dist.all_reduce(vals, op=dist.ReduceOp.SUM)
                    vals = vals / info.world_size
                    flag = finite.to(torch.int32)
                    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                    finite = flag.bool()
                vals = vals.tolist()
                if not bool(finite):
                    path = self.save(crash=True)
                    if bar is not None:
                        bar.close()
                    wb.finish()
                    raise NonFiniteLossError(f"non-finite loss at or before step {step_done} "
                                             f"(loss={vals[0]}); crash checkpoint written to {path}")
                dt = time.time() - t_window
                keys = list(out["per_key"])
                rec = {"step": step_done, "loss": vals[0], "lr": out["lr"],
                       "img_per_s": imgs_per_step * steps_window / max(dt, 1e-9), "grad_norm": vals[1]}
                rec.update({f"loss/{k}": v for k, v in zip(keys, vals[2:2 + len(keys)])})
                rec.update({f"force_rms/{k}": v for k, v in zip(keys, vals[2 + len(keys):])})
                history.append(rec)
                if info.is_main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    wb.log(rec, step=step_done)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
                t_window, steps_window = time.time(), 0
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        wb.finish()
        return {"step": self.step, "history": history, "out_dir": cfg.out_dir,
                "train_time_s": train_time0 + time.time() - t_run}


def train(cfg: TrainConfig, *, resume: Optional[str] = None,
          loader_factory: Optional[Callable[[TrainConfig, DistInfo], Any]] = None) -> Dict[str, Any]:
    """Train to cfg.max_steps (resuming from `resume`: 'auto' or a checkpoint directory); returns a summary."""
    trainer = Trainer(cfg, resume=resume, loader_factory=loader_factory)
    try:
        return trainer.run()
    finally:
        trainer.close()
