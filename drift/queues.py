"""Sample queues (MoCo-style memory banks) that feed positives and unconditional negatives to the field.

Paper App. A.8 and the official `memory_bank.py` (`ArrayMemoryBank`): one ring buffer per class holding the
latest `positive_bank_size` (128) real samples of that class, and one global ring buffer holding the latest
`negative_bank_size` (1000) real samples of any class. Every step pushes `push_per_step` fresh reals into
both; positives for a label are drawn from its class queue and each label gets its own independent draw of
unconditional samples from the global queue. Draws are without replacement, except that a queue holding
fewer than n items is sampled with replacement (official `np.random.choice(valid, n, replace=valid < n)`).

Storage: float32 (latents, any data), or uint8 for images in [-1, 1] on the uint8 grid, x = (u - 127.5) / 127.5
for u in 0..255 (what every image loader of drift-prep shards yields): pushes round back to u, samples return
(u - 127.5) / 127.5 in float32, the loader's own values, in a quarter of the memory (the pixel presets' 1000 x 128
images of 256 x 256 x 3 are 101 GB in float32, 25 GB in uint8, per rank).

Unlike the official per-sample Python loops, push and sample here are a handful of vectorized tensor ops on
the queue's device, with no data-dependent host sync except the optional input checks (`check=True`,
one `.item()`-style read per call). Slot bookkeeping (`ptr`, `count`) lives in tensors so it can be saved in
checkpoints (`state_dict` holds tensors only and loads under `torch.load(weights_only=True)`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def _as_shape(item_shape) -> tuple:
    if isinstance(item_shape, int):
        item_shape = (item_shape,)
    shape = tuple(int(s) for s in item_shape)
    if any(s < 1 for s in shape):
        raise ValueError(f"item_shape must hold positive sizes, got {item_shape!r}")
    return shape


STORAGE_DTYPES = (torch.float32, torch.uint8)


def _check_dtype(dtype) -> torch.dtype:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"queue dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    return dtype


def _store(x: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """Items as stored: float32, or uint8 images (x in [-1, 1] on the uint8 grid, rounded back to u)."""
    if dtype == torch.uint8:
        return (x.to(device=device, dtype=torch.float32) * 127.5 + 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return x.to(device=device, dtype=dtype)


def _load(x: torch.Tensor) -> torch.Tensor:
    """Stored items as float32 (uint8 images back to (u - 127.5) / 127.5)."""
    if x.dtype == torch.uint8:
        return (x.to(torch.float32) - 127.5) / 127.5
    return x


def _check_state_dtype(sd: dict, dtype: torch.dtype) -> None:
    if sd["data"].dtype != dtype:
        raise ValueError(f"queue state 'data' is {sd['data'].dtype}, this queue stores {dtype} "
                         "(TrainConfig.queue_dtype differs from the checkpoint's)")


def _draw_indices(valid: torch.Tensor, n: int, size: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """For each row r, n indices into [0, valid[r]): distinct when valid[r] >= n, uniform with replacement
    otherwise. valid: int64 [k] on the queue device. Returns int64 [k, n].

    Both branches are drawn for every row so the amount of randomness consumed never depends on the queue
    contents (a resumed run replays the same random stream)."""
    k = valid.shape[0]
    device = valid.device
    # With replacement: floor(u * valid), clamped because u * valid can round up to valid in fp32.
    u = torch.rand(k, n, generator=generator, device=device)
    with_repl = (u * valid.unsqueeze(1)).long().clamp_(max=(valid - 1).clamp(min=0).unsqueeze(1))
    if n > size:
        return with_repl  # no queue can hold n distinct items
    # Without replacement: the n smallest of i.i.d. random keys over the valid slots (invalid slots get +inf).
    keys = torch.rand(k, size, generator=generator, device=device)
    slots = torch.arange(size, device=device)
    keys = keys.masked_fill(slots.unsqueeze(0) >= valid.unsqueeze(1), float("inf"))
    without_repl = keys.topk(n, dim=1, largest=False, sorted=False).indices
    return torch.where((valid >= n).unsqueeze(1), without_repl, with_repl)


class ClassQueues:
    """Per-class ring buffers: `num_classes` queues of `size` items of shape `item_shape` (positive_bank_size)."""

    def __init__(self, num_classes: int, size: int = 128, item_shape: Sequence[int] = (), device=None,
                 dtype: torch.dtype = torch.float32):
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if int(size) != size or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        self.num_classes = int(num_classes)
        self.size = int(size)
        self.item_shape = _as_shape(item_shape)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = _check_dtype(dtype)
        self.data = torch.zeros(self.num_classes, self.size, *self.item_shape, device=self.device, dtype=dtype)
        self.ptr = torch.zeros(self.num_classes, dtype=torch.long, device=self.device)  # next slot to write
        self.counts = torch.zeros(self.num_classes, dtype=torch.long, device=self.device)  # valid items
        self.last_labels = torch.zeros(0, dtype=torch.long, device=self.device)  # labels of the latest push

    def __repr__(self) -> str:
        return (f"ClassQueues(num_classes={self.num_classes}, size={self.size}, item_shape={self.item_shape}, "
                f"device={self.device}, dtype={self.dtype})")

    # ----------------------------------------------------------------------------------------------
    def _check_labels(self, labels: torch.Tensor, name: str, n: Optional[int] = None) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point \
                or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor, got "
                             f"{getattr(labels, 'dtype', type(labels))} {tuple(getattr(labels, 'shape', ()))}")
        if n is not None and labels.shape[0] != n:
            raise ValueError(f"{name} has {labels.shape[0]} entries but x has {n} items")
        return labels.to(device=self.device, dtype=torch.long)

    def _check_range(self, labels: torch.Tensor, name: str) -> None:
        if labels.numel() and bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"{name} must lie in [0, {self.num_classes}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")

    @torch.no_grad()
    def push(self, x: torch.Tensor, labels: torch.Tensor, check: bool = True) -> None:
        """Append x [n, *item_shape] to the queues of `labels` [n], evicting each class's oldest items.

        Equivalent to pushing the items one by one in order: if a class receives more than `size` items
        in one call, only its newest `size` survive. `check=False` skips the label-range scan (a host sync)."""
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != self.item_shape or x.dim() != 1 + len(self.item_shape):
            raise ValueError(f"x must have shape [n, {', '.join(map(str, self.item_shape))}], "
                             f"got {tuple(getattr(x, 'shape', ()))}")
        n = x.shape[0]
        labels = self._check_labels(labels, "labels", n)
        if check:
            self._check_range(labels, "labels")
        self.last_labels = labels.clone()
        if n == 0:
            return
        x = _store(x, self.dtype, self.device)
        # Rank of each item among the items of its class in this batch (stable order = arrival order).
        order = torch.argsort(labels, stable=True)
        sorted_labels = labels[order]
        per_class = torch.zeros(self.num_classes, dtype=torch.long, device=self.device)
        per_class.index_add_(0, labels, torch.ones_like(labels))
        starts = torch.cumsum(per_class, 0) - per_class
        first = starts[sorted_labels]
        rank = torch.arange(n, device=self.device) - first
        n_c = per_class[sorted_labels]
        # Items later overwritten within this batch write the value of the newest item that lands on the same
        # slot instead, so duplicate destinations all carry identical values (deterministic, no sync to mask).
        winner = rank + self.size * torch.div(n_c - 1 - rank, self.size, rounding_mode="floor")
        src = order[first + winner]
        slot = (self.ptr[sorted_labels] + rank) % self.size
        self.data[sorted_labels, slot] = x[src]
        self.ptr = (self.ptr + per_class) % self.size
        self.counts = torch.clamp(self.counts + per_class, max=self.size)

    def count(self, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Number of valid items per class of `labels` [k] (all classes when None); int64 on the queue device."""
        if labels is None:
            return self.counts.clone()
        return self.counts[self._check_labels(labels, "labels")]

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, n: int, generator: Optional[torch.Generator] = None,
               check: bool = True) -> torch.Tensor:
        """Draw n items per entry of `labels` [k] from its class queue -> [k, n, *item_shape].

        Without replacement when the class holds at least n items, uniformly with replacement otherwise.
        `check=True` raises on labels out of range or an empty class (one host sync)."""
        if int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        n = int(n)
        labels = self._check_labels(labels, "labels")
        if check:
            self._check_range(labels, "labels")
            empty = self.counts[labels] == 0
            if labels.numel() and bool(empty.any()):
                bad = labels[empty].unique().tolist()
                raise ValueError(f"cannot sample from empty class queue(s) {bad[:10]}; push data of these "
                                 f"classes first")
        valid = self.counts[labels]
        idx = _draw_indices(valid, n, self.size, generator)  # (k, n)
        return _load(self.data[labels.unsqueeze(1), idx])  # (k, n, *item_shape), float32

    @torch.no_grad()
    def sample_recent_labels(self, k: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """k labels drawn without replacement from the positions of the latest push (official: each step's
        labels are a random subset of the most recently loaded batch's labels, so classes follow the data
        frequency). Returns int64 [k] on the queue device."""
        m = self.last_labels.shape[0]
        if int(k) != k or k < 1 or k > m:
            raise ValueError(f"k must be in [1, {m}] (the size of the latest push), got {k!r}")
        keys = torch.rand(m, generator=generator, device=self.device)
        return self.last_labels[keys.topk(int(k), largest=False).indices]

    # ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors only (loads under `torch.load(weights_only=True)`)."""
        return {"data": self.data.clone(), "ptr": self.ptr.clone(), "counts": self.counts.clone(),
                "last_labels": self.last_labels.clone()}

    def load_state_dict(self, sd: dict) -> None:
        """Restore from `state_dict()`; the geometry (classes, size, item shape) must match."""
        missing = {"data", "ptr", "counts", "last_labels"} - set(sd)
        if missing:
            raise ValueError(f"queue state is missing {sorted(missing)}")
        expect = (self.num_classes, self.size, *self.item_shape)
        if tuple(sd["data"].shape) != expect:
            raise ValueError(f"queue state 'data' has shape {tuple(sd['data'].shape)}, expected {expect}")
        _check_state_dtype(sd, self.dtype)
        for key in ("ptr", "counts"):
            if tuple(sd[key].shape) != (self.num_classes,):
                raise ValueError(f"queue state '{key}' has shape {tuple(sd[key].shape)}, expected ({self.num_classes},)")
        counts = sd["counts"].to(self.device, torch.long)
        ptr = sd["ptr"].to(self.device, torch.long)
        if bool(((counts < 0) | (counts > self.size) | (ptr < 0) | (ptr >= self.size)).any()):
            raise ValueError("queue state has 'counts' or 'ptr' outside [0, size]")
        self.data.copy_(sd["data"])
        self.ptr, self.counts = ptr.clone(), counts.clone()
        self.last_labels = sd["last_labels"].to(self.device, torch.long).clone()


class GlobalQueue:
    """One ring buffer of the latest `size` items of any class (negative_bank_size), for the CFG negatives."""

    def __init__(self, size: int = 1000, item_shape: Sequence[int] = (), device=None,
                 dtype: torch.dtype = torch.float32):
        if int(size) != size or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        self.size = int(size)
        self.item_shape = _as_shape(item_shape)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = _check_dtype(dtype)
        self.data = torch.zeros(self.size, *self.item_shape, device=self.device, dtype=dtype)
        # 0-d tensors rather than Python ints so the state travels with the data (and across devices).
        self.ptr = torch.zeros((), dtype=torch.long, device=self.device)
        self.counts = torch.zeros((), dtype=torch.long, device=self.device)

    def __repr__(self) -> str:
        return f"GlobalQueue(size={self.size}, item_shape={self.item_shape}, device={self.device}, dtype={self.dtype})"

    @torch.no_grad()
    def push(self, x: torch.Tensor) -> None:
        """Append x [n, *item_shape], evicting the oldest items; of more than `size` items the newest survive."""
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != self.item_shape or x.dim() != 1 + len(self.item_shape):
            raise ValueError(f"x must have shape [n, {', '.join(map(str, self.item_shape))}], "
                             f"got {tuple(getattr(x, 'shape', ()))}")
        n = x.shape[0]
        if n == 0:
            return
        keep = min(n, self.size)  # a static size: the dropped items would be overwritten anyway
        slot = (self.ptr + (n - keep) + torch.arange(keep, device=self.device)) % self.size
        self.data[slot] = _store(x[n - keep:], self.dtype, self.device)
        self.ptr = (self.ptr + n) % self.size
        self.counts = torch.clamp(self.counts + n, max=self.size)

    def count(self) -> torch.Tensor:
        """Number of valid items (0-d int64 tensor)."""
        return self.counts.clone()

    def __len__(self) -> int:
        return int(self.counts)

    @torch.no_grad()
    def sample(self, k: int, n: int, generator: Optional[torch.Generator] = None, check: bool = True) -> torch.Tensor:
        """k independent draws of n items -> [k, n, *item_shape]; each row without replacement when the queue
        holds at least n items, with replacement otherwise. `check=True` raises on an empty queue."""
        for name, v in (("k", k), ("n", n)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if check and int(self.counts) == 0:
            raise ValueError("cannot sample from an empty GlobalQueue; push data first")
        valid = self.counts.expand(int(k))
        idx = _draw_indices(valid, int(n), self.size, generator)  # (k, n)
        return _load(self.data[idx])  # (k, n, *item_shape), float32

    def state_dict(self) -> dict:
        """Tensors only (loads under `torch.load(weights_only=True)`)."""
        return {"data": self.data.clone(), "ptr": self.ptr.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, sd: dict) -> None:
        """Restore from `state_dict()`; size and item shape must match."""
        missing = {"data", "ptr", "counts"} - set(sd)
        if missing:
            raise ValueError(f"queue state is missing {sorted(missing)}")
        expect = (self.size, *self.item_shape)
        if tuple(sd["data"].shape) != expect:
            raise ValueError(f"queue state 'data' has shape {tuple(sd['data'].shape)}, expected {expect}")
        _check_state_dtype(sd, self.dtype)
        ptr = sd["ptr"].to(self.device, torch.long).reshape(())
        counts = sd["counts"].to(self.device, torch.long).reshape(())
        if not (0 <= int(counts) <= self.size and 0 <= int(ptr) < self.size):
            raise ValueError("queue state has 'counts' or 'ptr' outside [0, size]")
        self.data.copy_(sd["data"])
        self.ptr, self.counts = ptr.clone(), counts.clone()
