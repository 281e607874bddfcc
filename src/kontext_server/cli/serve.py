"""``kontext-server serve``: the HTTP API plus the worker processes it starts and watches."""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import Annotated

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
    import uvicorn

    from kontext_server.metrics import prepare_multiprocess_dir

    # before anything imports prometheus_client: this process and its workers share samples
    metrics_dir = settings.data_dir / "metrics"
    prepare_multiprocess_dir(metrics_dir)

    from prometheus_client.multiprocess import mark_process_dead

    from kontext_server.cli.supervisor import WorkerSupervisor, visible_gpus, worker_specs
    from kontext_server.files import open_file_store
    from kontext_server.http.app import create_app, tune_threads_for
    from kontext_server.store import open_configured_store
    from kontext_server.webhooks.signing import WebhookSigner
    from kontext_server.worker.state import WorkerStates

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_configured_store(settings)  # creates the schema before any worker starts
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
    files = open_file_store(settings.files_url(), settings)
    signer = WebhookSigner.load_or_create(settings.data_dir / "webhook-ed25519.pem")
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
    states = WorkerStates(settings.data_dir / "workers")
    states.clear()  # files of an earlier run (a killed serve) would speak for reused pids
    start_failure: list[str] = []  # why the last worker that gave up could not start

    def worker_ended(pid: int) -> None:
        mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]
        state = states.read(pid)
        if state is not None and state.state == "failed":
            start_failure[:] = [state.detail]
        states.remove(pid)

    supervisor = WorkerSupervisor(specs, on_exit=worker_ended)

    def stop_workers() -> None:
        supervisor.stop(timeout_s=settings.drain_timeout_s + 15)

    def a_worker_is_ready() -> str | None:
        """Ready once a model worker has loaded (and compiled) its model."""
        if not count:
            return None
        pids = supervisor.pids_of("local")
        problem = (
            states.readiness(pids) if pids else f"none of the {count} worker process(es) is running"
        )
        if problem and start_failure:
            problem += f"; the last worker that exited could not start: {start_failure[0]}"
        return problem

    api = create_app(
        settings,
        store,
        files,
        signer=signer,
        metrics_dir=metrics_dir,
        readiness_checks=[a_worker_is_ready],
        shutdown_hooks=[stop_workers],
        freeze_heap=True,
    )
    supervisor.start()
    scheme = "https" if ssl_certfile else "http"
    log.info(
        "serving on %s://%s:%d with %d worker(s); requests queue until a worker has loaded "
        "the model and logged 'worker ... ready'",
        scheme,
        settings.host,
        settings.port,
        count,
    )
    try:
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
    finally:
        stop_workers()  # idempotent: also reached when uvicorn returns normally (Ctrl-C)
        store.close()
