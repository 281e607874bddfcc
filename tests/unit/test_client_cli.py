"""``kontext-server submit | status | result | cancel | edit --server``: argument handling and
output, against the real API app served on loopback in this process (uvicorn in a thread),
with a worker played through the store (no model)."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from PIL import Image
from typer.testing import CliRunner, Result

from kontext_server.cli import app
from kontext_server.config import Settings
from kontext_server.domain.jobs import Job, JobStatus, Progress
from kontext_server.files.base import new_file_key
from kontext_server.files.local import LocalFileStore
from kontext_server.http.app import create_app
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.webhooks.signing import WebhookSigner

WORKER = "played-worker"


def png(width: int = 8, height: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buffer, format="PNG")
    return buffer.getvalue()


class Server:
    """The API app on 127.0.0.1 (an OS-chosen port) in a thread, over real stores."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = SQLiteJobStore(tmp_path / "jobs.db")
        self.files = LocalFileStore(tmp_path / "files")
        settings = Settings(data_dir=tmp_path / "data")
        signer = WebhookSigner.load_or_create(tmp_path / "key.pem")
        application = create_app(
            settings, self.store, self.files, signer=signer, run_background=False,
            stream_keepalive_s=0.2, poll_interval_s=0.02,
        )  # fmt: skip
        config = uvicorn.Config(application, host="127.0.0.1", port=0, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> Server:
        self._thread.start()
        while not self._server.started:
            assert self._thread.is_alive(), "uvicorn did not start"
            threading.Event().wait(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self.store.close()

    def finish_next(self, *, steps: int = 2) -> Job:
        """Play a worker: claim the next job, report its steps, store a PNG, succeed."""
        job = self.store.claim(WORKER, lease_s=30)
        assert job is not None, "nothing queued"
        for step in range(1, steps + 1):
            self.store.set_progress(job.id, WORKER, job.attempts, Progress(step, steps))
        key = new_file_key(job.id, job.attempts, 0, "png")
        self.files.put(key, png(24, 16), "image/png")
        image = {
            "file_key": key, "url": None, "width": 24, "height": 16,
            "content_type": "image/png", "file_name": "0.png", "file_size": len(png(24, 16)),
        }  # fmt: skip
        result = {
            "images": [image], "timings": {"inference": 0.5}, "seed": 9,
            "has_nsfw_concepts": [False], "prompt": job.input.prompt, "random_weights": True,
        }  # fmt: skip
        assert self.store.finish(job.id, WORKER, job.attempts, JobStatus.SUCCEEDED, result=result)
        return job


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with Server(tmp_path) as live:
        yield live


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def submit(server: Server, *extra: str) -> str:
    outcome = cli("submit", "--server", server.url, "--prompt", "make it blue", *extra)
    assert outcome.exit_code == 0, outcome.output
    return outcome.stdout.strip()


def test_submit_uploads_a_local_file_and_prints_the_request_id(
    server: Server, tmp_path: Path
) -> None:
    (tmp_path / "cat.png").write_bytes(png())

    request_id = submit(server, "--image", str(tmp_path / "cat.png"), "--seed", "3")

    job = server.store.get(request_id)
    assert job is not None
    assert job.input.seed == 3
    (image_url,) = job.input.references
    assert image_url.startswith(f"{server.url}/files/uploads/")
    assert image_url.endswith("/cat.png")
    assert server.files.read(image_url.split("/files/", 1)[1]) == png()


def test_submit_passes_urls_through_and_prints_json_with_json(server: Server) -> None:
    outcome = cli(
        "submit", "--server", server.url, "--prompt", "x",
        "--image", "https://example.com/a.png", "--aspect-ratio", "16:9", "--json",
    )  # fmt: skip

    assert outcome.exit_code == 0, outcome.output
    answer = json.loads(outcome.stdout)
    assert answer["status"] == "IN_QUEUE"
    job = server.store.get(answer["request_id"])
    assert job is not None
    assert job.input.references == ("https://example.com/a.png",)
    assert job.input.aspect_ratio == "16:9"


def test_a_refused_input_exits_1_with_the_servers_message(server: Server) -> None:
    outcome = cli(
        "submit", "--server", server.url, "--prompt", "x",
        "--image", "https://example.com/a.png", "--aspect-ratio", "nope",
    )  # fmt: skip

    assert outcome.exit_code == 1
    assert "422" in outcome.stderr
    assert "21:9" in outcome.stderr


def test_a_missing_file_says_what_is_accepted(server: Server, tmp_path: Path) -> None:
    outcome = cli(
        "submit", "--server", server.url, "--prompt", "x", "--image", str(tmp_path / "no.png")
    )

    assert outcome.exit_code == 1
    assert "http(s) URL or a data: URI" in outcome.stderr


def test_several_images_need_the_multi_endpoint(server: Server) -> None:
    outcome = cli(
        "submit", "--server", server.url, "--prompt", "x",
        "--image", "https://example.com/a.png", "--image", "https://example.com/b.png",
    )  # fmt: skip

    assert outcome.exit_code == 1
    assert "kontext/max/multi" in outcome.stderr


def test_status_result_and_cancel_by_request_id(server: Server, tmp_path: Path) -> None:
    first = submit(server, "--image", "https://example.com/a.png")
    second = submit(server, "--image", "https://example.com/a.png")

    queued = cli("status", second, "--server", server.url)
    early = cli("result", first, "--server", server.url)
    server.finish_next()
    cancelled = cli("cancel", second, "--server", server.url)
    finished = cli("status", first, "--server", server.url, "--json")
    output = cli("result", first, "--server", server.url, "--out", str(tmp_path / "out"))
    unknown = cli("cancel", "00000000-0000-0000-0000-000000000000", "--server", server.url)

    assert queued.stdout.strip() == "IN_QUEUE (position 1)"
    assert early.exit_code == 1
    assert "still in progress" in early.stderr
    assert cancelled.stdout.strip() == "CANCELLATION_REQUESTED"
    assert json.loads(finished.stdout)["status"] == "COMPLETED"
    assert output.exit_code == 0, output.output
    body = json.loads(output.stdout)
    assert body["seed"] == 9
    with Image.open(body["files"][0]["path"]) as image:
        assert image.size == (24, 16)
    assert unknown.exit_code == 1
    assert "not found" in unknown.stderr


def test_edit_with_server_waits_shows_progress_and_downloads(
    server: Server, tmp_path: Path
) -> None:
    (tmp_path / "in.png").write_bytes(png())
    played = threading.Thread(target=_finish_when_queued, args=(server,), daemon=True)
    played.start()

    outcome = cli(
        "edit", "--server", server.url, "--image", str(tmp_path / "in.png"),
        "--prompt", "make it blue", "--out", str(tmp_path / "out"), "--json",
    )  # fmt: skip
    played.join(10)

    assert outcome.exit_code == 0, outcome.output
    summary: dict[str, Any] = json.loads(outcome.stdout)
    assert summary["seed"] == 9
    assert summary["endpoint"] == "fal-ai/flux-pro/kontext/max"
    [entry] = summary["files"]
    assert Path(entry["path"]).read_bytes()[:4] == b"\x89PNG"
    assert "done" in outcome.stderr  # the progress bar's last state


def _finish_when_queued(server: Server) -> None:
    for _ in range(500):
        if server.store.queue_depth():
            server.finish_next()
            return
        threading.Event().wait(0.01)
