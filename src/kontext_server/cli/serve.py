"""``kontext-server serve``: the HTTP API plus the worker processes it starts and watches."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kontext_server.cli._app import app
from kontext_server.cli.common import (
    AccelerationOpt,
    DataDirOpt,
    FilesOpt,
    MemoryOpt,
    ModelOpt,
    StoreOpt,
    configure_logging,
    load_settings,
)
from kontext_server.config import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from kontext_server.cli.supervisor import WorkerSpec
    from kontext_server.store.base import JobStore

log = logging.getLogger(__name__)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def worker_argv(settings: Settings) -> list[str]:
    """The flags a worker needs to reach the same stores and model as this server."""
    argv = [
        "--store",
        settings.store_url(),
        "--files",
        settings.files_url(),
        "--model",
        settings.model,
        "--data-dir",
        str(settings.data_dir),
        "--acceleration",
        settings.acceleration,
        "--memory",
        settings.memory,
    ]
    if settings.device:
        argv += ["--device", settings.device]
    return argv


def worker_env(settings: Settings, count: int) -> dict[str, str]:
    """Settings the workers get beyond their flags. Input prefetch is off by default when
    several workers share the queue: each busy worker peeks the same queue head, which
    another worker then claims (measured: ~1.8 image fetches per job, no time saved;
    docs/performance.md). An operator's own ``KONTEXT_PREFETCH_JOBS`` is kept."""
    if count > 1 and "prefetch_jobs" not in settings.model_fields_set:
        return {"KONTEXT_PREFETCH_JOBS": "0"}
    return {}


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind [default: 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind [default: 8000].")] = None,
    root_path: Annotated[
        str | None,
        typer.Option(help="Path prefix a reverse proxy serves this under, e.g. /kontext."),
    ] = None,
    model: ModelOpt = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (default: one per GPU, 1 on CPU).")
    ] = None,
    store: StoreOpt = None,
    files: FilesOpt = None,
    data_dir: DataDirOpt = None,
    device: Annotated[str | None, typer.Option(help="Worker device: cuda, cpu, ...")] = None,
    acceleration: AccelerationOpt = None,
    memory: MemoryOpt = None,
    ssl_certfile: Annotated[
        str | None, typer.Option(help="Serve HTTPS with this PEM certificate (chain).")
    ] = None,
    ssl_keyfile: Annotated[str | None, typer.Option(help="Private key of --ssl-certfile.")] = None,
    insecure_no_auth: Annotated[
        bool,
        typer.Option(
            "--insecure-no-auth", help="Allow a non-loopback bind with no API key configured."
        ),
    ] = False,
) -> None:
    """Serve fal's queue API for FLUX.1 Kontext, with worker processes running the edits."""
    settings = load_settings(
        host=host,
        port=port,
        root_path=root_path,
        model=model,
        workers=workers,
        store=store,
        files=files,
        data_dir=data_dir,
        device=device,
        acceleration=acceleration,
        memory=memory,
        insecure_no_auth=insecure_no_auth or None,
    )
    configure_logging(settings)
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise typer.BadParameter("--ssl-certfile and --ssl-keyfile go together")
    run_server(settings, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)


