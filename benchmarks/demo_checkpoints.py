"""Score every saved checkpoint of a demo run with the demo's metrics (the recipe-search table in RESULTS.md).

    python benchmarks/demo_checkpoints.py outputs/expA                       # every checkpoint, every weight set
    python benchmarks/demo_checkpoints.py outputs/expA --steps 1000,1400 --cache outputs/demo/cache

For each checkpoint step and each weight set (every EMA decay the run kept, then the raw weights) it generates
one sample per test image at alpha = 1 and reports `class_accuracy`, `fd` and fd / fd_class_mean, exactly as
`python -m drift.demo` scores the final checkpoint (drift.demo.evaluate_run). The metric classifier is read from
(or trained into) --cache; pass the demo's cache to compare runs against the same classifier. Prints a table
and writes benchmarks/results/demo-ckpts-cpu-<utc>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _harness as H  # noqa: E402
from drift import checkpoint as ckpt  # noqa: E402
from drift.demo import DEFAULT_DATA  # noqa: E402


def score_run(run_dir: str, evaluator, steps=None, *, alpha: float = 1.0, seed: int = 1):
    """Rows {step, weights, class_accuracy, fd, fd_over_class_mean} for the run's checkpoints (all or `steps`)."""
    from drift.sample import generate, load_generator
    have = ckpt.list_checkpoints(run_dir)
    if not have:
        raise FileNotFoundError(f"no finished checkpoints under {ckpt.ckpt_root(run_dir)}")
    if steps is None:
        steps = have
    missing = sorted(set(steps) - set(have))
    if missing:
        raise ValueError(f"{run_dir} has no checkpoint at step(s) {missing}; it has {have}")
    fd_cm = evaluator.references()["fd_class_mean"]
    labels = evaluator.test_y
    rows = []
    for step in steps:
        d = os.path.join(ckpt.ckpt_root(run_dir), ckpt.step_name(step))
        decays = list(ckpt.load_for_sampling(d, map_location="cpu")["ema"])
        for key in decays + ["raw"]:
            model, _ = load_generator(d, ema=key != "raw", ema_decay=None if key == "raw" else float(key))
            m = evaluator.evaluate(generate(model, labels, alpha=alpha, seed=seed), labels)
            rows.append({"step": step, "weights": "raw" if key == "raw" else f"ema {key}",
                         "class_accuracy": m["class_accuracy"], "fd": m["fd"], "fd_over_class_mean": m["fd"] / fd_cm})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="demo run directory (holds checkpoints/)")
    ap.add_argument("--steps", default=None, help="comma-separated checkpoint steps (default: all)")
    ap.add_argument("--data", default=DEFAULT_DATA, help="directory with the Fashion-MNIST IDX files")
    ap.add_argument("--cache", default=None, help="metric-classifier cache (default: <run>/cache)")
    ap.add_argument("--num-eval", type=int, default=10000, help="generated / test images per score")
    ap.add_argument("--classifier-epochs", type=int, default=2, help="epochs if the classifier must be trained")
    ap.add_argument("--threads", type=int, default=2, help="CPU intra-op threads")
    ap.add_argument("--out-dir", default=None, help="directory of the JSON result (default benchmarks/results)")
    args = ap.parse_args(argv)
    steps = None
    if args.steps:
        try:
            steps = [int(s) for s in args.steps.split(",")]
        except ValueError:
            ap.error(f"--steps must be comma-separated integers, got {args.steps!r}")

    from drift.demo_metrics import DemoEvaluator
    torch.set_num_threads(args.threads)
    ev = DemoEvaluator(args.data, args.cache or os.path.join(args.run, "cache"), num_eval=args.num_eval,
                       classifier_epochs=args.classifier_epochs)
    refs = ev.references()
    rows = score_run(args.run, ev, steps)
    cols = [("step", "step", 6, "d"), ("weights", "weights", 10, "s"), ("class_accuracy", "class acc", 10, ".3f"),
            ("fd", "fd", 9, ".2f"), ("fd_over_class_mean", "fd/class-mean", 14, ".3f")]
    print(f"{args.run}: fd_class_mean {refs['fd_class_mean']:.2f}, fd_real_floor {refs['fd_real_floor']:.3f}, "
          f"num_eval {ev.num_eval}")
    print(H.format_table(rows, cols))
    path = H.write_json("demo-ckpts", "cpu", {"run": args.run, "num_eval": ev.num_eval, "references": refs,
                                              "rows": rows}, args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
