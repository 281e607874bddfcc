"""fal's queue routes (PROTOCOL.md §1-§7) and the sync run route.

The same queue routes are mounted at ``/`` and ``/queue``; URLs in answers are built from the
base the client used (scheme, host, root path and that prefix). Request-id routes accept
``owner/alias`` (what the clients send) or the full endpoint path before ``/requests/``, and
answer 404 for a request of another API key.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from kontext_server.core.service import SubmitOutcome
from kontext_server.domain.jobs import CancelOutcome, Job, JobEvent, JobStatus
from kontext_server.http.context import (
    ApiContext,
    Caller,
    Context,
    api_context,
    caller,
    site_base,
)
from kontext_server.http.fal.inputs import stored_input
from kontext_server.http.fal.results import render_output
from kontext_server.http.fal.schemas import ENDPOINTS, json_body_schema
from kontext_server.http.fal.sse import StatusStream
from kontext_server.http.fal.submission import (
    input_model,
    own_files_check,
    precheck_urls,
    read_input,
    submit_options,
    webhook_url,
)
from kontext_server.http.fal.wire import (
    REQUEST_ID_HEADER,
    RequestUrls,
    endpoint_matches,
    error_body,
    error_status_code,
    status_body,
    submit_body,
)
from kontext_server.http.ids import REQUEST_ID_CONVERTOR, RequestIdPath
from kontext_server.http.streams import TooManyStreamsError, released_after
from kontext_server.http.waiting import wait_until_final

__all__ = [
    "QUEUE_PREFIXES",
    "RUN_PREFIX",
    "add_request_routes",
    "add_submit_routes",
    "add_unknown_endpoint_route",
    "add_unknown_request_route",
    "run_router",
]

QUEUE_PREFIXES = ("/queue", "")  # "/queue" first: the bare request routes would take it too
RUN_PREFIX = "/run"
_TRUTHY = frozenset({"1", "true", "yes", "on"})
_NOT_FOUND = {"detail": "Request not found"}
_CANCEL_ANSWERS = {
    CancelOutcome.CANCELED: (202, "CANCELLATION_REQUESTED"),
    CancelOutcome.REQUESTED: (202, "CANCELLATION_REQUESTED"),
    CancelOutcome.ALREADY_FINISHED: (400, "ALREADY_COMPLETED"),
    CancelOutcome.NOT_FOUND: (404, "NOT_FOUND"),
}


def add_submit_routes(app: FastAPI, prefix: str) -> None:
    """``POST {prefix}/{endpoint}`` for each served endpoint, on its exact path.

    Added to the app itself, not through an included router: FastAPI finds a route by trying
    each in turn, and an included router costs ~4 µs to pass and more to enter.
    ``add_unknown_endpoint_route`` (added last) answers the other ``POST`` paths."""
    routes = _QueueRoutes(prefix)
    for endpoint, model in ENDPOINTS.items():
        app.add_api_route(
            f"{prefix}/{endpoint}",
            routes.submit_to(endpoint),
            methods=["POST"],
            name=f"submit {endpoint}",
            tags=["queue"],
            openapi_extra=json_body_schema(model),
        )


def add_request_routes(app: FastAPI, prefix: str) -> None:
    """Status, status stream, cancel and result of a request under ``prefix``; their paths
    contain ``/requests/``, so they shadow no other route."""
    routes = _QueueRoutes(prefix)
    request_path = f"{prefix}/{{endpoint:path}}/requests/{{request_id:{REQUEST_ID_CONVERTOR}}}"
    for path, handler, method in (
        (f"{request_path}/status", routes.status, "GET"),
        (f"{request_path}/status/stream", routes.stream, "GET"),
        (f"{request_path}/cancel", routes.cancel, "PUT"),
        (request_path, routes.result, "GET"),
    ):
        app.add_api_route(path, handler, methods=[method], tags=["queue"])


def add_unknown_request_route(app: FastAPI, prefix: str) -> None:
    """``GET``/``PUT {prefix}/.../requests/{anything}``: what the request-id routes did not
    take (an id that is not one of ours, an empty id segment) is a 404 in the route's own
    shape, the id neither used nor echoed. Added after the request-id routes of every
    prefix."""
    app.add_api_route(
        prefix + "/{endpoint:path}/requests/{rest:path}",
        _unknown_request,
        methods=["GET", "PUT"],
        include_in_schema=False,
    )


async def _unknown_request(request: Request) -> JSONResponse:
    if request.method == "PUT":
        return JSONResponse({"status": "NOT_FOUND"}, status_code=404)
    return JSONResponse(_NOT_FOUND, status_code=404)


def add_unknown_endpoint_route(app: FastAPI, prefix: str) -> None:
    """``POST {prefix}/{anything}``: a served endpoint spelled with a trailing slash is
    submitted; any other path is a 404 that lists the served endpoints. Added after every
    other route: it matches every ``POST`` path."""
    app.add_api_route(
        prefix + "/{endpoint:path}",
        _QueueRoutes(prefix).submit,
        methods=["POST"],
        include_in_schema=False,
    )


def run_router() -> APIRouter:
    """``POST /run/{endpoint}``: submit, wait for the end, answer the output (or the error)."""
    router = APIRouter(prefix=RUN_PREFIX, tags=["run"])
    router.add_api_route("/{endpoint:path}", run, methods=["POST"])
    return router


class _QueueRoutes:
    """Route handlers bound to one queue prefix (it only changes the URLs they answer)."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix

    def _urls(self, request: Request, job: Job) -> RequestUrls:
        return RequestUrls.build(site_base(request) + self._prefix, job.endpoint, job.id)

    def submit_to(self, endpoint: str) -> Callable[[Request], Awaitable[JSONResponse]]:
        """``submit`` bound to one served endpoint (the handler of its exact path).

        The context and the caller are looked up here rather than declared as dependencies:
        FastAPI's dependency solving was ~5 % of a submit's CPU (docs/performance.md)."""

        async def submit(request: Request) -> JSONResponse:
            context = await api_context(request)
            return await self.submit(endpoint, request, context, await caller(request, context))

        submit.__doc__ = f"Queue a request for {endpoint}: PROTOCOL.md §3."
        return submit

    async def submit(
        self, endpoint: str, request: Request, context: Context, principal: Caller
    ) -> JSONResponse:
        """Queue a request: PROTOCOL.md §3."""
        outcome = await _submit(endpoint, request, context, principal.owner)
        body = submit_body(outcome.job, self._urls(request, outcome.job), outcome.queue_position)
        return JSONResponse(body, headers={REQUEST_ID_HEADER: outcome.job.id})

    async def status(
        self,
        endpoint: str,
        request_id: RequestIdPath,
        request: Request,
        context: Context,
        principal: Caller,
        logs: str | None = None,
    ) -> JSONResponse:
        """202 while queued or running, 200 once completed: PROTOCOL.md §4."""
        found = await context.store_call(
            _status_of, context, endpoint, request_id, principal.owner, with_logs=_truthy(logs)
        )
        if found is None:
            return _not_found(request_id)
        job, position, events = found
        body = status_body(job, self._urls(request, job), queue_position=position, logs=events)
        code = 200 if job.status.is_final else 202
        return JSONResponse(body, status_code=code, headers={REQUEST_ID_HEADER: job.id})

    async def stream(
        self,
        endpoint: str,
        request_id: RequestIdPath,
        request: Request,
        context: Context,
        principal: Caller,
        logs: str | None = None,
    ) -> Response:
        """Server-sent status events until COMPLETED: PROTOCOL.md §5."""
        find = functools.partial(_find, context, endpoint, request_id, principal.owner)
        job = await run_in_threadpool(find)
        if job is None:
            return _not_found(request_id)
        try:
            release = context.stream_slots.acquire(
                principal.owner, context.settings.max_streams_per_key
            )
        except TooManyStreamsError as exc:
            headers = {"retry-after": str(exc.retry_after_s)}
            return JSONResponse({"detail": str(exc)}, status_code=429, headers=headers)
        events = StatusStream(
            context.service,
            job,
            self._urls(request, job),
            with_logs=_truthy(logs),
            keepalive_s=context.stream_keepalive_s,
            poll_interval_s=context.poll_interval_s,
        )
        headers = {REQUEST_ID_HEADER: job.id, "cache-control": "no-cache"}
        # Released when the stream ends or the client leaves; the background task covers a
        # response that never started streaming.
        return StreamingResponse(
            released_after(events, release),
            media_type="text/event-stream",
            headers=headers,
            background=BackgroundTask(release),
        )

    def result(
        self,
        endpoint: str,
        request_id: RequestIdPath,
        request: Request,
        context: Context,
        principal: Caller,
    ) -> JSONResponse:
        """The output, the job's error, or 400 while not finished: PROTOCOL.md §6."""
        job = _find(context, endpoint, request_id, principal.owner)
        if job is None:
            return _not_found(request_id)
        if not job.status.is_final:
            detail = {"detail": "Request is still in progress"}
            return JSONResponse(detail, status_code=400, headers={REQUEST_ID_HEADER: job.id})
        return _final_answer(context, request, job)

    def cancel(
        self, endpoint: str, request_id: RequestIdPath, context: Context, principal: Caller
    ) -> JSONResponse:
        """Queued: cancelled now; running: within one step: PROTOCOL.md §7."""
        job = _find(context, endpoint, request_id, principal.owner)
        outcome = CancelOutcome.NOT_FOUND
        if job is not None:
            outcome = context.service.cancel(job.id, principal.owner)
        code, status = _CANCEL_ANSWERS[outcome]
        return JSONResponse({"status": status}, status_code=code, headers=_echoed_id(request_id))


