"""Parts of the training step that are not the step's math: the label-chunked forward/backward (the memory
lever of `TrainConfig.label_chunk`), regional compilation, the compile warm-up's progress line and the phase
timer of `benchmarks/bench_train.py`. The step itself (`Trainer._loss`, `Trainer._key_losses`) is in
drift/trainer.py; this module calls back into it.

The label-chunked step (cfg.label_chunk = c labels per chunk, 0 < c < labels per rank). The plain step
holds the autograd graph of the generator and the encoder for every generated sample of the rank at once
(~17 GiB per label at ablation-B/2 on a GPU: benchmarks/RESULTS.md, "Trainer on GPU"). The chunked step
gives the same per-key losses and the same gradients (up to fp32 summation order) in three phases:

  A. without a graph, chunk by chunk: the generator, then the feature keys of the generated samples and of
     the reals (positives + unconditional negatives);
  B. the field of every key over all of the rank's labels at once (`Trainer._key_losses`, so its scale and
     per-temperature RMS are the global ones, all-reduced over ranks as in the plain step) on leaf copies of
     the generated keys, and a backward of the summed loss to those leaves: the gradient of the step's loss
     with respect to every generated key (the plain step's backward passes through the same values). Keys
     go through B in ~KEY_GROUPS groups (by bytes), each group's state freed before the next;
  C. chunk by chunk, with a graph: the generator and the encoder again (same inputs, so the same samples and
     keys), and a backward of the keys with their stored gradients; the parameter gradients accumulate
     over the chunks. Under DDP only the last chunk's backward all-reduces (`no_sync` before it).

Peak memory: the stored keys of the rank (phase A/B) and their gradients, plus one chunk's graph, instead of
every label's graph. Cost: one more forward of the generator and of the encoder on the generated samples.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

import torch


def label_chunks(n: int, chunk: int) -> List[Tuple[int, int]]:
    """[(lo, hi)) label ranges of `chunk` labels covering range(n); the last one may be shorter."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]


def _sum(values):
    """Sum in order, as the plain step sums its key losses (same rounding, same logged loss)."""
    total = None
    for v in values:
        total = v if total is None else total + v
    return total


# The chunked step's field runs over about this many groups of keys (by bytes), so the loss's saved (x - goal)
# and the transient of one group's backward are ~1/KEY_GROUPS of all keys' instead of all at once.
KEY_GROUPS = 8


def key_groups(keys: Dict[str, torch.Tensor], groups: int = KEY_GROUPS) -> List[List[str]]:
    """Consecutive key names split into groups of at most max(total / groups, largest key) bytes (in order)."""
    sizes = {k: v.numel() * v.element_size() for k, v in keys.items()}
    budget = max(sum(sizes.values()) / groups, max(sizes.values(), default=0))
    out: List[List[str]] = []
    used = budget
    for k, n in sizes.items():
        if used + n > budget:
            out.append([])
            used = 0
        out[-1].append(k)
        used += n
    return out


class PhaseTimer:
    """Wall time per phase of the step, with a device synchronize at both ends of every phase.

    Only for a separate, instrumented run (`Trainer.phase_timer`): the synchronizes serialize the host and
    the device, so the timed run of a benchmark leaves the timer off (None)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: Dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def phase(timer: Optional[PhaseTimer], name: str):
    """`timer(name)`, or a no-op context when no timer is set (the normal case)."""
    return contextlib.nullcontext() if timer is None else timer(name)


def chunk_keys(tr, batch, chunks) -> tuple:
    """Phase A of the chunked step: the keys of every generated and real sample of the rank, without a graph,
    copied chunk by chunk into buffers for all labels (so the peak holds one chunk's keys beside the buffers,
    not every chunk's twice). Returns (f_gen, f_pos, f_unc) as key -> [n*G | n*P | n*U, L, D] (f_unc None
    without negatives). Call under no_grad and the trainer's autocast."""
    cfg, timer = tr.cfg, tr.phase_timer
    G, U, P, n = cfg.gen_per_label, cfg.neg_per_sample, cfg.pos_per_sample, tr.nc_local
    f_gen, f_pos, f_unc = {}, {}, ({} if U else None)
    for lo, hi in chunks:
        with phase(timer, "generator"):
            x = tr._generate(batch, lo, hi, graph=False)
        with phase(timer, "encoder"):
            # One encoder call for the chunk's generated samples and reals (one compiled variant per block
            # shape instead of two). The samples are promoted to the reals' dtype: the same values, so the
            # keys are the same; a key that is the sample itself is then fp32 where phase C's is bf16, and
            # its gradient is rounded to bf16 in phase C's backward, as the plain step rounds it.
            f = tr._encode(torch.cat([x.to(batch["pos"].dtype), tr._reals(batch, lo, hi)]))
            ng, npos = (hi - lo) * G, (hi - lo) * P
            for k, v in f.items():
                if k not in f_gen:
                    f_gen[k] = v.new_empty((n * G, *v.shape[1:]))
                    f_pos[k] = v.new_empty((n * P, *v.shape[1:]))
                    if U:
                        f_unc[k] = v.new_empty((n * U, *v.shape[1:]))
                f_gen[k][lo * G:hi * G].copy_(v[:ng])
                f_pos[k][lo * P:hi * P].copy_(v[ng:ng + npos])
                if U:
                    f_unc[k][lo * U:hi * U].copy_(v[ng + npos:])
        del x, f
    return f_gen, f_pos, f_unc


