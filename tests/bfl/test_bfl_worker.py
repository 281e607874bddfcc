"""The BFL engine against the stand-in BFL server: mapping, statuses, retries, cancel,
resume after a lost worker, drain, many jobs in flight. Real SQLite, real HTTP."""

from __future__ import annotations

import base64
import io
import logging
import time
from dataclasses import replace
from typing import Any

import pytest
from bfl_standin import API_KEY
from bfl_support import FAST_LIMITS, MAX, MULTI, Rig, RunningWorker, png_data_uri
from PIL import Image

from kontext_server.domain.editing import EditInput
from kontext_server.domain.jobs import Job, JobStatus
from kontext_server.worker.bfl import BflClient, bfl_request_body


def wait_until(predicate: Any, timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def final(rig: Rig, job: Job, timeout_s: float = 15.0) -> Job:
    def done() -> bool:
        current = rig.store.get(job.id)
        return current is not None and current.status.is_final

    wait_until(done, timeout_s, f"job {job.id} to finish")
    current = rig.store.get(job.id)
    assert current is not None
    return current


def error_events(rig: Rig, job: Job) -> list[Any]:
    return [event for event in rig.store.events(job.id) if event.level == "ERROR"]


# --- routing and mapping ---------------------------------------------------------------------


def test_submit_routes_configured_endpoints_to_the_bfl_engine(rig: Rig) -> None:
    job = rig.submit(MAX)
    assert job.engine == "bfl"
    assert rig.store.claim("local-worker", 30.0) is None  # a local worker never takes it
    assert rig.store.claim("bfl-worker", 30.0, engine="bfl") is not None


def test_max_completes_with_the_local_result_shape(rig: Rig) -> None:
    job = rig.submit(MAX, seed=42, output_format="png", aspect_ratio="16:9")
    with RunningWorker(rig.make_worker()):
        done = final(rig, job)
    assert done.status is JobStatus.SUCCEEDED, done.error
    result = done.result
    assert result is not None
    assert set(result) == {
        "images",
        "timings",
        "seed",
        "has_nsfw_concepts",
        "prompt",
        "random_weights",
    }
    assert result["seed"] == 42 and result["has_nsfw_concepts"] == [False]
    [image] = result["images"]
    assert (image["width"], image["height"], image["content_type"]) == (96, 54, "image/png")
    stored = rig.files.read(image["file_key"])
    assert stored is not None and len(stored) == image["file_size"]
    assert Image.open(io.BytesIO(stored)).format == "PNG"
    [body] = rig.standin.submissions
    assert body["seed"] == 42 and body["aspect_ratio"] == "16:9"
    assert body["output_format"] == "png" and body["safety_tolerance"] == 2
    assert body["prompt_upsampling"] is False
    # The reference travels as plain base64 (not a data URI) of the caller's bytes.
    sent = base64.b64decode(body["input_image"])
    assert sent == base64.b64decode(png_data_uri().split(",", 1)[1])


def test_multi_sends_each_reference_and_one_task_per_image_with_consecutive_seeds(
    rig: Rig,
) -> None:
    job = rig.submit(MULTI, seed=7, num_images=3, enhance_prompt=True, safety_tolerance="5")
    with RunningWorker(rig.make_worker()):
        done = final(rig, job)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert done.result is not None and len(done.result["images"]) == 3
    bodies = rig.standin.submissions
    assert sorted(body["seed"] for body in bodies) == [7, 8, 9]
    for body in bodies:
        assert {"input_image", "input_image_2"} <= set(body) and "input_image_3" not in body
        assert body["prompt_upsampling"] is True and body["safety_tolerance"] == 5
        assert "guidance_scale" not in body and "num_images" not in body


def test_request_body_names_up_to_four_references() -> None:
    body = bfl_request_body(EditInput(prompt="p"), ["a", "b", "c", "d"], seed=1)
    assert [
        body[k] for k in ("input_image", "input_image_2", "input_image_3", "input_image_4")
    ] == ["a", "b", "c", "d"]


def test_more_than_four_references_fail_with_a_clear_error(rig: Rig) -> None:
    job = rig.submit(MULTI, prompt="p", image_urls=[png_data_uri()] * 5)
    with RunningWorker(rig.make_worker()):
        done = final(rig, job)
    assert done.status is JobStatus.FAILED and done.error_type == "bad_request"
    assert "at most 4 reference images" in (done.error or "")
    assert rig.standin.submissions == []


# --- upstream statuses -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("marker", "flags", "words"),
    [
        ("[request-moderated]", [False], "prompt or an input image"),
        ("[content-moderated]", [True], "generated image"),
    ],
)
def test_moderation_fails_with_content_policy_violation_and_nsfw_flags(
    rig: Rig, marker: str, flags: list[bool], words: str
) -> None:
    job = rig.submit(MAX, prompt=f"make it naughty {marker}")
    with RunningWorker(rig.make_worker()):
        done = final(rig, job)
    assert done.status is JobStatus.FAILED
    assert done.error_type == "content_policy_violation"
    assert "moderated" in (done.error or "") and words in (done.error or "")
    [event] = [e for e in error_events(rig, job) if "has_nsfw_concepts" in e.data]
    assert event.data["has_nsfw_concepts"] == flags


