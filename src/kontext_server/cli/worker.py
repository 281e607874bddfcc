"""``kontext-server worker``: one GPU worker process (started by ``serve`` or by hand), or
with ``--engine bfl`` one process that runs the jobs routed to Black Forest Labs' API."""

from __future__ import annotations

from typing import Annotated, Literal

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


@app.command()
def worker(
    data_dir: DataDirOpt = None,
    store: StoreOpt = None,
    files: FilesOpt = None,
    model: ModelOpt = None,
    device: Annotated[str | None, typer.Option(help="cuda, cuda:1, cpu (default: auto)")] = None,
    worker_id: Annotated[str | None, typer.Option(help="Name in leases and logs.")] = None,
    acceleration: AccelerationOpt = None,
    memory: MemoryOpt = None,
    engine: Annotated[
        Literal["local", "bfl"],
        typer.Option(
            help="local: run edits on this machine's GPU (or CPU). bfl: run the jobs that"
            " KONTEXT_ENGINES routes to Black Forest Labs' API (no GPU; needs"
            " KONTEXT_BFL_API_KEY)."
        ),
    ] = "local",
) -> None:
    """Claim jobs from the store and run them on this machine's GPU (or CPU), or upstream."""
    settings = load_settings(
        data_dir=data_dir,
        store=store,
        files=files,
        model=model,
        device=device,
        acceleration=acceleration,
        memory=memory,
    )
    configure_logging(settings)
    if engine == "bfl":
        from kontext_server.worker.bfl import run_bfl_worker  # torch-free

        run_bfl_worker(settings, worker_id)
        return
    from kontext_server.worker.main import run_worker

    run_worker(settings, worker_id)
