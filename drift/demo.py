"""The CPU demo: train the `demo` preset on Fashion-MNIST, then sample and score it (`make demo`).

    python -m drift.demo                                  # what `make demo` runs
    python -m drift.demo --data DIR_WITH_IDX_FILES --max-steps 20 --num-eval 1000   # a short smoke run

Steps: (1) find the IDX files (installing the Debian package `dataset-fashion-mnist` with apt when they are
missing and apt is usable); (2) pack them with `drift-prep idx` (skipped when already packed); (3) train the
`demo` preset through the shard loader (DALI when importable, PIL otherwise), resuming a killed run;
(4) write `samples.png` (10 classes x 10 samples, EMA weights, alpha = 1), `metrics.json` (class accuracy
and Fréchet distance of 10,000 samples in a small classifier's features, beside `fd_real_floor` and
`fd_class_mean`) and `log.jsonl` into the output directory (default outputs/demo).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from typing import Optional, Sequence

from drift.cli import run_main
from drift.schema import write_json_atomic

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
# Demo targets at alpha = 1: accuracy, and fd well below the class-mean generator's (see README).
TARGET_ACCURACY = 0.80
TARGET_FD_RATIO = 0.10


def _has_idx(path: str) -> bool:
    from data_prep.images import find_idx_pair
    try:
        find_idx_pair(path, "train")
        find_idx_pair(path, "test")
    except FileNotFoundError:
        return False
    return True


def ensure_dataset(path: str, *, allow_apt: bool = True) -> str:
    """The IDX directory; installs dataset-fashion-mnist via apt for the default path when it is missing."""
    if _has_idx(path):
        return path
    if allow_apt and os.path.abspath(path) == DEFAULT_DATA and shutil.which("apt-get"):
        print(f"demo: {path} missing; installing dataset-fashion-mnist with apt-get", flush=True)
        cmd = ["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"]
        if os.geteuid() != 0 and shutil.which("sudo"):
            cmd = ["sudo"] + cmd
        if subprocess.run(cmd).returncode != 0:
            subprocess.run(cmd[:-4] + ["update", "-q"] if cmd[0] != "sudo" else ["sudo", "apt-get", "update", "-q"])
            subprocess.run(cmd)
        if _has_idx(path):
            return path
    raise FileNotFoundError(f"Fashion-MNIST IDX files ({', '.join(IDX_NAMES)}[.gz]) not found in {path}; "
                            f"install the Debian package dataset-fashion-mnist or pass --data DIR")


def ensure_packed(data: str, packed: str) -> str:
    """Pack the train split with `drift-prep idx` unless `packed` already holds a finished pack."""
    if os.path.isfile(os.path.join(packed, "manifest.json")):
        return packed
    from data_prep.cli import main as prep_main
    from data_prep.images import find_idx_pair, read_idx
    # Fashion-MNIST's names only when the labels are its 10 classes (other IDX data keeps '0', '1', ...).
    names = ["--class-names", "fashion-mnist"] if int(read_idx(find_idx_pair(data, "train")[1]).max()) == 9 else []
    rc = prep_main(["idx", data, packed, *names, "--quiet"])
    if rc not in (0, None) or not os.path.isfile(os.path.join(packed, "manifest.json")):
        raise RuntimeError(f"drift-prep idx {data} {packed} failed (exit code {rc})")
    return packed


def evaluate_run(out_dir: str, data: str, *, num_eval: int = 10000, cache_dir: Optional[str] = None,
                 seed: int = 0, alpha: float = 1.0, classifier_epochs: int = 2) -> dict:
    """Sample grid + metrics of the run's latest checkpoint (EMA weights); writes samples.png, metrics.json."""
    import torch
    from drift.demo_metrics import DemoEvaluator
    from drift.sampler import generate, load_generator, sample_grid

    t0 = time.time()
    cache_dir = cache_dir or os.path.join(out_dir, "cache")
    ev = DemoEvaluator(data, cache_dir, num_eval=num_eval, seed=seed, classifier_epochs=classifier_epochs,
                       log=lambda s: print(f"demo: {s}", flush=True))
    t_cls = time.time() - t0
    model, meta = load_generator(out_dir, ema=True)
    labels = ev.test_y
    torch.manual_seed(seed)
    images = generate(model, labels, alpha=alpha, seed=seed + 1)
    metrics = ev.evaluate(images, labels)
    raw_model, _ = load_generator(out_dir, ema=False)
    raw = ev.evaluate(generate(raw_model, labels, alpha=alpha, seed=seed + 1), labels)
    metrics.update({"raw_class_accuracy": raw["class_accuracy"], "raw_fd": raw["fd"]})
    metrics.update({
        "alpha": alpha, "num_eval": int(labels.shape[0]), "step": int(meta["step"]),
        "train_time_s": float(meta.get("loop_state", {}).get("train_time_s", 0.0)),
        "classifier_time_s": t_cls, "eval_time_s": time.time() - t0,
        "target_class_accuracy": TARGET_ACCURACY, "target_fd_over_class_mean": TARGET_FD_RATIO,
    })
    metrics["meets_targets"] = bool(metrics["class_accuracy"] >= TARGET_ACCURACY
                                    and metrics["fd"] <= TARGET_FD_RATIO * metrics["fd_class_mean"])
    sample_grid(out_dir, os.path.join(out_dir, "samples.png"), per_class=10, alpha=alpha, seed=seed)
    write_json_atomic(os.path.join(out_dir, "metrics.json"), metrics, indent=2)
    return metrics


