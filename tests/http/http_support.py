"""Helpers of the HTTP tests: request bodies, a played worker, a live loopback server."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI
from PIL import Image
from starlette.testclient import TestClient

from kontext_server.domain.jobs import Job, JobStatus, Progress
from kontext_server.files.base import StoredFile, new_file_key
from kontext_server.files.local import LocalFileStore
from kontext_server.store.sqlite import SQLiteJobStore

# what the ``make_app`` fixture returns: create_app with the test's store, files and signer
AppFactory = Callable[..., FastAPI]

MAX = "fal-ai/flux-pro/kontext/max"
MULTI = "fal-ai/flux-pro/kontext/max/multi"
IMAGE_URL = "https://example.com/cat.png"
LOOPBACK = ("127.0.0.1", 50000)


def edit_body(**overrides: Any) -> dict[str, Any]:
    """A valid /max body (the spec's example, with a valid aspect_ratio)."""
    return {"prompt": "Put a donut next to the flour.", "image_url": IMAGE_URL, **overrides}


def tiny_png_data_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class PlayedWorker:
    """Plays a worker through the store's fenced worker calls (claim, progress, finish)."""

    def __init__(self, store: SQLiteJobStore, files: LocalFileStore) -> None:
        self.store = store
        self.files = files
        self.job: Job | None = None

    def claim(self) -> Job:
        job = self.store.claim("played-worker", lease_s=30)
        assert job is not None, "nothing queued"
        self.job = job
        return job

    def _current(self) -> Job:
        assert self.job is not None, "claim first"
        return self.job

    def progress(self, step: int, total: int) -> None:
        job = self._current()
        assert self.store.set_progress(job.id, "played-worker", job.attempts, Progress(step, total))

    def succeed(self, *, output_format: str = "jpeg", sync_mode: bool = False) -> dict[str, Any]:
        job = self._current()
        image = self._image(job, output_format, sync_mode)
        result = {
            "images": [image],
            "timings": {"inference": 1.25},
            "seed": 42,
            "has_nsfw_concepts": [False],
            "prompt": job.input.prompt,
            "random_weights": True,
        }
        self._finish(JobStatus.SUCCEEDED, result=result)
        return result

    def _image(self, job: Job, output_format: str, sync_mode: bool) -> dict[str, Any]:
        buffer = io.BytesIO()
        Image.new("RGB", (24, 16), "blue").save(buffer, format=output_format.upper())
        data = buffer.getvalue()
        content_type = f"image/{output_format}"
        file_name = f"0.{output_format}"
        if sync_mode:
            uri = f"data:{content_type};base64,{base64.b64encode(data).decode()}"
            return self._image_fields(None, uri, content_type, file_name, len(data))
        key = new_file_key(job.id, job.attempts, 0, output_format)
        stored: StoredFile = self.files.put(key, data, content_type)
        return self._image_fields(stored.key, None, content_type, file_name, len(data))

    @staticmethod
    def _image_fields(
        key: str | None, url: str | None, content_type: str, file_name: str, size: int
    ) -> dict[str, Any]:
        return {
            "file_key": key,
            "url": url,
            "width": 24,
            "height": 16,
            "content_type": content_type,
            "file_name": file_name,
            "file_size": size,
        }

    def fail(self, error: str, error_type: str) -> None:
        self._finish(JobStatus.FAILED, error=error, error_type=error_type)

    def cancelled(self) -> None:
        self._finish(JobStatus.CANCELED, error="Request cancelled", error_type="client_cancelled")

    def _finish(self, status: JobStatus, **fields: Any) -> None:
        job = self._current()
        assert self.store.finish(job.id, "played-worker", job.attempts, status, **fields)


class LiveServer:
    """uvicorn serving an app on 127.0.0.1 (port chosen by the OS) in a thread."""

    def __init__(self, app: FastAPI) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._url: str | None = None

    def __enter__(self) -> LiveServer:
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            threading.Event().wait(0.01)
        assert self.url
        return self

    @property
    def url(self) -> str:
        """Valid while the server runs (and cached, so a test may use it afterwards)."""
        if self._url is None:
            port = self._server.servers[0].sockets[0].getsockname()[1]
            self._url = f"http://127.0.0.1:{port}"
        return self._url

    def __exit__(self, *exc_info: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)


def submit(
    client: TestClient, body: dict[str, Any] | None = None, path: str = MAX, **kw: Any
) -> dict[str, Any]:
    """Submit and return the answer's JSON (asserting a 200)."""
    response = client.post(f"/{path}", json=edit_body() if body is None else body, **kw)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer
