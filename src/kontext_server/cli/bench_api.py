"""``kontext-server bench-api``: the API and queue benchmark (``benchmarks/bench_api.py``).

The benchmark is a script of the source tree, not part of the installed package: this
command finds it next to ``src/`` (an editable install or a checkout) and runs it in this
process; it starts the servers under test as child processes of its own.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer

from kontext_server.cli._app import app
from kontext_server.domain.errors import ConfigError

__all__ = ["bench_api", "find_benchmark"]

_SCRIPT = Path("benchmarks") / "bench_api.py"
_MODULE_NAME = "kontext_benchmarks_bench_api"


def find_benchmark() -> Path:
    """``benchmarks/bench_api.py`` of the checkout this package was installed from."""
    import kontext_server

    checkout = Path(kontext_server.__file__).resolve().parents[2]  # src/kontext_server/..
    script = checkout / _SCRIPT
    if not script.is_file():
        raise typer.BadParameter(
            f"{script} not found: bench-api runs the benchmark of a source checkout; "
            "clone the repository and install it with `pip install -e .`"
        )
    return script


def _load(script: Path) -> ModuleType:
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, script)
    if spec is None or spec.loader is None:
        raise typer.BadParameter(f"cannot load {script} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


@app.command("bench-api")
def bench_api(
    clients: Annotated[int, typer.Option(min=1, help="Concurrent submitters.")] = 16,
    duration_s: Annotated[float, typer.Option(min=0.1, help="Seconds per load phase.")] = 5.0,
    warmup_s: Annotated[float, typer.Option(min=0.0, help="Warm-up per load phase.")] = 1.0,
    pollers: Annotated[int, typer.Option(min=1, help="Concurrent status pollers.")] = 50,
    poll_interval_s: Annotated[
        float, typer.Option(min=0.0, help="Pause of each poller (fal_client: 0.1).")
    ] = 0.1,
    running_jobs: Annotated[
        int, typer.Option(min=0, help="Of the polled requests, how many are running.")
    ] = 10,
    queued_jobs: Annotated[
        int, typer.Option(min=2, help="Queue length for the queue-position figure.")
    ] = 100_000,
    queue_samples: Annotated[int, typer.Option(min=2)] = 200,
    start_samples: Annotated[int, typer.Option(min=1, help="Submit -> running samples.")] = 30,
    overhead_jobs: Annotated[int, typer.Option(min=1, help="Jobs for the overhead figure.")] = 30,
    image_side_px: Annotated[int, typer.Option(min=16, help="Side of the overhead JPEGs.")] = 1024,
    folder: Annotated[
        Path | None, typer.Option("--dir", help="Where the temporary folders go.")
    ] = None,
    store: Annotated[
        list[str] | None,
        typer.Option(
            "--store",
            metavar="URL",
            help="A PostgreSQL server (postgresql://...): each phase gets a fresh database"
            " on it, dropped afterwards; or 'sqlite' (the default): SQLite files in the"
            " temporary folder. Give it once per store to run each in turn and report"
            " them side by side.",
        ),
    ] = None,
    strict: Annotated[bool, typer.Option(help="Exit 1 when a target is missed.")] = False,
) -> None:
    """Measure the API and the queue on loopback; print every figure as JSON."""
    module = _load(find_benchmark())
    stores: list[str | None] = list(store) if store else [None]
    try:
        for one in stores:
            module.check_store_option(one)
    except ConfigError as error:
        raise typer.BadParameter(str(error), param_hint="--store") from error
    options = module.BenchOptions(
        clients=clients,
        duration_s=duration_s,
        warmup_s=warmup_s,
        pollers=pollers,
        poll_interval_s=poll_interval_s,
        running_jobs=running_jobs,
        queued_jobs=queued_jobs,
        queue_samples=queue_samples,
        start_samples=start_samples,
        overhead_jobs=overhead_jobs,
        image_side_px=image_side_px,
        folder=folder,
    )
    figures: dict[str, Any]
    if len(stores) == 1:
        figures = module.run(dataclasses.replace(options, store=stores[0]))
    else:
        figures = module.run_stores(options, [module.store_of(one) for one in stores])
    typer.echo(json.dumps(figures, indent=2))
    if strict and not figures["all_targets_met"]:
        raise typer.Exit(code=1)
