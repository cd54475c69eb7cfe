"""drift-eval: FID, Inception Score and precision/recall of a checkpoint, computed the way the paper's numbers
were (README "Sampling and evaluation"), plus the small FID the trainer logs at checkpoints (`TrainingFID`).

    drift-eval runs/b2 --vae sd-vae-ft-mse --inception-weights weights-inception-2015-12-05-6726825d.pth \\
        --ref-stats VIRTUAL_imagenet256_labeled.npz --alpha 1.0 1.1 1.5 --device cuda
    torchrun --nproc_per_node 8 -m drift.evaluate runs/b2 ...     # the same images, split over 8 GPUs
    drift-eval outputs/demo --features demo --alpha 1 1.5          # the demo classifier as the feature network
    drift-eval runs/b2 --vae sd-vae-ft-mse --features none        # only samples.npz, e.g. for ADM's evaluator

Protocol (the official release): --num-samples N (default 50 per class, 50,000 for ImageNet) from the EMA
weights, one network evaluation each; sample i has class i mod K (the validation-label rule) and noise from
(--seed, i) alone; uint8 by floor(clip(x01 * 255, 0, 255)), NHWC. For each alpha, OUT/alpha_<a>/samples.npz
holds `arr_0` (uint8 [N, H, W, C]) and `arr_1` (labels) as ADM's evaluator reads them. Features: the TF
2015-12-05 FID Inception (torch-fidelity's port, weights from --inception-weights); FID against
--ref-stats (`mu`/`sigma` or `ref_mu`/`ref_sigma`), IS from the logits, precision/recall (k = 3) against the
reference images (`arr_0` of --ref-stats or --ref-images). A table goes to stdout, everything to OUT/eval.json.

Ranks (torchrun): the N indices are cut into chunks of --chunk-size; chunk c is made by rank c mod W. Chunks
and their batches do not depend on W, so 1 and 8 ranks write the same images. Resume: every finished chunk
(images, then features) is renamed into OUT/alpha_<a>/chunks/ atomically; rerunning the same command after
a kill keeps them and makes only the rest. Rank 0 then streams the chunks into samples.npz and computes
the metrics. Nothing is downloaded: every weights and reference file comes from a local path.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from drift.cli import run_main
from drift.fid import (InceptionFeatures, REF_IMAGES_HELP, REF_STATS_HELP, check_ref_images, extract_features,
                       frechet_distance_to, inception_score, iter_npz_array, load_ref_stats, precision_recall)
from drift.sampler import (generate, load_decoder, load_generator, rank_chunks, resolve_ckpt_dir, sample_shape,
                           validation_labels, vae_path_for, write_adm_npz)
from drift.schema import write_json_atomic

STATE_VERSION = 1  # bump when the meaning of the files under OUT/alpha_<a>/ changes


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------

def _savez(path: str, **arrays) -> None:
    """np.savez to a temp file, then an atomic rename: a reader sees a whole chunk or none."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _write_json(path: str, obj: Any) -> None:
    write_json_atomic(path, obj, indent=2)


def alpha_dir(out: str, alpha: float) -> str:
    return os.path.join(out, f"alpha_{alpha:g}")


def chunk_paths(adir: str, start: int, end: int):
    """(images file, features file) of chunk [start, end)."""
    base = os.path.join(adir, "chunks", f"{start:07d}-{end:07d}")
    return base + ".images.npz", base + ".features.npz"


def _check_state(adir: str, state: Dict[str, Any]) -> None:
    """A different earlier evaluation in `adir` is an error (every rank reads the same file, so all raise)."""
    path = os.path.join(adir, "state.json")
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(state) if old.get(k) != state.get(k))
        if diff:
            raise ValueError(f"{adir} holds samples of another evaluation (differs in {', '.join(diff)}); "
                             f"pass another --out or delete that directory")


def _init_state(adir: str, state: Dict[str, Any]) -> None:
    """Rank 0, while no rank writes: record what the samples in `adir` are; drop half-written temp files."""
    os.makedirs(os.path.join(adir, "chunks"), exist_ok=True)
    for stale in glob.glob(os.path.join(adir, "chunks", "*.tmp")):  # left by a killed run
        os.remove(stale)
    if not os.path.isfile(os.path.join(adir, "state.json")):
        _write_json(os.path.join(adir, "state.json"), state)


# ---------------------------------------------------------------------------------------------------
# Generation and features, per rank
# ---------------------------------------------------------------------------------------------------

