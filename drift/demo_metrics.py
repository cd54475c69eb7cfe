"""Demo metrics (the `make demo` scores): class accuracy and a Fréchet distance in the features of a small classifier.

No external weights: a small CNN (`DemoClassifier`) is trained once on the demo dataset's train split
(Fashion-MNIST, 28x28 grayscale, 10 classes) with a fixed seed and cached as a `.pt` state dict. Its
penultimate activations are the feature space of the Fréchet distance (`fd`), in the spirit of FID but
with a classifier that actually knows the dataset. Two references put `fd` in context:

    fd_real_floor   10,000 real train images vs the 10,000 test images (what a perfect generator scores)
    fd_class_mean   each test label's class-mean image plus faint noise vs the test images: a "generator"
                    that is always recognisable but has no diversity (high accuracy, useless samples)

Images everywhere are float tensors in [-1, 1], shape [N, 1, 28, 28]; labels are int64 [N].

One implementation with `drift-eval`: the classifier is a feature network of `drift.fid` (`DemoFeatureNet`), so
features go through `drift.fid.extract_features` and the distance is `drift.fid.frechet_distance` (fp64);
`drift-eval CKPT --features demo` reports FID/IS/precision/recall/class accuracy in the same features.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data_prep.images import find_idx_pair, read_idx
from drift.fid import extract_features, feature_stats, frechet_distance

def load_idx_split(data_dir: str, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] as float32 [N, 1, H, W] and int64 labels [N] of the `split` ("train"|"test")."""
    img_path, lbl_path = find_idx_pair(data_dir, split)  # the IDX reader drift-prep packs with
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{data_dir}: {split} images {images.shape} and labels {labels.shape} do not match")
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1) / 127.5 - 1.0
    return x, torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------------------------------------------
# Classifier
# ---------------------------------------------------------------------------------------------------