def run_server(
    settings: Settings, *, ssl_certfile: str | None = None, ssl_keyfile: str | None = None
) -> None:
    from kontext_server.metrics import prepare_multiprocess_dir

    # before anything imports prometheus_client: this process and its workers share samples
    metrics_dir = settings.data_dir / "metrics"
    prepare_multiprocess_dir(metrics_dir)

    from kontext_server.files import open_file_store
    from kontext_server.http.app import build_app
    from kontext_server.http.services import ApiServices

    store = _open_store(settings)  # creates the schema before any worker starts
    files = open_file_store(settings.files_url(), settings)
    services = ApiServices.build(settings, store, files)
    workers = _Workers(settings, metrics_dir)
    api = build_app(
        services,
        metrics_dir=metrics_dir,
        readiness_checks=[workers.readiness],
        shutdown_hooks=[workers.stop],
        freeze_heap=True,
    )
    workers.start()
    log.info(
        "serving on %s://%s:%d with %d worker(s); requests queue until a worker has loaded "
        "the model and logged 'worker ... ready'",
        "https" if ssl_certfile else "http",
        settings.host,
        settings.port,
        workers.count,
    )
    try:
        _run_uvicorn(api, settings, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    finally:
        workers.stop()  # idempotent: also reached when uvicorn returns normally (Ctrl-C)
        store.close()


def _open_store(settings: Settings) -> JobStore:
    """The configured job store, its schema created; refuses a non-loopback bind with no API
    key unless ``insecure_no_auth``."""
    from kontext_server.http.app import tune_threads_for
    from kontext_server.store import open_configured_store

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_configured_store(settings)
    tune_threads_for(store)
    if not is_loopback_host(settings.host) and not store.has_api_keys():
        if not settings.insecure_no_auth:
            raise typer.BadParameter(
                f"refusing to serve on {settings.host} with no API key: anyone could use "
                "this server. Create a key with `kontext-server keys create --name NAME`, bind "
                "127.0.0.1, or pass --insecure-no-auth.",
                param_hint="--host",
            )
        log.warning("serving on %s with authentication OFF (--insecure-no-auth)", settings.host)
    return store


def _worker_specs(settings: Settings) -> tuple[list[WorkerSpec], int]:
    """The worker processes to start, and how many of them run the model locally."""
    from kontext_server.cli.supervisor import visible_gpus, worker_specs

    gpus = visible_gpus(os.environ)
    count = settings.workers if settings.workers is not None else max(1, len(gpus))
    specs = worker_specs(count, gpus, worker_argv(settings))
    for spec in specs:
        spec.env.update(worker_env(settings, count))
    if count and "bfl" in settings.engines.values():
        # endpoints routed upstream need no GPU: one BFL worker holds many tasks in flight
        [bfl] = worker_specs(1, [], [*worker_argv(settings), "--engine", "bfl"])
        bfl.engine = "bfl"
        specs.append(bfl)
    return specs, count


class _Workers:
    """This node's worker processes under a ``WorkerSupervisor``, and whether one is ready
    (a ``/readyz`` check). ``stop`` is idempotent."""

    def __init__(self, settings: Settings, metrics_dir: Path) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        from kontext_server.cli.supervisor import WorkerSupervisor
        from kontext_server.worker.state import WorkerStates

        self._settings = settings
        self._metrics_dir = metrics_dir
        self._mark_process_dead = mark_process_dead
        specs, self.count = _worker_specs(settings)
        self._states = WorkerStates(settings.data_dir / "workers")
        self._states.clear()  # files of an earlier run (a killed serve) would speak for reused pids
        self._start_failure: str | None = None  # why the last worker that gave up could not start
        self._supervisor = WorkerSupervisor(specs, on_exit=self._ended)

    def start(self) -> None:
        self._supervisor.start()

    def stop(self) -> None:
        self._supervisor.stop(timeout_s=self._settings.drain_timeout_s + 15)

    def readiness(self) -> str | None:
        """Ready once a model worker has loaded (and compiled) its model."""
        if not self.count:
            return None
        pids = self._supervisor.pids_of("local")
        problem = (
            self._states.readiness(pids)
            if pids
            else f"none of the {self.count} worker process(es) is running"
        )
        if problem and self._start_failure is not None:
            problem += f"; the last worker that exited could not start: {self._start_failure}"
        return problem

    def _ended(self, pid: int) -> None:
        self._mark_process_dead(pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]
        state = self._states.read(pid)
        if state is not None and state.state == "failed":
            self._start_failure = state.detail
        self._states.remove(pid)


def _run_uvicorn(
    api: FastAPI, settings: Settings, *, ssl_certfile: str | None, ssl_keyfile: str | None
) -> None:
    import uvicorn

    uvicorn.run(
        api,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # keep our handlers (text or JSON, with request ids)
        access_log=False,  # the access log middleware writes one line per request
        timeout_graceful_shutdown=5,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        root_path=settings.root_path,
    )
