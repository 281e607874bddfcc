"""Starts, watches and restarts the worker processes of ``kontext-server serve``.

Workers are separate programs (``python -m kontext_server worker``), so the API process never
imports torch and a worker that crashes (or is killed) takes nothing else down: its job's
lease expires and the job is re-queued, and the supervisor starts a new worker. A worker that
ended itself after an execution timeout (``EXIT_EXECUTION_TIMEOUT``) is replaced at once:
that is the plan, not a crash, so it does not count towards the crash backoff.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from kontext_server.worker.exit_codes import EXIT_EXECUTION_TIMEOUT, EXIT_START_FAILED

__all__ = ["WorkerSpec", "WorkerSupervisor", "visible_gpus", "worker_specs"]

log = logging.getLogger(__name__)

_MAX_RESTART_DELAY_S = 30.0


def visible_gpus(env: Mapping[str, str]) -> list[str]:
    """Ids of the GPUs workers may use, found without importing torch ([] on CPU-only hosts)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    count = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    return [str(i) for i in range(count)]


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return cast("Callable[..., int]", ctypes.CDLL(None, use_errno=True).prctl)
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM (a graceful drain) when the supervisor dies, even
    by SIGKILL, so that no worker outlives its ``serve``."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class WorkerSpec:
    """How to start worker ``index``: its argv and extra environment (e.g. its GPU)."""

    argv: Sequence[str]
    env: dict[str, str] = field(default_factory=dict)
    engine: str = "local"  # "bfl": the upstream worker (no GPU, no model)


@dataclass
class _Slot:
    spec: WorkerSpec
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_start_at: float = 0.0


class WorkerSupervisor:
    """Keeps one process per ``WorkerSpec`` alive, with backoff on repeated crashes."""

    def __init__(
        self,
        specs: Sequence[WorkerSpec],
        *,
        poll_s: float = 0.5,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        """``on_exit(pid)`` runs for every worker that ended (e.g. to drop its metrics)."""
        self._on_exit = on_exit
        self._slots = [_Slot(spec) for spec in specs]
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    @property
    def pids(self) -> list[int]:
        return [s.process.pid for s in self._slots if s.process and s.process.poll() is None]

    def pids_of(self, engine: str) -> list[int]:
        """The running workers of one engine (``local``: the model workers)."""
        return [
            s.process.pid
            for s in self._slots
            if s.spec.engine == engine and s.process and s.process.poll() is None
        ]

    def start(self) -> None:
        for slot in self._slots:
            self._spawn(slot)
        self._thread.start()

    def stop(self, timeout_s: float = 75.0) -> None:
        """SIGTERM every worker (each drains: finishes or hands back its job in hand), then
        SIGKILL stragglers after ``timeout_s``; give it more than the workers'
        ``drain_timeout_s`` (default 60 s) so that a drain is never cut short."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        running = [s.process for s in self._slots if s.process and s.process.poll() is None]
        for proc in running:
            proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()
            if self._on_exit is not None:
                self._on_exit(proc.pid)

    def _spawn(self, slot: _Slot) -> None:
        env = {**os.environ, **slot.spec.env}
        slot.process = subprocess.Popen(
            list(slot.spec.argv), env=env, preexec_fn=_die_with_parent if _PRCTL else None
        )
        slot.started_at = time.monotonic()
        log.info("started worker pid %d", slot.process.pid)

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            for slot in self._slots:
                self._check(slot)

    def _check(self, slot: _Slot) -> None:
        proc = slot.process
        now = time.monotonic()
        if proc is not None and proc.poll() is None:
            if now - slot.started_at > 60:
                slot.restarts = 0  # healthy for a minute: forget earlier crashes
            return
        if proc is not None:
            if self._on_exit is not None:
                self._on_exit(proc.pid)
            self._schedule_restart(slot, proc, now)
        if now >= slot.next_start_at and not self._stop.is_set():
            self._spawn(slot)

    @staticmethod
    def _schedule_restart(slot: _Slot, proc: subprocess.Popen[bytes], now: float) -> None:
        slot.process = None
        if proc.returncode == EXIT_START_FAILED:
            # the model cannot load (or warm up) here: trying again at once would fail again
            slot.restarts += 1
            slot.next_start_at = now + _MAX_RESTART_DELAY_S
            log.error(
                "worker pid %d could not load its model; trying again in %.0f s",
                proc.pid,
                _MAX_RESTART_DELAY_S,
            )
            return
        if proc.returncode == EXIT_EXECUTION_TIMEOUT:
            slot.next_start_at = now
            log.warning(
                "worker pid %d ended itself after an execution timeout; replacing it", proc.pid
            )
            return
        delay_s = min(_MAX_RESTART_DELAY_S, 0.5 * 2**slot.restarts)
        slot.restarts += 1
        slot.next_start_at = now + delay_s
        log.warning(
            "worker pid %d exited with %s; restarting in %.1f s", proc.pid, proc.returncode, delay_s
        )


def worker_specs(count: int, gpus: Sequence[str], base_argv: Sequence[str]) -> list[WorkerSpec]:
    """One spec per worker; on a GPU machine worker i sees only GPU ``gpus[i % len(gpus)]``."""
    argv = [sys.executable, "-m", "kontext_server", "worker", *base_argv]
    if not gpus:
        return [WorkerSpec(argv) for _ in range(count)]
    return [WorkerSpec(argv, {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}) for i in range(count)]
