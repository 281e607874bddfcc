"""``kontext-server submit | status | result | cancel`` and ``edit --server``: a client of a
running server, over plain HTTP (httpx) and the fal queue API (PROTOCOL.md).

Local image files are uploaded through the server's storage endpoints (§10) first; URLs and
``data:`` URIs are passed through. ``edit`` waits on the status stream (§5) with a progress
bar on stderr, from the queue position to step i/N, then downloads the images. Every command
prints something a human reads, or JSON with ``--json``. Exit status 1 means the server
refused or the request failed (the message says why).
"""

from __future__ import annotations

import base64
import json
import mimetypes
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from kontext_server.cli._app import app

__all__ = [
    "DEFAULT_ENDPOINT",
    "EndpointOpt",
    "JsonOpt",
    "KeyOpt",
    "RemoteError",
    "RemoteServer",
    "ServerOpt",
    "SpecFields",
    "cancel",
    "edit_remotely",
    "result",
    "status",
    "submit",
]

DEFAULT_ENDPOINT = "fal-ai/flux-pro/kontext/max"
_TIMEOUT_S = 60.0
_STREAM_READ_TIMEOUT_S = 60.0  # the server sends a keepalive every 15 s
_POLL_S = 0.5
_EXTENSIONS = {"image/jpeg": "jpeg", "image/png": "png", "image/webp": "webp"}

