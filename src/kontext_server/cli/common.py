"""Options shared by the commands that open stores (serve, worker, keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kontext_server.config import Settings

__all__ = ["DataDirOpt", "FilesOpt", "ModelOpt", "StoreOpt", "configure_logging", "load_settings"]

DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Folder for the job DB, files and keys.")
]
StoreOpt = Annotated[
    str | None, typer.Option("--store", help="Job store URL, e.g. sqlite:///path/jobs.db")
]
FilesOpt = Annotated[
    str | None, typer.Option("--files", help="File store URL, e.g. file:///path/files")
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", help="tiny | dummy-full | HF id | diffusers folder | .safetensors | .gguf"
    ),
]


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (KONTEXT_*), with the non-None CLI flags on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def configure_logging(settings: Settings) -> None:
    from kontext_server.logs import configure_logging as configure

    configure(settings.log_level, settings.log_format)
