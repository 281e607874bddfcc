"""``kontext-server worker``: one GPU worker process (started by ``serve`` or by hand)."""

from __future__ import annotations

from typing import Annotated

import typer

from kontext_server.cli._app import app
from kontext_server.cli.common import (
    DataDirOpt,
    FilesOpt,
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
) -> None:
    """Claim jobs from the store and run them on this machine's GPU (or CPU)."""
    settings = load_settings(
        data_dir=data_dir, store=store, files=files, model=model, device=device
    )
    configure_logging(settings)
    from kontext_server.worker.main import run_worker

    run_worker(settings, worker_id)
