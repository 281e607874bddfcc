"""Operations of a live `serve`: worker samples reach the API's /metrics, readiness."""

from __future__ import annotations

import httpx
import pytest
from e2e_support import ENDPOINT, ServerProcess, make_input_data_uri, wait_until_completed
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_worker_metrics_are_served_by_the_api_process(live_server: ServerProcess) -> None:
    with httpx.Client(base_url=live_server.base_url, timeout=10.0) as client:
        before = metric(
            client.get("/metrics").text,
            "kontext_jobs_finished_total",
            endpoint=ENDPOINT,
            status="succeeded",
        )
        answer = client.post(
            f"/{ENDPOINT}", json={"prompt": "p", "image_url": make_input_data_uri()}
        )
        wait_until_completed(client, answer.json()["status_url"], timeout_s=90)
        text = client.get("/metrics").text
        ready = client.get("/readyz")

    finished = metric(text, "kontext_jobs_finished_total", endpoint=ENDPOINT, status="succeeded")
    assert finished >= before + 1
    assert metric(text, "kontext_workers") == 1
    assert metric(text, "kontext_denoising_steps_total") >= 2
    assert metric(text, "kontext_job_run_seconds_count", endpoint=ENDPOINT) >= 1
    assert "kontext_queue_depth" in text
    assert ready.status_code == 200, ready.text
