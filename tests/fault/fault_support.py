"""Helpers of the fault tests: real API and worker processes on loopback, over one backend.

A ``Backend`` is a job store URL plus a file store URL (PostgreSQL + S3, or SQLite + a local
folder) and the environment every process needs to reach them. ``ApiProcess`` is
``kontext-server serve --workers 0`` (API only); ``WorkerProcess`` is ``fault_worker.py`` (the
production worker loop around a fixture engine) or, with ``engine=None``, the real
``kontext-server worker --model tiny``. Every process runs in its own session so that a test
can SIGKILL exactly one of them; ``Processes`` kills whatever a test left running.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from kontext_server.domain.jobs import Job
from kontext_server.store import open_store
from kontext_server.store.base import JobStore

__all__ = [
    "ENDPOINT",
    "ApiProcess",
    "Backend",
    "Processes",
    "WorkerProcess",
    "free_port",
    "input_image_uri",
    "on_base",
    "opened",
    "stored_names",
    "wait_for",
    "wait_until_completed",
]

ENDPOINT = "fal-ai/flux-pro/kontext/max"
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def input_image_uri(side_px: int = 32) -> str:
    """A small PNG as a ``data:`` URI (workers need no network)."""
    buffer = io.BytesIO()
    Image.new("RGB", (side_px, side_px), "purple").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def kontext_server_argv() -> list[str]:
    script = Path(sys.executable).parent / "kontext-server"
    return [str(script)] if script.exists() else [sys.executable, "-m", "kontext_server"]


@dataclass
class Backend:
    """Where the processes of one test keep jobs and files."""

    name: str  # "postgres" (with S3) or "sqlite" (with a local folder)
    store_url: str
    files_url: str
    env: dict[str, str] = field(default_factory=dict)
    list_file_keys: Callable[[], set[str]] = field(default=lambda: set())

    def count_jobs(self) -> int:
        """Rows in the ``jobs`` table, whatever their status (plain SQL: no store method
        counts finished jobs)."""
        if self.store_url.startswith("sqlite:///"):
            import sqlite3

            with contextlib.closing(
                sqlite3.connect(self.store_url.removeprefix("sqlite:///"))
            ) as db:
                return int(db.execute("SELECT count(*) FROM jobs").fetchone()[0])
        import psycopg

        with psycopg.connect(self.store_url) as conn:
            row = conn.execute("SELECT count(*) FROM jobs").fetchone()
            assert row is not None
            return int(row[0])

    def open_store(self) -> JobStore:
        """A store of our own, to look behind the processes' backs (close it after use)."""
        return open_store(self.store_url, pg_pool_max=2)


class _Process:
    """A subprocess in a session of its own, output appended to ``log_path``."""

    def __init__(self, argv: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.argv, self.env, self.log_path = argv, dict(env), log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def spawn(self) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {' '.join(self.argv)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.argv,
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        """SIGKILL, like a crash or the OOM killer; waits until it is gone."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (graceful), SIGKILL after ``timeout_s``."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGCONT)  # a stopped process cannot drain
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9()

    def log_tail(self, max_chars: int = 4000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"(no log at {self.log_path})"
        return f"----- {self.log_path.name} (tail) -----\n{text[-max_chars:]}"


class ApiProcess(_Process):
    """``kontext-server serve --workers 0`` on 127.0.0.1: the API (maintenance loop and
    webhook dispatcher included), no workers."""

    def __init__(
        self, backend: Backend, data_dir: Path, *, env: Mapping[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        argv = [
            *kontext_server_argv(),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "0",
            "--store",
            backend.store_url,
            "--files",
            backend.files_url,
            "--data-dir",
            str(data_dir),
        ]
        full_env = {"KONTEXT_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1", **backend.env}
        full_env.update(env or {})
        super().__init__(argv, full_env, data_dir.parent / f"{data_dir.name}-api.log")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.spawn()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"API exited at start\n{self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.base_url}/healthz", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"API did not answer within {timeout_s} s\n{self.log_tail()}")


class WorkerProcess(_Process):
    """A worker on ``backend``: ``fault_worker.py ENGINE`` or (``engine=None``) the real
    ``kontext-server worker --model tiny``."""

    def __init__(
        self,
        backend: Backend,
        folder: Path,
        name: str,
        *,
        engine: str | None = "slow",
        steps: int = 4,
        step_s: float = 0.05,
        lease_s: float = 2.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        full_env = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **backend.env}
        if engine is None:
            argv = [
                *kontext_server_argv(),
                "worker",
                "--store",
                backend.store_url,
                "--files",
                backend.files_url,
                "--model",
                "tiny",
                "--device",
                "cpu",
                "--data-dir",
                str(folder / f"{name}-data"),
                "--worker-id",
                name,
            ]
            full_env |= {
                "KONTEXT_DEFAULT_STEPS": str(steps),
                "KONTEXT_LEASE_S": str(lease_s),
                "KONTEXT_HEARTBEAT_S": str(lease_s / 4),
            }
        else:
            argv = [
                sys.executable,
                str(HERE / "fault_worker.py"),
                engine,
                "--store",
                backend.store_url,
                "--files",
                backend.files_url,
                "--name",
                name,
                "--lease-s",
                str(lease_s),
                "--steps",
                str(steps),
                "--step-s",
                str(step_s),
            ]
        full_env.update(env or {})
        super().__init__(argv, full_env, folder / f"{name}-worker.log")

    def start(self) -> WorkerProcess:
        self.spawn()
        return self

    @property
    def worker_id(self) -> str:
        """The id this process claims under (fixture workers; the real one uses ``name``)."""
        return f"{self.name}/{self.pid}"


class Processes:
    """Every process a test starts; ``close()`` stops the ones still running."""

    def __init__(self) -> None:
        self._all: list[_Process] = []

    def add(self, process: _Process) -> None:
        self._all.append(process)

    def logs(self) -> str:
        return "\n".join(p.log_tail(2500) for p in self._all)

    def close(self) -> None:
        for process in self._all:
            with contextlib.suppress(Exception):
                process.kill9()


def on_base(url: str, base_url: str) -> str:
    """``url`` (given by one API process) pointed at another API process."""
    path = url.split("://", 1)[1].split("/", 1)[1]
    return f"{base_url}/{path}"


def wait_for(
    condition: Callable[[], Any], *, timeout_s: float, poll_s: float = 0.05, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


def wait_until_completed(
    client: httpx.Client, status_url: str, *, timeout_s: float
) -> dict[str, Any]:
    """Poll a status URL until ``COMPLETED``; the last status body."""

    def completed() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(status_url, params={"logs": "1"}).json()
        return body if body["status"] == "COMPLETED" else None

    result: dict[str, Any] = wait_for(completed, timeout_s=timeout_s, poll_s=0.1, what=status_url)
    return result


def jobs_by_id(store: JobStore, job_ids: list[str]) -> dict[str, Job | None]:
    return {job_id: store.get(job_id) for job_id in job_ids}


@contextlib.contextmanager
def opened(backend: Backend) -> Iterator[JobStore]:
    store = backend.open_store()
    try:
        yield store
    finally:
        store.close()


def stored_names(keys: set[str]) -> set[str]:
    """``token/attempt-index.ext`` of each key, whatever prefix the file store adds."""
    return {"/".join(key.split("/")[-2:]) for key in keys}
