"""Reading a job again while waiting for it: through store outages, and until it is final for
the routes that answer only then (fal's ``POST /run/``, OpenAI's edits)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import anyio
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from kontext_server.domain.errors import StoreUnavailableError
from kontext_server.domain.jobs import Job
from kontext_server.http.context import ApiContext

__all__ = ["fresh_job", "wait_until_final"]


async def fresh_job(read: Callable[[str], Job | None], job: Job) -> Job:
    """``job`` read again (in the thread pool); as it was while the store is unavailable, so
    that a caller waiting for the end waits through an outage instead of failing."""
    try:
        fresh = await run_in_threadpool(read, job.id)
    except StoreUnavailableError:
        return job
    return fresh or job


async def wait_until_final(
    context: ApiContext, request: Request, job: Job, owner: str | None
) -> Job | None:
    """Poll the store until ``job`` is final, through store outages. A client that hangs up
    cancels its request; then ``None``."""
    read: Callable[[str], Job | None] = context.service.store.get
    while not job.status.is_final:
        await anyio.sleep(context.poll_interval_s)
        if await request.is_disconnected():
            cancel = functools.partial(context.service.cancel, job.id, owner)
            await run_in_threadpool(cancel)
            return None
        job = await fresh_job(read, job)
    return job
