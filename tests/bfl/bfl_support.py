"""Helpers of the BFL engine tests: the rig (store, files, service, worker) and inputs."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bfl_standin import StandInBfl
from PIL import Image

from kontext_server.core.service import QueueService
from kontext_server.domain.jobs import Job, NewJob
from kontext_server.files.local import LocalFileStore
from kontext_server.http.fal.inputs import stored_input
from kontext_server.http.fal.schemas import ENDPOINTS
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.worker.bfl import BflLimits, BflWorker

MAX = "fal-ai/flux-pro/kontext/max"
MULTI = "fal-ai/flux-pro/kontext/max/multi"
ENGINES = {MAX: "bfl", MULTI: "bfl"}
FAST_LIMITS = BflLimits(
    lease_s=5.0,
    heartbeat_s=0.2,
    idle_wait_s=0.05,
    job_timeout_s=20.0,
    max_in_flight=4,
    poll_initial_s=0.05,
    poll_max_s=0.2,
)


def png_data_uri(width: int = 32, height: int = 24) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class Rig:
    """A SQLite store, a file store, the queue service and a BFL worker, all on loopback."""

    store: SQLiteJobStore
    files: LocalFileStore
    service: QueueService
    standin: StandInBfl
    make_worker: Callable[..., BflWorker]

    def submit(self, endpoint: str = MAX, **input: Any) -> Job:
        body: dict[str, Any] = {"prompt": "make it blue", "image_url": png_data_uri()}
        if endpoint == MULTI:
            body = {"prompt": "combine", "image_urls": [png_data_uri(), png_data_uri(16, 16)]}
        edit = stored_input(ENDPOINTS[endpoint].model_validate(body | input))  # as the API does
        return self.service.submit(endpoint, edit).job

    def submit_raw(self, job: NewJob) -> Job:
        return self.store.submit(job)[0]


class RunningWorker:
    """``BflWorker.run_forever`` on a thread, stopped (and joined) on exit."""

    def __init__(self, worker: BflWorker) -> None:
        self.worker = worker
        self.stop = threading.Event()
        self.thread = threading.Thread(target=worker.run_forever, args=(self.stop,), daemon=True)

    def __enter__(self) -> BflWorker:
        self.thread.start()
        return self.worker

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
