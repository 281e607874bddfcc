"""The status stream (PROTOCOL.md §5): one ``data:`` event per change, keep-alive comments,
and the end of the stream right after the ``COMPLETED`` event.

Workers are other processes, so the stream polls the store (every ``poll_interval_s``); each
read runs in the thread pool, never on the event loop. While the store is unavailable the
stream stays open with keep-alive comments and goes on once the store is back.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
from starlette.concurrency import run_in_threadpool

from kontext_server.core.service import QueueService
from kontext_server.domain.errors import StoreUnavailableError
from kontext_server.domain.jobs import Job, JobEvent, JobStatus, Progress
from kontext_server.http.fal.wire import RequestUrls, status_body
from kontext_server.http.waiting import fresh_job

__all__ = ["KEEPALIVE", "StatusStream", "sse_event"]

KEEPALIVE = ": keepalive\n\n"


def sse_event(data: object) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


@dataclass(frozen=True, slots=True)
class _Seen:
    """What the client was last told; a new event is sent when any of it changes."""

    status: JobStatus
    progress: Progress | None
    queue_position: int | None
    last_event_id: int


class StatusStream:
    """Server-sent events of one job for one client. With ``with_logs``, each event carries
    the log lines that are new since the previous event (ours: the stream is incremental,
    the status route answers all lines)."""

    def __init__(
        self,
        service: QueueService,
        job: Job,
        urls: RequestUrls,
        *,
        with_logs: bool,
        keepalive_s: float,
        poll_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._service = service
        self._job = job
        self._urls = urls
        self._with_logs = with_logs
        self._keepalive_s = keepalive_s
        self._poll_interval_s = poll_interval_s
        self._clock = clock

    async def __aiter__(self) -> AsyncIterator[str]:
        seen: _Seen | None = None
        last_sent_at = self._clock()
        job = self._job
        while True:
            update = await self._read(job, seen)
            if update is not None:
                position, events = update
                now_seen = _Seen(job.status, job.progress, position, _last_id(events, seen))
                if now_seen != seen:
                    body = status_body(job, self._urls, queue_position=position, logs=events)
                    yield sse_event(body)
                    seen, last_sent_at = now_seen, self._clock()
                if job.status.is_final:
                    return
            if self._clock() - last_sent_at >= self._keepalive_s:
                yield KEEPALIVE
                last_sent_at = self._clock()
            await anyio.sleep(self._poll_interval_s)
            job = await fresh_job(self._service.store.get, job)

    async def _read(
        self, job: Job, seen: _Seen | None
    ) -> tuple[int | None, list[JobEvent] | None] | None:
        """The queue position and new log lines; None while the store is unavailable (the
        stream stays open, keep-alives go on, and the next round reads again)."""
        try:
            position = await self._queue_position(job)
            events = await self._new_events(seen.last_event_id if seen else 0)
        except StoreUnavailableError:
            return None
        return position, events

    async def _queue_position(self, job: Job) -> int | None:
        if job.status is not JobStatus.QUEUED:
            return None
        return await run_in_threadpool(self._service.queue_position, job)

    async def _new_events(self, after_id: int) -> list[JobEvent] | None:
        if not self._with_logs:
            return None
        return await run_in_threadpool(self._service.logs, self._job.id, after_id)


def _last_id(events: list[JobEvent] | None, seen: _Seen | None) -> int:
    if events:
        return events[-1].id
    return seen.last_event_id if seen else 0