ServerOpt = Annotated[
    str | None,
    typer.Option(
        "--server",
        help="Base URL of a running kontext-server (e.g. http://127.0.0.1:8000). "
        "With it, `edit` runs there instead of in this process.",
    ),
]
KeyOpt = Annotated[
    str | None,
    typer.Option("--key", envvar="KONTEXT_API_KEY", help="API key, sent as 'Key <key>'."),
]
EndpointOpt = Annotated[str, typer.Option("--endpoint", help="fal endpoint id.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]
RequestIdArg = Annotated[str, typer.Argument(help="The request id that submit printed.")]
_RequiredServerOpt = Annotated[
    str, typer.Option("--server", help="Base URL of a running kontext-server.")
]


class RemoteError(Exception):
    """The server refused, could not be reached, or the request failed; the message says so."""


# --- the HTTP client ---------------------------------------------------------------------------


class RemoteServer:
    """fal's queue and storage APIs of one server. ``endpoint`` arguments are endpoint ids
    (``fal-ai/flux-pro/kontext/max``); request-id routes use their ``owner/alias``."""

    def __init__(self, server: str, key: str | None, *, timeout_s: float = _TIMEOUT_S) -> None:
        self.base_url = server.rstrip("/")
        headers = {"Authorization": f"Key {key}"} if key else {}
        self.http = httpx.Client(headers=headers, timeout=timeout_s)

    def __enter__(self) -> RemoteServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.http.close()

    def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise RemoteError(f"cannot reach {url}: {exc}") from exc

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._call(method, f"{self.base_url}{path}", **kwargs)
        if response.status_code >= 400:
            raise RemoteError(_failure(response))
        answer: dict[str, Any] = response.json()
        return answer

    # --- storage ---------------------------------------------------------------------------
    def image_source(self, source: str) -> str:
        """URLs and ``data:`` URIs as given; a local file is uploaded and its URL returned."""
        if source.startswith(("http://", "https://", "data:")):
            return source
        return self.upload(Path(source))

    def upload(self, path: Path) -> str:
        """Upload a file (CDN token + ``/files/upload``); returns its URL on the server."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RemoteError(
                f"cannot read {path}: {exc.strerror or exc} (give a file, an http(s) URL or "
                "a data: URI)"
            ) from exc
        token = self._json(
            "POST", "/rest/storage/auth/token", params={"storage_type": "fal-cdn-v3"}, json={}
        )
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        headers = {
            "Authorization": f"{token['token_type']} {token['token']}",
            "Content-Type": content_type,
            "X-Fal-File-Name": path.name,
        }
        response = self._call(
            "POST", f"{token['base_url']}/files/upload", content=data, headers=headers
        )
        if response.status_code >= 400:
            raise RemoteError(f"upload of {path} refused: {_failure(response)}")
        url: str = response.json()["access_url"]
        return url

    # --- the queue -------------------------------------------------------------------------
    def submit(self, endpoint: str, arguments: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", f"/{endpoint.strip('/')}", json=arguments)

    def status(self, endpoint: str, request_id: str, *, logs: bool = False) -> dict[str, Any]:
        path = f"{_request_path(endpoint, request_id)}/status"
        return self._json("GET", path, params={"logs": "1" if logs else "0"})

    def result(self, endpoint: str, request_id: str) -> dict[str, Any]:
        return self._json("GET", _request_path(endpoint, request_id))

    def cancel(self, endpoint: str, request_id: str) -> tuple[int, str]:
        """The HTTP status and fal's word: CANCELLATION_REQUESTED, ALREADY_COMPLETED, ..."""
        url = f"{self.base_url}{_request_path(endpoint, request_id)}/cancel"
        response = self._call("PUT", url)
        if response.status_code >= 500 or response.status_code in (401, 403):
            raise RemoteError(_failure(response))
        return response.status_code, str(response.json().get("status", ""))

    def watch(self, endpoint: str, request_id: str) -> Iterator[dict[str, Any]]:
        """Status updates until COMPLETED: from the status stream, or by polling if the
        stream breaks off (a restarting server, a proxy that buffers)."""
        try:
            for update in self._stream(endpoint, request_id):
                yield update
                if update.get("status") == "COMPLETED":
                    return
        except (httpx.HTTPError, ValueError):
            pass  # fall back to polling below
        while True:
            update = self.status(endpoint, request_id)
            yield update
            if update.get("status") == "COMPLETED":
                return
            time.sleep(_POLL_S)

    def _stream(self, endpoint: str, request_id: str) -> Iterator[dict[str, Any]]:
        url = f"{self.base_url}{_request_path(endpoint, request_id)}/status/stream"
        timeout = httpx.Timeout(_TIMEOUT_S, read=_STREAM_READ_TIMEOUT_S)
        with self.http.stream("GET", url, params={"logs": "0"}, timeout=timeout) as response:
            if response.status_code >= 400:
                response.read()
                raise RemoteError(_failure(response))
            for line in response.iter_lines():
                if line.startswith("data:"):
                    yield json.loads(line[len("data:") :])

    def download(self, url: str) -> bytes:
        """An output image: a ``data:`` URI (sync_mode) or a link."""
        if url.startswith("data:"):
            return base64.b64decode(url.partition(",")[2])
        response = self._call("GET", url)
        if response.status_code >= 400:
            raise RemoteError(f"cannot download {url}: {_failure(response)}")
        return response.content


def _request_path(endpoint: str, request_id: str) -> str:
    owner_alias = "/".join(endpoint.strip("/").split("/")[:2])
    return f"/{owner_alias}/requests/{request_id}"


def _failure(response: httpx.Response) -> str:
    """What the server said, as one line: ``422: aspect_ratio must be ...``."""
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # FastAPI validation errors
        detail = "; ".join(str(item.get("msg", item)) for item in detail)
    return f"HTTP {response.status_code}: {detail}"


# --- inputs and outputs ------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecFields:
    """The endpoint fields a user may set (PROTOCOL.md §8); ``None`` means the default."""

    prompt: str
    images: list[str] = field(default_factory=list)
    seed: int | None = None
    guidance_scale: float | None = None
    num_images: int | None = None
    aspect_ratio: str | None = None
    output_format: str | None = None
    safety_tolerance: str | None = None
    enhance_prompt: bool | None = None
    sync_mode: bool | None = None
    num_inference_steps: int | None = None

    def arguments(self, endpoint: str, image_urls: list[str]) -> dict[str, Any]:
        """The JSON body: ``image_urls`` for ``.../multi`` endpoints, else ``image_url``."""
        body: dict[str, Any] = {"prompt": self.prompt}
        if endpoint.rstrip("/").endswith("/multi"):
            body["image_urls"] = image_urls
        elif len(image_urls) == 1:
            body["image_url"] = image_urls[0]
        elif image_urls:
            raise RemoteError(
                f"{endpoint} takes one image; for several use --endpoint {endpoint}/multi"
            )
        for name in (
            "seed", "guidance_scale", "num_images", "aspect_ratio", "output_format",
            "safety_tolerance", "enhance_prompt", "sync_mode", "num_inference_steps",
        ):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        return body


def _prepare(remote: RemoteServer, endpoint: str, fields: SpecFields) -> dict[str, Any]:
    return fields.arguments(endpoint, [remote.image_source(source) for source in fields.images])


def _write_images(
    remote: RemoteServer, output: dict[str, Any], out: Path, request_id: str
) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, image in enumerate(output.get("images", [])):
        extension = _EXTENSIONS.get(image.get("content_type", ""), "bin")
        path = out / f"{request_id}-{index}.{extension}"
        data = remote.download(image["url"])
        path.write_bytes(data)
        written.append(
            {
                "path": str(path),
                "width": image.get("width"),
                "height": image.get("height"),
                "content_type": image.get("content_type"),
                "bytes": len(data),
            }
        )
    return written


class _ProgressBar:
    """tqdm on stderr: "queued (position N)" while waiting, then steps i/N."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=None, file=sys.stderr, desc="submitted", unit="step")

    def show(self, update: dict[str, Any]) -> None:
        status = update.get("status")
        progress = update.get("progress") or {}
        if status == "IN_QUEUE":
            self._bar.set_description(f"queued (position {update.get('queue_position', 0)})")
        elif status == "IN_PROGRESS" and progress.get("total"):
            self._bar.set_description("editing")
            self._bar.total = progress["total"]
            self._bar.n = progress.get("step", 0)
        elif status == "COMPLETED":
            self._bar.set_description("failed" if update.get("error") else "done")
            if self._bar.total:
                self._bar.n = self._bar.total
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


# --- commands ----------------------------------------------------------------------------------


def _run(action: Any) -> None:
    """Run ``action``; a ``RemoteError`` becomes ``error: ...`` on stderr and exit status 1."""
    try:
        action()
    except RemoteError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc


def _echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


ImageOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--image", help="Reference image: a file (uploaded), an http(s) URL or a data: URI."
    ),
]


@app.command()
def submit(
    server: _RequiredServerOpt,
    prompt: Annotated[str, typer.Option(help="What to change.")],
    image: ImageOpt = None,
    key: KeyOpt = None,
    endpoint: EndpointOpt = DEFAULT_ENDPOINT,
    seed: Annotated[int | None, typer.Option()] = None,
    guidance_scale: Annotated[float | None, typer.Option()] = None,
    num_images: Annotated[int | None, typer.Option(min=1, max=4)] = None,
    aspect_ratio: Annotated[str | None, typer.Option(help="W:H, 21:9 to 9:21")] = None,
    output_format: Annotated[str | None, typer.Option(help="jpeg or png")] = None,
    safety_tolerance: Annotated[str | None, typer.Option(help="1 (strict) to 6")] = None,
    enhance_prompt: Annotated[bool | None, typer.Option()] = None,
    sync_mode: Annotated[bool | None, typer.Option()] = None,
    steps: Annotated[int | None, typer.Option(help="num_inference_steps (dev endpoint)")] = None,
    json_output: JsonOpt = False,
) -> None:
    """Queue an edit on a running server; print its request id (or the answer as JSON)."""
    fields = SpecFields(
        prompt, list(image or []), seed, guidance_scale, num_images, aspect_ratio,
        output_format, safety_tolerance, enhance_prompt, sync_mode, steps,
    )  # fmt: skip

    def action() -> None:
        with RemoteServer(server, key) as remote:
            answer = remote.submit(endpoint, _prepare(remote, endpoint, fields))
        if json_output:
            _echo_json(answer)
        else:
            typer.echo(answer["request_id"])

    _run(action)


@app.command()
def status(
    request_id: RequestIdArg,
    server: _RequiredServerOpt,
    key: KeyOpt = None,
    endpoint: EndpointOpt = DEFAULT_ENDPOINT,
    logs: Annotated[bool, typer.Option(help="Include the request's log lines.")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Print a request's status: IN_QUEUE (position), IN_PROGRESS (step) or COMPLETED."""

    def action() -> None:
        with RemoteServer(server, key) as remote:
            answer = remote.status(endpoint, request_id, logs=logs)
        if json_output:
            _echo_json(answer)
            return
        typer.echo(_status_line(answer))
        for entry in answer.get("logs") or []:
            typer.echo(
                f"  {entry.get('timestamp', '')} {entry.get('level', '')} {entry['message']}"
            )

    _run(action)


def _status_line(answer: dict[str, Any]) -> str:
    line = str(answer.get("status"))
    progress = answer.get("progress") or {}
    if line == "IN_QUEUE":
        line += f" (position {answer.get('queue_position', 0)})"
    elif progress.get("total"):
        line += f" (step {progress.get('step', 0)}/{progress['total']})"
    if answer.get("error"):
        line += f": {answer.get('error_type')}: {answer['error']}"
    return line


@app.command()
def result(
    request_id: RequestIdArg,
    server: _RequiredServerOpt,
    key: KeyOpt = None,
    endpoint: EndpointOpt = DEFAULT_ENDPOINT,
    out: Annotated[Path | None, typer.Option(help="Also download the images here.")] = None,
) -> None:
    """Print a finished request's output JSON.

    With --out the images are saved there and their paths added as "files". A failed
    request prints its error and exits 1."""

    def action() -> None:
        with RemoteServer(server, key) as remote:
            output = remote.result(endpoint, request_id)
            if out is not None:
                output["files"] = _write_images(remote, output, out, request_id)
        _echo_json(output)

    _run(action)


@app.command()
def cancel(
    request_id: RequestIdArg,
    server: _RequiredServerOpt,
    key: KeyOpt = None,
    endpoint: EndpointOpt = DEFAULT_ENDPOINT,
) -> None:
    """Cancel a request: queued ones at once, running ones within one step."""

    def action() -> None:
        with RemoteServer(server, key) as remote:
            code, word = remote.cancel(endpoint, request_id)
        typer.echo(word)
        if code == 404:
            raise RemoteError(f"request {request_id} not found (or owned by another key)")

    _run(action)


def edit_remotely(
    server: str, key: str | None, endpoint: str, fields: SpecFields, out: Path, *, as_json: bool
) -> None:
    """``kontext-server edit --server URL``: submit, show progress, download to ``out``, and
    print the files (or a JSON summary). Exits 1 when the request fails."""

    def action() -> None:
        with RemoteServer(server, key) as remote:
            summary = _edit(remote, endpoint, fields, out)
        if as_json:
            _echo_json(summary)
        else:
            for entry in summary["files"]:
                typer.echo(entry["path"])

    _run(action)


def _edit(remote: RemoteServer, endpoint: str, fields: SpecFields, out: Path) -> dict[str, Any]:
    if len(fields.images) > 1 and not endpoint.rstrip("/").endswith("/multi"):
        endpoint = f"{endpoint.rstrip('/')}/multi"  # several references: the multi endpoint
    request_id = remote.submit(endpoint, _prepare(remote, endpoint, fields))["request_id"]
    bar = _ProgressBar()
    try:
        for update in remote.watch(endpoint, request_id):
            bar.show(update)
    finally:
        bar.close()
    output = remote.result(endpoint, request_id)
    return {
        "request_id": request_id,
        "endpoint": endpoint,
        "seed": output.get("seed"),
        "prompt": output.get("prompt"),
        "timings": output.get("timings"),
        "random_weights": output.get("random_weights", False),
        "files": _write_images(remote, output, out, request_id),
    }
