"""Sample-quality metrics (the paper's evaluation protocol) and the feature networks they are computed in.

    net = InceptionFeatures("weights-inception-2015-12-05-6726825d.pth", device="cuda")
    feats = extract_features(net, images_uint8_nhwc)            # {"pool": [N, 2048], "logits": [N, 1008]}
    mu_ref, sigma_ref = load_ref_stats("VIRTUAL_imagenet256_labeled.npz")
    fid = frechet_distance(*feature_stats(feats["pool"]), mu_ref, sigma_ref)
    isc = inception_score(feats["logits"])
    precision, recall = precision_recall(ref_pool, feats["pool"], k=3)

The conventions are those of ADM's evaluation suite (guided-diffusion `evaluations/evaluator.py`), which the
paper's numbers and the official release follow: FID from the pool3 mean and covariance in fp64; IS from the
softmax of the pool3 logits without bias, in splits of 5,000; precision/recall with ADM's manifold estimator
(a point is inside the other set's manifold when it lies within the k-th nearest-neighbour radius, k = 3, of
at least one of that set's points; radii among the set's own points).

A feature network is any object with `name` (str), `input_uint8` (True: it takes uint8 [N, H, W, C] as in
samples.npz; False: float [N, C, H, W] in [-1, 1]), `class_logits` (its logits are the generator's classes,
so class accuracy means something) and `__call__(x) -> {"pool": [N, F], "logits": [N, K]}`.
`InceptionFeatures` (torch-fidelity's port of the TF 2015-12-05 FID Inception, weights from a local file)
is the one for ImageNet; the demo's small classifier (`drift.demo_metrics.DemoFeatureNet`) is another.
"""
from __future__ import annotations

import os
import zipfile
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

import numpy as np
import torch

INCEPTION_FILE_HELP = (
    "expected torch-fidelity's Inception-v3 state dict `weights-inception-2015-12-05-6726825d.pth` (the TF "
    "2015-12-05 FID Inception ported to PyTorch; published with torch-fidelity's GitHub release v0.2.0); "
    "nothing is downloaded, so bring the file and pass --inception-weights FILE")
REF_STATS_HELP = (
    "expected an .npz with `mu` [F] and `sigma` [F, F] (ADM's evaluation suite: VIRTUAL_imagenet256_labeled.npz) "
    "or `ref_mu`/`ref_sigma` (the official drifting release's imagenet_256_fid_stats.npz)")
REF_IMAGES_HELP = (
    "expected an .npz whose `arr_0` holds uint8 reference images [N, H, W, 3] (ADM's "
    "VIRTUAL_imagenet256_labeled.npz, or the official release's imagenet_val_prc_arr0.npz)")
IS_SPLIT_SIZE = 5000  # ADM: the Inception Score is the mean over splits of 5,000 samples


# ---------------------------------------------------------------------------------------------------
# Statistics and distances
# ---------------------------------------------------------------------------------------------------

