"""Trainer benchmark: the real `drift.trainer.Trainer` step at a preset's per-GPU shapes, on synthetic data.

    python benchmarks/bench_train.py --preset ablation-B/2 --labels-per-gpu 1 2 4 8          # a GPU
    python benchmarks/bench_train.py --preset B/2 --labels-per-gpu 16 --mae-width 640 --label-chunk 2
    python benchmarks/bench_train.py --preset ablation-B/2 --labels-per-gpu 8 --compile
    python benchmarks/bench_train.py --device cpu --preset ablation-B/2 --labels-per-gpu 1 2 --hidden-size 64 \
        --depth 2 --num-heads 1 --mae-width 16 --image-size 16 --num-classes 10 --gen-per-label 8 \
        --pos-per-sample 8 --neg-per-sample 4 --steps 3                                     # CPU smoke size

No dataset: a loader with the trainer's loader contract yields random latents (or images) and labels over
--num-classes classes; the feature encoder is the preset's, randomly initialized on the device (--mae-width /
--mae-layers change the MAE-ResNet's size). Each labels-per-GPU value runs in a fresh
child process (clean memory statistics; an out-of-memory run becomes a row saying so). Per run:

* step time: median (p20/p80) of --steps timed steps after --warmup-steps, each between device synchronizes;
  generated img/s = labels x gen_per_label / step time;
* peak memory: torch.cuda.max_memory_allocated over all steps (and the reserved peak); on CPU the process's
  peak RSS (ru_maxrss: everything the process ever held, a loose upper bound);
* the field's Triton precompile (`Trainer.precompile_field`: its kernels compiled in parallel processes before
  step 0; --no-precompile leaves them to the first step), the compile warm-up (`Trainer.warmup_compile`) and
  the first step after both; a cold first step is precompile + warm-up + first step on an empty Triton cache;
* phases (data, generator, encoder, field, backward, optimizer = clip + AdamW + EMA): a separate run of
  --phase-steps steps with a synchronize around each phase (`drift.step.PhaseTimer`), so the timed steps are
  not perturbed; in the label-chunked step the phases of its passes are summed;
* model FLOPs per step, counted by torch.utils.flop_counter on one sample: generator forward + backward on
  the generated samples, encoder forward + backward (input gradients only: the encoder is frozen) on them,
  encoder forward on positives and unconditional negatives, plus the field's counted work
  (rows * 2*G*M*S*(1 + nR) per key, the counted model of benchmarks/bench_field.py). The label-chunked
  step's recomputation (a second generator and encoder forward) and activation checkpointing's are not model
  work and are not counted;
* MFU = model FLOP/s / the matmul peak measured in the same run (a large bf16 matmul loop on CUDA; fp32,
  the dtype the CPU step computes in, on CPU).

Prints a table; writes benchmarks/results/train-<device>-<utc>.json (machine, versions, git sha, argv, rows).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._harness import format_table, write_json  # noqa: E402
from drift.config import PRESETS, TrainConfig  # noqa: E402
from drift.model import DRIFT_MODELS  # noqa: E402

PHASES = ("data", "generator", "encoder", "field", "backward", "optimizer")
GIB = float(1 << 30)


class SyntheticLoader:
    """The trainer's loader contract on random data: batches of `batch` items [C, H, W] ~ N(0, 1) (latents) or
    uniform in [-1, 1] (images), labels uniform over `num_classes`, made on `device` by a seeded generator."""

    def __init__(self, batch: int, item_shape, num_classes: int, device, seed: int = 0):
        self.batch_size = batch
        self.channels, self.image_size = int(item_shape[0]), int(item_shape[1])
        self.num_classes = num_classes
        self.num_samples = 1 << 30  # "infinite": the trainer's queue warm-up stops at queue_warmup_batches
        self.kind = "latents" if self.channels == 4 else "images"
        self.vae_scale = 0.18215 if self.kind == "latents" else None
        self.device = torch.device(device)
        self.seed = seed
        self.served = 0
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self):
        shape = (self.batch_size, self.channels, self.image_size, self.image_size)
        x = torch.randn(shape, generator=self._gen, device=self.device)
        if self.kind == "images":
            x = x.tanh()
        y = torch.randint(self.num_classes, (self.batch_size,), generator=self._gen, device=self.device)
        self.served += 1
        return x, y

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, sd: dict) -> None:
        self.served = int(sd["served"])

    def close(self) -> None:
        pass


def item_shape_of(cfg: TrainConfig, image_size: int = 0):
    """(C, H, W) of the preset's data: its generator's input (32x32x4 latents, 256x256x3 pixels), or H = W =
    image_size when given (small CPU runs)."""
    with torch.device("meta"):
        g = DRIFT_MODELS[cfg.model](num_classes=1)
    size = image_size or g.input_size
    return (g.in_channels, size, size)


def build_config(args, labels: int, out_dir: str) -> TrainConfig:
    """The benchmark's TrainConfig: the preset at `labels` labels per GPU (one rank), the size overrides,
    no checkpoints or logging within the run."""
    over = dict(train_batch_size=labels, device=args.device, out_dir=out_dir, progress=False, compile=args.compile,
                queue_warmup_batches=1, wandb="disabled", max_steps=10 ** 6, log_every=10 ** 6, ckpt_every=10 ** 6,
                label_chunk=args.label_chunk, bf16_keys=args.bf16_keys, field_backend=args.field_backend,
                seed=args.seed, precompile=args.precompile, fused_loss=args.fused_loss)
    for name in ("hidden_size", "depth", "num_heads", "gen_per_label", "pos_per_sample", "neg_per_sample",
                 "threads"):
        v = getattr(args, name)
        if v is not None:
            over[name] = v
    over["push_per_step"] = max(PRESETS[args.preset].get("push_per_step", 64), labels)
    cfg = TrainConfig.from_preset(args.preset, **over)
    if (args.mae_width is not None or args.mae_layers is not None) and "mae" not in cfg.features:
        raise ValueError(f"--mae-width/--mae-layers need MAE features; preset {args.preset} uses {cfg.features!r}")
    return cfg


@contextlib.contextmanager
def random_encoders_on_device(width: Optional[int] = None, layers=None):
    """While the trainer is built, its feature extractor is the preset's, randomly initialized directly on the
    training device, with the MAE-ResNet's `width` / `layers` when given. (The default path builds on the host
    and copies: minutes for the 2.1e9 parameters of the MAE-640.)"""
    import drift.trainer as trainer_mod
    from drift.features import build_feature_extractor
    orig = trainer_mod.build_features
    opts = {k: v for k, v in (("width", width), ("layers", layers)) if v is not None}

    def build(cfg, device):
        if cfg.features in ("pixels", "pixel-multiscale"):
            return orig(cfg, device)
        return build_feature_extractor(cfg.features, device=device, **opts).to(device)

    trainer_mod.build_features = build
    try:
        yield
    finally:
        trainer_mod.build_features = orig


def make_trainer(cfg: TrainConfig, args):
    from drift.trainer import Trainer
    shape = item_shape_of(cfg, args.image_size)
    with random_encoders_on_device(args.mae_width, args.mae_layers):
        return Trainer(cfg, loader_factory=lambda c, info: SyntheticLoader(c.push_per_step, shape, args.num_classes,
                                                                           info.device, seed=c.seed))


# ----------------------------------------------------------------------------------------------------
# Counted FLOPs and the matmul peak
# ----------------------------------------------------------------------------------------------------

def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def count_model_flops(t) -> Dict[str, float]:
    """Model FLOPs of one step of trainer `t` (module docstring), counted on one sample of each kind, with
    compiled blocks run eagerly (the counter is a dispatch mode; the work is the same)."""
    eager = getattr(torch.compiler, "set_stance", None)
    ckpt = t.model.grad_checkpointing  # a checkpointed block's recomputation is not model work either
    t.model.grad_checkpointing = False
    try:
        with (eager("force_eager") if eager is not None else contextlib.nullcontext()):
            return _count_model_flops(t)
    finally:
        t.model.grad_checkpointing = ckpt


def _count_model_flops(t) -> Dict[str, float]:
    cfg, dev = t.cfg, t.device
    n, G, P, U = t.nc_local, cfg.gen_per_label, cfg.pos_per_sample, cfg.neg_per_sample
    noise = torch.randn(1, *t.item_shape, device=dev)
    labels = torch.zeros(1, dtype=torch.long, device=dev)
    alpha = torch.ones(1, device=dev)
    style = t.model.sample_style(1, None, dev)
    with t._autocast():
        with torch.no_grad():
            gen_fwd = _flops(lambda: t.model(noise, labels, alpha, style))
        # .backward() (FlopCounterMode's module hooks refuse autograd.grad); the gradients are dropped after.
        gen_fwd_bwd = _flops(lambda: t.model(noise, labels, alpha, style).float().sum().backward())
        t.opt.zero_grad(set_to_none=True)
        x = torch.randn(1, *t.item_shape, device=dev)
        with torch.no_grad():
            enc_fwd = _flops(lambda: t.features(x))
        xg = x.clone().requires_grad_(True)
        enc_fwd_bwd = _flops(lambda: sum(v.float().sum() for v in t.features(xg).values()).backward())
        with torch.no_grad():
            shapes = {k: tuple(v.shape[1:]) for k, v in t.features(x).items()}
    M = G + U + P
    n_r = len(cfg.R_list)
    field = sum(n * L * 2 * G * M * D * (1 + n_r) for L, D in shapes.values())
    model = n * G * (gen_fwd_bwd + enc_fwd_bwd) + n * (P + U) * enc_fwd + field
    return {"generator_fwd_per_sample": gen_fwd, "generator_fwd_bwd_per_sample": gen_fwd_bwd,
            "encoder_fwd_per_sample": enc_fwd, "encoder_fwd_bwd_per_sample": enc_fwd_bwd, "field": float(field),
            "model": float(model), "keys": len(shapes),
            "key_elements_per_sample": sum(L * D for L, D in shapes.values())}


def matmul_peak(device: torch.device) -> Dict[str, float]:
    """Dense matmul throughput measured here: bf16 8192^3 on CUDA, fp32 1024^3 on CPU (the step's dtypes)."""
    if device.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 30
    else:
        n, dtype, reps = 1024, torch.float32, 5
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        torch.matmul(a, b, out=c)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=c)
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return {"matmul_tflops": 2 * n ** 3 / best / 1e12, "matmul_dtype": str(dtype).replace("torch.", ""),
            "matmul_n": n}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(xs: List[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(xs, dtype=torch.float64), q))


