"""Operations routes: /healthz, /readyz, /metrics, and the access log's request ids."""

from __future__ import annotations

import logging

import pytest
from http_support import MAX, AppFactory, submit
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from kontext_server.domain.editing import EditInput, EditResult
from kontext_server.domain.errors import StoreUnavailableError
from kontext_server.domain.jobs import Job, JobStatus
from kontext_server.metrics import JobMetrics
from kontext_server.store.sqlite import SQLiteJobStore


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_healthz_answers_ok(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_is_ready_when_the_store_answers(client: TestClient) -> None:
    assert client.get("/readyz").json() == {"status": "ready"}


def test_readyz_says_what_is_wrong_when_a_check_fails(make_app: AppFactory) -> None:
    app = make_app(readiness_checks=[lambda: "none of the 1 worker process(es) is running"])
    with TestClient(app) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["problems"] == ["none of the 1 worker process(es) is running"]


def test_metrics_report_queue_depth_by_endpoint_priority_and_state(client: TestClient) -> None:
    submit(client)
    submit(client)
    submit(client, headers={"X-Fal-Queue-Priority": "low"})
    submit(client, path=f"{MAX}/multi", body={"prompt": "p", "image_urls": [_uri()]})

    text = client.get("/metrics").text

    depth = samples(text, "kontext_queue_depth")
    assert depth[(("endpoint", MAX), ("priority", "normal"), ("state", "queued"))] == 2
    assert depth[(("endpoint", MAX), ("priority", "low"), ("state", "queued"))] == 1
    assert depth[(("endpoint", f"{MAX}/multi"), ("priority", "normal"), ("state", "queued"))] == 1


def test_metrics_show_what_workers_recorded(client: TestClient) -> None:
    job = Job(
        id="j",
        seq=1,
        endpoint="fal-ai/test/metrics",
        input=EditInput(prompt="p"),
        owner=None,
        priority=0,
        status=JobStatus.RUNNING,
        attempts=1,
        max_attempts=3,
        cancel_requested=False,
        lease_owner="w",
        lease_until=None,
        result=None,
        error=None,
        error_type=None,
        progress=None,
        start_deadline_at=None,
        webhook_url=None,
        base_url=None,
        created_at=100.0,
        started_at=101.5,
    )
    recorder = JobMetrics()
    recorder.job_started(job)
    result = EditResult(images=[], seed=1, timings={"inference": 2.0}, steps=8)
    recorder.job_finished(job, JobStatus.SUCCEEDED, None, 2.5, result)
    recorder.job_finished(job, JobStatus.FAILED, "image_load_error", 0.1, None)

    text = client.get("/metrics").text

    finished = samples(text, "kontext_jobs_finished_total")
    assert finished[(("endpoint", "fal-ai/test/metrics"), ("status", "succeeded"))] >= 1
    assert samples(text, "kontext_job_failures_total")[(("error_type", "image_load_error"),)] >= 1
    wait_sum = samples(text, "kontext_job_wait_seconds_sum")
    assert wait_sum[(("endpoint", "fal-ai/test/metrics"),)] >= 1.5
    assert samples(text, "kontext_denoising_steps_per_second")[()] == pytest.approx(4.0)


def test_access_log_lines_carry_the_request_id(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="kontext_server.access"):
        answer = submit(client)
        client.get(answer["status_url"])
    ids = [
        getattr(r, "request_id", None) for r in caplog.records if r.name == "kontext_server.access"
    ]
    assert ids == [answer["request_id"], answer["request_id"]]


def _uri() -> str:
    from http_support import tiny_png_data_uri

    return tiny_png_data_uri()


def test_readyz_asks_the_store_itself_not_its_memory(
    make_app: AppFactory, store: SQLiteJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable() -> None:
        raise StoreUnavailableError("the job store is unavailable (test)")

    monkeypatch.setattr(store, "ping", unreachable)
    store.queue_depth()  # still answers (from memory on some stores)
    with TestClient(make_app()) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert "the job store is unavailable (test)" in response.json()["problems"][0]