async def run(endpoint: str, request: Request, context: Context, principal: Caller) -> JSONResponse:
    """Submit and wait. A client that hangs up cancels its request."""
    outcome = await _submit(endpoint, request, context, principal.owner)
    job = await wait_until_final(context, request, outcome.job, principal.owner)
    if job is None:
        return JSONResponse({"detail": "Client disconnected"}, status_code=499)
    return _final_answer(context, request, job)


async def _submit(
    endpoint: str, request: Request, context: ApiContext, owner: str | None
) -> SubmitOutcome:
    model = input_model(endpoint)
    validated = await read_input(
        request,
        model,
        max_body_bytes=context.max_body_bytes,
        max_data_uri_bytes=context.max_data_uri_bytes,
    )
    options = submit_options(request)
    webhook = webhook_url(request)
    if context.url_checker is not None:
        precheck_urls(validated, webhook, context.url_checker, is_own_file=own_files_check(request))
    # The submits that reach the loop together commit together (group commit), on the loop
    # for SQLite (a thread hop per submit cost a third of the throughput), off it for
    # PostgreSQL (a round trip would stall every other request); see docs/performance.md.
    return await context.service.submit_async(
        endpoint.strip("/"),
        stored_input(validated),
        owner=owner,
        priority=options.priority,
        start_timeout_s=options.start_timeout_s,
        webhook_url=webhook,
        base_url=site_base(request),
        idempotency_key=options.idempotency_key,
        retry=options.retry,
        retention_s=options.retention_s,
    )


