"""Status (§4), result (§6) and cancel (§7), with a played worker."""

from __future__ import annotations

import pytest
from http_support import MAX, PlayedWorker, edit_body, submit
from starlette.testclient import TestClient

from kontext_server.store.sqlite import SQLiteJobStore

FAL_STATUSES = {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}


def test_a_queued_request_reads_in_queue_with_its_position_and_202(client: TestClient) -> None:
    submit(client)
    answer = submit(client)

    response = client.get(answer["status_url"])

    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "IN_QUEUE"
    assert body["queue_position"] == 1
    assert body["request_id"] == answer["request_id"]
    assert body["response_url"] == answer["response_url"]
    assert response.headers["x-fal-request-id"] == answer["request_id"]


def test_a_running_request_reads_in_progress_with_step_progress_and_no_logs_by_default(
    client: TestClient, worker: PlayedWorker
) -> None:
    answer = submit(client)
    worker.claim()
    worker.progress(7, 28)

    response = client.get(answer["status_url"])

    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "IN_PROGRESS"
    assert body["progress"] == {"step": 7, "total": 28}
    assert body["logs"] is None
    assert body["metrics"] == {}
    assert "queue_position" not in body


@pytest.mark.parametrize("flag", ["1", "true"])
def test_logs_are_listed_when_asked_for(
    client: TestClient, worker: PlayedWorker, flag: str
) -> None:
    answer = submit(client)
    worker.claim()
    worker.progress(1, 2)

    logs = client.get(answer["status_url"], params={"logs": flag}).json()["logs"]

    assert any(entry["message"] == "step 1/2" for entry in logs)
    for entry in logs:
        assert set(entry) == {"message", "level", "source", "timestamp"}
        assert entry["source"] == "USER"
        assert entry["level"] in {"INFO", "WARN", "ERROR", "DEBUG"}
    assert client.get(answer["status_url"], params={"logs": "0"}).json()["logs"] is None


def test_a_finished_request_reads_completed_with_200_and_inference_time(
    client: TestClient, worker: PlayedWorker
) -> None:
    answer = submit(client)
    worker.claim()
    worker.succeed()

    response = client.get(answer["status_url"])

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "COMPLETED"
    assert body["metrics"] == {"inference_time": 1.25}
    assert "logs" in body
    assert "error" not in body


def test_only_the_three_fal_statuses_ever_appear(client: TestClient, worker: PlayedWorker) -> None:
    seen = set()
    failed, cancelled, succeeded = submit(client), submit(client), submit(client)
    seen.add(client.get(failed["status_url"]).json()["status"])
    worker.claim()
    seen.add(client.get(failed["status_url"]).json()["status"])
    worker.fail("image could not be fetched", "file_download_error")
    client.put(cancelled["cancel_url"])
    worker.claim()
    worker.succeed()

    for answer in (failed, cancelled, succeeded):
        seen.add(client.get(answer["status_url"]).json()["status"])
    assert seen == FAL_STATUSES


def test_a_failure_reads_completed_with_error_and_error_type(
    client: TestClient, worker: PlayedWorker
) -> None:
    answer = submit(client)
    worker.claim()
    worker.fail("cannot fetch https://example.com/cat.png: HTTP 404", "file_download_error")

    body = client.get(answer["status_url"]).json()

    assert body["status"] == "COMPLETED"
    assert body["error"] == "cannot fetch https://example.com/cat.png: HTTP 404"
    assert body["error_type"] == "file_download_error"


def test_the_full_endpoint_path_is_accepted_before_requests(client: TestClient) -> None:
    request_id = submit(client)["request_id"]

    assert client.get(f"/{MAX}/requests/{request_id}/status").status_code == 202
    assert client.get(f"/queue/{MAX}/requests/{request_id}").status_code == 400


def test_another_apps_path_or_an_unknown_id_is_a_404(client: TestClient) -> None:
    request_id = submit(client)["request_id"]

    wrong_app = client.get(f"/fal-ai/flux-lora/requests/{request_id}/status")
    unknown = client.get("/fal-ai/flux-pro/requests/00000000-0000-0000-0000-000000000000/status")

    assert wrong_app.status_code == 404
    assert unknown.status_code == 404
    assert unknown.json() == {"detail": "Request not found"}


def test_result_before_the_end_is_a_400(client: TestClient, worker: PlayedWorker) -> None:
    answer = submit(client)
    assert client.get(answer["response_url"]).status_code == 400
    worker.claim()

    response = client.get(answer["response_url"])

    assert response.status_code == 400
    assert response.json() == {"detail": "Request is still in progress"}