def _main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="drift-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="directory with the Fashion-MNIST IDX files")
    p.add_argument("--packed", default="data/fashion-mnist", help="where drift-prep writes the shards")
    p.add_argument("--out", default="outputs/demo", help="run directory (checkpoints, log, samples, metrics)")
    p.add_argument("--num-eval", type=int, default=10000, help="generated / test images for the metrics")
    p.add_argument("--classifier-epochs", type=int, default=2, help="epochs of the metric classifier (cached)")
    p.add_argument("--fresh", action="store_true", help="delete earlier checkpoints in --out first")
    p.add_argument("--no-apt", action="store_true", help="never try to install the dataset with apt")
    a, train_args = p.parse_known_args(argv)

    t0 = time.time()
    data = ensure_dataset(a.data, allow_apt=not a.no_apt)
    packed = ensure_packed(data, a.packed)
    print(f"demo: data ready in {time.time() - t0:.1f}s ({packed})", flush=True)

    from drift.config import parse_cli
    from drift.trainer import train
    cfg, ns = parse_cli(["--preset", "demo", "--data-path", packed, "--out-dir", a.out, *train_args],
                        prog="drift-demo")
    if a.fresh and os.path.isdir(os.path.join(a.out, "checkpoints")):
        shutil.rmtree(os.path.join(a.out, "checkpoints"))
    t1 = time.time()
    summary = train(cfg, resume=ns.resume or "auto")
    print(f"demo: trained {summary['step']} steps in {time.time() - t1:.1f}s", flush=True)
    m = evaluate_run(a.out, data, num_eval=a.num_eval, seed=cfg.seed, classifier_epochs=a.classifier_epochs)
    keys = ("class_accuracy", "fd", "fd_real_floor", "fd_class_mean", "fd_over_class_mean", "meets_targets")
    print("demo: " + ", ".join(f"{k}={m[k]:.4g}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in keys))
    print(f"demo: total {time.time() - t0:.1f}s; wrote {a.out}/samples.png, metrics.json, log.jsonl", flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """User errors (a missing dataset, a bad flag value, a run directory in use) are one `drift-demo: error: ...`
    line and exit code 2; `--debug` shows the traceback."""
    return run_main(_main, argv, prog="drift-demo")


if __name__ == "__main__":
    sys.exit(main())