def _status_of(
    context: ApiContext, endpoint: str, request_id: str, owner: str | None, *, with_logs: bool
) -> tuple[Job, int | None, list[JobEvent] | None] | None:
    """The job, its queue position (queued jobs only) and its events (when asked)."""
    job = _find(context, endpoint, request_id, owner)
    if job is None:
        return None
    service = context.service
    position = service.queue_position(job) if job.status is JobStatus.QUEUED else None
    return job, position, service.logs(job.id) if with_logs else None


def _find(context: ApiContext, endpoint: str, request_id: str, owner: str | None) -> Job | None:
    job = context.service.get(request_id, owner)
    if job is None or not endpoint_matches(endpoint, job.endpoint):
        return None
    return job


def _final_answer(context: ApiContext, request: Request, job: Job) -> JSONResponse:
    headers = {REQUEST_ID_HEADER: job.id}
    if job.status is JobStatus.SUCCEEDED:
        output: dict[str, Any] = render_output(job, site_base(request), context.files)
        return JSONResponse(output, headers=headers)
    headers["x-fal-error-type"] = job.error_type or "internal_error"
    if job.error_type == "request_timeout":
        # Both official clients treat a 504 as the caller's own start timeout only with this
        # header; without it they retry (and `run` would submit the edit again).
        headers["x-fal-request-timeout-type"] = "user"
    return JSONResponse(error_body(job), status_code=error_status_code(job), headers=headers)


def _not_found(request_id: str) -> JSONResponse:
    return JSONResponse(_NOT_FOUND, status_code=404, headers=_echoed_id(request_id))


def _echoed_id(request_id: str) -> dict[str, str]:
    """The caller's request id as a header: the route matched only an id of our own format
    (``ids.py``), so it is always a legal header value."""
    return {REQUEST_ID_HEADER: request_id}


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in _TRUTHY
