"""A Hypothesis state machine over submit / status / cancel / result against the real app,
with a worker played through the store. After every step, for every request:

* its status is one of the protocol's three (IN_QUEUE, IN_PROGRESS, COMPLETED) and never goes
  back from COMPLETED;
* a queued request has a queue position, never negative, and the queued requests' positions
  are exactly 0..n-1;
* the result endpoint answers a result exactly when the status is COMPLETED (still in
  progress: 400 "Request is still in progress"), and an output only for a success.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from http_support import LOOPBACK, MAX, PlayedWorker, edit_body
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule
from starlette.testclient import TestClient

from kontext_server.config import Settings
from kontext_server.domain.jobs import JobStatus
from kontext_server.files.local import LocalFileStore
from kontext_server.http.app import create_app
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.webhooks.signing import WebhookSigner

STATUSES = frozenset({"IN_QUEUE", "IN_PROGRESS", "COMPLETED"})
IN_PROGRESS_DETAIL = {"detail": "Request is still in progress"}


class QueueProtocol(RuleBasedStateMachine):
    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="kontext-sm-"))
        self.store = SQLiteJobStore(self.folder / "jobs.db")
        files = LocalFileStore(self.folder / "files")
        app = create_app(
            Settings(data_dir=self.folder / "data"),
            self.store,
            files,
            signer=WebhookSigner.load_or_create(self.folder / "key.pem"),
            run_background=False,
        )
        self.client = TestClient(app, client=LOOPBACK).__enter__()
        self.worker = PlayedWorker(self.store, files)
        self.urls: dict[str, dict[str, str]] = {}
        self.completed: set[str] = set()
        self.running = False

    def teardown(self) -> None:
        self.client.__exit__(None, None, None)
        self.store.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    # --- the client ------------------------------------------------------------------------

    @rule(target=requests, priority=st.sampled_from([None, "normal", "low"]))
    def submit(self, priority: str | None) -> str:
        headers = {"x-fal-queue-priority": priority} if priority else {}
        answer = self.client.post(f"/{MAX}", json=edit_body(), headers=headers)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        assert body["status"] == "IN_QUEUE" and body["queue_position"] >= 0
        self.urls[body["request_id"]] = body
        return str(body["request_id"])

    @rule(request_id=requests)
    def cancel(self, request_id: str) -> None:
        answer = self.client.put(self.urls[request_id]["cancel_url"])
        assert answer.status_code in (202, 400), answer.text
        assert (answer.status_code == 400) == (answer.json()["status"] == "ALREADY_COMPLETED")

    # --- the worker ------------------------------------------------------------------------

    @rule()
    def claim(self) -> None:
        if self.running or self.store.queue_depth() == 0:
            return
        self.worker.claim()
        self.running = True

    @rule(step=st.integers(1, 4))
    def progress(self, step: int) -> None:
        if self.running:
            self.worker.progress(step, 4)

    @rule(outcome=st.sampled_from(["succeed", "fail", "honour_cancel"]))
    def finish(self, outcome: str) -> None:
        if not self.running:
            return
        job = self.worker.job
        assert job is not None
        if outcome == "honour_cancel" and self.store.is_cancel_requested(job.id):
            self.worker.cancelled()
        elif outcome == "fail":
            self.worker.fail("it broke", "internal_error")
        else:
            self.worker.succeed()
        self.running = False

    # --- what must always hold -------------------------------------------------------------

    @invariant()
    def statuses_positions_and_results_agree(self) -> None:
        positions = []
        for request_id, urls in self.urls.items():
            status = self.client.get(urls["status_url"]).json()
            assert status["status"] in STATUSES
            if request_id in self.completed:
                assert status["status"] == "COMPLETED"
            if status["status"] == "IN_QUEUE":
                assert status["queue_position"] >= 0
                positions.append(status["queue_position"])
            self._check_result(request_id, status["status"])
        assert sorted(positions) == list(range(len(positions)))

    def _check_result(self, request_id: str, status: str) -> None:
        answer = self.client.get(self.urls[request_id]["response_url"])
        if status != "COMPLETED":
            assert answer.status_code == 400 and answer.json() == IN_PROGRESS_DETAIL
            return
        self.completed.add(request_id)
        job = self.store.get(request_id)
        assert job is not None
        if job.status is JobStatus.SUCCEEDED:
            assert answer.status_code == 200 and answer.json()["images"]
        else:
            assert answer.status_code >= 400 and "x-fal-error-type" in answer.headers
            assert answer.json() != IN_PROGRESS_DETAIL


QueueProtocol.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)
test_queue_protocol_invariants = QueueProtocol.TestCase