def test_upstream_error_status_reaches_the_job_clearly(rig: Rig) -> None:
    job = rig.submit(MAX, prompt="break it [error]")
    with RunningWorker(rig.make_worker()):
        done = final(rig, job)
    assert done.status is JobStatus.FAILED and done.error_type == "internal_error"
    assert "Black Forest Labs could not run the edit" in (done.error or "")


def test_pending_reports_progress_events(rig: Rig) -> None:
    rig.standin.ready_after_s = 0.8
    job = rig.submit(MAX)
    with RunningWorker(rig.make_worker()):
        final(rig, job)
    steps = [e.data["step"] for e in rig.store.events(job.id) if "step" in e.data]
    assert len(steps) >= 2 and steps == sorted(steps) and steps[-1] == 100
    assert any("Pending" in e.message for e in rig.store.events(job.id))


def test_429_and_503_are_retried_without_paying_twice(rig: Rig) -> None:
    rig.standin.fail_submits = 2
    rig.standin.fail_polls = 2
    job = rig.submit(MAX)
    with RunningWorker(rig.make_worker()):
        done = final(rig, job)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert len(rig.standin.submissions) == 1
    warnings = [e.message for e in rig.store.events(job.id) if e.level == "WARN"]
    assert any("429" in m for m in warnings) and any("503" in m for m in warnings)


def test_retries_stop_when_the_jobs_time_runs_out(rig: Rig) -> None:
    rig.standin.fail_submits = 10_000
    limits = replace(FAST_LIMITS, job_timeout_s=1.0)
    job = rig.submit(MAX)
    with RunningWorker(rig.make_worker(limits=limits)):
        done = final(rig, job)
    assert done.status is JobStatus.FAILED and done.error_type == "execution_timeout"
    assert "kept failing" in (done.error or "") and "429" in (done.error or "")


def test_expired_sample_url_fails_clearly(rig: Rig) -> None:
    rig.standin.sample_ttl_s = -1.0
    job = rig.submit(MAX)
    with RunningWorker(rig.make_worker()):
        done = final(rig, job)
    assert done.status is JobStatus.FAILED
    assert "could not be downloaded" in (done.error or "") and "expire" in (done.error or "")


def test_bad_api_key_fails_clearly_without_showing_the_key(rig: Rig) -> None:
    job = rig.submit(MAX)
    with RunningWorker(rig.make_worker(api_key="wrong-key-123")):
        done = final(rig, job)
    assert done.status is JobStatus.FAILED and "KONTEXT_BFL_API_KEY" in (done.error or "")
    assert "wrong-key-123" not in (done.error or "")


