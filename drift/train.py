"""drift-train: train a Drifting Model from the command line (flags generated from drift.config.TrainConfig).

    drift-train --preset demo --data-path data/fmnist --out-dir outputs/demo
    drift-train --preset B/2 --data-path data/imagenet-latents --resume auto
    torchrun --nproc_per_node 8 -m drift.train --preset B/16 --data-path data/imagenet --feature-weights mae.pt

`--preset` is applied first, then `--config FILE.json`, then every other flag. `--resume auto` continues
from the newest checkpoint in --out-dir (if any); `--resume DIR` from that checkpoint.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from drift.config import parse_cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg, ns = parse_cli(argv)
    from drift.dist import cleanup_distributed, print0
    from drift.trainer import train
    try:
        summary = train(cfg, resume=ns.resume)
        print0(f"done: {summary['step']} steps in {summary['train_time_s']:.1f}s -> {cfg.out_dir}")
    finally:
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