def chunked_forward_backward(tr, batch) -> Dict[str, object]:
    """The label-chunked step of Trainer `tr` on `batch` (module docstring); leaves the parameter gradients
    in `.grad` and returns what `Trainer._loss` returns, with the loss detached."""
    cfg = tr.cfg
    G = cfg.gen_per_label
    chunks = label_chunks(tr.nc_local, cfg.label_chunk)
    timer = tr.phase_timer
    with torch.no_grad(), tr._autocast():
        f_gen, f_pos, f_unc = chunk_keys(tr, batch, chunks)  # A
    # B: the field over all labels, a group of keys at a time; the gradient of the group's summed loss with
    # respect to each of its generated keys (no other key depends on them), after which the group's keys and
    # the loss's saved (x - goal) are freed.
    names = list(f_gen)
    w = tr._cfg_weight(batch)
    per_key, rms, key_grads = {}, {}, {}
    for group in key_groups(f_gen):
        leaves = {k: f_gen.pop(k).detach().requires_grad_(True) for k in group}
        pos_g = {k: f_pos.pop(k) for k in group}
        unc_g = {k: f_unc.pop(k) for k in group} if f_unc is not None else None
        with phase(timer, "field"):
            losses, forces = tr._key_losses(leaves, pos_g, unc_g, w)
        del pos_g, unc_g
        with phase(timer, "backward"):
            grads = torch.autograd.grad(_sum(losses.values()), [leaves[k] for k in group])
        del leaves
        per_key.update((k, v.detach()) for k, v in losses.items())
        rms.update(forces)
        key_grads.update(zip(group, grads))
    per_key = {k: per_key[k] for k in names}
    rms = {k: rms[k] for k in names}
    total = _sum(per_key.values())
    # C: chunk by chunk with a graph; the stored key gradients drive the backward.
    for j, (lo, hi) in enumerate(chunks):
        sync = tr.ddp is None or j == len(chunks) - 1
        with (contextlib.nullcontext() if sync else tr.ddp.no_sync()):
            with tr._autocast():
                with phase(timer, "generator"):
                    x = tr._generate(batch, lo, hi, graph=True)
                with phase(timer, "encoder"):
                    f = tr._encode(x)
            outs = [f[k] for k in names if f[k].requires_grad]
            grads = [key_grads[k][lo * G:hi * G] for k in names if f[k].requires_grad]
            del f, x
            with phase(timer, "backward"):
                torch.autograd.backward(outs, grads)
            del outs, grads
    return {"loss": total, "per_key": per_key, "force_rms": rms}


