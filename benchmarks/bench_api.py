"""The API and queue benchmark: this server against a bare FastAPI endpoint, on loopback.

One run measures, and prints as one JSON document with the targets and pass/fail:

1. submit throughput (``--clients`` keep-alive connections, closed loop) of this server
   (real uvicorn, the job store of ``--store``, no worker) and of a bare FastAPI app
   whose endpoints do nothing, under the same uvicorn settings (those of
   ``kontext-server serve``) and the same load generator; and their ratio;
2. status latency p50/p99 with ``--pollers`` concurrent pollers, each polling one queued
   or running request every ``--poll-interval-s`` (fal_client's default, 0.1 s); the same
   pollers with no pause (saturation) are reported too, for both apps;
3. queue-position time with ``--queued-jobs`` queued (``queue_position.run``);
4. submit -> running latency with an idle worker: a worker process (``JobRunner`` with an
   instant engine) polling the same store at the default ``claim_poll_s``;
5. per-job overhead of ``JobRunner`` outside the engine call, for a ~1 MP JPEG in and out.

Each server runs in a process of its own (and the worker in a third), the load generator
in this one, so that the machine's cores are shared between them by the OS. The load
generator is a minimal asyncio HTTP/1.1 client: httpx costs about as much CPU per request
as the bare endpoint itself, so it would measure itself rather than the servers.

    .venv/bin/python benchmarks/bench_api.py [--strict] [--duration-s 5] [--clients 16]
    .venv/bin/python benchmarks/bench_api.py --store postgresql://user@host/postgres

Job store: without ``--store``, SQLite files in the temporary folder (one per phase). With
a PostgreSQL URL, each phase that needs a store (API server + worker, overhead, queue
position) gets a fresh database ``bench_<phase>_<random>`` created on that server (the
URL's role needs CREATEDB) and dropped afterwards, so that no phase sees another's jobs.

The exit code is 0 whatever the figures (a measurement, not a test) unless ``--strict``.
``run(BenchOptions(...))`` is what ``kontext-server bench-api`` calls.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import importlib.util
import io
import itertools
import json
import os
import platform
import random
import secrets
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, cast

from PIL import Image

from kontext_server.config import Settings
from kontext_server.domain.editing import EditInput, EditRequest, EditResult, EncodedImage
from kontext_server.domain.errors import ConfigError, EditCancelled
from kontext_server.domain.jobs import JobStatus
from kontext_server.files.base import FileStore
from kontext_server.files.local import LocalFileStore
from kontext_server.logs import configure_logging
from kontext_server.store import POSTGRES_SCHEMES, open_configured_store, open_store
from kontext_server.store.base import JobStore
from kontext_server.worker.local_engine import LocalEngine
from kontext_server.worker.loop import WorkerLoop
from kontext_server.worker.main import make_fetcher, runner_limits
from kontext_server.worker.runner import JobRunner

__all__ = ["TARGETS", "BenchOptions", "InstantEngine", "main", "run"]

LOOPBACK = "127.0.0.1"
ENDPOINT = "fal-ai/flux-pro/kontext/max"
# The spec's own example input: submit checks it without touching the network.
SPEC_INPUT = {
    "prompt": "Put a donut next to the flour.",
    "image_url": "https://v3.fal.media/files/rabbit/rmgBxhwGYb2d3pl3x9sKf_output.png",
}
STARTUP_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 10.0
HOLDER_LEASE_S = 600.0  # running jobs held by the benchmark while pollers watch them
KEEP_ALL_ANSWERS = 10**7
SUBMIT_VARIANTS = 4096  # distinct submit bodies the load cycles through
STORE_URL_FILE = "store-url"  # how a child learns its job store (not argv: no password in ps)
# The submit phase queues ~5,000 jobs for one caller (authentication off: one owner); the
# default per-key limit (1,000) would answer most of them 429. Raised to the total limit.
MAX_QUEUED_PER_KEY = Settings().max_queue_size

SQLITE = "sqlite"  # --store value for SQLite files (the default)

# name -> (comparison, threshold, unit, what is compared)
TARGETS: dict[str, tuple[str, float, str, str]] = {
    "submit_throughput_ratio": (">=", 0.40, "x", "submit req/s of this server / bare FastAPI"),
    "status_p99_ms": ("<", 20.0, "ms", "status p99 with the pollers at their interval"),
    "queue_position_p99_ms": ("<", 1.0, "ms", "worst p99 of front/middle/back positions"),
    "submit_to_running_p99_ms": ("<", 100.0, "ms", "submit response -> started_at, p99"),
    "job_overhead_p50_ms": ("<", 50.0, "ms", "claim->finish minus engine time, p50"),
}


@dataclass(frozen=True)
class BenchOptions:
    """What one run does; the defaults are the documented run (about a minute on 2 cores)."""

    clients: int = 16  # concurrent submitters (keep-alive connections)
    warmup_s: float = 1.0  # per load phase, not counted
    duration_s: float = 5.0  # per load phase, counted
    pollers: int = 50
    poll_interval_s: float = 0.1  # fal_client.DEFAULT_QUEUE_POLL_INTERVAL
    running_jobs: int = 10  # of the polled requests, how many are running (the rest queued)
    queued_jobs: int = 100_000  # for the queue-position figure
    queue_samples: int = 200
    start_samples: int = 30  # submit -> running samples
    overhead_jobs: int = 30
    image_side_px: int = 1024  # input and output of the overhead jobs (1024 x 1024 = 1 MP)
    engine_steps: int = 28  # step callbacks the instant engine makes, as the real one does
    folder: Path | None = None  # where the temporary folders go
    # None: SQLite in the temporary folder; a postgresql:// URL: a fresh database per phase
    store: str | None = None


# --- a minimal HTTP/1.1 load generator ------------------------------------------------------------
class _HttpConnection:
    """One keep-alive HTTP/1.1 connection; answers with a Content-Length body only (what
    uvicorn sends for JSON). Requests are pre-encoded bytes, so a request costs the
    generator little more than two system calls."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> _HttpConnection:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        return cls(reader, writer)

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """(status code, body) of one request."""
        self._writer.write(request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        length = _content_length(head)
        body = await self._reader.readexactly(length) if length else b""
        return int(head[9:12]), body

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


def _content_length(head: bytes) -> int:
    lowered = head.lower()
    start = lowered.find(b"\r\ncontent-length:")
    if start < 0:
        if b"transfer-encoding:" in lowered:
            raise RuntimeError("the load generator reads Content-Length bodies only")
        return 0
    end = lowered.find(b"\r\n", start + 2)
    return int(lowered[start + len(b"\r\ncontent-length:") : end])


def http_request(method: str, path: str, port: int, body: bytes = b"") -> bytes:
    """The bytes of one HTTP/1.1 request with a JSON body."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


@dataclass
class _Load:
    """What one load phase saw inside its measured window."""

    window_s: float
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    bodies: list[bytes] = field(default_factory=list)  # the first answers, for their ids

    def figures(self, expected_status: int) -> dict[str, Any]:
        errors = sum(n for code, n in self.statuses.items() if code != expected_status)
        return {
            # only answers with the expected status count: a 429 is not a submit
            "requests_per_s": round(self.statuses[expected_status] / self.window_s, 1),
            **_percentiles_ms(self.latencies_ms),
            "requests": len(self.latencies_ms),
            "unexpected_statuses": errors,
            "statuses": {str(code): n for code, n in sorted(self.statuses.items())},
        }


class _Window:
    """The measured part of a load phase: after the warm-up, until the end."""

    def __init__(self, warmup_s: float, duration_s: float) -> None:
        self.start = time.perf_counter() + warmup_s
        self.end = self.start + duration_s

    def counts(self, done: float) -> bool:
        return self.start <= done <= self.end


async def closed_loop(
    port: int,
    requests: list[bytes],
    clients: int,
    warmup_s: float,
    duration_s: float,
    keep: int = 0,
) -> _Load:
    """``clients`` connections sending ``requests`` back to back, in turn."""
    load, window = _Load(duration_s), _Window(warmup_s, duration_s)
    turns = itertools.cycle(requests)

    async def client() -> None:
        connection = await _HttpConnection.open(port)
        try:
            while time.perf_counter() < window.end:
                sent = time.perf_counter()
                status, body = await connection.send(next(turns))
                _record(load, window, sent, status)
                if len(load.bodies) < keep and status == 200:
                    load.bodies.append(body)
        finally:
            await connection.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return load


async def pollers_loop(
    port: int, requests: list[bytes], pollers: int, interval_s: float, options: BenchOptions
) -> _Load:
    """``pollers`` connections, each polling one of ``requests`` and pausing ``interval_s``
    after each answer (what fal_client does); phases are staggered at random."""
    load, window = _Load(options.duration_s), _Window(options.warmup_s, options.duration_s)

    async def poller(request: bytes) -> None:
        connection = await _HttpConnection.open(port)
        try:
            await asyncio.sleep(random.uniform(0, interval_s))
            while time.perf_counter() < window.end:
                sent = time.perf_counter()
                status, _ = await connection.send(request)
                _record(load, window, sent, status)
                await asyncio.sleep(interval_s)
        finally:
            await connection.close()

    await asyncio.gather(*(poller(requests[i % len(requests)]) for i in range(pollers)))
    return load


def _record(load: _Load, window: _Window, sent: float, status: int) -> None:
    done = time.perf_counter()
    if window.counts(done):
        load.latencies_ms.append((done - sent) * 1e3)
        load.statuses[status] += 1


# --- statistics -----------------------------------------------------------------------------------
def _percentiles_ms(values_ms: list[float]) -> dict[str, float]:
    if not values_ms:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    p99 = values_ms[0] if len(values_ms) == 1 else _quantile(values_ms, 99)
    return {
        "p50_ms": round(statistics.median(values_ms), 3),
        "p99_ms": round(p99, 3),
        "max_ms": round(max(values_ms), 3),
    }


def _quantile(values: list[float], percent: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


# --- the servers under test (child processes) -----------------------------------------------------
def bare_app() -> Any:
    """FastAPI with do-nothing endpoints on the same paths as the real ones."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post(f"/{ENDPOINT}")
    async def submit() -> dict[str, str]:
        return {"request_id": "00000000-0000-0000-0000-000000000000", "status": "IN_QUEUE"}

    @app.get("/fal-ai/flux-pro/requests/{request_id}/status", status_code=202)
    async def status(request_id: str) -> dict[str, str]:
        return {"status": "IN_QUEUE", "request_id": request_id}

    return app


def kontext_app(data_dir: Path) -> Any:
    """This server as ``kontext-server serve`` builds it, over the job store named in
    ``data_dir/store-url`` and local files in ``data_dir``, with the per-key queue limit
    raised to ``MAX_QUEUED_PER_KEY``."""
    from kontext_server.http.app import create_app, tune_threads_for

    settings = Settings(
        data_dir=data_dir, store=_child_store_url(data_dir), max_queued_per_key=MAX_QUEUED_PER_KEY
    )
    store = open_configured_store(settings)
    tune_threads_for(store)
    return create_app(settings, store, LocalFileStore(data_dir / "files"), freeze_heap=True)


def _child_store_url(data_dir: Path) -> str:
    return (data_dir / STORE_URL_FILE).read_text()


def serve_child(kind: str, data_dir: Path) -> None:
    """Child process: serve ``kind`` on a free loopback port, written to ``data_dir/port``."""
    import uvicorn

    # proto must be IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only then; with
    # proto 0, Nagle holds each response body behind its headers for a delayed ACK (~40 ms).
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOPBACK, 0))
    listener.listen(2048)
    if kind == "bare":
        # INFO logs with uvicorn's access log: one line per request.
        config = uvicorn.Config(bare_app(), log_level="info", timeout_graceful_shutdown=5)
    else:
        # The settings of `kontext-server serve` (cli/serve.py): our INFO logging, one line per
        # request from the access-log middleware, uvicorn's own access log off.
        configure_logging("INFO")
        config = uvicorn.Config(
            kontext_app(data_dir),
            log_level="info",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
        )
    _publish(data_dir / "port", str(listener.getsockname()[1]))
    uvicorn.Server(config).run(sockets=[listener])