def feature_stats(feats: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """Mean [F] and unbiased covariance [F, F] (float64 numpy) of features [N, F]."""
    if feats.dim() != 2 or feats.shape[0] < 2:
        raise ValueError(f"feats must be [N, F] with N >= 2, got {tuple(feats.shape)}")
    x = feats.double().cpu().numpy()
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) for Gaussians, in fp64; exact via symmetric eigendecompositions.

    tr((S1 S2)^1/2) = sum of sqrt(eigvals(S1^1/2 S2 S1^1/2)), a symmetric PSD matrix, so no complex sqrtm.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched shapes: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    w1, v1 = np.linalg.eigh((s1 + s1.T) / 2)
    sqrt_s1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    m = sqrt_s1 @ ((s2 + s2.T) / 2) @ sqrt_s1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def frechet_distance_to(feats: torch.Tensor, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of the Gaussian fit of features [N, F] (mean, unbiased covariance) to (mu2, sigma2), fp64.

    The same value as `frechet_distance(*feature_stats(feats), mu2, sigma2)`. With N - 1 < F the covariance
    S1 = Xc^T Xc / (N - 1) has rank N - 1, and the non-zero eigenvalues of S1 S2 are those of the N x N matrix
    Xc S2 Xc^T / (N - 1) (AB and BA share them), so a small evaluation needs no F x F eigendecomposition."""
    if feats.dim() != 2 or feats.shape[0] < 2:
        raise ValueError(f"feats must be [N, F] with N >= 2, got {tuple(feats.shape)}")
    n, f = feats.shape
    if n - 1 >= f:
        return frechet_distance(*feature_stats(feats), mu2, sigma2)
    x = feats.double().cpu().numpy()
    mu1, mu2 = x.mean(0), np.asarray(mu2, np.float64)
    s2 = np.asarray(sigma2, np.float64)
    if mu2.shape != (f,) or s2.shape != (f, f):
        raise ValueError(f"mismatched shapes: features {tuple(feats.shape)}, mu {mu2.shape}, sigma {s2.shape}")
    xc = x - mu1
    m = xc @ ((s2 + s2.T) / 2) @ xc.T / (n - 1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + (xc * xc).sum() / (n - 1) + np.trace(s2) - 2 * tr_covmean)


def inception_score(logits: torch.Tensor, split_size: int = IS_SPLIT_SIZE) -> float:
    """exp(E_x KL(p(y|x) || p(y))) per split of `split_size` samples, averaged over splits (ADM), in fp64."""
    if logits.dim() != 2 or logits.shape[0] < 1:
        raise ValueError(f"logits must be [N, K] with N >= 1, got {tuple(logits.shape)}")
    p = torch.softmax(logits.double().cpu(), dim=1)
    scores = []
    for i in range(0, p.shape[0], split_size):
        part = p[i:i + split_size]
        # p log p is 0 at p = 0: xlogy keeps an underflowed probability from turning the sum into NaN.
        kl = (torch.xlogy(part, part) - part * torch.log(part.mean(0, keepdim=True))).sum(1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores))


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [n, m] by |a|^2 - 2 a.b + |b|^2, floored at 0 (ADM's form)."""
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min(0)


def manifold_radii(feats: torch.Tensor, k: int = 3, batch_size: int = 1000) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in `feats` [N, F] (itself excluded)."""
    if feats.shape[0] <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {feats.shape[0]}")
    out = []
    for i in range(0, feats.shape[0], batch_size):
        d = _sq_dists(feats[i:i + batch_size], feats)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the k+1-th smallest: the point itself is the first
    return torch.cat(out)


def _inside(query: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, batch_size: int) -> torch.Tensor:
    """bool [n]: query point j lies within radii[c] of at least one center c (squared distances)."""
    hit = torch.zeros(query.shape[0], dtype=torch.bool, device=query.device)
    for i in range(0, query.shape[0], batch_size):
        for c in range(0, centers.shape[0], batch_size):
            d = _sq_dists(query[i:i + batch_size], centers[c:c + batch_size])
            hit[i:i + batch_size] |= (d <= radii[None, c:c + batch_size]).any(1)
    return hit


def precision_recall(ref: torch.Tensor, gen: torch.Tensor, k: int = 3, batch_size: int = 1000,
                     device=None) -> Tuple[float, float]:
    """(precision, recall) of generated features `gen` [N, F] against reference features `ref` [M, F].

    precision = share of generated points inside the reference manifold; recall = share of reference
    points inside the generated manifold (fp32 distances, as ADM)."""
    device = device or ref.device
    ref, gen = ref.to(device, torch.float32), gen.to(device, torch.float32)
    if ref.dim() != 2 or gen.dim() != 2 or ref.shape[1] != gen.shape[1]:
        raise ValueError(f"features must be [M, F] and [N, F], got {tuple(ref.shape)} and {tuple(gen.shape)}")
    r_ref = manifold_radii(ref, k, batch_size)
    r_gen = manifold_radii(gen, k, batch_size)
    precision = _inside(gen, ref, r_ref, batch_size).double().mean()
    recall = _inside(ref, gen, r_gen, batch_size).double().mean()
    return float(precision), float(recall)


# ---------------------------------------------------------------------------------------------------
# Reference files
# ---------------------------------------------------------------------------------------------------

def _open_npz(path: str, help_text: str) -> zipfile.ZipFile:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path} ({help_text})")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path} is not an .npz file ({e}); {help_text}") from e


def load_ref_stats(path: str, dim: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Reference (mu [F], sigma [F, F]) in fp64 from either layout (`mu`/`sigma` or `ref_mu`/`ref_sigma`)."""
    with _open_npz(path, REF_STATS_HELP) as zf:
        names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    if not names:
        raise ValueError(f"{path} is not an .npz file (no arrays in it); {REF_STATS_HELP}")
    pair = next((p for p in (("mu", "sigma"), ("ref_mu", "ref_sigma")) if set(p) <= names), None)
    if pair is None:
        raise ValueError(f"{path} holds {sorted(names)}, no mu/sigma; {REF_STATS_HELP}")
    with np.load(path, allow_pickle=False) as z:
        mu, sigma = np.asarray(z[pair[0]], np.float64), np.asarray(z[pair[1]], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{path}: {pair[0]} {mu.shape} and {pair[1]} {sigma.shape} are not [F] and [F, F]; "
                         f"{REF_STATS_HELP}")
    if dim is not None and mu.size != dim:
        raise ValueError(f"{path} holds {mu.size}-d statistics but the feature network gives {dim}-d features; "
                         f"{REF_STATS_HELP}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: {pair[0]}/{pair[1]} hold non-finite values")
    return mu, sigma


def npz_array_info(path: str, key: str, help_text: str) -> Tuple[Tuple[int, ...], np.dtype]:
    """(shape, dtype) of `key` in an .npz from its header alone (no data read); ValueError if it is absent."""
    with _open_npz(path, help_text) as zf:
        if f"{key}.npy" not in zf.namelist():
            raise ValueError(f"{path} has no `{key}`; {help_text}")
        with zf.open(f"{key}.npy") as f:
            shape, fortran, dtype = _read_header(f, path)
    return tuple(shape), dtype


def _read_header(f, path: str):
    """(shape, fortran_order, dtype) from an open .npy stream (format 1.0 or 2.0, what np.savez writes)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"{path}: .npy format version {version} is not supported (expected 1.0 or 2.0)")


def iter_npz_array(path: str, key: str, batch_size: int) -> Iterator[np.ndarray]:
    """Batches of rows of `key` in an .npz, read as a stream (a 10,000-image reference never sits in memory
    at once; ADM's evaluator reads its files the same way)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        shape, fortran, dtype = _read_header(f, path)
        if fortran:
            raise ValueError(f"{path}: `{key}` is stored in Fortran order; expected a C-order array")
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            buf = f.read(n * row)
            if len(buf) != n * row:
                raise ValueError(f"{path}: `{key}` is truncated at row {start}")
            yield np.frombuffer(buf, dtype=dtype).reshape((n,) + tuple(shape[1:]))


def check_ref_images(path: str) -> int:
    """Number of reference images in `arr_0` of `path`, after checking they are uint8 [N, H, W, 3]."""
    shape, dtype = npz_array_info(path, "arr_0", REF_IMAGES_HELP)
    if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3):
        raise ValueError(f"{path}: `arr_0` is {dtype} {shape}; {REF_IMAGES_HELP}")
    return int(shape[0])


# ---------------------------------------------------------------------------------------------------
# Feature networks
# ---------------------------------------------------------------------------------------------------

class InceptionFeatures:
    """The TF 2015-12-05 FID Inception-v3 (torch-fidelity's `inception-v3-compat` port) from a local weights
    file: uint8 [N, H, W, C] images (C = 1 is repeated to RGB) -> pool3 [N, 2048] and logits [N, 1008]
    (without the bias, as the IS of ADM and torch-fidelity). torch-fidelity resizes to 299 with the TF1
    bilinear rule and normalises (x - 128) / 128 inside."""

    name = "inception-v3-compat"
    input_uint8 = True
    class_logits = False
    dim = 2048

    def __init__(self, weights: str, device="cpu"):
        if not weights:
            raise ValueError(f"no Inception weights file given; {INCEPTION_FILE_HELP}")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"Inception weights file not found: {weights} ({INCEPTION_FILE_HELP})")
        try:
            # weights_only=True first: only plain tensors are accepted from a file the user brings.
            sd = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise ValueError(f"{weights} is not a torch state dict ({type(e).__name__}: {first}); "
                             f"{INCEPTION_FILE_HELP}") from e
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise ValueError(f"{weights} holds a {type(sd).__name__}, not a state dict; {INCEPTION_FILE_HELP}")
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        try:
            net = FeatureExtractorInceptionV3(self.name, ["2048", "logits_unbiased"],
                                              feature_extractor_weights_path=weights)
        except RuntimeError as e:  # load_state_dict(strict=True): missing, unexpected or misshapen tensors
            first = str(e).strip().splitlines()
            raise ValueError(f"{weights} is not an Inception-v3 FID state dict ({' '.join(first[:2])[:300]}); "
                             f"{INCEPTION_FILE_HELP}") from e
        self.weights = weights
        self.device = torch.device(device)
        self.net = net.to(self.device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"Inception features take uint8 [N, H, W, 1|3] images, got {x.dtype} {tuple(x.shape)}")
        x = x.to(self.device).permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        pool, logits = self.net(x.contiguous())
        return {"pool": pool, "logits": logits}


def extract_features(net, images: Union[torch.Tensor, Iterable[torch.Tensor]], batch_size: int = 200,
                     progress: Optional[Callable[[int], None]] = None) -> Dict[str, torch.Tensor]:
    """Run a feature network over images (a tensor, or an iterable of tensors): float32 CPU {"pool", "logits"}.

    Images are float [N, C, H, W] in [-1, 1] or uint8 [N, H, W, C]; each batch is converted to what the
    network takes (floats -> uint8 by the official floor rule; uint8 -> x / 127.5 - 1)."""
    from drift.sampler import to_uint8
    parts = [images] if torch.is_tensor(images) else images
    out: Dict[str, list] = {}
    for part in parts:
        part = torch.as_tensor(part)
        for i in range(0, part.shape[0], batch_size):
            x = part[i:i + batch_size]
            if net.input_uint8 and x.dtype != torch.uint8:
                x = to_uint8(x)
            elif not net.input_uint8 and x.dtype == torch.uint8:
                x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
            elif not net.input_uint8:
                x = x.float().cpu()
            for k, v in net(x).items():
                out.setdefault(k, []).append(v.float().cpu())
            if progress is not None:
                progress(x.shape[0])
    return {k: torch.cat(v) for k, v in out.items()}
