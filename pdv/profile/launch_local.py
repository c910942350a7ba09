"""Start N ranks on this host under torchrun, watch them, and never wait forever.

Each rank writes its latest step to a heartbeat file (`rank-<r>.json`, replaced atomically)
in a folder the launcher names through PDV_PROGRESS_DIR. The launcher reads those files:
- a rank with no file did not join once `timeout` seconds pass in which no rank joined and
  no rank still starting used any CPU (importing torch on a busy machine can take longer than
  the timeout, and is not a stuck rank);
- when no rank has made a step for `timeout` seconds, the job is stuck, and the rank whose
  last step is the oldest is the one that stopped answering (the others block on it later);
- a rank that failed writes its error, which becomes the launcher's one-line error.
In every failing case the whole torchrun tree (torchrun starts each rank in its own session,
so a process-group kill would miss them) is killed before the error is raised.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from pdv.errors import PdvError

__all__ = [
    "PROGRESS_ENV",
    "Heartbeat",
    "free_port",
    "heartbeat_from_env",
    "kill_tree",
    "launch_local",
]

PROGRESS_ENV = "PDV_PROGRESS_DIR"


class Heartbeat:
    """Rank side: write each progress event, with a sequence number and time, to the folder."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.path, self.rank, self.seq = folder / f"rank-{rank}.json", rank, 0

    def __call__(self, event: dict[str, Any]) -> None:
        self.seq += 1
        record = {"rank": self.rank, "seq": self.seq, "time": time.time(), "pid": os.getpid(),
                  "event": event}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path)


def heartbeat_from_env(rank: int) -> Heartbeat | None:
    """The heartbeat writer when a launcher asked for one (PDV_PROGRESS_DIR), else None."""
    folder = os.environ.get(PROGRESS_ENV)
    return Heartbeat(Path(folder), rank) if folder else None


def free_port() -> int:
    """A TCP port free on this host right now (the rendezvous binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process and every descendant (found before the kill), then reap them."""
    try:
        parent = psutil.Process(proc.pid)
        family = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(family, timeout=5)


def _read_states(folder: Path) -> dict[int, dict[str, Any]]:
    states = {}
    for f in folder.glob("rank-*.json"):
        try:
            record = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # replaced while reading; the next poll sees it
        states[int(record["rank"])] = record
    return states


def launch_local(
    nproc: int,
    rank_args: list[str],
    timeout_s: float,
    on_progress: Callable[[dict[int, dict[str, Any]]], None] | None = None,
    describe: Callable[[dict[str, Any]], str] = str,
    env: dict[str, str] | None = None,
) -> None:
    """Run `python -m pdv <rank_args>` as `nproc` torchrun ranks; a stuck rank is a PdvError."""
    folder = Path(tempfile.mkdtemp(prefix="pdv-ranks-"))
    log = folder / "torchrun.log"
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=1", f"--nproc-per-node={nproc}", "--rdzv-backend=static",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}", "--max-restarts=0",
        "--no-python", sys.executable, "-m", "pdv", *rank_args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", PROGRESS_ENV: str(folder), **(env or {})}
    start = time.monotonic()
    with log.open("wb") as log_file:
        proc = subprocess.Popen(cmd, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _watch(proc, folder, nproc, timeout_s, start, on_progress, describe)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        shutil.rmtree(folder, ignore_errors=True)


def _watch(
    proc: subprocess.Popen[bytes],
    folder: Path,
    nproc: int,
    timeout_s: float,
    start: float,
    on_progress: Callable[[dict[int, dict[str, Any]]], None] | None,
    describe: Callable[[dict[str, Any]], str],
) -> None:
    last_seen: dict[int, tuple[int, float]] = {}  # rank -> (seq, monotonic time it changed)
    last_step = join_progress = start
    starting = _StartWatch(proc)
    while True:
        done = proc.poll() is not None
        now = time.monotonic()
        states = _read_states(folder)
        for r, rec in states.items():
            if last_seen.get(r, (0, 0.0))[0] != rec["seq"]:
                last_seen[r] = (rec["seq"], now)
                last_step = now
        if on_progress:
            on_progress(states)
        failed = [r for r, rec in states.items() if rec["event"].get("phase") == "error"]
        if failed:
            kill_tree(proc)
            # The first rank to fail is the cause; the others fail because it went away.
            r = min(failed, key=lambda r: (states[r]["time"], r))
            vanished = _vanished(states) if states[r]["event"].get("peer_unknown") else []
            if vanished:
                # The failing rank lost a connection; the rank that died without a word is the
                # cause (the first to go silent, if torchrun has since stopped others too).
                v = min(vanished, key=lambda v: (states[v]["time"], v))
                raise PdvError(
                    f"no answer from rank {v}: it exited without an error after "
                    f"{describe(states[v]['event'])}; rank {r} lost its connection; "
                    "all ranks were killed"
                )
            raise PdvError(states[r]["event"].get("error") or f"rank {r} failed")
        if done:
            if proc.returncode == 0:
                return
            tail = _tail(folder / "torchrun.log")
            raise PdvError(f"torchrun exited with code {proc.returncode}: {tail}")
        missing = [r for r in range(nproc) if r not in states]
        if missing and starting.busy(set(states)):
            join_progress = now
        join_progress = max(join_progress, last_step)
        if missing and now - join_progress > timeout_s:
            kill_tree(proc)
            joined = nproc - len(missing)
            raise PdvError(
                f"rank {_ranks(missing)} did not join within {timeout_s:g}s "
                f"({joined} of {nproc} ranks started, and none of the others used CPU in "
                "that time)"
            )
        if not missing and now - last_step > timeout_s:
            kill_tree(proc)
            # Ranks' own clocks (one host) order the last steps finer than the poll interval.
            stuck = min(states, key=lambda r: (states[r]["time"], r))
            raise PdvError(
                f"rank {stuck} stopped answering: no rank made progress for {timeout_s:g}s; "
                f"its last step: {describe(states[stuck]['event'])}; all ranks were killed"
            )
        time.sleep(0.2)


class _StartWatch:
    """Whether any rank that has not joined yet used CPU since the last look (it is still
    starting: python, imports), read from the rank processes' own CPU times."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.cpu: dict[int, float] = {}  # pid -> CPU seconds at the last look

    def busy(self, joined: set[int]) -> bool:
        """True when a rank process outside `joined` gained CPU time since the last call."""
        try:
            workers = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return False
        gained = False
        for w in workers:
            try:
                rank = w.environ().get("RANK")
                if rank is None or int(rank) in joined:
                    continue
                times = w.cpu_times()
            except (psutil.Error, ValueError):
                continue
            cpu = times.user + times.system
            gained = gained or cpu > self.cpu.get(w.pid, 0.0)
            self.cpu[w.pid] = cpu
        return gained


def _vanished(states: dict[int, dict[str, Any]]) -> list[int]:
    """Ranks whose process is gone (or a zombie) though they never reported an error or finished."""
    gone = []
    for r, rec in states.items():
        if rec["event"].get("phase") in ("error", "gathered", "written") or "pid" not in rec:
            continue
        try:
            alive = psutil.Process(rec["pid"]).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            alive = False
        if not alive:
            gone.append(r)
    return gone


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


def _tail(log: Path) -> str:
    """What went wrong, from torchrun's log: the root-cause rank and exit code where it has them."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no log)"
    cause = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", text, re.S)
    if cause:
        return f"rank {cause.group(1)} exited first, with code {cause.group(2)}"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["(empty log)"])[-1].strip()[:300]
