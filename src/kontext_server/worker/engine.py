"""What the worker loop (``worker.loop``) needs from an engine, and what it hands one.

The loop claims jobs, keeps their leases, drains, records the outcome and logs it; an engine
turns one claimed job into ``Job.result``. Two engines exist: the local one
(``worker.local_engine``: diffusers, one job at a time in the loop's thread) and the BFL one
(``worker.bfl_engine``: many upstream tasks in flight, one thread each).

An engine ends a job other than with a result by raising: ``EditCancelled`` (canceled),
``HandBack`` (drain time is up: released, its place kept), ``Abandoned`` (the lease moved
to another worker: nothing recorded), ``InputError`` or ``JobFailed`` (failed with their
``error_type``); anything else fails the job as an internal error.
"""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from kontext_server.domain.editing import EditOutput, EditResult, EncodedImage, OutputImage
from kontext_server.domain.errors import KontextError
from kontext_server.domain.jobs import Job
from kontext_server.files.base import FileStore, new_file_key
from kontext_server.worker.drain import DrainDeadline

__all__ = [
    "EXECUTION_TIMEOUT_ERROR_TYPE",
    "Abandoned",
    "Engine",
    "HandBack",
    "JobContext",
    "JobFailed",
    "LeaseLimits",
    "publish_image",
]

EXECUTION_TIMEOUT_ERROR_TYPE = "execution_timeout"  # ours: PROTOCOL.md's list has no word for it


class JobFailed(KontextError):
    """Ends a job as failed: ``error_type`` from PROTOCOL.md's list; ``data`` goes into the last
    event."""

    def __init__(
        self,
        message: str,
        error_type: str = "internal_error",
        data: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.data = data or {}


class Abandoned(Exception):
    """This attempt lost its lease: record nothing, another worker owns the job."""


class HandBack(Exception):
    """Drain time is up: release the job (its place kept, the attempt not counted)."""


@dataclass
class JobContext:
    """One claimed job as its engine sees it. ``lease_lost`` is set by the heartbeat when
    another worker owns the job; ``drain`` is the loop's (live: it may begin mid-job).
    ``edit``: the local engine's edit result, for the metrics."""

    job: Job
    worker_id: str
    lease_lost: threading.Event
    drain: DrainDeadline
    edit: EditResult | None = None


class LeaseLimits(Protocol):
    """The loop's part of an engine's limits."""

    @property
    def lease_s(self) -> float: ...

    @property
    def heartbeat_s(self) -> float: ...

    @property
    def idle_wait_s(self) -> float: ...  # longest wait for work between claims when idle


class Engine(Protocol):
    """What the loop runs. ``name``: the jobs it claims (``Job.engine``). ``capacity``: jobs
    in flight at once; 1 runs each job in the loop's own thread, more run one thread each.
    ``watchdog_s``: a run still going this long after its start is failed
    (``execution_timeout``) and the process is ended, since a stuck GPU call cannot be
    interrupted from Python; None: the engine keeps its own time."""

    @property
    def name(self) -> str: ...

    @property
    def capacity(self) -> int: ...

    @property
    def limits(self) -> LeaseLimits: ...

    @property
    def watchdog_s(self) -> float | None: ...

    def execute(self, ctx: JobContext) -> EditOutput:
        """Run the claimed ``ctx.job``; returns what it published (see the module docstring)."""
        ...

    def idle(self) -> None:
        """Nothing was queued at the last claim."""
        ...

    def close(self) -> None: ...


def publish_image(
    files: FileStore,
    job: Job,
    index: int,
    image: EncodedImage,
    extension: str,
    *,
    inline: bool,
) -> OutputImage:
    """One output image: stored in ``files``, or inline as a data URI (``inline``)."""
    if inline:
        encoded = base64.b64encode(image.data).decode("ascii")
        file_key, url = None, f"data:{image.content_type};base64,{encoded}"
        file_name = f"{job.id}-{index}.{extension}"
    else:
        file_key, url = new_file_key(job.id, job.attempts, index, extension), None
        files.put(file_key, image.data, image.content_type)
        file_name = file_key.rsplit("/", 1)[-1]
    return OutputImage(
        width=image.width,
        height=image.height,
        content_type=image.content_type,
        file_size=len(image.data),
        file_name=file_name,
        file_key=file_key,
        url=url,
    )