def make_chunks(model, decode, net, *, adir: str, alpha: float, num_samples: int, num_classes: int, seed: int,
                chunk_size: int, batch_size: int, feature_batch_size: int, device, rank: int = 0,
                world_size: int = 1, progress: bool = False) -> int:
    """Generate (and featurize) this rank's chunks of one alpha that are not on disk yet; returns how many
    chunks it made. With net=None only the images are written."""
    from tqdm import tqdm
    if os.path.isfile(os.path.join(adir, "samples.npz")):
        return 0  # assembled by an earlier run: every chunk was finished before that
    mine = rank_chunks(num_samples, chunk_size, rank, world_size)
    todo = [(s, e) for s, e in mine
            if not os.path.isfile(chunk_paths(adir, s, e)[1 if net is not None else 0])]
    n_todo = sum(e - s for s, e in todo)
    kw = dict(total=n_todo, unit="img", dynamic_ncols=True, disable=not progress)
    fkw = dict(kw, disable=not progress or net is None)
    with tqdm(desc=f"alpha {alpha:g} generate", position=0, **kw) as gbar, \
            tqdm(desc=f"alpha {alpha:g} features", position=1, **fkw) as fbar:
        for s, e in todo:
            img_path, feat_path = chunk_paths(adir, s, e)
            idx = torch.arange(s, e)
            if os.path.isfile(img_path):
                with np.load(img_path) as z:
                    images = torch.from_numpy(z["images"])
                gbar.update(e - s)
            else:
                labels = validation_labels(idx, num_classes)
                images = generate(model, labels, alpha=alpha, seed=seed, batch_size=batch_size, device=device,
                                  indices=idx, decode=decode, as_uint8=True, progress=gbar.update)
                _savez(img_path, images=images.numpy(), labels=labels.numpy(), indices=idx.numpy())
            if net is not None:
                f = extract_features(net, images, feature_batch_size, progress=fbar.update)
                _savez(feat_path, indices=idx.numpy(), rank=np.int64(rank),
                       **{k: v.numpy() for k, v in f.items()})
    return len(todo)


def assemble(adir: str, num_samples: int, num_classes: int, chunk_size: int, shape) -> str:
    """Stream the image chunks of `adir` into the ADM-format samples.npz, then delete them (rank 0)."""
    out = os.path.join(adir, "samples.npz")
    if os.path.isfile(out):
        return out
    chunks = rank_chunks(num_samples, chunk_size)
    paths = [chunk_paths(adir, s, e)[0] for s, e in chunks]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise RuntimeError(f"{len(missing)} sample chunks missing in {adir} (first: {missing[0]}); "
                           f"rerun the same command to make them")

    def read():
        for p in paths:
            with np.load(p) as z:
                yield z["images"]

    labels = validation_labels(torch.arange(num_samples), num_classes).numpy()
    write_adm_npz(out, read(), (num_samples,) + tuple(shape), labels)
    for p in paths:
        os.remove(p)
    return out