def test_result_after_success_renders_urls_that_serve_the_image(
    client: TestClient, worker: PlayedWorker
) -> None:
    answer = submit(client, body=edit_body(output_format="png"))
    worker.claim()
    stored = worker.succeed(output_format="png")

    response = client.get(answer["response_url"])

    assert response.status_code == 200
    output = response.json()
    image = output["images"][0]
    assert "file_key" not in image
    assert image["url"] == f"http://testserver/files/{stored['images'][0]['file_key']}"
    assert (image["width"], image["height"], image["content_type"]) == (24, 16, "image/png")
    assert output["seed"] == 42
    assert output["has_nsfw_concepts"] == [False]
    assert output["timings"] == {"inference": 1.25}
    assert output["prompt"] == "Put a donut next to the flour."
    file = client.get(image["url"])
    assert file.status_code == 200
    assert file.headers["content-type"] == "image/png"
    assert file.content.startswith(b"\x89PNG")
    assert len(file.content) == image["file_size"]


def test_sync_mode_results_keep_their_data_uris(client: TestClient, worker: PlayedWorker) -> None:
    answer = submit(client, body=edit_body(sync_mode=True))
    worker.claim()
    worker.succeed(sync_mode=True)

    image = client.get(answer["response_url"]).json()["images"][0]

    assert image["url"].startswith("data:image/jpeg;base64,")


@pytest.mark.parametrize(
    ("error_type", "status_code"),
    [
        ("bad_request", 422),
        ("file_download_error", 422),
        ("image_load_error", 422),
        ("request_timeout", 504),
        ("internal_error", 500),
        ("runner_disconnected", 500),
        ("something_new", 500),
    ],
)
def test_result_of_a_failure_answers_the_code_of_its_error_type(
    client: TestClient, worker: PlayedWorker, error_type: str, status_code: int
) -> None:
    answer = submit(client)
    worker.claim()
    worker.fail("it went wrong", error_type)

    response = client.get(answer["response_url"])

    assert response.status_code == status_code
    assert response.json() == {"detail": "it went wrong", "error_type": error_type}
    assert response.headers["x-fal-error-type"] == error_type
    assert response.headers["x-fal-request-id"] == answer["request_id"]
    # the official clients retry a 504 unless it is marked as the caller's own timeout
    timeout_type = response.headers.get("x-fal-request-timeout-type")
    assert timeout_type == ("user" if error_type == "request_timeout" else None)


def test_cancel_of_queued_job_is_immediate(client: TestClient) -> None:
    answer = submit(client)

    response = client.put(answer["cancel_url"])

    assert response.status_code == 202
    assert response.json() == {"status": "CANCELLATION_REQUESTED"}
    status = client.get(answer["status_url"]).json()
    assert status["status"] == "COMPLETED"
    assert status["error_type"] == "client_cancelled"
    result = client.get(answer["response_url"])
    assert result.status_code == 400
    assert result.headers["x-fal-error-type"] == "client_cancelled"


def test_cancel_of_running_job_sets_the_flag_the_worker_watches(
    client: TestClient, worker: PlayedWorker, store: SQLiteJobStore
) -> None:
    answer = submit(client)
    job = worker.claim()

    response = client.put(answer["cancel_url"])

    assert response.status_code == 202
    assert store.is_cancel_requested(job.id)
    assert client.get(answer["status_url"]).json()["status"] == "IN_PROGRESS"
    worker.cancelled()
    assert client.get(answer["status_url"]).json()["error_type"] == "client_cancelled"


def test_cancel_of_finished_job_is_a_400(client: TestClient, worker: PlayedWorker) -> None:
    answer = submit(client)
    worker.claim()
    worker.succeed()

    response = client.put(answer["cancel_url"])

    assert response.status_code == 400
    assert response.json() == {"status": "ALREADY_COMPLETED"}


def test_cancel_of_unknown_job_is_a_404(client: TestClient) -> None:
    unknown = "0190b1f2-7c3a-7d4e-8f60-123456789abc"
    response = client.put(f"/fal-ai/flux-pro/requests/{unknown}/cancel")

    assert response.status_code == 404
    assert response.json() == {"status": "NOT_FOUND"}
    assert response.headers["x-fal-request-id"] == unknown


def test_cancel_of_an_id_not_of_our_format_is_a_404_that_does_not_echo_it(
    client: TestClient,
) -> None:
    response = client.put("/fal-ai/flux-pro/requests/nope/cancel")

    assert response.status_code == 404
    assert response.json() == {"status": "NOT_FOUND"}
    assert "x-fal-request-id" not in response.headers
