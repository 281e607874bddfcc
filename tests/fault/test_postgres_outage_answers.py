"""What clients are told while PostgreSQL is away: stop it under polling load (raw HTTP
pollers and the official ``fal-client``), start it again, and check every answer.

While the store is unreachable every route that needs it answers ``503`` with
``Retry-After`` and a JSON body, promptly; ``/readyz`` says not ready; a submit is refused
(never acknowledged and then lost, never half-written). Only 200, 202 and 503 are seen, every
one with a JSON body, and every acknowledged request completes once the store is back.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fal_client
import fal_client.client
import httpx
import pytest
from fault_support import (
    ENDPOINT,
    ApiProcess,
    Backend,
    Processes,
    WorkerProcess,
    input_image_uri,
    opened,
    wait_for,
)

from contract.pg_cluster import PgCluster
from kontext_server.domain.jobs import JobStatus

pytestmark = [pytest.mark.fault, pytest.mark.timeout(150)]

OUTAGE_S = 4.0
POLLERS = 4
PROMPT_S = 2.5  # no answer during the outage may take longer than this


@dataclass
class Seen:
    """Every answer the load got: (what, status, seconds it took, JSON or not)."""

    answers: list[tuple[str, int, float, bool]] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)  # request ids answered 200 to submit
    refused_submits: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, what: str, response: httpx.Response, took_s: float) -> None:
        json_ok = response.headers.get("content-type", "").startswith("application/json")
        if json_ok:
            try:
                response.json()
            except ValueError:
                json_ok = False
        if response.status_code == 503:
            json_ok = json_ok and response.headers.get("retry-after", "").isdigit()
        with self.lock:
            self.answers.append((what, response.status_code, took_s, json_ok))
            if what == "submit" and response.status_code == 200:
                self.acknowledged.append(response.json()["request_id"])
            elif what == "submit":
                self.refused_submits += 1


def poll_under_load(base: str, ids: list[str], seen: Seen, stop: threading.Event) -> None:
    body = {"prompt": "outage", "image_url": input_image_uri()}
    with httpx.Client(base_url=base, timeout=30.0) as client:
        turn = 0
        while not stop.is_set():
            turn += 1
            calls: list[tuple[str, str, str, dict[str, Any] | None]] = [
                ("status", "GET", f"/fal-ai/flux-pro/requests/{ids[turn % len(ids)]}/status", None),
                ("readyz", "GET", "/readyz", None),
            ]
            if turn % 10 == 0:
                calls.append(("submit", "POST", f"/{ENDPOINT}", body))
            for what, method, path, payload in calls:
                started = time.monotonic()
                try:
                    response = client.request(method, path, json=payload)
                except httpx.TransportError as exc:
                    with seen.lock:
                        seen.transport_errors.append(f"{what}: {exc!r}")
                    continue
                seen.record(what, response, time.monotonic() - started)
            time.sleep(0.02)


@dataclass
class FalClientRun:
    """The official client polling one request through the outage."""

    statuses: Counter[str] = field(default_factory=Counter)
    errors: list[tuple[int, Any]] = field(default_factory=list)  # FalClientHTTPError answers
    result: dict[str, Any] | None = None
    failure: BaseException | None = None


def fal_client_polls(handle: Any, run: FalClientRun) -> None:
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                status = handle.status(with_logs=True)
            except fal_client.FalClientHTTPError as exc:
                run.errors.append((exc.status_code, exc.response.json()))
                time.sleep(0.1)
                continue
            run.statuses[type(status).__name__] += 1
            if isinstance(status, fal_client.Completed):
                run.result = handle.get()
                return
            time.sleep(0.1)
    except BaseException as exc:
        run.failure = exc


@dataclass
class StreamRun:
    """One status stream (SSE) held open through the outage."""

    events: list[str] = field(default_factory=list)
    failure: BaseException | None = None


def follow_stream(base: str, request_id: str, run: StreamRun) -> None:
    url = f"{base}/fal-ai/flux-pro/requests/{request_id}/status/stream"
    try:
        with httpx.stream("GET", url, timeout=60.0) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("data: "):
                    run.events.append(json.loads(line.removeprefix("data: "))["status"])
    except BaseException as exc:
        run.failure = exc


def test_a_postgresql_outage_under_polling_load_answers_503_and_loses_nothing(
    pg_cluster: PgCluster,
    pg_backend: Backend,
    processes: Processes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = ApiProcess(pg_backend, tmp_path / "api")
    processes.add(api)
    api.start()
    for i in range(2):
        worker = WorkerProcess(pg_backend, tmp_path, f"w{i}", steps=5, step_s=0.05, lease_s=3.0)
        processes.add(worker)
        worker.start()
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{api.base_url}/")
    monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", f"{api.base_url}/run/")
    client = fal_client.SyncClient(key="auth-is-off")
    arguments = {"prompt": "through the outage", "image_url": input_image_uri()}

    seen = Seen()
    with httpx.Client(base_url=api.base_url, timeout=10.0) as http:
        body = {"prompt": "outage", "image_url": input_image_uri()}
        before = [http.post(f"/{ENDPOINT}", json=body) for _ in range(8)]
        assert all(a.status_code == 200 for a in before), [a.text for a in before]
        ids = [a.json()["request_id"] for a in before]
        handle = client.submit(ENDPOINT, arguments=arguments)
        ids.append(handle.request_id)
        # low priority: it waits behind every other request, so its stream spans the outage
        streamed = http.post(f"/{ENDPOINT}", json=body, headers={"x-fal-queue-priority": "low"})
        ids.append(streamed.json()["request_id"])
        assert http.get("/readyz").status_code == 200

        stop = threading.Event()
        pollers = [
            threading.Thread(target=poll_under_load, args=(api.base_url, ids, seen, stop))
            for _ in range(POLLERS)
        ]
        fal_run = FalClientRun()
        fal_thread = threading.Thread(target=fal_client_polls, args=(handle, fal_run))
        stream_run = StreamRun()
        stream_thread = threading.Thread(
            target=follow_stream, args=(api.base_url, ids[-1], stream_run)
        )
        for thread in [*pollers, fal_thread, stream_thread]:
            thread.start()
        try:
            time.sleep(1.0)  # load before the outage
            pg_cluster.stop("fast")
            down_at = time.monotonic()
            try:
                time.sleep(OUTAGE_S)
                during = len(seen.answers)
            finally:
                pg_cluster.start()
            back_at = time.monotonic()
            wait_for(
                lambda: http.get("/readyz").status_code == 200,
                timeout_s=20,
                what="/readyz to say ready again",
            )
            time.sleep(1.0)  # load after the outage
        finally:
            stop.set()
            for thread in pollers:
                thread.join(30)
        fal_thread.join(100)
        stream_thread.join(60)

    acknowledged = [*ids, *seen.acknowledged]
    codes = Counter((what, status) for what, status, _, _ in seen.answers)
    unavailable = [a for a in seen.answers if a[1] == 503]
    print(
        f"answers: {dict(codes)}; {during} during the first {OUTAGE_S} s of the outage; "
        f"slowest 503: {max((a[2] for a in unavailable), default=0):.3f} s; "
        f"fal-client: {dict(fal_run.statuses)}, {len(fal_run.errors)} 503s; "
        f"stream events: {stream_run.events}; back after {back_at - down_at:.1f} s"
    )
    with opened(pg_backend) as store:

        def all_final() -> bool:
            return all(store.get(i).status.is_final for i in acknowledged)  # type: ignore[union-attr]

        wait_for(all_final, timeout_s=60, poll_s=0.5, what="every acknowledged request to finish")
        jobs = [store.get(i) for i in acknowledged]
    rows = pg_backend.count_jobs()

    assert not seen.transport_errors, seen.transport_errors[:5]
    assert {status for _, status, _, _ in seen.answers} <= {200, 202, 503}, codes
    assert all(json_ok for *_, json_ok in seen.answers), [a for a in seen.answers if not a[3]][:5]
    assert unavailable, "the outage was not seen"
    assert {what for what, *_ in unavailable} >= {"status", "readyz"}, codes
    assert max(took for _, _, took, _ in unavailable) < PROMPT_S
    # Refused submits left nothing behind; acknowledged ones all ran.
    assert rows == len(acknowledged), (rows, len(acknowledged), seen.refused_submits)
    failed = [
        (j.id, j.status, j.error) for j in jobs if j is None or j.status is not JobStatus.SUCCEEDED
    ]
    assert not failed, f"{failed}\n{processes.logs()}"
    # The official client saw 503s with a JSON body while the store was away, then the result.
    assert fal_run.failure is None, fal_run.failure
    assert fal_run.result is not None and fal_run.result["images"], fal_run
    assert all(code == 503 and "detail" in body for code, body in fal_run.errors), fal_run.errors
    # A status stream opened before the outage stayed open through it and ended COMPLETED.
    assert stream_run.failure is None, stream_run.failure
    assert stream_run.events and stream_run.events[-1] == "COMPLETED", stream_run.events
