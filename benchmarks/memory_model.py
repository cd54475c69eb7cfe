"""Memory model of one training step at a preset's per-GPU shapes: where the GPU memory goes, and what the
label-chunked step (cfg.label_chunk) and bf16 keys (cfg.bf16_keys) leave of it. Runs on a CPU.

    python benchmarks/memory_model.py                       # the default scenarios (ablation-B/2, B/2 + MAE-640)
    python benchmarks/memory_model.py --preset ablation-B/2 --labels-per-gpu 8 --label-chunk 2
    python benchmarks/memory_model.py --preset B/2 --mae-width 640 --labels-per-gpu 16 --label-chunk 1 --bf16-keys

Method. The step's memory is, per rank: fixed state (generator parameters, fp32 gradients, AdamW's two moments,
one fp32 EMA copy per decay, autocast's bf16 copies of the generator's weights, the encoder's weights, the
class and global queues: all counted exactly) plus what grows with the samples. The per-sample terms are
measured on the real `Trainer` step on the CPU under bf16 autocast with CUDA's autocast policy for GroupNorm
(fp32, as on the GPU; the CPU policy would keep it in bf16), at small sizes:

* saved for backward, per generated sample, split by phase (`torch.autograd.graph.saved_tensors_hooks`,
  one count per storage): the generator (at its full width, at depths 1 and 2: per block and the rest), the
  encoder with the feature keys taken from its maps (MAE-ResNet at two reduced widths, full resolution and
  block layout: every tensor it saves has C x H x W elements with C proportional to the width), and the loss
  (the per-key (x - goal) the squared error keeps);
* feature keys alive but not saved (generated samples), and the keys of the reals (positives + unconditional
  negatives), held until the field of every key is done;
* the backward's extra working set (live bytes during backward beyond those at its start: gradients of the
  feature maps in flight), from a live-storage tracker (a dispatch mode that follows every tensor storage
  the step allocates until it is freed).

Per-sample terms are the difference of 2 and 1 labels divided by the samples (fixed costs cancel), then scaled
to the preset's depth and encoder width (linear; `test_memory_model.py` checks the extrapolation against a
direct measurement). The field's transient is modelled: the largest key's force buffer and, unless
cfg.fused_loss, the loss's three fp32 temporaries. (The loss saves one fp32 copy of each key either way: (x - goal),
or the force when fused.) Peaks:

  plain:   max(field: fixed + nG (gen saved + enc saved + loss saved + live keys) + n(P+U) real keys + field,
               backward: fixed + nG (gen saved + enc saved + loss saved + backward working set))
  chunked: max(phase B: fixed + nG (stored keys + loss saved) + n(P+U) stored real keys + field,
               phase C: fixed + nG key gradients + cG (gen saved + enc saved + live keys + backward working set))

with n labels per GPU, c labels per chunk, G generated samples per label. Not modelled: allocator rounding and
fragmentation (`max_memory_allocated` does not see fragmentation; `reserved` does), cuDNN/cuBLAS workspaces,
torch.compile's buffers. The check against measured GPU peaks is in benchmarks/RESULTS.md ("Trainer on GPU").
Prints a table; writes benchmarks/results/memory-model-<cpu>-<utc>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._harness import format_table, write_json  # noqa: E402
from benchmarks.bench_train import SyntheticLoader, item_shape_of  # noqa: E402
from drift.config import PRESETS, TrainConfig  # noqa: E402

GIB = float(1 << 30)
# Measured on an H200 before the memory levers (RESULTS.md "Trainer on GPU"; torch 2.11, eager, bf16 autocast, Triton field, random MAE-ResNet w256,
# synthetic latents, 1000 classes): ablation-B/2 plain step, labels per GPU -> max_memory_allocated (GiB).
H200_MEASURED = {1: 23.4, 2: 40.5}
H200_MEASURED_NOTE = {8: "133 GiB after step 0, out of memory at step 1 (141 GB card)"}


# ----------------------------------------------------------------------------------------------------
# Instruments
# ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def cuda_autocast_policy():
    """GroupNorm in fp32 under CPU autocast, as CUDA's autocast runs it (its fp32 op list): the input is cast
    to fp32 (that copy is what GroupNorm saves) and the output is fp32. Everything else the step runs has the
    same policy on both devices (matmuls, convolutions and attention in bf16)."""
    orig = F.group_norm

    def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
        if torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return orig(x.float(), num_groups, None if weight is None else weight.float(),
                            None if bias is None else bias.float(), eps)
        return orig(x, num_groups, weight, bias, eps)

    F.group_norm = group_norm
    try:
        yield
    finally:
        F.group_norm = orig


class LiveTracker(TorchDispatchMode):
    """Bytes of every tensor storage created inside the mode, from its creation until it is freed (weakref
    on the storage); `peak` since the last `mark()`. Storages made before entering (parameters, queues) are
    not counted, nor scratch memory inside an op."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._sizes: Dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.current -= self._sizes.pop(key, 0)

    def _add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key, n = st.data_ptr(), st.nbytes()
        if n == 0 or key in self._sizes:
            return
        self._sizes[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def mark(self) -> int:
        """Reset the peak to the current bytes; return them."""
        self.peak = self.current
        return self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._add(t)
        return out


class PhaseProbe:
    """Stands in for `Trainer.phase_timer`: knows the step's current phase (for the saved-tensor hook) and
    records the live tracker's bytes at the start and the peak of every phase."""

    def __init__(self, tracker: LiveTracker):
        self.tracker = tracker
        self.current = "other"
        self.start: Dict[str, int] = {}
        self.peak: Dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        prev, self.current = self.current, name
        self.start.setdefault(name, self.tracker.current)
        outer_peak = self.tracker.peak
        self.tracker.mark()
        try:
            yield
        finally:
            self.peak[name] = max(self.peak.get(name, 0), self.tracker.peak)
            self.tracker.peak = max(outer_peak, self.tracker.peak)
            self.current = prev


# ----------------------------------------------------------------------------------------------------
# One measured step at a small size
# ----------------------------------------------------------------------------------------------------

@dataclass
class Probe:
    """What one measured step held (bytes; all ranks' tensors are on this CPU)."""
    saved: Dict[str, int] = field(default_factory=dict)  # phase -> saved-for-backward bytes (unique storages)
    saved_by_dtype: Dict[str, int] = field(default_factory=dict)  # "phase/dtype" -> bytes
    gen_keys_unsaved: int = 0  # generated-sample keys alive but not saved
    gen_keys: int = 0  # all generated-sample key bytes, as stored contiguously (sum of numel * itemsize)
    real_keys: int = 0  # keys of the reals (storages)
    backward_start: int = 0
    backward_peak: int = 0
    peak: int = 0  # the whole step's live peak (tracker)
    phase_peak: Dict[str, int] = field(default_factory=dict)


def write_random_mae(path: str, width: int, layers, in_channels: int, patch_size: int) -> str:
    """A randomly initialized MAE-ResNet encoder of the given size, saved as a weights file with its config."""
    from drift.features.mae_resnet import MAEConfig, MAEResNetEncoder
    cfg = MAEConfig(in_channels=in_channels, patch_size=patch_size, width=width, layers=tuple(layers),
                    num_classes=0)
    torch.save({"state_dict": MAEResNetEncoder(cfg).state_dict(), "config": cfg.to_dict()}, path)
    return path


def small_config(preset: str, labels: int, *, width: int, depth: int, gen: int, pos: int, unc: int,
                 hidden: Optional[int] = None, heads: Optional[int] = None, layers=None, label_chunk: int = 0,
                 bf16_keys: bool = False, num_classes: int = 4, image_size: int = 0, tmp: str = "",
                 grad_checkpointing: Optional[bool] = None) -> TrainConfig:
    """A CPU-sized config of `preset`: the generator at `depth` blocks (its width unless `hidden`), a random
    MAE-ResNet of `width` (the preset's resolution and layout unless `layers` / `image_size`)."""
    over = dict(train_batch_size=labels, gen_per_label=gen, pos_per_sample=pos, neg_per_sample=unc, depth=depth,
                device="cpu", compile=False, queue_warmup_batches=1, progress=False, out_dir=os.path.join(tmp, "run"),
                positive_bank_size=8, negative_bank_size=16, push_per_step=max(16, labels), label_chunk=label_chunk,
                bf16_keys=bf16_keys, field_backend="cpp" if _has_cpp() else "reference", wandb="disabled")
    if hidden:
        over.update(hidden_size=hidden, num_heads=heads or max(1, hidden // 64))
    if grad_checkpointing is not None:
        over["grad_checkpointing"] = grad_checkpointing
    cfg = TrainConfig.from_preset(preset, **over)
    c, h, _ = item_shape_of(cfg, image_size)
    path = os.path.join(tmp, f"mae{width}.pt")
    write_random_mae(path, width, layers or (3, 4, 6, 3), c, 1 if h <= 64 else 8)
    return cfg.replace(features="mae", feature_weights=path)


def _has_cpp() -> bool:
    from drift.field.dispatch import has_cpp
    return has_cpp()


def measure_step(cfg: TrainConfig, num_classes: int = 4, image_size: int = 0) -> Probe:
    """Run one forward/backward of the real step of `cfg` on the CPU under bf16 autocast (CUDA's policy) and
    record what it holds (see `Probe`)."""
    from drift.step import bf16_matmul_weights
    from drift.trainer import Trainer
    shape = item_shape_of(cfg, image_size)
    t = Trainer(cfg, loader_factory=lambda c, info: SyntheticLoader(c.push_per_step, shape, num_classes, "cpu"))
    try:
        t.autocast = True
        bf16_matmul_weights(t.features)  # what the trainer does under CUDA autocast
        t._push_batch()
        batch = t._sample_inputs(0)
        t.model.train()
        params = {p.untyped_storage().data_ptr() for p in list(t.model.parameters()) + list(t.features.parameters())}
        tracker = LiveTracker()
        probe = PhaseProbe(tracker)
        t.phase_timer = probe
        res = Probe()
        saved_keys = set()
        encode = t._encode
        key_storages = {"gen": {}, "real": {}}

        def pack(x):
            st = x.untyped_storage()
            key = st.data_ptr()
            if key not in params and key not in saved_keys and st.nbytes():
                saved_keys.add(key)
                res.saved[probe.current] = res.saved.get(probe.current, 0) + st.nbytes()
                k = f"{probe.current}/{str(x.dtype).replace('torch.', '')}"
                res.saved_by_dtype[k] = res.saved_by_dtype.get(k, 0) + st.nbytes()
            return x

        def encode_probe(x):
            out = encode(x)
            kind = "gen" if torch.is_grad_enabled() and x.requires_grad else "real"
            for v in out.values():
                key_storages[kind][v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
                if kind == "gen":
                    res.gen_keys += v.numel() * v.element_size()
            return out

        t._encode = encode_probe
        with cuda_autocast_policy(), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), tracker:
            tracker.mark()
            t._forward_backward(batch)
        res.gen_keys_unsaved = sum(n for k, n in key_storages["gen"].items() if k not in saved_keys)
        res.real_keys = sum(key_storages["real"].values())
        res.backward_start = probe.start.get("backward", 0)
        res.backward_peak = probe.peak.get("backward", 0)
        res.peak = tracker.peak
        res.phase_peak = dict(probe.peak)
        return res
    finally:
        t.close()


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------

@dataclass
class Coefficients:
    """Bytes per generated sample (gen_*, enc_*, loss_*, keys_*, bwd_*) or per real sample (real_keys), as
    linear functions of the encoder width w (a + b w) and, for the generator, of its depth d (a + b d)."""
    gen: tuple  # (per-sample bytes outside the blocks, per block)
    enc: tuple  # (a, b) of the encoder + key derivation saved bytes in w
    loss: tuple
    keys_unsaved: tuple
    gen_keys: tuple
    real_keys: tuple
    bwd: tuple
    dtypes: Dict[str, tuple] = field(default_factory=dict)  # "phase/dtype" saved bytes (a, b) in w (or in d)

    @staticmethod
    def _lin(pair, x):
        return pair[0] + pair[1] * x


def fit_coefficients(preset: str, widths=(32, 64), depths=(1, 2), gen: int = 2, pos: int = 2, unc: int = 1,
                     hidden: Optional[int] = None, layers=None, image_size: int = 0, bf16_keys: bool = False,
                     grad_checkpointing: Optional[bool] = None, log=print) -> Coefficients:
    """Measure the per-sample terms of `preset` (module doc): encoder terms from widths w0, w1 at depth d0,
    generator terms from depths d0, d1 at width w0, each from the difference of 2 and 1 labels."""
    if not PRESETS[preset].get("features", "").startswith("mae") or "convnext" in PRESETS[preset]["features"]:
        raise ValueError(f"the memory model covers MAE-ResNet presets; {preset} uses {PRESETS[preset]['features']}")
    unc = unc if PRESETS[preset].get("neg_per_sample", 16) else 0
    (w0, w1), (d0, d1) = widths, depths
    ckpt = bool(PRESETS[preset].get("grad_checkpointing", False)) if grad_checkpointing is None \
        else grad_checkpointing
    plan = [(w0, d0, ckpt), (w1, d0, ckpt), (w0, d1, ckpt)]
    if ckpt:
        # The backward's working set is the encoder's (gradients of its maps while its saved tensors are still
        # alive); a checkpointed generator recomputes its blocks later, once the encoder's saved tensors are
        # freed, and one block's activations are far below those. That recomputation would otherwise bend the
        # (peak - start) of the backward away from linear in the width, so it is measured without it.
        plan += [(w0, d0, False), (w1, d0, False)]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for w, d, c in plan:
            for n in (1, 2):
                cfg = small_config(preset, n, width=w, depth=d, gen=gen, pos=pos, unc=unc, hidden=hidden,
                                   layers=layers, bf16_keys=bf16_keys, image_size=image_size, tmp=tmp,
                                   grad_checkpointing=c)
                runs[(w, d, c, n)] = r = measure_step(cfg, image_size=image_size)
                log(f"  measured width {w}, depth {d}{', checkpointed' if c else ''}, {n} label(s): step peak "
                    f"{r.peak / 2**20:.1f} MiB")

    def per_sample(w, d, get, count=gen, c=ckpt):
        return (get(runs[(w, d, c, 2)]) - get(runs[(w, d, c, 1)])) / count

    def in_w(get, count=gen, c=ckpt):
        y0, y1 = per_sample(w0, d0, get, count, c), per_sample(w1, d0, get, count, c)
        b = (y1 - y0) / (w1 - w0)
        return (y0 - b * w0, b)

    def in_d(get):
        y0, y1 = per_sample(w0, d0, get), per_sample(w0, d1, get)
        b = (y1 - y0) / (d1 - d0)
        return (y0 - b * d0, b)

    dtypes = {}
    for k in set().union(*(r.saved_by_dtype for r in runs.values())):
        def get(r, k=k):
            return r.saved_by_dtype.get(k, 0)
        dtypes[k] = in_d(get) if k.startswith("generator/") else in_w(get)
    return Coefficients(
        gen=in_d(lambda r: r.saved.get("generator", 0)),
        enc=in_w(lambda r: r.saved.get("encoder", 0)),
        loss=in_w(lambda r: r.saved.get("field", 0)),
        keys_unsaved=in_w(lambda r: r.gen_keys_unsaved),
        gen_keys=in_w(lambda r: r.gen_keys),
        real_keys=in_w(lambda r: r.real_keys, pos + unc),
        bwd=in_w(lambda r: r.backward_peak - r.backward_start, c=False),
        dtypes=dtypes)


def fixed_bytes(cfg: TrainConfig, item_shape, num_classes: int, width: int, layers=None,
                autocast: bool = True, bf16_encoder_weights: bool = True) -> Dict[str, float]:
    """Exact per-rank state that does not grow with the samples (generator built on the meta device)."""
    from drift.features.mae_resnet import MAEConfig, MAEResNetEncoder
    from drift.model import build_generator_model
    with torch.device("meta"):
        g = build_generator_model(cfg, num_classes, item_shape[1], item_shape[0])
        enc = MAEResNetEncoder(MAEConfig(in_channels=item_shape[0], patch_size=1 if item_shape[1] <= 64 else 8,
                                         width=width, layers=tuple(layers or (3, 4, 6, 3)), num_classes=0))
    n_gen = sum(p.numel() for p in g.parameters())
    n_linear = sum(m.weight.numel() for m in g.modules() if isinstance(m, torch.nn.Linear))
    item = 1
    for s in item_shape:
        item *= int(s)
    out = {
        "generator weights": 4.0 * n_gen,
        "gradients": 4.0 * n_gen,
        "AdamW moments": 8.0 * n_gen,
        "EMA copies": 4.0 * n_gen * len(cfg.ema_decay),
        # conv / linear weights in bf16 under autocast (drift.step.bf16_matmul_weights), the norms in fp32
        "encoder weights": sum(p.numel() * (2.0 if autocast and bf16_encoder_weights and p.dim() > 1 else 4.0)
                               for p in enc.parameters()),
        "queues": (1.0 if cfg.queue_dtype == "uint8" else 4.0) * item
                  * (num_classes * cfg.positive_bank_size + cfg.negative_bank_size),
    }
    if autocast:  # autocast keeps one bf16 copy of each weight a matmul reads (cached while the forward runs)
        out["autocast weight copies"] = 2.0 * n_linear
    return out


def key_layout(width: int, item_shape, layers=None) -> Dict[str, float]:
    """Per sample: elements of the largest feature key (the field's transient is sized by it), and the share
    of all key elements in the largest of the chunked step's key groups (`drift.step.key_groups`)."""
    from drift.features.mae_resnet import MAEConfig, MAEFeatures, MAEResNetEncoder
    from drift.step import key_groups
    with torch.device("meta"):
        enc = MAEResNetEncoder(MAEConfig(in_channels=item_shape[0], patch_size=1 if item_shape[1] <= 64 else 8,
                                         width=width, layers=tuple(layers or (3, 4, 6, 3)), num_classes=0))
    shapes = MAEFeatures(enc).describe(tuple(item_shape))
    sizes = {k: L * D for k, (L, D) in shapes.items()}
    fake = {k: torch.empty(1, n, device="meta") for k, n in sizes.items()}
    total = sum(sizes.values())
    return {"max_key": max(sizes.values()), "keys": len(sizes), "elements": total,
            "group_share": max(sum(sizes[k] for k in g) for g in key_groups(fake)) / total}


def predict(co: Coefficients, cfg: TrainConfig, labels: int, label_chunk: int, width: int, depth: int,
            fixed: Dict[str, float], layout: Dict[str, float]) -> Dict[str, object]:
    """Predicted peak (bytes) and its terms for `labels` labels per GPU and chunks of `label_chunk` labels."""
    lin = Coefficients._lin
    G, R = cfg.gen_per_label, cfg.pos_per_sample + cfg.neg_per_sample
    gen_saved = lin(co.gen, depth)
    enc_saved, loss_saved = lin(co.enc, width), lin(co.loss, width)
    keys_unsaved, gen_keys = lin(co.keys_unsaved, width), lin(co.gen_keys, width)
    real_keys, bwd = lin(co.real_keys, width), lin(co.bwd, width)
    fixed_total = sum(fixed.values())
    n = labels
    # The largest key's fp32 force buffer, plus x, goal and (x - goal)^2 in fp32 unless the loss is fused.
    field_tmp = 4.0 * (1 if cfg.fused_loss else 4) * n * G * layout["max_key"]
    chunked = 0 < label_chunk < n
    terms: Dict[str, float] = dict(fixed)
    if not chunked:
        terms.update({"generator saved": n * G * gen_saved, "encoder saved": n * G * enc_saved,
                      "loss saved ((x - goal) or the fused force)": n * G * loss_saved,
                      "generated keys (not saved)": n * G * keys_unsaved,
                      "real keys": n * R * real_keys, "field transient": field_tmp,
                      "backward working set": n * G * bwd})
        at_field = fixed_total + n * G * (gen_saved + enc_saved + loss_saved + keys_unsaved) + n * R * real_keys \
            + field_tmp
        at_backward = fixed_total + n * G * (gen_saved + enc_saved + loss_saved + bwd)
        phases = {"field": at_field, "backward": at_backward}
    else:
        c = label_chunk
        grad_bytes = gen_keys  # the key gradients have the keys' dtypes
        share = layout["group_share"]  # phase B holds one key group's (x - goal) at a time
        terms.update({"stored generated keys / their gradients": n * G * gen_keys,
                      "loss saved ((x - goal) or the fused force), one key group": n * G * loss_saved * share,
                      "stored real keys": n * R * real_keys, "field transient": field_tmp,
                      "chunk: generator saved": c * G * gen_saved, "chunk: encoder saved": c * G * enc_saved,
                      "chunk: keys (not saved)": c * G * keys_unsaved, "chunk: backward working set": c * G * bwd})
        # B: a group's leaves become its gradients (same dtype), so stored keys + gradients stay at nG gen_keys.
        phase_b = fixed_total + n * G * (gen_keys + loss_saved * share) + n * R * real_keys + field_tmp
        phase_c = fixed_total + n * G * grad_bytes + c * G * (gen_saved + enc_saved + keys_unsaved + bwd)
        phases = {"B (field over all labels)": phase_b, "C (chunk backward)": phase_c}
    peak_phase = max(phases, key=phases.get)
    return {"peak": phases[peak_phase], "peak_phase": peak_phase, "phases": phases, "terms": terms}


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

# The code as measured on the H200 (before the levers: plain step, fp32 keys, fp32 encoder weights, no generator
# checkpointing, the unfused loss) and the presets as they are now (their label_chunk / bf16_keys /
# grad_checkpointing / fused_loss).
BEFORE = dict(label_chunk=0, bf16_keys=False, grad_checkpointing=False, bf16_encoder_weights=False, fused_loss=False)
DEFAULT_SCENARIOS = [  # (preset, MAE width, labels per GPU, overrides of the preset; None = the preset as it is)
    ("ablation-B/2", 256, (1, 2, 4, 8), BEFORE),
    ("ablation-B/2", 256, (1, 2, 4, 8), None),
    ("B/2", 640, (16,), BEFORE),
    ("B/2", 640, (16,), None),
    ("L/2", 640, (16,), BEFORE),
    ("L/2", 640, (16,), None),
    # the alternatives the presets' choices were made against
    ("ablation-B/2", 256, (8,), dict(label_chunk=1)),
    ("B/2", 640, (16,), dict(bf16_keys=False)),
    ("L/2", 640, (16,), dict(grad_checkpointing=False)),
]
BEFORE_LABEL, NOW_LABEL = "before (plain step as measured)", "now (preset levers)"


def scenario_rows(preset: str, width: int, labels_list, over: Optional[dict], num_classes: int, layers=None,
                  cache: Optional[dict] = None, log=print) -> List[dict]:
    """Predicted peaks of `preset` with an MAE-ResNet of `width` at each labels-per-GPU value; `over` replaces
    the preset's label_chunk / bf16_keys / grad_checkpointing / bf16_encoder_weights (None: as configured)."""
    what = BEFORE_LABEL if over == BEFORE else (NOW_LABEL if over is None else "with overrides")
    over = dict(over or {})
    bf16_weights = over.pop("bf16_encoder_weights", True)
    cfg = TrainConfig.from_preset(preset, **over)
    label_chunk, bf16_keys = cfg.label_chunk, cfg.bf16_keys
    shape = item_shape_of(cfg)
    depth = cfg.depth or _preset_depth(cfg)
    log(f"{preset} ({what}): MAE width {width}, label_chunk {label_chunk}, bf16_keys {bf16_keys}, "
        f"grad_checkpointing {cfg.grad_checkpointing}")
    key = (preset, bf16_keys, cfg.grad_checkpointing)
    cache = {} if cache is None else cache
    if key not in cache:
        cache[key] = fit_coefficients(preset, bf16_keys=bf16_keys, grad_checkpointing=cfg.grad_checkpointing,
                                      layers=layers, log=log)
    co = cache[key]
    fixed = fixed_bytes(cfg, shape, num_classes, width, layers, bf16_encoder_weights=bf16_weights)
    layout = key_layout(width, shape, layers)
    lin = Coefficients._lin
    rows = []
    for n in labels_list:
        pr = predict(co, cfg, n, label_chunk, width, depth, fixed, layout)
        row = {"preset": preset, "code": what, "mae_width": width, "labels_per_gpu": n, "label_chunk": label_chunk,
               "bf16_keys": bf16_keys, "grad_checkpointing": cfg.grad_checkpointing,
               "bf16_encoder_weights": bf16_weights, "predicted_gib": pr["peak"] / GIB,
               "peak_phase": pr["peak_phase"], "phases_gib": {k: v / GIB for k, v in pr["phases"].items()},
               "terms_gib": {k: v / GIB for k, v in pr["terms"].items()},
               "keys": layout["keys"], "key_elements_per_sample": layout["elements"],
               "per_sample_mib": {
                   "generator saved": lin(co.gen, depth) / 2**20,
                   "encoder saved": lin(co.enc, width) / 2**20,
                   "loss saved": lin(co.loss, width) / 2**20,
                   "generated keys (stored)": lin(co.gen_keys, width) / 2**20,
                   "generated keys (not saved)": lin(co.keys_unsaved, width) / 2**20,
                   "real keys (per real sample)": lin(co.real_keys, width) / 2**20,
                   "backward working set": lin(co.bwd, width) / 2**20},
               "saved_by_dtype_mib": {k: lin(v, depth if k.startswith("generator/") else width) / 2**20
                                      for k, v in sorted(co.dtypes.items())}}
        if preset == "ablation-B/2" and width == 256 and what == BEFORE_LABEL:
            row["h200_measured_gib"] = H200_MEASURED.get(n)
            row["h200_note"] = H200_MEASURED_NOTE.get(n)
        rows.append(row)
    return rows


def _preset_depth(cfg: TrainConfig) -> int:
    from drift.model import DRIFT_MODELS
    with torch.device("meta"):
        return DRIFT_MODELS[cfg.model](num_classes=1).depth


COLUMNS = [("preset", "preset", 13, ""), ("code", "code", 23, ""), ("mae_width", "MAE", 4, "d"),
           ("labels_per_gpu", "labels", 6, "d"),
           ("label_chunk", "chunk", 5, "d"), ("bf16_keys", "bf16 keys", 9, ""),
           ("grad_checkpointing", "gen ckpt", 8, ""), ("predicted_gib", "model GiB", 9, ".1f"),
           ("h200_measured_gib", "H200 GiB", 8, ".1f"), ("peak_phase", "peak in", 26, "")]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="one preset (default: the scenarios)")
    p.add_argument("--mae-width", type=int, default=256, help="MAE-ResNet width (256 or 640)")
    p.add_argument("--labels-per-gpu", type=int, nargs="+", default=[1, 2, 4, 8], help="labels per GPU")
    p.add_argument("--label-chunk", type=int, default=None, help="labels per chunk (0 = plain; default the preset's)")
    p.add_argument("--bf16-keys", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 feature keys (default: the preset's)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="generator activation checkpointing (default: the preset's)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes (queue memory)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the measurements")
    p.add_argument("--out-dir", default=None, help="JSON directory (default benchmarks/results)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.preset is None:
        scenarios = DEFAULT_SCENARIOS
    else:
        over = {k: v for k, v in (("label_chunk", args.label_chunk), ("bf16_keys", args.bf16_keys),
                                  ("grad_checkpointing", args.grad_checkpointing)) if v is not None}
        scenarios = [(args.preset, args.mae_width, tuple(args.labels_per_gpu), over)]
    rows, cache = [], {}
    for preset, width, labels, over in scenarios:
        rows += scenario_rows(preset, width, labels, over, args.num_classes, cache=cache)
    print(format_table(rows, COLUMNS))
    for r in rows:
        print(f"\n{r['preset']} MAE-{r['mae_width']} ({r['code']}), {r['labels_per_gpu']} labels, chunk "
              f"{r['label_chunk']}, bf16 keys {r['bf16_keys']}, generator checkpointing {r['grad_checkpointing']}: "
              f"{r['predicted_gib']:.1f} GiB (peak in {r['peak_phase']})")
        for k, v in r["terms_gib"].items():
            print(f"    {k:<32} {v:8.2f} GiB")
    path = write_json("memory-model", "cpu", {"rows": rows}, out_dir=args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
