"""The root Typer app; each command lives in its own module under ``cli/``."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="kontext-server",
    help="Self-hosted FLUX.1 Kontext image editing that speaks fal.ai's queue API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
