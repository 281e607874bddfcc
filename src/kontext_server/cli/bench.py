"""``kontext-server bench``: per-step and end-to-end speed of the engine, as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kontext_server.cli._app import app
from kontext_server.cli.common import configure_logging, load_settings

__all__ = ["bench"]


@app.command()
def bench(
    model: Annotated[
        str,
        typer.Option(help="tiny | dummy-full | HF id | diffusers folder | .safetensors | .gguf"),
    ] = "tiny",
    size: Annotated[int, typer.Option(min=16, help="Reference and output side in pixels.")] = 1024,
    steps: Annotated[int, typer.Option(min=1)] = 28,
    runs: Annotated[int, typer.Option(min=1)] = 5,
    warmup: Annotated[int, typer.Option(min=0)] = 1,
    device: Annotated[str | None, typer.Option(help="cuda, cuda:1, cpu (default: auto)")] = None,
    config_dir: Annotated[
        Path | None, typer.Option(help="Diffusers folder for a .safetensors/.gguf model.")
    ] = None,
) -> None:
    """Load MODEL and time RUNS edits of one SIZE x SIZE reference; print JSON."""
    settings = load_settings(model=model, device=device, model_config_dir=config_dir)
    configure_logging(settings)
    from kontext_server.errors import KontextError
    from kontext_server.worker.bench import BenchOptions, run_bench  # imports torch

    options = BenchOptions(
        model=settings.model,
        size_px=size,
        steps=steps,
        runs=runs,
        warmup=warmup,
        device=settings.device,
        config_dir=settings.model_config_dir,
        allow_download=settings.allow_download,
    )
    try:
        numbers = run_bench(options)
    except KontextError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(json.dumps(numbers, indent=2))
