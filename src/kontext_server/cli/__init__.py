"""Composition root: reads Settings, builds stores, starts the API and the workers.

Command modules import heavy dependencies (torch, uvicorn) inside their functions, so that
``kontext-server --help`` is fast and the API process never imports torch.
"""

from __future__ import annotations

import importlib

from kontext_server.cli._app import app

__all__ = ["app", "main"]

_COMMAND_MODULES = ("edit", "bench", "bench_api", "serve", "worker", "keys", "client")
for _name in _COMMAND_MODULES:
    try:
        importlib.import_module(f"kontext_server.cli.{_name}")
    except ModuleNotFoundError as exc:  # a command module not written yet
        if exc.name != f"kontext_server.cli.{_name}":
            raise


def main() -> None:
    app()
