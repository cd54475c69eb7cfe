"""On-disk store of the Triton field's tuning results, so that a GPU is tuned once, not in every process.

The tuner (drift.kernels.field_tuning, with DRIFT_TRITON_AUTOTUNE=1) times launch configurations and routes the
first time it sees a shape key; `TuneStore` keeps its results in a JSON file, per environment

    "<GPU name>|triton <version>|kernels <hash of the kernels' sources>"

so a result is only reused on the same GPU model, Triton version and kernel code (anything else is a miss,
and is tuned again). Entries are keyed by the tuning key without the device index: ranks on identical GPUs
share them. Later processes, tuning or not, take a stored result without timing.

    DRIFT_TRITON_TUNE_CACHE=/path/file.json   the file (default: $XDG_CACHE_HOME/drift/triton-tune.json, or
                                              ~/.cache/drift/triton-tune.json)
    DRIFT_TRITON_TUNE_CACHE=off               no file (also "0" or empty)

Writes are safe with several ranks writing at once: each write takes an exclusive lock on "<file>.lock",
re-reads the file, merges its entry into it and replaces the file atomically (a temporary file in the same
directory, then os.replace), so readers see the old or the new file and no entry is lost. A corrupt file, or
one of another format, is read as empty with a warning and rewritten by the next write; entries that no
longer name a candidate configuration are ignored by the tuner. At most MAX_ENVIRONMENTS environments are
kept (the most recently written). Imports nothing from drift (the kernels' store hook is duck-typed).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
import warnings
from typing import Callable, Dict, Optional

import torch

try:
    import fcntl
except ImportError:  # not POSIX: no lock (a concurrent writer may then drop another's entry, never corrupt)
    fcntl = None

FORMAT = 1
MAX_ENVIRONMENTS = 8
ENV_VAR = "DRIFT_TRITON_TUNE_CACHE"
_OFF = ("", "0", "off", "none")


def default_path() -> Optional[str]:
    """The store's file from DRIFT_TRITON_TUNE_CACHE or the user's cache directory; None when turned off."""
    value = os.environ.get(ENV_VAR)
    if value is not None:
        return None if value.strip().lower() in _OFF else os.path.expanduser(value)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "drift", "triton-tune.json")


def code_version(package) -> str:
    """A short hash of the sources of `package` (the kernels): tuning results of other kernel code are stale."""
    folder = os.path.dirname(os.path.abspath(package.__file__))
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def _cuda_name(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_name(device.index if device.index is not None else torch.cuda.current_device())


class TuneStore:
    """Tuning results in one JSON file (see the module docstring); get/put as field_tuning.set_store expects.

    device_name(device) -> str or None names the GPU model (default: the CUDA device name; None for other
    devices, which get nothing stored)."""

    def __init__(self, path: str, triton_version: Optional[str], kernels_version: str,
                 device_name: Callable[[torch.device], Optional[str]] = _cuda_name):
        self.path = path
        self.triton_version = triton_version
        self.kernels_version = kernels_version
        self._device_name = device_name
        self._names: Dict[str, Optional[str]] = {}
        self._data: Optional[dict] = None  # {environment: {entry key: value}} as read once, plus our writes
        self._writable = True
        self._warned = set()  # kinds of problem warned about ("read", "write"): each once per store

    def environment(self, device) -> Optional[str]:
        key = str(device)
        if key not in self._names:
            self._names[key] = self._device_name(torch.device(device))
        name = self._names[key]
        if name is None:
            return None
        return f"{name}|triton {self.triton_version}|kernels {self.kernels_version}"

    @staticmethod
    def entry_key(entry) -> str:
        return json.dumps(list(entry), separators=(",", ":"))

    def get(self, device, entry) -> Optional[dict]:
        env = self.environment(device)
        if env is None:
            return None
        if self._data is None:
            self._data = {e: v["entries"] for e, v in self._read().items()}
        return self._data.get(env, {}).get(self.entry_key(entry))

    def put(self, device, entry, value: dict) -> None:
        env = self.environment(device)
        if env is None:
            return
        key = self.entry_key(entry)
        if self._data is None:
            self._data = {e: v["entries"] for e, v in self._read().items()}
        self._data.setdefault(env, {})[key] = value
        if not self._writable:
            return
        try:
            self._write(env, key, value)
        except OSError as e:  # read-only home, full disk: keep the result for this process only
            self._writable = False
            self._warn("write", f"cannot write the Triton tuning cache {self.path} ({e}); tuning results are kept for "
                       f"this process only (set {ENV_VAR}=off to silence this)")

    # -- file access -----------------------------------------------------------------------------------

    def _warn(self, kind: str, msg: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _read(self) -> Dict[str, dict]:
        """{environment: {"updated": t, "entries": {...}}} from the file; {} (and a warning) when it is corrupt."""
        try:
            with open(self.path, "r", encoding="utf-8") as f:
                data = json.load(f)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except (OSError, ValueError) as e:
            self._warn("read", f"ignoring the Triton tuning cache {self.path}: unreadable ({type(e).__name__}: {e}); "
                       "it is rewritten by the next tuning result")
            return {}
        envs = data.get("environments") if isinstance(data, dict) and data.get("format") == FORMAT else None
        if not isinstance(envs, dict):
            self._warn("read", f"ignoring the Triton tuning cache {self.path}: not a format-{FORMAT} cache file; it is "
                       "rewritten by the next tuning result")
            return {}
        good = {e: v for e, v in envs.items()
                if isinstance(v, dict) and isinstance(v.get("entries"), dict)
                and isinstance(v.get("updated", 0), (int, float))}
        if len(good) < len(envs):
            self._warn("read", f"ignoring the Triton tuning cache {self.path}'s {len(envs) - len(good)} malformed "
                       "environment entries; they are dropped by the next tuning result")
        return good

    @contextlib.contextmanager
    def _locked(self):
        if fcntl is None:
            yield
            return
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _write(self, env: str, key: str, value: dict) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        with self._locked():
            envs = self._read()  # what other processes wrote since we read it
            cur = envs.setdefault(env, {"updated": 0.0, "entries": {}})
            cur["entries"][key] = value
            cur["updated"] = time.time()
            keep = sorted(envs, key=lambda e: envs[e].get("updated", 0.0), reverse=True)[:MAX_ENVIRONMENTS]
            out = {"format": FORMAT, "environments": {e: envs[e] for e in keep}}
            fd, tmp = tempfile.mkstemp(prefix=".triton-tune-", suffix=".json", dir=folder)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(out, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        self._data[env] = dict(cur["entries"], **self._data.get(env, {}))


def default_store(triton_version: Optional[str], kernels_version: str) -> Optional[TuneStore]:
    """The store at default_path(), or None when DRIFT_TRITON_TUNE_CACHE turns it off."""
    path = default_path()
    return None if path is None else TuneStore(path, triton_version, kernels_version)