class DemoClassifier(nn.Module):
    """Small strided CNN for 28x28 images; `features` gives the penultimate (feature_dim) activations.

    Strided convolutions instead of pooling keep it cheap enough (~0.5 MMAC per image) to train on the
    CPU inside the demo's time budget."""

    VERSION = 2  # part of the cache file name: bump when the architecture or recipe changes

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, feature_dim: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * width * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
        x = F.relu(self.conv1(x))  # (N, w, 14, 14)
        x = F.relu(self.conv2(x))  # (N, 2w, 7, 7)
        x = F.relu(self.conv3(x))  # (N, 4w, 4, 4)
        return F.relu(self.fc(x.flatten(1)))  # (N, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 2, batch_size: int = 128,
                     lr: float = 3e-3, seed: int = 0, num_classes: Optional[int] = None,
                     log: Optional[Callable[[str], None]] = None) -> DemoClassifier:
    """Train a DemoClassifier (AdamW, cosine LR, light random-shift augmentation) with a fixed seed."""
    if images.dim() != 4 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"images must be [N, C, H, W] matching labels [N], got {tuple(images.shape)} "
                         f"and {tuple(labels.shape)}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # parameter init
    model = DemoClassifier(num_classes=num_classes, in_channels=images.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = images.shape[0]
    steps = epochs * ((n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        correct = 0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            x, y = images[idx], labels[idx]
            # Random shifts of up to 2 px keep the classifier from keying on exact pixel positions,
            # which makes its features smoother for comparing generated images.
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            correct += int((logits.argmax(1) == y).sum())
        if log is not None:
            log(f"classifier epoch {epoch + 1}/{epochs}: train acc {correct / n:.4f}")
    model.eval()
    return model


def load_or_train_classifier(cache_path: str, images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0,
                             epochs: int = 2, log: Optional[Callable[[str], None]] = None) -> DemoClassifier:
    """Load the cached classifier at `cache_path`, or train it (fixed seed) and cache it atomically."""
    num_classes = int(labels.max()) + 1
    if os.path.exists(cache_path):
        try:
            blob = torch.load(cache_path, map_location="cpu", weights_only=True)
            model = DemoClassifier(num_classes=int(blob["num_classes"]), in_channels=int(blob["in_channels"]))
            model.load_state_dict(blob["state_dict"])
        except Exception as e:  # a corrupt cache is rebuilt rather than trusted
            raise ValueError(f"classifier cache {cache_path} is unreadable ({e}); delete it to retrain") from e
        if int(blob["seed"]) == seed and int(blob["epochs"]) == epochs and model.head.out_features == num_classes:
            model.eval()
            return model
    model = train_classifier(images, labels, epochs=epochs, seed=seed, num_classes=num_classes, log=log)
    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    blob = {"state_dict": model.state_dict(), "num_classes": num_classes, "in_channels": images.shape[1],
            "seed": seed, "epochs": epochs}
    tmp = cache_path + ".tmp"
    torch.save(blob, tmp)
    os.replace(tmp, cache_path)
    return model


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------

class DemoFeatureNet:
    """The demo classifier as a `drift.fid` feature network: float [N, C, H, W] in [-1, 1] -> its penultimate
    features ("pool", [N, 128]) and class logits ("logits", [N, K])."""

    name = "demo-classifier"
    input_uint8 = False
    class_logits = True

    def __init__(self, model: DemoClassifier):
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        f = self.model.features(x)
        return {"pool": f, "logits": self.model.head(f)}


def classifier_outputs(model: DemoClassifier, images: torch.Tensor, batch_size: int = 1000):
    """(penultimate features float64 [N, F], predicted labels int64 [N]) of `images` in [-1, 1]."""
    out = extract_features(DemoFeatureNet(model), images, batch_size)
    return out["pool"].double(), out["logits"].argmax(1)


def fd_between(model: DemoClassifier, a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between two image sets in the classifier's penultimate features."""
    fa, _ = classifier_outputs(model, a)
    fb, _ = classifier_outputs(model, b)
    return frechet_distance(*feature_stats(fa), *feature_stats(fb))


def class_mean_images(images: torch.Tensor, labels: torch.Tensor, query_labels: torch.Tensor, *,
                      noise_std: float = 0.05, seed: int = 0) -> torch.Tensor:
    """The class-mean "generator": the mean train image of each query label plus faint Gaussian noise."""
    num_classes = int(labels.max()) + 1
    means = torch.stack([images[labels == c].mean(0) for c in range(num_classes)])  # (K, C, H, W)
    g = torch.Generator().manual_seed(seed)
    out = means[query_labels] + noise_std * torch.randn(means[query_labels].shape, generator=g)
    return out.clamp(-1, 1)


class DemoEvaluator:
    """Holds the classifier and the real-data reference statistics; scores generated image sets."""

    def __init__(self, data_dir: str, cache_dir: str, *, num_eval: Optional[int] = 10000, seed: int = 0,
                 classifier_epochs: int = 2, log: Optional[Callable[[str], None]] = None):
        self.train_x, self.train_y = load_idx_split(data_dir, "train")
        test_x, test_y = load_idx_split(data_dir, "test")
        num_eval = test_x.shape[0] if num_eval is None else num_eval  # None: the whole test split
        if num_eval > test_x.shape[0]:
            raise ValueError(f"num_eval={num_eval} exceeds the {test_x.shape[0]} test images")
        self.test_x, self.test_y = test_x[:num_eval], test_y[:num_eval]
        self.num_eval = num_eval
        self.seed = seed
        cache = os.path.join(cache_dir, f"demo_classifier_v{DemoClassifier.VERSION}_seed{seed}_ep{classifier_epochs}.pt")
        self.model = load_or_train_classifier(cache, self.train_x, self.train_y, seed=seed,
                                              epochs=classifier_epochs, log=log)
        self.test_feats, test_pred = classifier_outputs(self.model, self.test_x)  # float64 [num_eval, F]
        self.test_accuracy = float((test_pred == self.test_y).float().mean())
        self.test_stats = feature_stats(self.test_feats)
        self._references: Optional[Dict[str, float]] = None

    def fd_to_test(self, images: torch.Tensor) -> float:
        feats, _ = classifier_outputs(self.model, images)
        return frechet_distance(*feature_stats(feats), *self.test_stats)

    def references(self) -> Dict[str, float]:
        """fd_real_floor (train subset vs test) and fd_class_mean (class means + noise vs test)."""
        if self._references is None:
            g = torch.Generator().manual_seed(self.seed + 1)
            idx = torch.randperm(self.train_x.shape[0], generator=g)[: self.num_eval]
            cm = class_mean_images(self.train_x, self.train_y, self.test_y, seed=self.seed)
            _, cm_pred = classifier_outputs(self.model, cm)
            self._references = {
                "fd_real_floor": self.fd_to_test(self.train_x[idx]),
                "fd_class_mean": self.fd_to_test(cm),
                "class_accuracy_class_mean": float((cm_pred == self.test_y).float().mean()),
                "classifier_test_accuracy": self.test_accuracy,
            }
        return dict(self._references)

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        """class_accuracy and fd of generated `images` (conditioned on `labels`), plus the references."""
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in count")
        feats, pred = classifier_outputs(self.model, images)
        out = {"class_accuracy": float((pred == labels.cpu()).float().mean()),
               "fd": frechet_distance(*feature_stats(feats), *self.test_stats)}
        out.update(self.references())
        out["fd_over_class_mean"] = out["fd"] / max(out["fd_class_mean"], 1e-12)
        return out