def field_calls(tr, batch) -> List[List[tuple]]:
    """The (gen, pos, neg, neg_weight) items of each field call a step of Trainer `tr` makes on `batch`, computed
    without a graph: one call with every key in the plain step (the encoder's own views), one per key group of
    phase B in the chunked step (its contiguous key buffers). The same tensors in layout and dtype as the step
    passes, so the same kernel variants launch (drift/precompile.py runs this under FakeTensorMode)."""
    n, chunk = tr.nc_local, tr.cfg.label_chunk
    with torch.no_grad(), tr._autocast():
        if 0 < chunk < n:
            f_gen, f_pos, f_unc = chunk_keys(tr, batch, label_chunks(n, chunk))
        else:
            f_gen = tr._encode(tr._generate(batch, 0, n, graph=False))
            f_pos, f_unc = tr._split_reals(tr._encode(tr._reals(batch, 0, n)), n)
    w = tr._cfg_weight(batch)
    if not 0 < chunk < n:
        return [tr._key_items(f_gen, f_pos, f_unc, w)]
    return [tr._key_items({k: f_gen[k] for k in group}, {k: f_pos[k] for k in group},
                          {k: f_unc[k] for k in group} if f_unc is not None else None, w)
            for group in key_groups(f_gen)]


# ----------------------------------------------------------------------------------------------------
# Regional compilation
# ----------------------------------------------------------------------------------------------------

def _region_types() -> tuple:
    """The repeated blocks that are compiled one by one: the generator's transformer block and the blocks of
    the encoders (MAE-ResNet basic block, ConvNeXt-V2 block, torchvision ResNet blocks)."""
    from drift.features.convnext import Block as ConvNeXtBlock
    from drift.features.mae_resnet import BasicBlock as MAEBlock
    from drift.model import DriftBlock
    types = [DriftBlock, MAEBlock, ConvNeXtBlock]
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
        types += [BasicBlock, Bottleneck]
    except ImportError:  # torchvision is optional; without it there are no torchvision encoders either
        pass
    return tuple(types)


# Compiled variants one block code object may hold: encoder blocks differ in width and stride per stage
# (7 shapes in the MAE-ResNet), each with and without a graph, at the generated and the real batch sizes.
RECOMPILE_LIMIT = 64


def compile_regions(*modules: torch.nn.Module) -> int:
    """Compile every repeated block inside `modules` in place (`nn.Module.compile`, dynamic=False) and return
    how many were compiled. Blocks of one class share their compiled code (parameters are graph inputs), so
    a 12-block generator compiles one block, not twelve; state_dict keys do not change."""
    import torch._dynamo as dynamo
    limit_name = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo.config, limit_name, max(getattr(dynamo.config, limit_name), RECOMPILE_LIMIT))
    types = _region_types()
    n = 0
    for root in modules:
        for m in root.modules():
            if isinstance(m, types):
                m.compile(dynamic=False)
                n += 1
    return n


def bf16_matmul_weights(extractor: torch.nn.Module) -> int:
    """Keep the weights of the frozen encoder's convolutions and linear layers in bf16; returns the bytes freed.

    Only for an encoder that runs under bf16 autocast, which casts these weights to bf16 (round to nearest
    even, like `.to`) at every call: the results are bit-identical and the weights take half the memory
    (the MAE-ResNet of width 640 has ~2.1e9 of them: 7.9 GiB in fp32). Norm parameters stay fp32. The SD-VAE
    of a latent-to-pixel extractor is left alone (it casts its inputs to its own dtype)."""
    from drift.features.vae import SDVAE
    skip = {id(m) for v in extractor.modules() if isinstance(v, SDVAE) for m in v.modules()}
    freed = 0
    for m in extractor.modules():
        if id(m) in skip or not isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        if m.weight.dtype == torch.float32 and not m.weight.requires_grad:
            freed += m.weight.numel() * 2
            m.weight.data = m.weight.data.to(torch.bfloat16)
    return freed


class ProgressTicker:
    """A background line every `every` seconds while a long call runs ("<what>: 40 s elapsed"), and a final
    one with the total, so compiling never looks like a hang. Prints to stderr when `enabled`."""

    def __init__(self, what: str, every: float = 15.0, enabled: bool = True, stream=None):
        self.what, self.every, self.enabled = what, every, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.elapsed = 0.0
        self._stop = threading.Event()
        self._t0 = 0.0
        self._thread: Optional[threading.Thread] = None

    def _say(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            self._say(f"{self.what}: {time.perf_counter() - self._t0:.0f} s elapsed")

    def __enter__(self) -> "ProgressTicker":
        self._t0 = time.perf_counter()
        self._say(f"{self.what}: started")
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.elapsed = time.perf_counter() - self._t0
        self._say(f"{self.what}: done in {self.elapsed:.1f} s")
