"""What each worker process of a ``serve`` is doing, as one small file per process.

A worker writes its state (``loading``, ``warming up``, ``ready``) into
``<data_dir>/workers/<pid>.json``; ``serve``'s ``/readyz`` reads the files of the worker
processes it started, so that the server says "not ready" while the model loads or compiles,
and which worker is doing what. Torch-free: both sides import it. A worker started by hand on
another machine writes its file there; the API's readiness only covers the workers it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WorkerState", "WorkerStates"]

READY = "ready"


@dataclass(frozen=True)
class WorkerState:
    state: str  # loading | warming up | ready | failed
    detail: str = ""
    since: float = 0.0  # time.time() when this state began

    @property
    def ready(self) -> bool:
        return self.state == READY

    def describe(self, pid: int) -> str:
        elapsed = max(0.0, time.time() - self.since)
        text = f"worker {pid} is {self.state}"
        if self.detail:
            text += f" ({self.detail})"
        return f"{text} for {elapsed:.0f} s"


class WorkerStates:
    """The state files under ``folder`` (``<data_dir>/workers``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def write(self, state: str, detail: str = "", *, pid: int | None = None) -> None:
        """Atomically replace this process's (or ``pid``'s) state file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        pid = os.getpid() if pid is None else pid
        target = self.folder / f"{pid}.json"
        temporary = target.with_suffix(".tmp")
        record = {"state": state, "detail": detail, "since": time.time()}
        temporary.write_text(json.dumps(record), encoding="utf-8")
        temporary.replace(target)

    def read(self, pid: int) -> WorkerState | None:
        try:
            record = json.loads((self.folder / f"{pid}.json").read_text(encoding="utf-8"))
            return WorkerState(
                str(record["state"]), str(record.get("detail", "")), float(record["since"])
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not written yet (the process is starting), or being replaced

    def remove(self, pid: int) -> None:
        with contextlib.suppress(OSError):
            (self.folder / f"{pid}.json").unlink()

    def clear(self) -> None:
        """Remove every state file (``serve`` does, before it starts its workers)."""
        for path in self.folder.glob("*.json"):
            with contextlib.suppress(OSError):
                path.unlink()

    def readiness(self, pids: list[int]) -> str | None:
        """None when at least one of ``pids`` is ready, else what each one is doing."""
        states = {pid: self.read(pid) for pid in pids}
        if any(state is not None and state.ready for state in states.values()):
            return None
        return "; ".join(
            f"worker {pid} is starting" if state is None else state.describe(pid)
            for pid, state in sorted(states.items())
        )