def worker_child(data_dir: Path) -> None:
    """Child process: a ``JobRunner`` with an instant engine on ``data_dir``'s stores,
    configured as ``kontext-server worker`` configures it, until SIGTERM."""
    settings = Settings(data_dir=data_dir, store=_child_store_url(data_dir))
    store = open_configured_store(settings)
    engine = InstantEngine(encoded_jpeg(64), steps=1)
    runner = JobRunner(
        store,
        LocalFileStore(data_dir / "files"),
        engine,
        make_fetcher(settings),
        worker_id="bench-worker",
        limits=runner_limits(settings),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _publish(data_dir / "worker-ready", f"{Settings().claim_poll_s}")
    try:
        runner.run_forever(stop)
    finally:
        runner.close()
        store.close()


def _publish(path: Path, text: str) -> None:
    """Write ``path`` atomically: the parent polls for it."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(path)


class _Child:
    """This script run as a child process (``serve bare|kontext DIR`` or ``worker DIR``);
    output goes to ``DIR/<role>.log``; it is stopped with SIGTERM on exit."""

    def __init__(self, args: list[str], data_dir: Path, ready_file: str) -> None:
        self._args, self._data_dir, self._ready = args, data_dir, data_dir / ready_file
        self._process: subprocess.Popen[bytes] | None = None
        role = args[1] if args[0] == "serve" else args[0]
        self.log_path = data_dir / f"{role}.log"

    def __enter__(self) -> str:
        self._data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            command = [sys.executable, str(Path(__file__).resolve()), *self._args]
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            return self._wait_ready()
        except BaseException:
            self.__exit__()  # no orphan child when it never became ready
            raise

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._ready.exists():
            if self._process is None or self._process.poll() is not None:
                raise RuntimeError(f"{self._args} exited early:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self._args} not ready after {STARTUP_TIMEOUT_S} s")
            time.sleep(0.02)
        return self._ready.read_text()

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def __exit__(self, *exc: object) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


async def _wait_answers(port: int) -> None:
    """Until the server answers HTTP (it may have bound before its app started)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            connection = await _HttpConnection.open(port)
            await connection.send(http_request("GET", "/bench-ready", port))
            await connection.close()
            return
        except (OSError, asyncio.IncompleteReadError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


@contextlib.contextmanager
def served(kind: str, data_dir: Path) -> Iterator[int]:
    """A server child of ``kind`` ("bare" or "kontext"); yields its port once it answers."""
    with _Child(["serve", kind, str(data_dir)], data_dir, "port") as port_text:
        port = int(port_text)
        asyncio.run(_wait_answers(port))
        yield port


# --- job stores: one per phase -------------------------------------------------------------------
def sqlite_url(data_dir: Path) -> str:
    """The SQLite store of a phase's folder (what ``serve`` makes of ``--data-dir``)."""
    return f"sqlite:///{(data_dir / 'jobs.db').resolve()}"


def check_store_option(url: str | None) -> None:
    """``--store`` is empty or ``sqlite`` (SQLite) or a PostgreSQL server's URL; raises
    ``ConfigError``."""
    if url is not None and url != SQLITE and not url.startswith(POSTGRES_SCHEMES):
        raise ConfigError(
            f"--store {_redacted(url)!r}: give a postgresql:// URL (a fresh database is"
            " created on that server for each phase), or 'sqlite' (or nothing) for SQLite"
            " files"
        )


def store_of(option: str | None) -> str | None:
    """``BenchOptions.store`` for a ``--store`` value: ``None`` for SQLite."""
    return None if option in (None, SQLITE) else option


def with_database(url: str, dbname: str) -> str:
    """``url`` with its database name replaced by ``dbname`` (query parameters kept)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{dbname}"))


def _redacted(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    return urllib.parse.urlunsplit(
        parts._replace(netloc=parts.netloc.replace(parts.password, "***"))
    )


@contextlib.contextmanager
def fresh_database(server_url: str, phase: str) -> Iterator[str]:
    """A new database ``bench_<phase>_<random>`` on ``server_url``'s server; yields its URL
    and drops it afterwards (closing any connection left to it)."""
    import psycopg
    from psycopg import sql

    name = f"bench_{phase}_{secrets.token_hex(4)}"
    dbname = sql.Identifier(name)
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(dbname))
    try:
        yield with_database(server_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            force = sql.SQL(" WITH (FORCE)" if conn.info.server_version >= 130000 else "")
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}{}").format(dbname, force))


@contextlib.contextmanager
def phase_store(options: BenchOptions, phase: str, data_dir: Path) -> Iterator[str]:
    """The job store URL of one phase: SQLite in ``data_dir``, or a fresh PostgreSQL
    database on ``options.store``'s server, dropped when the phase ends."""
    if options.store is None:
        yield sqlite_url(data_dir)
        return
    with fresh_database(options.store, phase) as url:
        yield url


def _postgres_version(server_url: str) -> str:
    import psycopg

    with psycopg.connect(server_url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"


# --- the instant engine ---------------------------------------------------------------------------
class InstantEngine:
    """An ``EditPipeline`` that answers a pre-encoded image at once, after making the step
    callbacks the real pipeline makes (``steps`` of them: progress, then the cancel check).
    It records its own time with the callbacks left out, because the callbacks are the
    runner's work (progress writes, cancel reads), not the engine's."""

    random_weights = False

    def __init__(self, output: EncodedImage, *, steps: int) -> None:
        self.default_steps = steps
        self.output = output
        self.engine_s: list[float] = []
        self.callbacks_s: list[float] = []

    def edit(
        self,
        request: EditRequest,
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> EditResult:
        started = time.perf_counter()
        in_callbacks_s = 0.0
        for step in range(1, self.default_steps + 1):
            before = time.perf_counter()
            if on_step is not None:
                on_step(step, self.default_steps)
            cancel = should_cancel is not None and should_cancel()
            in_callbacks_s += time.perf_counter() - before
            if cancel:
                raise EditCancelled("cancelled by the caller")
        result = EditResult(
            images=[self.output] * request.num_images,
            seed=request.seed or 0,
            timings={"inference": 0.0},
        )
        self.engine_s.append(time.perf_counter() - started - in_callbacks_s)
        self.callbacks_s.append(in_callbacks_s)
        return result


def sample_jpeg(side_px: int) -> bytes:
    """A ``side_px`` square JPEG (quality 90) that compresses like a photo, not like a flat
    colour: two gradients and a noise channel."""
    gradient = Image.linear_gradient("L").resize((side_px, side_px))
    noise = Image.effect_noise((side_px, side_px), 48)
    image = Image.merge("RGB", (gradient, gradient.rotate(90), noise))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def encoded_jpeg(side_px: int) -> EncodedImage:
    return EncodedImage(sample_jpeg(side_px), side_px, side_px, "image/jpeg")


def jpeg_data_uri(side_px: int) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(sample_jpeg(side_px)).decode("ascii")


# --- 1 and 2: submit throughput and status latency ------------------------------------------------
def submit_request(port: int, image_url: str = SPEC_INPUT["image_url"]) -> bytes:
    body = json.dumps({**SPEC_INPUT, "image_url": image_url}).encode()
    return http_request("POST", f"/{ENDPOINT}", port, body)


def submit_requests(port: int) -> list[bytes]:
    """The spec's example submit, each with an image URL of its own (as real traffic has:
    nothing per URL that the server may keep, such as a parsed URL, is reused across the
    load)."""
    base = SPEC_INPUT["image_url"]
    return [submit_request(port, f"{base}?n={n}") for n in range(SUBMIT_VARIANTS)]


def measure_bare(options: BenchOptions, data_dir: Path) -> dict[str, Any]:
    with served("bare", data_dir) as port:
        submit = asyncio.run(
            closed_loop(
                port, submit_requests(port), options.clients, options.warmup_s, options.duration_s
            )
        )
        status_paths = [
            http_request("GET", _status_path(f"{i:08d}"), port) for i in range(options.pollers)
        ]
        status, saturated = _status_loads(port, status_paths, options)
    return {
        "submit": submit.figures(200),
        "status": status.figures(202),
        "status_saturated": saturated.figures(202),
    }


def _status_loads(port: int, requests: list[bytes], options: BenchOptions) -> tuple[_Load, _Load]:
    """The pollers at their interval, then the same pollers with no pause."""
    paced = asyncio.run(
        pollers_loop(port, requests, options.pollers, options.poll_interval_s, options)
    )
    saturated = asyncio.run(pollers_loop(port, requests, options.pollers, 0.0, options))
    return paced, saturated


def measure_kontext(options: BenchOptions, data_dir: Path) -> dict[str, Any]:
    """Start latency (with a worker), then submit throughput and status (no worker), on a
    job store of their own."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with phase_store(options, "api", data_dir) as store_url:
        _publish(data_dir / STORE_URL_FILE, store_url)
        return _measure_kontext(options, data_dir, store_url)


def _measure_kontext(options: BenchOptions, data_dir: Path, store_url: str) -> dict[str, Any]:
    with served("kontext", data_dir) as port:
        start = measure_start_latency(port, data_dir, store_url, options)
        submit = asyncio.run(
            closed_loop(
                port,
                submit_requests(port),
                options.clients,
                options.warmup_s,
                options.duration_s,
                keep=KEEP_ALL_ANSWERS,  # the pollers pick theirs along the whole line
            )
        )
        polled = _polled_requests(submit.bodies, store_url, options)
        requests = [http_request("GET", path, port) for path in polled.paths]
        status, saturated = _status_loads(port, requests, options)
    return {
        "submit": submit.figures(200),
        "status": {**status.figures(202), **polled.describe()},
        "status_saturated": saturated.figures(202),
        "submit_to_running": start,
    }


@dataclass
class _Polled:
    paths: list[str]
    running: int
    queue_depth: int
    positions: list[int]

    def describe(self) -> dict[str, Any]:
        return {
            "polled_running": self.running,
            "polled_queued": len(self.paths) - self.running,
            "queue_depth": self.queue_depth,
            "polled_queue_positions": [min(self.positions), max(self.positions)]
            if self.positions
            else [],
        }


def _polled_requests(bodies: list[bytes], store_url: str, options: BenchOptions) -> _Polled:
    """Status paths of the requests the pollers watch, one per poller: ``running_jobs`` of
    them (at most all) are claimed here from the front of the queue and held running; the
    others stay queued, spread along the line of answers kept from the submit phase."""
    answered_ids = [json.loads(body)["request_id"] for body in bodies]
    store = open_store(store_url)
    try:
        running = [
            store.claim("bench-holder", HOLDER_LEASE_S)
            for _ in range(min(options.running_jobs, options.pollers))
        ]
        running_ids = [job.id for job in running if job is not None]
        held = set(running_ids)
        queued_ids = [job_id for job_id in answered_ids if job_id not in held]
        wanted = options.pollers - len(running_ids)
        chosen = queued_ids[:: max(1, len(queued_ids) // max(1, wanted))][:wanted]
        if not running_ids and not chosen:
            raise RuntimeError("the submit phase left no request to poll")
        positions = [store.queue_position(job_id) or 0 for job_id in chosen]
        paths = [_status_path(job_id) for job_id in running_ids + chosen]
        return _Polled(paths, len(running_ids), store.queue_depth(), positions)
    finally:
        store.close()


def _status_path(request_id: str) -> str:
    """What the submit answer's ``status_url`` points at (``owner/alias`` form)."""
    return f"/fal-ai/flux-pro/requests/{request_id}/status"


# --- 4: submit -> running with an idle worker -----------------------------------------------------
def measure_start_latency(
    port: int, data_dir: Path, store_url: str, options: BenchOptions
) -> dict[str, Any]:
    """Submit one job at a time to an idle worker; the gap from the submit answer (and from
    the job's creation) to the job's ``started_at``. Between samples a random pause puts the
    submit at a random point of the worker's poll cycle."""
    with _Child(["worker", str(data_dir)], data_dir, "worker-ready") as poll_text:
        store = open_store(store_url)
        try:
            samples = asyncio.run(_start_samples(port, store, options.start_samples, poll_text))
        finally:
            store.close()
    from_response = [s[0] for s in samples]
    from_created = [s[1] for s in samples]
    return {
        "samples": len(samples),
        "claim_poll_s": float(poll_text),
        "from_response": _percentiles_ms(from_response),
        "from_created": _percentiles_ms(from_created),
    }


async def _start_samples(
    port: int, store: JobStore, count: int, poll_text: str
) -> list[tuple[float, float]]:
    request = submit_request(port, jpeg_data_uri(64))
    claim_poll_s = float(poll_text)
    connection = await _HttpConnection.open(port)
    samples = []
    try:
        for _ in range(count):
            await asyncio.sleep(random.uniform(claim_poll_s, 3 * claim_poll_s))
            status, body = await connection.send(request)
            answered_at = time.time()
            if status != 200:
                raise RuntimeError(f"submit answered {status}: {body[:300]!r}")
            job = await _until_final(store, json.loads(body)["request_id"])
            if job.started_at is None:
                raise RuntimeError(f"job {job.id} ended {job.status} without starting")
            samples.append(
                ((job.started_at - answered_at) * 1e3, (job.started_at - job.created_at) * 1e3)
            )
    finally:
        await connection.close()
    return samples


async def _until_final(store: JobStore, job_id: str) -> Any:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = store.get(job_id)
        if job is not None and job.status.is_final:
            return job
        await asyncio.sleep(0.005)
    raise RuntimeError(f"job {job_id} did not finish within {JOB_TIMEOUT_S} s")


# --- 5: per-job overhead outside the engine call --------------------------------------------------
class _Timed:
    """Wraps a store or file store and adds up the time spent in each of its methods."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.spent_s: defaultdict[str, float] = defaultdict(float)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return attribute(*args, **kwargs)
            finally:
                self.spent_s[name] += time.perf_counter() - started

        return timed


class _InputTimedEngine(LocalEngine):
    """``LocalEngine`` that also adds up the time spent loading input images (data URI and
    Pillow decode, on the engine's I/O thread). It hooks ``_load_image``, a private method:
    should that be renamed, the breakdown loses this line, never the overhead figure."""

    input_load_s = 0.0

    def _load_image(self, source: str) -> Image.Image:
        started = time.perf_counter()
        try:
            return super()._load_image(source)
        finally:
            self.input_load_s += time.perf_counter() - started


@dataclass
class _OverheadRig:
    """A runner over timed stores in a folder, with an instant engine."""

    store: _Timed
    files: _Timed
    engine: InstantEngine
    runner: WorkerLoop[_InputTimedEngine]

    @classmethod
    def build(cls, folder: Path, store_url: str, options: BenchOptions) -> _OverheadRig:
        store = _Timed(open_store(store_url))
        files = _Timed(LocalFileStore(folder / "files"))
        engine = InstantEngine(encoded_jpeg(options.image_side_px), steps=options.engine_steps)
        # A real step takes longer than the progress throttle, so every step writes.
        limits = dataclasses.replace(runner_limits(Settings()), progress_interval_s=0.0)
        local = _InputTimedEngine(
            cast(JobStore, store),
            cast(FileStore, files),
            engine,
            make_fetcher(Settings()),
            limits=limits,
        )
        runner = WorkerLoop(cast(JobStore, store), local, worker_id="bench-overhead")
        return cls(store, files, engine, runner)

    def reset(self) -> None:
        self.store.spent_s.clear()
        self.files.spent_s.clear()
        self.engine.engine_s.clear()
        self.engine.callbacks_s.clear()
        self.runner.engine.input_load_s = 0.0

    def close(self) -> None:
        self.runner.close()
        cast(JobStore, self.store.inner).close()


def overhead_job_input(data_uri: str) -> EditInput:
    """``Job.input`` as submit makes it: the spec's prompt, validated by the real schema."""
    from kontext_server.http.fal.inputs import stored_input
    from kontext_server.http.fal.schemas import ENDPOINTS

    validated = ENDPOINTS[ENDPOINT].model_validate(
        {"prompt": SPEC_INPUT["prompt"], "image_url": data_uri},
        context={"max_data_uri_bytes": Settings().max_image_bytes},
    )
    return stored_input(validated)


def measure_job_overhead(options: BenchOptions, folder: Path) -> dict[str, Any]:
    """``JobRunner.run_next`` (claim -> finish) on an in-process store, minus the engine's own
    time, for jobs whose input is a ~1 MP JPEG data URI. One warm-up job is not counted."""
    with phase_store(options, "overhead", folder) as store_url:
        return _measure_job_overhead(options, folder, store_url)


def _measure_job_overhead(options: BenchOptions, folder: Path, store_url: str) -> dict[str, Any]:
    from kontext_server.core.service import QueueService

    data_uri = jpeg_data_uri(options.image_side_px)
    rig = _OverheadRig.build(folder, store_url, options)
    try:
        service = QueueService(cast(JobStore, rig.store), Settings())
        job_input = overhead_job_input(data_uri)
        ids = [service.submit(ENDPOINT, job_input).job.id for _ in range(options.overhead_jobs + 1)]
        rig.runner.run_next()  # warm-up: first thread, first connection, first decode
        rig.reset()
        walls_s = [_timed_run_next(rig.runner) for _ in range(options.overhead_jobs)]
        figures = _overhead_figures(options, walls_s, rig, data_uri)
        _check_succeeded(cast(JobStore, rig.store.inner), ids)
        return figures
    finally:
        rig.close()


def _timed_run_next(runner: WorkerLoop[Any]) -> float:
    started = time.perf_counter()
    if not runner.run_next():
        raise RuntimeError("the overhead jobs ran out")
    return time.perf_counter() - started


def _check_succeeded(store: JobStore, ids: list[str]) -> None:
    for job_id in ids:
        job = store.get(job_id)
        if job is None or job.status is not JobStatus.SUCCEEDED:
            error = None if job is None else job.error
            raise RuntimeError(f"overhead job {job_id} did not succeed: {error}")


def _overhead_figures(
    options: BenchOptions, walls_s: list[float], rig: _OverheadRig, data_uri: str
) -> dict[str, Any]:
    engine_s = rig.engine.engine_s
    overhead_ms = [(wall - inside) * 1e3 for wall, inside in zip(walls_s, engine_s, strict=True)]
    mean_ms = statistics.fmean(overhead_ms)
    return {
        "jobs": len(walls_s),
        **_percentiles_ms(overhead_ms),
        "mean_ms": round(mean_ms, 3),
        "engine_p50_ms": round(statistics.median(engine_s) * 1e3, 3),
        "input_jpeg_bytes": len(base64.b64decode(data_uri.split(",", 1)[1])),
        "input_data_uri_chars": len(data_uri),
        "output_jpeg_bytes": len(rig.engine.output.data),
        "image_px": [options.image_side_px, options.image_side_px],
        "engine_steps": options.engine_steps,
        "mean_breakdown_ms": _breakdown_ms(rig, len(walls_s), mean_ms),
    }


def _breakdown_ms(rig: _OverheadRig, jobs: int, mean_overhead_ms: float) -> dict[str, float]:
    """Mean time per job in each store and file-store method, in input loading, and the
    rest (threads, JSON, the runner's own Python)."""
    spent_s = {f"store.{name}": s for name, s in rig.store.spent_s.items()}
    spent_s |= {f"files.{name}": s for name, s in rig.files.spent_s.items()}
    spent_s["input_load (data URI + Pillow decode)"] = rig.runner.engine.input_load_s
    per_job_ms = {name: s * 1e3 / jobs for name, s in spent_s.items()}
    ordered = sorted(per_job_ms.items(), key=lambda item: -item[1])
    rest_ms = max(0.0, mean_overhead_ms - sum(per_job_ms.values()))
    return {name: round(ms, 3) for name, ms in [*ordered, ("rest", rest_ms)]}


# --- 3: queue position ----------------------------------------------------------------------------
def _sibling(name: str) -> ModuleType:
    """A module next to this file (benchmarks/ is a folder of scripts, not a package)."""
    module_name = f"kontext_benchmarks_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(
        module_name, Path(__file__).with_name(f"{name}.py")
    )
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def measure_queue_position(options: BenchOptions) -> dict[str, Any]:
    """``queue_position.run`` on a store of its own: a temporary SQLite file, or a fresh
    PostgreSQL database."""
    run_queue = _sibling("queue_position").run
    figures: dict[str, Any]
    if options.store is None:
        figures = run_queue(options.queued_jobs, options.queue_samples, options.folder)
    else:
        with fresh_database(options.store, "queue") as dsn:
            figures = run_queue(
                options.queued_jobs, options.queue_samples, store_kind="postgres", dsn=dsn
            )
    positions = figures["queue_position"]
    return {
        "queued_jobs": figures["queued_jobs"],
        "samples": figures["samples"],
        "positions": positions,
        "warmup": figures["warmup"],  # the calls before the timed ones (queue_position.py)
        "worst_p50_ms": max(p["p50_ms"] for p in positions.values()),
        "worst_p99_ms": max(p["p99_ms"] for p in positions.values()),
        "claim_deep_queue": figures["claim"],
        "claim_idle": figures["claim_idle"],
        "queue_depth": figures["queue_depth"],
        "store_submit_per_s": figures["submit_per_s"],
    }


# --- the whole run --------------------------------------------------------------------------------
def _verdicts(measured: dict[str, float]) -> list[dict[str, Any]]:
    verdicts = []
    for name, (comparison, threshold, unit, meaning) in TARGETS.items():
        value = measured[name]
        passed = value >= threshold if comparison == ">=" else value < threshold
        verdicts.append(
            {
                "metric": name,
                "meaning": meaning,
                "target": f"{comparison} {threshold:g} {unit}",
                "measured": round(value, 3),
                "passed": bool(passed),
            }
        )
    return verdicts


def _environment(options: BenchOptions) -> dict[str, Any]:
    environment: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "store": "sqlite" if options.store is None else "postgresql",
        "sqlite": sqlite3.sqlite_version,
        "machine": platform.machine(),
        "system": platform.system(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    if options.store is not None:
        environment["postgresql"] = _postgres_version(options.store)
    return environment


def run(options: BenchOptions | None = None) -> dict[str, Any]:
    """Every figure, the targets and pass/fail, as one JSON-ready dict."""
    options = options or BenchOptions()
    check_store_option(options.store)
    options = dataclasses.replace(options, store=store_of(options.store))
    started = time.perf_counter()
    environment = _environment(options)
    with tempfile.TemporaryDirectory(prefix="kontext-bench-api-", dir=options.folder) as temp:
        folder = Path(temp)
        bare = measure_bare(options, folder / "bare")
        kontext = measure_kontext(options, folder / "kontext")
        overhead = measure_job_overhead(options, folder / "overhead")
    queue = measure_queue_position(options)
    ratio = kontext["submit"]["requests_per_s"] / bare["submit"]["requests_per_s"]
    measured = {
        "submit_throughput_ratio": ratio,
        "status_p99_ms": kontext["status"]["p99_ms"],
        "queue_position_p99_ms": queue["worst_p99_ms"],
        "submit_to_running_p99_ms": kontext["submit_to_running"]["from_response"]["p99_ms"],
        "job_overhead_p50_ms": overhead["p50_ms"],
    }
    verdicts = _verdicts(measured)
    environment["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    return {
        "benchmark": "bench_api",
        "targets": verdicts,
        "all_targets_met": all(v["passed"] for v in verdicts),
        "submit_throughput": {
            "clients": options.clients,
            "max_queued_per_key": MAX_QUEUED_PER_KEY,
            "kontext": kontext["submit"],
            "bare_fastapi": bare["submit"],
            "ratio": round(ratio, 3),
        },
        "status_latency": {
            "pollers": options.pollers,
            "poll_interval_s": options.poll_interval_s,
            "kontext": kontext["status"],
            "bare_fastapi": bare["status"],
            "saturated_no_pause": {
                "kontext": kontext["status_saturated"],
                "bare_fastapi": bare["status_saturated"],
            },
        },
        "queue_position": queue,
        "submit_to_running": kontext["submit_to_running"],
        "job_overhead": overhead,
        "options": _described_options(options),
        "environment": environment,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


def run_stores(options: BenchOptions, stores: list[str | None]) -> dict[str, Any]:
    """``run`` once per store (``None``: SQLite), one after the other, and the figures side
    by side: for each target, each store's measured value and verdict. Each store's run
    keeps its own JSON (``stores``), load averages at its start and end included."""
    started = time.perf_counter()
    load_before = round(os.getloadavg()[0], 2)
    runs = []
    for store in stores:
        runs.append(run(dataclasses.replace(options, store=store)))
    names = [r["environment"]["store"] for r in runs]
    side_by_side = [
        {
            "metric": verdict["metric"],
            "target": verdict["target"],
            **{
                name: {"measured": r["targets"][i]["measured"], "passed": r["targets"][i]["passed"]}
                for name, r in zip(names, runs, strict=True)
            },
        }
        for i, verdict in enumerate(runs[0]["targets"])
    ]
    return {
        "benchmark": "bench_api",
        "stores": dict(zip(names, runs, strict=True)) if len(set(names)) == len(names) else runs,
        "side_by_side": side_by_side,
        "all_targets_met": all(r["all_targets_met"] for r in runs),
        "environment": {
            "load_average_1m": load_before,
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


def _described_options(options: BenchOptions) -> dict[str, Any]:
    described = {
        k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(options).items()
    }
    if options.store is not None:
        described["store"] = _redacted(options.store)
    return described


# --- command line ---------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    defaults = BenchOptions()
    for option in dataclasses.fields(BenchOptions):
        if option.name in ("folder", "store"):
            continue
        default = getattr(defaults, option.name)
        parser.add_argument(
            f"--{option.name.replace('_', '-')}", type=type(default), default=default
        )
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary folders go")
    parser.add_argument(
        "--store",
        action="append",
        default=None,
        metavar="URL",
        help="a PostgreSQL server (postgresql://...): a fresh database per phase, or 'sqlite'"
        " (the default): SQLite files in the temporary folder. Give it more than once to run"
        " each store in turn and report them side by side",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        serve_child(argv[1], Path(argv[2]))
        return 0
    if argv[:1] == ["worker"]:
        worker_child(Path(argv[1]))
        return 0
    args = vars(_parser().parse_args(argv))
    strict, folder, stores = args.pop("strict"), args.pop("dir"), args.pop("store") or [None]
    try:
        for store in stores:
            check_store_option(store)
    except ConfigError as error:
        _parser().error(str(error))
    options = BenchOptions(**args, folder=folder)
    if len(stores) == 1:
        figures = run(dataclasses.replace(options, store=store_of(stores[0])))
    else:
        figures = run_stores(options, [store_of(store) for store in stores])
    print(json.dumps(figures, indent=2))
    return 1 if strict and not figures["all_targets_met"] else 0


if __name__ == "__main__":
    sys.exit(main())