def load_chunk_features(adir: str, num_samples: int, chunk_size: int) -> Dict[str, torch.Tensor]:
    """Every chunk's features of `adir` in index order (rank 0)."""
    parts: Dict[str, List[np.ndarray]] = {}
    for s, e in rank_chunks(num_samples, chunk_size):
        path = chunk_paths(adir, s, e)[1]
        if not os.path.isfile(path):
            raise RuntimeError(f"features of samples {s}..{e - 1} missing ({path}); delete {adir} and rerun "
                               f"to remake this alpha")
        with np.load(path) as z:
            if not np.array_equal(z["indices"], np.arange(s, e)):
                raise RuntimeError(f"{path} holds features of other samples")
            for k in z.files:
                if k not in ("indices", "rank"):
                    parts.setdefault(k, []).append(z[k])
    return {k: torch.from_numpy(np.concatenate(v)) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------------
# Reference side
# ---------------------------------------------------------------------------------------------------

class Reference:
    """What generated features are compared with: mu/sigma for FID, optional features for precision/recall."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray, *, source: str, feats: Optional[torch.Tensor] = None,
                 images: Optional[str] = None):
        self.mu, self.sigma, self.source = mu, sigma, source
        self.feats, self.images = feats, images

    def pr_features(self, net, cache_dir: str, batch_size: int, progress: bool) -> Optional[torch.Tensor]:
        """Reference features for precision/recall, computed once from the images and cached in `cache_dir`."""
        if self.feats is not None or self.images is None:
            return self.feats
        st = os.stat(self.images)
        key = "|".join(str(v) for v in (os.path.abspath(self.images), st.st_size, int(st.st_mtime), net.name,
                                         getattr(net, "weights", "")))
        cache = os.path.join(cache_dir, "ref_features.npz")
        if os.path.isfile(cache):
            with np.load(cache) as z:
                if str(z["key"]) == key:
                    self.feats = torch.from_numpy(z["pool"])
                    return self.feats
        from tqdm import tqdm
        n = check_ref_images(self.images)
        with tqdm(total=n, desc="reference features", unit="img", dynamic_ncols=True, disable=not progress) as bar:
            batches = (torch.from_numpy(np.array(b)) for b in iter_npz_array(self.images, "arr_0", batch_size))
            self.feats = extract_features(net, batches, batch_size, progress=bar.update)["pool"]
        os.makedirs(cache_dir, exist_ok=True)
        _savez(cache, pool=self.feats.numpy(), key=np.array(key))
        return self.feats


def build_features(kind: str, *, device, inception_weights: Optional[str] = None, ref_stats: Optional[str] = None,
                   ref_images: Optional[str] = None, demo_data: Optional[str] = None,
                   demo_cache: Optional[str] = None):
    """(feature network, Reference) for --features inception | demo | none ((None, None) for none)."""
    if kind == "none":
        return None, None
    if kind == "demo":
        from drift.demo_metrics import DemoEvaluator, DemoFeatureNet
        if not demo_data:
            raise ValueError("--features demo needs --demo-data DIR (the directory of the demo's Fashion-MNIST "
                             "IDX files; the reference is its test split)")
        ev = DemoEvaluator(demo_data, demo_cache, num_eval=None)
        return DemoFeatureNet(ev.model), Reference(*ev.test_stats, source=f"{demo_data} (test split)",
                                                   feats=ev.test_feats)
    if kind != "inception":
        raise ValueError(f"--features must be inception, demo or none, got {kind!r}")
    if not ref_stats:
        raise ValueError(f"--features inception needs --ref-stats FILE: {REF_STATS_HELP}")
    net = InceptionFeatures(inception_weights, device=device)
    mu, sigma = load_ref_stats(ref_stats, dim=net.dim)
    if ref_images:
        check_ref_images(ref_images)
    else:
        with np.load(ref_stats) as z:
            ref_images = ref_stats if "arr_0" in z.files else None
    return net, Reference(mu, sigma, source=ref_stats, images=ref_images)


# ---------------------------------------------------------------------------------------------------
# Metrics, table
# ---------------------------------------------------------------------------------------------------

def compute_metrics(feats: Dict[str, torch.Tensor], labels: torch.Tensor, net, ref: Reference,
                    ref_feats: Optional[torch.Tensor], k: int = 3, device=None) -> Dict[str, float]:
    """fid, is, precision/recall (when reference features exist) and class_accuracy (class-logit networks)."""
    pool = feats["pool"]
    out = {"fid": frechet_distance_to(pool, ref.mu, ref.sigma)}
    if "logits" in feats:
        out["is"] = inception_score(feats["logits"])
        if net.class_logits:
            out["class_accuracy"] = float((feats["logits"].argmax(1) == labels).double().mean())
    if ref_feats is not None:
        out["precision"], out["recall"] = precision_recall(ref_feats, pool, k=k, device=device)
    return out


_COLUMNS = (("fid", "FID"), ("is", "IS"), ("precision", "precision"), ("recall", "recall"),
            ("class_accuracy", "class_acc"))


def format_table(results: List[Dict[str, Any]]) -> str:
    """One row per alpha, one column per metric that was computed."""
    cols = [(k, name) for k, name in _COLUMNS if any(k in r for r in results)]
    lines = ["  ".join([f"{'alpha':>6}"] + [f"{name:>10}" for _, name in cols])]
    for r in results:
        cells = [f"{r['alpha']:>6g}"] + [f"{r[k]:>10.4f}" if k in r else f"{'-':>10}" for k, _ in cols]
        lines.append("  ".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="drift-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="checkpoint directory, or a run directory (uses its latest checkpoint)")
    p.add_argument("--out", default=None, help="output directory (default: <ckpt>/eval)")
    p.add_argument("--alpha", type=float, nargs="+", default=[1.0], help="CFG strengths to sweep (one row each)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="samples per alpha (default: 50 per class, 50,000 for ImageNet)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (sample i's noise depends on (seed, i) only)")
    p.add_argument("--ema", default=True, action=argparse.BooleanOptionalAction, help="use EMA weights")
    p.add_argument("--ema-decay", type=float, default=None, help="which EMA copy (default: the first)")
    p.add_argument("--vae", default=None,
                   help="SD-VAE directory (diffusers AutoencoderKL) for latent models (default: the run's config)")
    p.add_argument("--features", default="inception", choices=("inception", "demo", "none"),
                   help="feature network: the FID Inception, the demo classifier, or none (samples.npz only)")
    p.add_argument("--inception-weights", default=None,
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (local file)")
    p.add_argument("--ref-stats", default=None,
                   help="reference statistics .npz (mu/sigma or ref_mu/ref_sigma), e.g. ADM's "
                        "VIRTUAL_imagenet256_labeled.npz")
    p.add_argument("--ref-images", default=None,
                   help="reference images .npz (arr_0) for precision/recall (default: arr_0 of --ref-stats)")
    p.add_argument("--demo-data", default=None, help="--features demo: directory of the Fashion-MNIST IDX files")
    p.add_argument("--demo-cache", default=None,
                   help="--features demo: where the demo classifier is cached (default: <out>/cache)")
    p.add_argument("--k", type=int, default=3, help="neighbourhood size of precision/recall")
    p.add_argument("--batch-size", type=int, default=250, help="samples per generator forward pass")
    p.add_argument("--feature-batch-size", type=int, default=200, help="images per feature-network pass")
    p.add_argument("--chunk-size", type=int, default=1000, help="samples per resumable chunk file")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run")
    p.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction, help="tqdm progress bars")
    return p


def _main(argv: List[str]) -> int:
    from drift.dist import barrier, cleanup_distributed, init_distributed
    a = _parser().parse_args(argv)
    for flag in ("num_samples", "batch_size", "feature_batch_size", "chunk_size", "k"):
        v = getattr(a, flag)
        if v is not None and v < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if len(set(a.alpha)) != len(a.alpha):
        raise ValueError(f"--alpha lists a value twice: {a.alpha}")
    info = init_distributed(a.device)
    try:
        return _evaluate(a, info, barrier)
    finally:
        cleanup_distributed()


def _evaluate(a, info, barrier) -> int:
    t0 = time.time()
    ckpt_dir = resolve_ckpt_dir(a.ckpt)
    out = a.out or os.path.join(ckpt_dir, "eval")
    dev = info.device
    model, meta = load_generator(ckpt_dir, ema=a.ema, ema_decay=a.ema_decay, device=dev)
    vae = vae_path_for(meta, a.vae)
    decode = load_decoder(meta, a.vae, device=dev)
    K = int(meta["num_classes"])
    n = a.num_samples or 50 * K
    shape = sample_shape(model, decode)  # (C, H, W)
    build = dict(device=dev, inception_weights=a.inception_weights, ref_stats=a.ref_stats, ref_images=a.ref_images,
                 demo_data=a.demo_data, demo_cache=a.demo_cache or os.path.join(out, "cache"))
    if info.is_main:
        os.makedirs(out, exist_ok=True)
    # The demo classifier is trained (once) and cached by rank 0 before the others load it; every other
    # feature network is built by all ranks at once, so a bad file stops every rank with the same error.
    later = a.features == "demo" and not info.is_main
    if not later:
        net, ref = build_features(a.features, **build)
    if a.features == "demo":
        barrier()
    if later:
        net, ref = build_features(a.features, **build)
    weights = ("ema:" + (f"{a.ema_decay:g}" if a.ema_decay is not None else "first")) if a.ema else "raw"
    base_state = {"version": STATE_VERSION, "checkpoint": os.path.abspath(ckpt_dir), "step": int(meta["step"]),
                  "weights": weights, "seed": a.seed, "num_samples": n, "chunk_size": a.chunk_size, "vae": vae,
                  "features": net.name if net is not None else "none",
                  "feature_weights": getattr(net, "weights", None)}
    show = a.progress and info.is_main
    for alpha in a.alpha:
        adir, state = alpha_dir(out, alpha), dict(base_state, alpha=alpha)
        _check_state(adir, state)
        barrier()
        if info.is_main:
            _init_state(adir, state)
        barrier()
        make_chunks(model, decode, net, adir=adir, alpha=alpha, num_samples=n, num_classes=K, seed=a.seed,
                    chunk_size=a.chunk_size, batch_size=a.batch_size, feature_batch_size=a.feature_batch_size,
                    device=dev, rank=info.rank, world_size=info.world_size, progress=show)
        barrier()
    if not info.is_main:
        return 0
    labels = validation_labels(torch.arange(n), K)
    ref_feats = ref.pr_features(net, out, a.feature_batch_size, show) if net is not None else None
    results = []
    for alpha in a.alpha:
        adir = alpha_dir(out, alpha)
        row: Dict[str, Any] = {"alpha": alpha, "samples": assemble(adir, n, K, a.chunk_size, shape[1:] + shape[:1])}
        if net is not None:
            feats = load_chunk_features(adir, n, a.chunk_size)
            row.update(compute_metrics(feats, labels, net, ref, ref_feats, k=a.k, device=dev))
        results.append(row)
    report = {"checkpoint": os.path.abspath(ckpt_dir), "step": int(meta["step"]), "weights": weights,
              "num_samples": n, "seed": a.seed, "image_shape": [shape[1], shape[2], shape[0]], "vae": vae,
              "features": base_state["features"], "feature_weights": base_state["feature_weights"],
              "reference": ref.source if ref is not None else None,
              "precision_recall_reference": (ref.images or ref.source) if ref_feats is not None else None,
              "k": a.k, "results": results, "time_s": time.time() - t0}
    if net is not None:
        best = min(results, key=lambda r: r["fid"])
        report["best"] = {"alpha": best["alpha"], "fid": best["fid"]}
    _write_json(os.path.join(out, "eval.json"), report)
    print(f"drift-eval: {ckpt_dir} (step {report['step']}, {weights} weights), {n} samples per alpha, "
          f"features {report['features']}")
    if net is not None:
        if ref_feats is None:
            print(f"drift-eval: no reference images for precision/recall ({REF_IMAGES_HELP})")
        print(format_table(results))
        print(f"drift-eval: best FID {report['best']['fid']:.4f} at alpha {report['best']['alpha']:g}")
    for r in results:
        print(f"drift-eval: {r['samples']}")
    print(f"drift-eval: wrote {os.path.join(out, 'eval.json')} ({report['time_s']:.1f} s)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_main, argv, prog="drift-eval")


# ---------------------------------------------------------------------------------------------------
# FID during training
# ---------------------------------------------------------------------------------------------------

class TrainingFID:
    """The small evaluation the trainer runs at checkpoints (cfg.eval_every): cfg.eval_samples samples of
    the EMA generator per alpha in cfg.eval_alpha, split over the ranks by index (the same images as
    drift-eval with --seed cfg.seed), Inception pool3 features gathered from all ranks, FID against
    cfg.eval_ref_stats. Every rank returns the same {"fid/alpha=<a>": value}.
    Files are checked when this object is built (at the start of training), not at the first evaluation."""

    def __init__(self, cfg, device, *, num_classes: int, item_shape, data_kind: Optional[str] = None):
        if cfg.eval_every < 1 or cfg.eval_samples < 2:
            raise ValueError(f"need eval_every >= 1 and eval_samples >= 2, got {cfg.eval_every} and "
                             f"{cfg.eval_samples}")
        if not cfg.eval_inception_weights or not cfg.eval_ref_stats:
            raise ValueError("eval_every > 0 needs --eval-inception-weights FILE (torch-fidelity's "
                             "weights-inception-2015-12-05-6726825d.pth) and --eval-ref-stats FILE (" +
                             REF_STATS_HELP + ")")
        self.cfg, self.device, self.num_classes = cfg, device, int(num_classes)
        self.net = InceptionFeatures(cfg.eval_inception_weights, device=device)
        self.mu, self.sigma = load_ref_stats(cfg.eval_ref_stats, dim=self.net.dim)
        meta = {"item_shape": list(item_shape), "config": cfg.to_dict()}
        if data_kind is not None:
            meta["data_kind"] = data_kind
        self.decode = load_decoder(meta, None, device=device)

    @torch.no_grad()
    def __call__(self, model, rank: int = 0, world_size: int = 1) -> Dict[str, float]:
        cfg = self.cfg
        idx = torch.arange(rank, cfg.eval_samples, world_size)  # this rank's share, strided by index
        labels = validation_labels(idx, self.num_classes)
        out = {}
        for alpha in cfg.eval_alpha:
            x = generate(model, labels, alpha=alpha, seed=cfg.seed, batch_size=250, device=self.device,
                         indices=idx, decode=self.decode, as_uint8=True)
            f = extract_features(self.net, x)["pool"]
            if world_size > 1:
                f = _gather_rows(f.to(self.device), cfg.eval_samples, world_size).cpu()
            out[f"fid/alpha={alpha:g}"] = frechet_distance_to(f, self.mu, self.sigma)
        return out


def _gather_rows(x: torch.Tensor, total: int, world_size: int) -> torch.Tensor:
    """All ranks' rows of a strided split of `total` indices (rank r holds r, r + W, ...), on every rank."""
    import torch.distributed as dist
    sizes = [len(range(r, total, world_size)) for r in range(world_size)]
    padded = torch.zeros((sizes[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)  # rank 0's is largest
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


if __name__ == "__main__":
    sys.exit(main())
