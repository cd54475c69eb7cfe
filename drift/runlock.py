"""One run per run directory: an exclusive lock held for the whole life of a training run.

    lock = RunLock.acquire(out_dir, info)   # every rank calls it; rank 0 takes the lock for all of them
    ...                                     # train
    lock.release()                          # also released when the process dies, however it dies

Rank 0 opens `<out_dir>/run.lock`, takes `fcntl.flock(LOCK_EX | LOCK_NB)` on it and writes the holder's host,
PID, process start time and wall-clock start, plus the host and PID of every rank (gathered over the process
group). The kernel drops a flock when its last holder dies, so after a `kill -9` the next run gets the lock at
once; it then finds the dead holder's record in the file and says that it takes over. A second run on a
directory whose lock is held is refused with one line naming the holder, before it touches any file of the run.

Workers left running by a killed `torchrun` agent keep the directory locked: the flock belongs to rank 0's worker
process, not to the agent. Ranks other than rank 0 hold no flock, so a job whose rank 0 died while other ranks
still run is caught through the record instead: a recorded process on this host that is still alive (same PID
and same start time, so a reused PID is not mistaken for it) refuses the new run too. Processes on other hosts
cannot be checked from here; their record is reported and taken over.

On file systems without flock support the record alone decides (a live recorded process on this host refuses),
with a warning. `release()` unlinks the file while still holding the lock; an acquirer checks that the file it
locked is still the one at the path (same inode), so a lock released at that moment is never shared.
Imports only the standard library; under DDP it uses the torch.distributed the caller initialized.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Callable, List, Optional

from drift.cli import UserError

LOCK_NAME = "run.lock"


class RunLockedError(UserError):
    """Another live run holds the run directory."""


def _proc_start(pid: int) -> Optional[int]:
    """Start time of `pid` in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # field 22 (starttime); the command name (field 2) may hold spaces, so count from its closing paren
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _identity(rank: int) -> dict:
    pid = os.getpid()
    return {"rank": rank, "host": socket.gethostname(), "pid": pid, "proc_start": _proc_start(pid)}


def _alive(proc: dict) -> bool:
    """Whether the recorded process (on this host) still runs: same PID and, where known, same start time."""
    try:
        pid = int(proc["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    recorded, now = proc.get("proc_start"), _proc_start(pid)
    return recorded is None or now is None or recorded == now


def describe(record: dict) -> str:
    """'host H pid P (started T)' for a lock record."""
    started = record.get("started", "at an unknown time")
    return f"host {record.get('host', '?')} pid {record.get('pid', '?')} (started {started})"


def _read_record(fd: int) -> Optional[dict]:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    if not data.strip():
        return None
    try:
        rec = json.loads(data)
    except ValueError:
        return {"host": "?", "pid": "?", "started": "?; unreadable lock record"}
    return rec if isinstance(rec, dict) else None


def _live_on_this_host(record: dict) -> List[dict]:
    host = socket.gethostname()
    me = os.getpid()
    procs = [record] + [p for p in record.get("ranks", []) if isinstance(p, dict)]
    return [p for p in procs if p.get("host") == host and p.get("pid") != me and _alive(p)]


class RunLock:
    """The lock of one run directory (a real lock on rank 0, a handle that does nothing on other ranks)."""

    def __init__(self, path: str, fd: Optional[int]):
        self.path, self._fd, self._owner = path, fd, os.getpid()

    @classmethod
    def acquire(cls, out_dir: str, info=None, log: Callable[[str], None] = print) -> "RunLock":
        """Lock `out_dir` for this run (collective under DDP); RunLockedError names the holder if it is taken."""
        tdist = sys.modules.get("torch.distributed")  # no torch imported: no process group to talk to

        rank = info.rank if info is not None else 0
        idents = [_identity(rank)]
        group = tdist is not None and tdist.is_available() and tdist.is_initialized()
        if group:
            idents = [None] * tdist.get_world_size()
            tdist.all_gather_object(idents, _identity(rank))
        lock, error = None, None
        if rank == 0:
            try:
                lock = cls._acquire_main(out_dir, idents, log)
            except RunLockedError as e:
                error = str(e)
        if group:
            box = [error]
            tdist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise RunLockedError(error)
        return lock if lock is not None else cls(os.path.join(out_dir, LOCK_NAME), None)

    @classmethod
    def _acquire_main(cls, out_dir: str, ranks: List[dict], log: Callable[[str], None]) -> "RunLock":
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, LOCK_NAME)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                rec = _read_record(fd) or {}
                os.close(fd)
                raise RunLockedError(f"run directory {out_dir} is in use by {describe(rec)}; wait for that run to "
                                     f"end or stop it, or choose another out_dir") from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                log(f"drift: warning: {path}: file locks are not supported here; relying on the recorded holder")
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released (unlinked) it between our open and our flock: start over
        prev = _read_record(fd)
        if prev is not None:
            live = _live_on_this_host(prev)
            if live:
                os.close(fd)
                p = live[0]
                who = f"rank {p['rank']} pid {p['pid']}" if "rank" in p else f"pid {p['pid']}"
                raise RunLockedError(f"run directory {out_dir} is in use: {who} on host {p.get('host')} of the run "
                                     f"that locked it ({describe(prev)}) is still running (a worker left behind "
                                     f"by a killed launcher?); stop it or choose another out_dir")
            here = prev.get("host") == socket.gethostname()
            why = "that process is gone" if here else "it ran on another host and its lock was released"
            log(f"drift: taking over the lock of {out_dir} from {describe(prev)}: {why}")
        rec = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ranks": ranks}
        data = (json.dumps(rec, indent=1) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        return cls(path, fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (rank 0); a no-op elsewhere, twice, or in a forked child."""
        if self._fd is None or os.getpid() != self._owner:
            return
        fd, self._fd = self._fd, None
        try:
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)  # while still locked: a waiting acquirer re-checks the inode and retries
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def __del__(self):  # a Trainer dropped without close() must not keep its directory locked
        self.release()