# ----------------------------------------------------------------------------------------------------
# One configuration (child process)
# ----------------------------------------------------------------------------------------------------

def run_one(args, labels: int) -> dict:
    """Measure one labels-per-GPU value in this process; the row of the table."""
    from drift.step import PhaseTimer
    row = {"preset": args.preset, "labels_per_gpu": labels, "compile": args.compile, "label_chunk": args.label_chunk,
           "bf16_keys": args.bf16_keys, "fused_loss": args.fused_loss, "precompile": args.precompile,
           "mae_width": args.mae_width, "error": None}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(args, labels, os.path.join(tmp, "run"))
        row.update(gen_per_label=cfg.gen_per_label, pos_per_sample=cfg.pos_per_sample,
                   neg_per_sample=cfg.neg_per_sample, model=cfg.model, features=cfg.features,
                   hidden_size=cfg.hidden_size, depth=cfg.depth)
        t = make_trainer(cfg, args)
        dev = t.device
        row["device"] = str(dev)
        step = 0
        try:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            t.precompile_field()
            info = t.precompile_info or {}
            row["precompile_s"] = info.get("seconds")
            row["precompile_variants"] = info.get("variants")
            row["precompile_errors"] = info.get("errors")
            t.warmup_compile()
            row["compile_warmup_s"] = t.compile_warmup_s
            _sync(dev)
            t0 = time.perf_counter()
            t.train_step(step)
            _sync(dev)
            row["first_step_s"] = time.perf_counter() - t0
            step += 1
            if dev.type == "cuda":
                row["mem_after_first_step_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
            for _ in range(args.warmup_steps):
                t.train_step(step)
                step += 1
            times = []
            for _ in range(args.steps):
                _sync(dev)
                t0 = time.perf_counter()
                t.train_step(step)
                _sync(dev)
                times.append(time.perf_counter() - t0)
                step += 1
            row["step_ms"] = 1e3 * _quantile(times, 0.5)
            row["step_ms_p20"] = 1e3 * _quantile(times, 0.2)
            row["step_ms_p80"] = 1e3 * _quantile(times, 0.8)
            row["img_per_s"] = labels * cfg.gen_per_label / (row["step_ms"] / 1e3)
            if dev.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
                row["reserved_gib"] = torch.cuda.max_memory_reserved(dev) / GIB
                row["peak_kind"] = "torch.cuda.max_memory_allocated"
            else:
                row["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
                row["peak_kind"] = "peak RSS of the process (ru_maxrss)"
            if args.phase_steps:
                t.phase_timer = PhaseTimer(dev)
                for _ in range(args.phase_steps):
                    t.train_step(step)
                    step += 1
                row["phases_ms"] = {k: 1e3 * t.phase_timer.seconds.get(k, 0.0) / args.phase_steps for k in PHASES}
                t.phase_timer = None
            row.update({f"flops_{k}": v for k, v in count_model_flops(t).items()})
            row["model_tflops"] = row["flops_model"] / (row["step_ms"] / 1e3) / 1e12
            row.update(matmul_peak(dev))
            row["mfu"] = row["model_tflops"] / row["matmul_tflops"]
        except torch.OutOfMemoryError as e:
            row["error"] = f"out of memory at step {step}"
            row["oom_message"] = str(e).splitlines()[0][:300]
            if dev.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
                row["reserved_gib"] = torch.cuda.max_memory_reserved(dev) / GIB
        finally:
            t.close()
    return row


# ----------------------------------------------------------------------------------------------------
# The table (parent process)
# ----------------------------------------------------------------------------------------------------

COLUMNS = [("preset", "preset", 13, ""), ("labels_per_gpu", "labels", 6, "d"), ("label_chunk", "chunk", 5, "d"),
           ("compile", "compile", 7, ""), ("step_ms", "step ms", 9, ".1f"), ("img_per_s", "img/s", 8, ".0f"),
           ("peak_gib", "peak GiB", 8, ".2f"), ("precompile_s", "pre s", 6, ".1f"), ("first_step_s", "1st s", 6, ".2f"),
           ("compile_warmup_s", "compile s", 9, ".1f"), ("ph_generator", "gen ms", 7, ".1f"),
           ("ph_encoder", "enc ms", 7, ".1f"), ("ph_field", "field ms", 8, ".1f"), ("ph_backward", "bwd ms", 7, ".1f"),
           ("ph_optimizer", "opt ms", 7, ".1f"), ("model_tflops", "TFLOP/s", 8, ".2f"), ("mfu", "MFU", 6, ".3f"),
           ("error", "note", 24, "")]


def _display(row: dict) -> dict:
    out = dict(row)
    for k, v in (row.get("phases_ms") or {}).items():
        out[f"ph_{k}"] = v
    out["compile"] = "yes" if row.get("compile") else "no"
    return out


def _child_args(argv: List[str], labels: int, out_json: str) -> List[str]:
    """argv of a child: this invocation's flags with one labels-per-GPU value."""
    skip, args = False, []
    for a in argv:
        if skip:
            if a.startswith("--"):
                skip = False
            else:
                continue
        if a == "--labels-per-gpu":
            skip = True
            continue
        args.append(a)
    return args + ["--labels-per-gpu", str(labels), "--child-json", out_json]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="ablation-B/2", choices=sorted(PRESETS), help="training preset")
    p.add_argument("--labels-per-gpu", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="labels per GPU (train_batch_size of one rank); one child process each")
    p.add_argument("--compile", action="store_true", help="regional torch.compile (timed warm-up step first)")
    p.add_argument("--label-chunk", type=int, default=None,
                   help="labels per chunk of the label-chunked step (0 = plain step; default: the preset's)")
    p.add_argument("--bf16-keys", action=argparse.BooleanOptionalAction, default=None,
                   help="feature keys in bf16 into the field (default: the preset's)")
    p.add_argument("--fused-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="loss and gradient straight from the field's force (default: the preset's)")
    p.add_argument("--field-backend", default="auto", choices=("auto", "reference", "cpp", "triton"),
                   help="drifting field backend")
    p.add_argument("--precompile", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the field's Triton kernels in parallel processes before the first step (GPU)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps after the first step")
    p.add_argument("--phase-steps", type=int, default=3, help="steps of the phase-timed run (0 = none)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    p.add_argument("--hidden-size", type=int, default=None, help="generator width override (small CPU runs)")
    p.add_argument("--depth", type=int, default=None, help="generator depth override")
    p.add_argument("--num-heads", type=int, default=None, help="generator attention heads override")
    p.add_argument("--mae-width", type=int, default=None, help="random MAE-ResNet width (256, 640; small on CPU)")
    p.add_argument("--mae-layers", type=lambda s: tuple(int(v) for v in s.split(",")), default=None,
                   help="MAE-ResNet blocks per stage, e.g. 1,1,1,1 (default 3,4,6,3)")
    p.add_argument("--gen-per-label", type=int, default=None, help="N_neg override")
    p.add_argument("--pos-per-sample", type=int, default=None, help="N_pos override")
    p.add_argument("--neg-per-sample", type=int, default=None, help="N_unc override")
    p.add_argument("--image-size", type=int, default=0, help="item size H = W (0 = the preset's)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the synthetic labels")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="stop starting new runs when this many seconds have passed (0 = no limit)")
    p.add_argument("--out-dir", default=None, help="JSON directory (default benchmarks/results)")
    p.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.label_chunk is None:
        args.label_chunk = int(preset.get("label_chunk", 0))
    if args.bf16_keys is None:
        args.bf16_keys = bool(preset.get("bf16_keys", False))
    if args.fused_loss is None:
        args.fused_loss = bool(preset.get("fused_loss", False))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("steps", "warmup_steps", "phase_steps", "label_chunk"):
        if getattr(args, name) < 0:
            raise SystemExit(f"bench_train.py: error: --{name.replace('_', '-')} must be >= 0")
    if args.steps < 1 or any(n < 1 for n in args.labels_per_gpu):
        raise SystemExit("bench_train.py: error: --steps and --labels-per-gpu must be >= 1")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child_json:
        row = run_one(args, args.labels_per_gpu[0])
        with open(args.child_json, "w") as f:
            json.dump(row, f)
        return 0
    t_start = time.time()
    rows = []
    for labels in args.labels_per_gpu:
        left = args.time_budget_s - (time.time() - t_start) if args.time_budget_s else None
        if left is not None and left < 15:
            rows.append({"preset": args.preset, "labels_per_gpu": labels, "error": "skipped: time budget"})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out_json = os.path.join(tmp, "row.json")
            cmd = [sys.executable, os.path.abspath(__file__)] + _child_args(argv, labels, out_json)
            try:
                proc = subprocess.run(cmd, timeout=left, capture_output=True, text=True)
                sys.stderr.write(proc.stderr[-4000:])
                if os.path.exists(out_json):
                    with open(out_json) as f:
                        row = json.load(f)
                else:
                    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    row = {"preset": args.preset, "labels_per_gpu": labels,
                           "error": f"failed (rc {proc.returncode}): {tail[:200]}"}
            except subprocess.TimeoutExpired:
                row = {"preset": args.preset, "labels_per_gpu": labels, "error": "timed out (time budget)"}
        rows.append(row)
        print(f"labels {labels}: " + (row.get("error") or f"{row['step_ms']:.1f} ms/step, "
                                      f"{row['peak_gib']:.2f} GiB peak"), flush=True)
    print(format_table([_display(r) for r in rows], COLUMNS))
    device = "cuda" if args.device == "cuda" else "cpu"
    path = write_json("train", device, {"rows": rows, "args": vars(args)}, out_dir=args.out_dir)
    print(f"wrote {path}")
    # An out-of-memory run is a result, a budget skip a choice; anything else is a failure.
    ok = ("out of memory", "skipped: time budget", "timed out (time budget)")
    return 0 if all(not r.get("error") or r["error"].startswith(ok) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
