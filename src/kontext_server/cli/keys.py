"""``kontext-server keys create|list|revoke``: the API keys of this server.

Keys are stored hashed; ``create`` prints the full key once. While at least one key is active,
every API call must send ``Authorization: Key <key>`` (or ``Bearer <key>``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated

import typer

from kontext_server.cli._app import app
from kontext_server.cli.common import DataDirOpt, StoreOpt, load_settings
from kontext_server.store.base import JobStore

__all__ = ["keys_app"]

keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@contextmanager
def _opened_store(data_dir: DataDirOpt, store: StoreOpt) -> Iterator[JobStore]:
    from kontext_server.store import open_store

    settings = load_settings(data_dir=data_dir, store=store)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    job_store = open_store(settings.store_url())
    try:
        yield job_store
    finally:
        job_store.close()


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", help="A label, e.g. who uses the key.")],
    data_dir: DataDirOpt = None,
    store: StoreOpt = None,
) -> None:
    """Create a key and print it (once: only its hash is kept)."""
    from kontext_server.core.auth import create_api_key

    with _opened_store(data_dir, store) as job_store:
        api_key, key = create_api_key(job_store, name)
    typer.echo(key)
    typer.echo(
        f"Created key {api_key.id} ({name}). Store it now: it cannot be shown again. "
        "Clients send it as 'Authorization: Key <key>'.",
        err=True,
    )


@keys_app.command("list")
def list_keys(data_dir: DataDirOpt = None, store: StoreOpt = None) -> None:
    """List keys: id, name, created, revoked (never the keys themselves)."""
    with _opened_store(data_dir, store) as job_store:
        api_keys = job_store.list_api_keys()
    if not api_keys:
        typer.echo("No API keys: authentication is off (loopback clients only).", err=True)
    for api_key in api_keys:
        revoked = _when(api_key.revoked_at) if api_key.revoked_at else "active"
        typer.echo(f"{api_key.id}\t{api_key.name}\t{_when(api_key.created_at)}\t{revoked}")


@keys_app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (the part before ':').")],
    data_dir: DataDirOpt = None,
    store: StoreOpt = None,
) -> None:
    """Revoke a key: calls with it are refused from now on."""
    with _opened_store(data_dir, store) as job_store:
        revoked = job_store.revoke_api_key(key_id.partition(":")[0])
    if not revoked:
        typer.echo(f"No active key with id {key_id!r} (see `kontext-server keys list`).", err=True)
        raise typer.Exit(1)
    typer.echo(f"Revoked key {key_id}.")


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
