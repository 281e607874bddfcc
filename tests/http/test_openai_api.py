"""OpenAI's ``POST /v1/images/edits``: multipart parsing, the mapping onto the fal endpoints,
the synchronous answer and OpenAI-shaped errors."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from http_support import LOOPBACK, MAX, MULTI, PlayedWorker
from PIL import Image
from starlette.testclient import TestClient

from kontext_server.core.auth import create_api_key
from kontext_server.domain.jobs import Job
from kontext_server.store.sqlite import SQLiteJobStore


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return buffer.getvalue()


class BackgroundWorker:
    """Plays a worker on a thread: claims the next job, records it, finishes it as told."""

    def __init__(self, worker: PlayedWorker) -> None:
        self._worker = worker
        self.jobs: list[Job] = []
        self._stop = threading.Event()
        self.fail_with: tuple[str, str] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BackgroundWorker:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._worker.store.queue_depth() == 0:
                time.sleep(0.01)
                continue
            job = self._worker.claim()
            self.jobs.append(job)
            if self.fail_with is not None:
                self._worker.fail(*self.fail_with)
            else:
                self._worker.succeed(
                    output_format=job.input.output_format,
                    sync_mode=job.input.inline_output,
                )


@pytest.fixture
def background_worker(worker: PlayedWorker) -> Iterator[BackgroundWorker]:
    with BackgroundWorker(worker) as running:
        yield running


def edit(client: TestClient, *, files: Any = None, **data: Any) -> Any:
    files = files if files is not None else {"image": ("in.png", png_bytes(), "image/png")}
    return client.post("/v1/images/edits", data={"prompt": "add a hat", **data}, files=files)


def test_one_image_edit_answers_b64_json_by_default(
    client: TestClient, background_worker: BackgroundWorker
) -> None:
    response = edit(client)

    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["created"], int)
    assert (body["output_format"], body["size"]) == ("png", "24x16")
    image = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert image.format == "PNG"
    job = background_worker.jobs[0]
    assert job.endpoint == MAX and len(job.input.references) == 1
    assert job.input.references[0].startswith("data:image/png;base64,")
    assert (job.input.num_images, job.input.aspect_ratio) == (1, None)


def test_repeated_image_brackets_make_a_multi_job_with_url_answers(
    client: TestClient, background_worker: BackgroundWorker
) -> None:
    files = [("image[]", (f"{i}.png", png_bytes(), "application/octet-stream")) for i in range(2)]

    response = edit(
        client,
        files=files,
        response_format="url",
        output_format="jpeg",
        size="1536x1024",
        n="2",
        model="gpt-image-1",
    )

    assert response.status_code == 200, response.text
    url = response.json()["data"][0]["url"]
    assert url.startswith("http://testserver/files/")
    assert client.get(url).headers["content-type"] == "image/jpeg"
    job = background_worker.jobs[0]
    assert job.endpoint == MULTI and len(job.input.references) == 2
    assert (job.input.aspect_ratio, job.input.num_images) == ("3:2", 2)
    assert job.input.inline_output is False


@pytest.mark.parametrize(
    ("data", "param", "says"),
    [
        ({"n": "5"}, "n", "from 1 to 4"),
        ({"size": "640x480"}, "size", "auto, 256x256"),
        ({"response_format": "png"}, "response_format", "b64_json, url"),
        ({"output_format": "webp"}, "output_format", "png or jpeg"),
        ({"prompt": " "}, "prompt", "must not be empty"),
        ({"stream": "true"}, "stream", "not supported"),
    ],
)
def test_invalid_fields_are_openai_errors_naming_the_param(
    client: TestClient, data: dict[str, str], param: str, says: str
) -> None:
    response = edit(client, **data)

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert says in error["message"]


def test_missing_image_mask_and_non_images_are_refused(client: TestClient) -> None:
    no_image = client.post("/v1/images/edits", data={"prompt": "x"}, files={"dummy": ("a", b"")})
    masked = edit(
        client,
        files={"image": ("a.png", png_bytes(), "image/png"), "mask": ("m.png", png_bytes())},
    )
    not_image = edit(client, files={"image": ("a.txt", b"hello there", "text/plain")})
    json_body = client.post("/v1/images/edits", json={"prompt": "x"})

    assert no_image.json()["error"]["param"] == "image"
    assert masked.json()["error"]["param"] == "mask"
    assert not_image.json()["error"]["code"] == "invalid_image_format"
    assert json_body.status_code == 400 and "multipart/form-data" in json_body.text


def test_a_failed_edit_is_an_error_the_sdk_does_not_retry(
    client: TestClient, background_worker: BackgroundWorker
) -> None:
    background_worker.fail_with = ("cannot decode image 1", "image_load_error")

    response = edit(client)

    assert response.status_code == 400
    assert response.headers["x-should-retry"] == "false"
    assert response.json()["error"]["code"] == "image_load_error"


def test_bearer_key_is_required_once_keys_exist(make_app: Any, store: SQLiteJobStore) -> None:
    _, key = create_api_key(store, "openai")
    with TestClient(make_app(), client=LOOPBACK) as client:
        missing = edit(client)
        wrong = client.post(
            "/v1/images/edits", headers={"authorization": "Bearer x:y"}, data={"prompt": "p"}
        )
        right = client.post(
            "/v1/images/edits",
            headers={"authorization": f"Bearer {key}"},
            data={"prompt": "p"},
            files={"other": ("a", b"")},
        )

    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert wrong.status_code == 401
    assert right.json()["error"]["param"] == "image"  # past authentication, to validation


def test_a_full_queue_is_a_429_with_retry_after(make_app: Any, settings: Any) -> None:
    full = settings.model_copy(update={"max_queue_size": 0})
    with TestClient(make_app(settings=full), client=LOOPBACK) as client:
        response = edit(client)

    assert response.status_code == 429
    assert response.headers["retry-after"]
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