def test_the_api_key_never_reaches_logs_events_or_the_job(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    job = rig.submit(MAX)
    with RunningWorker(rig.make_worker()):
        done = final(rig, job)
    assert API_KEY not in caplog.text
    assert API_KEY not in repr(done) and API_KEY not in repr(rig.store.events(job.id))


# --- cancel, crash, drain, concurrency -----------------------------------------------------------


def test_cancel_while_polling_stops_polling_and_discards(rig: Rig) -> None:
    job = rig.submit(MAX, prompt="forever [never]")
    with RunningWorker(rig.make_worker()):
        wait_until(lambda: rig.standin.polls >= 2, what="polling")
        rig.store.request_cancel(job.id)
        done = final(rig, job)
        polls_at_cancel = rig.standin.polls
        time.sleep(0.5)
        assert rig.standin.polls == polls_at_cancel
    assert done.status is JobStatus.CANCELED and done.error_type == "client_cancelled"


def test_a_new_attempt_resumes_the_recorded_task_instead_of_submitting_again(rig: Rig) -> None:
    rig.standin.ready_after_s = 0.5
    job = rig.submit(MAX, seed=3)
    # A worker that submitted, recorded the task and died before polling it.
    claimed = rig.store.claim("crashed", 0.2, engine="bfl")
    assert claimed is not None
    client = BflClient(rig.standin.url, API_KEY)
    task = client.submit("flux-kontext-max", {"prompt": "make it blue", "seed": 3})
    client.close()
    record = {"engine": "bfl", "model": "flux-kontext-max", "seed": 3, "tasks": [task]}
    assert rig.store.set_upstream(job.id, "crashed", claimed.attempts, record)
    time.sleep(0.3)
    assert rig.store.requeue_expired() == 1
    with RunningWorker(rig.make_worker()):
        done = final(rig, job)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert len(rig.standin.submissions) == 1  # paid once
    assert done.attempts == 2 and done.upstream == record
    assert any("resuming 1" in e.message for e in rig.store.events(job.id))


def test_a_resumed_multi_image_job_submits_only_the_missing_tasks(rig: Rig) -> None:
    job = rig.submit(MAX, seed=10, num_images=3)
    claimed = rig.store.claim("crashed", 0.2, engine="bfl")
    assert claimed is not None
    client = BflClient(rig.standin.url, API_KEY)
    task = client.submit("flux-kontext-max", {"prompt": "make it blue", "seed": 10})
    client.close()
    record = {"engine": "bfl", "model": "flux-kontext-max", "seed": 10, "tasks": [task]}
    assert rig.store.set_upstream(job.id, "crashed", claimed.attempts, record)
    time.sleep(0.3)
    rig.store.requeue_expired()
    with RunningWorker(rig.make_worker()):
        done = final(rig, job)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert sorted(body["seed"] for body in rig.standin.submissions) == [10, 11, 12]


def test_drain_hands_the_job_back_with_its_task_recorded(rig: Rig) -> None:
    job = rig.submit(MAX, prompt="forever [never]")
    worker = rig.make_worker()
    with RunningWorker(worker):
        wait_until(lambda: rig.standin.polls >= 1, what="polling")
        worker.drain(0.0)
    back = rig.store.get(job.id)
    assert back is not None and back.status is JobStatus.QUEUED
    assert back.upstream is not None and len(back.upstream["tasks"]) == 1
    assert len(rig.standin.submissions) == 1


def test_many_jobs_are_in_flight_at_once(rig: Rig) -> None:
    rig.standin.slow_s = 1.0
    jobs = [rig.submit(MAX, prompt=f"job {i} [slow]") for i in range(4)]
    started = time.monotonic()
    with RunningWorker(rig.make_worker()):
        done = [final(rig, job) for job in jobs]
    elapsed_s = time.monotonic() - started
    assert all(job.status is JobStatus.SUCCEEDED for job in done)
    assert elapsed_s < 3.0, f"4 one-second tasks took {elapsed_s:.1f} s: not concurrent"


def test_in_flight_jobs_are_bounded_by_max_in_flight(rig: Rig) -> None:
    rig.standin.slow_s = 1.0
    jobs = [rig.submit(MAX, prompt=f"job {i} [slow]") for i in range(3)]
    worker = rig.make_worker(limits=replace(FAST_LIMITS, max_in_flight=2))
    with RunningWorker(worker):
        time.sleep(0.5)
        running = [j for j in jobs if (rig.store.get(j.id) or j).status is JobStatus.RUNNING]
        assert len(running) == 2 and worker.in_flight_count == 2
        for job in jobs:
            final(rig, job)


def test_lease_is_kept_alive_while_polling(rig: Rig) -> None:
    rig.standin.slow_s = 1.5
    job = rig.submit(MAX, prompt="slow [slow]")
    limits = replace(FAST_LIMITS, lease_s=0.5)
    with RunningWorker(rig.make_worker(limits=limits)):
        time.sleep(1.0)
        assert rig.store.requeue_expired() == 0
        done = final(rig, job)
    assert done.status is JobStatus.SUCCEEDED and done.attempts == 1
