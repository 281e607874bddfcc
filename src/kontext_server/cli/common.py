"""Options shared by the commands that open stores (serve, worker, keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from kontext_server.config import Settings

__all__ = [
    "AccelerationOpt",
    "DataDirOpt",
    "FilesOpt",
    "MemoryOpt",
    "ModelOpt",
    "StoreOpt",
    "configure_logging",
    "load_settings",
]

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

AccelerationOpt = Annotated[
    str | None,
    typer.Option(
        "--acceleration",
        help="Engine speed preset: none | compile | fp8 | cache | fp8-cache"
        " (default none; env KONTEXT_ACCELERATION).",
    ),
]
MemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--memory",
        help="Where the weights live: resident | fp8-storage | nf4 | model-offload |"
        " group-offload, or storage+offload (default resident; env KONTEXT_MEMORY).",
    ),
]


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (KONTEXT_*), with the non-None CLI flags on top. A bad
    value is a usage error (exit 2) that names the setting and what it allows."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()
        )
        raise typer.BadParameter(problems) from exc


def configure_logging(settings: Settings) -> None:
    from kontext_server.logs import configure_logging as configure

    configure(settings.log_level, settings.log_format)
