"""The run-directory lock: a second run is refused naming the holder, a dead holder's lock is taken over, and
workers left running by a killed launcher keep the directory locked.

    pytest -q tests/test_runlock.py
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from drift.runlock import LOCK_NAME, RunLock, RunLockedError, _proc_start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A process that takes the lock on argv[1], says so on stdout, and sleeps until killed.
HOLDER = ("import sys, time\nfrom drift.runlock import RunLock\n"
          "lock = RunLock.acquire(sys.argv[1], log=lambda m: None)\nprint('locked', flush=True)\ntime.sleep(600)\n")
# A "launcher" that starts a holder as its child, prints the child's PID, and waits (torchrun's agent, in short).
LAUNCHER = ("import subprocess, sys\np = subprocess.Popen([sys.executable, '-c', sys.argv[2], sys.argv[1]], "
            "stdout=subprocess.PIPE, text=True)\nassert p.stdout.readline().strip() == 'locked'\n"
            "print(p.pid, flush=True)\np.wait()\n")


def _spawn(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, text=True, env=env)


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_gone(pid):
    for _ in range(500):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        time.sleep(0.01)


def test_second_acquire_is_refused_and_release_frees(tmp_path):
    lock = RunLock.acquire(str(tmp_path), log=lambda m: None)
    rec = json.loads((tmp_path / LOCK_NAME).read_text())
    assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname() and rec["ranks"][0]["rank"] == 0
    with pytest.raises(RunLockedError, match=f"in use by host {socket.gethostname()} pid {os.getpid()}"):
        RunLock.acquire(str(tmp_path))
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()  # a clean end leaves no lock file behind
    RunLock.acquire(str(tmp_path), log=lambda m: None).release()


def test_lock_held_by_another_process_then_taken_over_after_kill(tmp_path):
    p = _spawn(HOLDER, str(tmp_path))
    try:
        assert p.stdout.readline().strip() == "locked"
        before = (tmp_path / LOCK_NAME).read_bytes()
        with pytest.raises(RunLockedError) as e:
            RunLock.acquire(str(tmp_path))
        assert f"pid {p.pid}" in str(e.value) and "\n" not in str(e.value)
        assert (tmp_path / LOCK_NAME).read_bytes() == before  # the refused run changed nothing
    finally:
        _kill(p.pid)
        p.wait()
    lines = []
    lock = RunLock.acquire(str(tmp_path), log=lines.append)  # kill -9 left the record; the flock is gone
    assert len(lines) == 1 and "taking over" in lines[0] and f"pid {p.pid}" in lines[0] and "gone" in lines[0]
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_orphaned_worker_of_a_killed_launcher_keeps_the_lock(tmp_path):
    """kill -9 of the launcher (torchrun's agent) leaves its worker running; a new run must still be refused."""
    agent = _spawn(LAUNCHER, str(tmp_path), HOLDER)
    worker = int(agent.stdout.readline())
    try:
        _kill(agent.pid)
        agent.wait()
        with pytest.raises(RunLockedError, match=f"pid {worker}"):
            RunLock.acquire(str(tmp_path))
    finally:
        _kill(worker)
        _wait_gone(worker)
    RunLock.acquire(str(tmp_path), log=lambda m: None).release()


def test_live_rank_of_a_dead_rank0_refuses(tmp_path):
    """Rank 0 (the flock holder) died but another rank of that job still runs on this host: refused, naming it.
    Once it is gone the lock is taken over; a recorded PID now used by another process does not count."""
    host = socket.gethostname()
    dead = _spawn("pass")
    dead.wait()
    other = _spawn("import time; time.sleep(600)")
    rec = {"host": host, "pid": dead.pid, "proc_start": None, "started": "earlier",
           "ranks": [{"rank": 0, "host": host, "pid": dead.pid, "proc_start": None},
                     {"rank": 1, "host": host, "pid": other.pid, "proc_start": _proc_start(other.pid)}]}
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps(rec))
        with pytest.raises(RunLockedError, match=f"rank 1 pid {other.pid} on host {host}.*still running"):
            RunLock.acquire(str(tmp_path))
        if rec["ranks"][1]["proc_start"] is not None:  # same PID, another start time: a reused PID, not the rank
            reused = dict(rec, ranks=[rec["ranks"][0], dict(rec["ranks"][1], proc_start=_proc_start(other.pid) + 1)])
            (tmp_path / LOCK_NAME).write_text(json.dumps(reused))
            lines = []
            RunLock.acquire(str(tmp_path), log=lines.append).release()
            assert "taking over" in lines[0]
    finally:
        _kill(other.pid)
        other.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps(rec))
    lines = []
    RunLock.acquire(str(tmp_path), log=lines.append).release()
    assert "taking over" in lines[0] and f"pid {dead.pid}" in lines[0]


def _ddp_worker(rank, world, port, out_dir, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from drift.dist import DistInfo
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        lock = RunLock.acquire(out_dir, DistInfo(rank=rank, world_size=world, is_ddp=True), log=lambda m: None)
        dist.barrier()
        try:  # a second job on the same directory (here: the same ranks again) is refused on every rank
            RunLock.acquire(out_dir, DistInfo(rank=rank, world_size=world, is_ddp=True))
            q.put((rank, "not refused"))
        except RunLockedError as e:
            q.put((rank, str(e)))
        dist.barrier()
        lock.release()
    finally:
        dist.destroy_process_group()


def test_two_ranks_one_lock_with_every_rank_recorded(tmp_path):
    import multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, str(tmp_path), q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert got[0] == got[1] and "in use by" in got[0]
    assert not (tmp_path / LOCK_NAME).exists()


def _digest(root):
    import hashlib
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_two_trainers_on_one_run_directory(tmp_path):
    """The second trainer is refused before it touches anything; the first one's files stay as they were."""
    from drift.trainer import Trainer, train
    from tests.trainer_utils import loader_factory, tiny, toy_images
    x, y = toy_images(n=48, size=8)
    cfg = tiny(tmp_path, max_steps=2, ckpt_every=1)
    train(cfg, loader_factory=loader_factory(x, y))
    first = Trainer(cfg.replace(max_steps=3), resume="auto", loader_factory=loader_factory(x, y))
    before = _digest(tmp_path / "run")
    for resume in (None, "auto"):
        with pytest.raises(RunLockedError, match=f"run directory {cfg.out_dir} is in use by .*pid {os.getpid()}"):
            Trainer(cfg, resume=resume, loader_factory=loader_factory(x, y))
    assert _digest(tmp_path / "run") == before
    first.run()
    first.close()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    train(cfg.replace(max_steps=4), resume="auto", loader_factory=loader_factory(x, y))  # free again


def test_drift_train_refuses_a_locked_directory_in_one_line(tmp_path, capsys):
    from drift.train import main
    out = tmp_path / "run"
    p = _spawn(HOLDER, str(out))
    try:
        assert p.stdout.readline().strip() == "locked"
        rc = main(["--preset", "tiny", "--out-dir", str(out), "--data-path", str(tmp_path / "none")])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("drift-train: error: run directory") and f"pid {p.pid}" in err
        assert err.count("\n") == 1 and os.listdir(out) == [LOCK_NAME]
    finally:
        _kill(p.pid)
        p.wait()
