"""``kontext-server bench``: the engine's speed per preset and memory mode, as JSON; with
``--compare`` each entry in a fresh child process and a table with the deviation from ``none``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kontext_server.cli._app import app
from kontext_server.cli.common import AccelerationOpt, MemoryOpt, configure_logging, load_settings

__all__ = ["bench"]


@app.command()
def bench(
    model: Annotated[
        str,
        typer.Option(help="tiny | dummy-full | HF id | diffusers folder | .safetensors | .gguf"),
    ] = "tiny",
    size: Annotated[int, typer.Option(min=16, help="Reference and output side in pixels.")] = 1024,
    steps: Annotated[int, typer.Option(min=1)] = 28,
    runs: Annotated[int, typer.Option(min=1, help="Timed edits (>= 3 with --compare).")] = 3,
    warmup: Annotated[
        int, typer.Option(min=0, help="Untimed edits after the first (timed) edit.")
    ] = 0,
    device: Annotated[str | None, typer.Option(help="cuda, cuda:1, cpu (default: auto)")] = None,
    config_dir: Annotated[
        Path | None, typer.Option(help="Diffusers folder for a .safetensors/.gguf model.")
    ] = None,
    acceleration: AccelerationOpt = None,
    memory: MemoryOpt = None,
    cache_threshold: Annotated[
        float | None, typer.Option(help="Step cache threshold (cache presets), in (0, 1].")
    ] = None,
    memory_limit_gb: Annotated[
        float | None,
        typer.Option(
            help="CUDA only: cap this process at G GiB after loading (emulates a smaller GPU)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for the JSON, the deviation's latents and image, the table."),
    ] = None,
    compile_cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Compiled kernels (default: OUT/<entry>/compile-cache, else a temp dir)."
        ),
    ] = None,
    compare: Annotated[
        str | None,
        typer.Option(
            help="Entries, each in a fresh process: preset or preset@memory, comma-separated, "
            "e.g. none,compile,cache,none@model-offload (needs --out)."
        ),
    ] = None,
    entry_timeout_s: Annotated[
        float, typer.Option(min=1, help="--compare: seconds an entry may run.")
    ] = 600.0,
) -> None:
    """Load MODEL with a preset and memory mode and time the first edit and RUNS edits of
    one SIZE x SIZE reference; print JSON. With --compare, a table of the entries."""
    settings = load_settings(
        model=model,
        device=device,
        model_config_dir=config_dir,
        acceleration=acceleration,
        memory=memory,
        cache_threshold=cache_threshold,
    )
    configure_logging(settings)
    from kontext_server.domain.errors import KontextError
    from kontext_server.worker.bench import (  # imports torch
        BenchOptions,
        parse_entries,
        run_bench,
        run_compare,
    )

    options = BenchOptions(
        model=settings.model,
        size_px=size,
        steps=steps,
        runs=runs,
        warmup=warmup,
        device=settings.device,
        config_dir=settings.model_config_dir,
        allow_download=settings.allow_download,
        acceleration=settings.acceleration,
        memory=settings.memory,
        cache_threshold=settings.cache_threshold,
        memory_limit_gb=memory_limit_gb,
        out_dir=out,
        compile_cache_dir=compile_cache_dir,
        seed=seed,
    )
    if compare is not None:
        if out is None:
            raise typer.BadParameter("--compare needs --out DIR", param_hint="--out")
        try:
            entries = parse_entries(compare)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--compare") from exc
        if runs < 3:
            raise typer.BadParameter("--compare needs --runs >= 3", param_hint="--runs")
        summary = run_compare(options, entries, out, entry_timeout_s, echo=typer.echo)
        if any(record.get("status") != "ok" for record in summary["entries"]):
            raise typer.Exit(code=2)
        return
    try:
        numbers = run_bench(options)
    except (KontextError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    text = json.dumps(numbers, indent=2)
    if out is not None:
        from kontext_server.worker.bench import slug

        (out / f"{slug(options.name)}.json").write_text(text + "\n")
    typer.echo(text)
