"""drift-train: train a Drifting Model from the command line (flags generated from drift.config.TrainConfig).

    drift-train --preset demo --data-path data/fmnist --out-dir outputs/demo
    drift-train --preset B/2 --data-path data/imagenet-latents --resume auto
    torchrun --nproc_per_node 8 -m drift.train --preset B/16 --data-path data/imagenet --feature-weights mae.pt

`--preset` is applied first, then `--config FILE.json`, then every other flag. `--resume auto` continues
from the newest checkpoint in --out-dir that verifies (if any); `--resume DIR` from that checkpoint.
Without `--preset` the built-in defaults (ImageNet scale) run: the command says so, and refuses when a coarse
estimate of their memory (drift/memory.py) exceeds what this machine has free. User errors (bad flags or
config values, missing files, a run directory in use) are one `drift-train: error: ...` line and exit code 2;
`--debug` shows the traceback.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence, Tuple

from drift.cli import UserError, run_main
from drift.config import TrainConfig, parse_cli


def _data_shape(cfg: TrainConfig) -> Tuple[int, Tuple[int, int, int]]:
    """(num_classes, item shape C, H, W) from the shard manifest of --data-path, else the model's native ones."""
    from drift import schema
    try:
        m = schema.read_manifest(cfg.data_path)
    except (OSError, ValueError):
        m = None
    if m is not None and m.get("latent_shape"):
        c, h, w = m["latent_shape"][1:]
        return m["num_classes"], (c, h, w)
    if m is not None:
        size = cfg.image_size or (m.get("image_size") or [256])[0]
        return m["num_classes"], (m.get("channels", 3), size, size)
    import torch

    from drift.model import DRIFT_MODELS
    if cfg.model not in DRIFT_MODELS:
        raise UserError(f"model must be one of {sorted(DRIFT_MODELS)}, got {cfg.model!r}")
    with torch.device("meta"):
        net = DRIFT_MODELS[cfg.model]()
    size = cfg.image_size or net.input_size
    return net.num_classes, (net.in_channels, size, size)


def check_defaults_fit(cfg: TrainConfig, available: Optional[float] = None) -> str:
    """For a run without --preset: the line naming the defaults it runs; UserError when their estimated memory
    exceeds the free memory of this machine (`available` bytes overrides the measurement)."""
    import torch

    from drift.memory import check_fits, estimate_train_memory
    num_classes, shape = _data_shape(cfg)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    est = estimate_train_memory(cfg, num_classes, shape, world_size=world, device_type="cuda" if use_cuda else "cpu",
                                ranks_per_host=local)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    fits = check_fits(est, device, available)
    return (f"drift-train: no --preset given: running the built-in defaults (model {cfg.model}, features "
            f"{cfg.features}, train_batch_size {cfg.train_batch_size}, gen_per_label {cfg.gen_per_label}, "
            f"pos_per_sample {cfg.pos_per_sample}, max_steps {cfg.max_steps}: the ImageNet recipe's scale; "
            f"--preset demo is the small CPU run); {fits}")


def _main(argv: List[str]) -> int:
    cfg, ns = parse_cli(argv)
    from drift.dist import cleanup_distributed, print0
    from drift.trainer import train
    if ns.preset is None:
        print0(check_defaults_fit(cfg))
    try:
        summary = train(cfg, resume=ns.resume)
        print0(f"done: {summary['step']} steps in {summary['train_time_s']:.1f}s -> {cfg.out_dir}")
    finally:
        cleanup_distributed()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_main, argv, prog="drift-train")


if __name__ == "__main__":
    sys.exit(main())
