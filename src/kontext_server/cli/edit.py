"""``kontext-server edit``: one edit in this process, a progress bar, a JSON summary."""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kontext_server.cli._app import app
from kontext_server.cli.client import (
    DEFAULT_ENDPOINT,
    EndpointOpt,
    JsonOpt,
    KeyOpt,
    ServerOpt,
    SpecFields,
    edit_remotely,
)
from kontext_server.cli.common import ModelOpt, configure_logging, load_settings
from kontext_server.domain.editing import DEFAULT_GUIDANCE_SCALE, EditRequest, EditResult
from kontext_server.domain.errors import InputError, KontextError

if TYPE_CHECKING:
    from PIL import Image

    from kontext_server.config import Settings

__all__ = ["edit", "read_image_source"]


class OutputFormatChoice(enum.StrEnum):
    jpeg = "jpeg"
    png = "png"


DeviceOpt = Annotated[str | None, typer.Option(help="cuda, cuda:1, cpu (default: auto)")]


@app.command()
def edit(
    image: Annotated[
        list[str],
        typer.Option(
            "--image",
            help="Reference image: a file, an http(s) URL or a data: URI. "
            "Repeat for several references.",
        ),
    ],
    prompt: Annotated[str, typer.Option(help="What to change.")],
    out: Annotated[Path, typer.Option(help="Folder for the output images (created).")],
    model: ModelOpt = None,
    seed: Annotated[int | None, typer.Option(help="Default: drawn and printed.")] = None,
    guidance_scale: Annotated[float, typer.Option()] = DEFAULT_GUIDANCE_SCALE,
    num_images: Annotated[int, typer.Option(min=1, max=4)] = 1,
    aspect_ratio: Annotated[str | None, typer.Option(help="W:H, 21:9 to 9:21")] = None,
    steps: Annotated[int | None, typer.Option(help="Default: 28 (4 for tiny).")] = None,
    output_format: Annotated[OutputFormatChoice, typer.Option()] = OutputFormatChoice.jpeg,
    device: DeviceOpt = None,
    config_dir: Annotated[
        Path | None, typer.Option(help="Diffusers folder for a .safetensors/.gguf model.")
    ] = None,
    server: ServerOpt = None,
    key: KeyOpt = None,
    endpoint: EndpointOpt = DEFAULT_ENDPOINT,
    safety_tolerance: Annotated[str | None, typer.Option(help="With --server: 1 to 6")] = None,
    enhance_prompt: Annotated[bool | None, typer.Option(help="With --server.")] = None,
    json_output: JsonOpt = False,
) -> None:
    """Edit IMAGE(s) with PROMPT; write the images to OUT and print a JSON summary.

    With --server the edit runs on that server instead: local files are uploaded, the
    progress is shown, and the summary is printed with --json."""
    if server is not None:
        fields = SpecFields(
            prompt, image, seed, guidance_scale, num_images, aspect_ratio,
            output_format.value, safety_tolerance, enhance_prompt, None, steps,
        )  # fmt: skip
        edit_remotely(server, key, endpoint, fields, out, as_json=json_output)
        return
    settings = load_settings(model=model, device=device, model_config_dir=config_dir)
    configure_logging(settings)
    try:
        request = EditRequest(
            prompt=prompt,
            images=[read_image_source(source, settings) for source in image],
            seed=seed,
            guidance_scale=guidance_scale,
            num_images=num_images,
            aspect_ratio=aspect_ratio,
            num_inference_steps=steps,
            output_format=output_format.value,
        )
        result = _run(settings, request)
    except KontextError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(json.dumps(_write_outputs(result, out, settings.model), indent=2))


def read_image_source(source: str, settings: Settings) -> Image.Image:
    """Decode an image named by a file path, an http(s) URL or a ``data:`` URI (URLs go
    through the SSRF-safe fetcher with the operator's settings). Raises ``InputError``."""
    from kontext_server.worker import imaging

    if source.startswith(("http://", "https://", "data:")):
        from kontext_server.net.fetch import SafeFetcher, load_image_bytes

        fetcher = SafeFetcher(
            allow_hosts=settings.fetch_allow_hosts,
            allow_ports=settings.fetch_allow_ports,
            timeout_s=settings.fetch_timeout_s,
            max_bytes=settings.max_image_bytes,
        )
        data = load_image_bytes(source, fetcher, max_bytes=settings.max_image_bytes)
    else:
        data = _read_file(Path(source), settings.max_image_bytes)
    return imaging.decode_image(data, max_pixels=settings.max_image_pixels)


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InputError(f"{path} is {size:,} bytes; at most {max_bytes:,} are allowed")
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read image file {path}: {exc.strerror or exc}") from exc


def _run(settings: Settings, request: EditRequest) -> EditResult:
    """Load the model and run ``request`` with a progress bar on stderr."""
    from tqdm import tqdm

    from kontext_server.worker.pipeline import KontextPipeline  # torch lives behind this line

    engine = KontextPipeline.from_settings(settings)
    total = (request.num_inference_steps or engine.default_steps) * request.num_images
    try:
        with tqdm(total=total, file=sys.stderr, desc="denoising", unit="step") as bar:
            return engine.edit(request, on_step=lambda step, _total: bar.update(step - bar.n))
    finally:
        engine.close()


def _write_outputs(result: EditResult, out: Path, model: str) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for index, image in enumerate(result.images):
        path = out / f"edit-{result.seed}-{index}.{image.extension}"
        path.write_bytes(image.data)
        files.append(
            {
                "path": str(path),
                "width": image.width,
                "height": image.height,
                "content_type": image.content_type,
                "bytes": len(image.data),
            }
        )
    return {
        "model": model,
        "random_weights": result.random_weights,
        "seed": result.seed,
        "files": files,
        "timings": result.timings,
    }
