"""Conformance: random sequences of store operations agree with a tiny in-memory model.

The model is the state machine of ``store/base.py`` written as plainly as possible; Hypothesis
drives both with the same operations (submit, claim, fenced writes by current and stale
attempts, cancel, time passing + lease expiry) and compares them after every step.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kontext_server.domain.editing import EditInput
from kontext_server.domain.jobs import CancelOutcome, JobStatus, NewJob, Progress

if TYPE_CHECKING:
    from tests.contract.conftest import Backend, FakeClock

LEASE_S = 30.0
WORKERS = ("worker-1", "worker-2")
FINAL_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


@dataclass
class ModelJob:
    order: int  # submission order: the tie-breaker after priority
    priority: int
    max_attempts: int
    status: JobStatus = JobStatus.QUEUED
    attempts: int = 0
    lease_owner: str | None = None
    lease_until: float | None = None
    cancel_requested: bool = False

    def is_queued(self) -> bool:
        return self.status is JobStatus.QUEUED


def build_machine(backend: Backend, clock_type: type[FakeClock]) -> type[RuleBasedStateMachine]:
    class JobStoreMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.folder = Path(tempfile.mkdtemp(prefix="kontext-contract-"))
            self.clock = clock_type()
            self.store = backend.open(backend.fresh_url(self.folder), self.clock)
            self.model: dict[str, ModelJob] = {}

        def teardown(self) -> None:
            self.store.close()
            shutil.rmtree(self.folder, ignore_errors=True)

        # --- the model's reading of the rules -----------------------------------------------------
        def queued_in_order(self) -> list[str]:
            queued = [(j.priority, j.order, i) for i, j in self.model.items() if j.is_queued()]
            return [job_id for _, _, job_id in sorted(queued)]

        def running(self) -> list[str]:
            return sorted(i for i, j in self.model.items() if j.status is JobStatus.RUNNING)

        def owns(self, job_id: str, worker_id: str, attempt: int) -> bool:
            job = self.model[job_id]
            return (job.status, job.lease_owner, job.attempts) == (
                JobStatus.RUNNING,
                worker_id,
                attempt,
            )

        # --- operations ---------------------------------------------------------------------------
        @rule(priority=st.sampled_from([0, 1]), max_attempts=st.integers(1, 3))
        def submit(self, priority: int, max_attempts: int) -> None:
            job = NewJob(
                id=f"job-{len(self.model):04d}",  # deterministic: Hypothesis replays examples
                endpoint="fal-ai/flux-pro/kontext/max",
                input=EditInput(prompt="x"),
                priority=priority,
                max_attempts=max_attempts,
            )
            self.store.submit(job)
            self.model[job.id] = ModelJob(len(self.model), priority, max_attempts)

        @rule(worker_id=st.sampled_from(WORKERS))
        def claim(self, worker_id: str) -> None:
            queued = self.queued_in_order()
            claimed = self.store.claim(worker_id, LEASE_S)
            if not queued:
                assert claimed is None
                return
            assert claimed is not None
            assert claimed.id == queued[0]
            job = self.model[claimed.id]
            job.status, job.attempts = JobStatus.RUNNING, job.attempts + 1
            job.lease_owner, job.lease_until = worker_id, self.clock.now + LEASE_S

        @precondition(lambda self: self.running())
        @rule(data=st.data(), status=st.sampled_from(FINAL_STATUSES))
        def finish_by_lease_holder(self, data: st.DataObject, status: JobStatus) -> None:
            job_id = data.draw(st.sampled_from(self.running()))
            job = self.model[job_id]
            assert job.lease_owner is not None
            assert self.store.finish(job_id, job.lease_owner, job.attempts, status, result={})
            job.status = status

        @precondition(lambda self: self.running())
        @rule(data=st.data())
        def heartbeat_by_lease_holder(self, data: st.DataObject) -> None:
            job_id = data.draw(st.sampled_from(self.running()))
            job = self.model[job_id]
            assert job.lease_owner is not None
            assert self.store.heartbeat(job_id, job.lease_owner, job.attempts, LEASE_S)
            job.lease_until = self.clock.now + LEASE_S

        @precondition(lambda self: self.model)
        @rule(
            data=st.data(),
            worker_id=st.sampled_from(WORKERS),
            attempt=st.integers(1, 3),
            write=st.sampled_from(["heartbeat", "progress", "finish"]),
        )
        def write_by_anyone(
            self, data: st.DataObject, worker_id: str, attempt: int, write: str
        ) -> None:
            """Mostly stale or foreign writes: they must change nothing unless fenced in."""
            job_id = data.draw(st.sampled_from(sorted(self.model)))
            allowed = self.owns(job_id, worker_id, attempt)
            if write == "heartbeat":
                done = self.store.heartbeat(job_id, worker_id, attempt, LEASE_S)
                if allowed:
                    self.model[job_id].lease_until = self.clock.now + LEASE_S
            elif write == "progress":
                done = self.store.set_progress(job_id, worker_id, attempt, Progress(1, 2))
            else:
                done = self.store.finish(job_id, worker_id, attempt, JobStatus.FAILED, error="x")
                if allowed:
                    self.model[job_id].status = JobStatus.FAILED
            assert done == allowed

        @precondition(lambda self: self.model)
        @rule(data=st.data())
        def cancel(self, data: st.DataObject) -> None:
            job_id = data.draw(st.sampled_from(sorted(self.model)))
            job = self.model[job_id]
            outcome = self.store.request_cancel(job_id)
            if job.status is JobStatus.QUEUED:
                assert outcome is CancelOutcome.CANCELED
                job.status, job.cancel_requested = JobStatus.CANCELED, True
            elif job.status is JobStatus.RUNNING:
                assert outcome is CancelOutcome.REQUESTED
                job.cancel_requested = True
            else:
                assert outcome is CancelOutcome.ALREADY_FINISHED

        @rule(seconds=st.sampled_from([1.0, 10.0, LEASE_S + 1]))
        def time_passes_and_expired_leases_are_handled(self, seconds: float) -> None:
            self.clock.advance(seconds)
            changed = 0
            for job in self.model.values():
                if job.status is not JobStatus.RUNNING:
                    continue
                assert job.lease_until is not None
                if job.lease_until >= self.clock.now:
                    continue
                changed += 1
                if job.cancel_requested:
                    job.status = JobStatus.CANCELED
                elif job.attempts >= job.max_attempts:
                    job.status = JobStatus.FAILED
                else:
                    job.status, job.lease_owner, job.lease_until = JobStatus.QUEUED, None, None
            assert self.store.requeue_expired() == changed

        # --- what must always hold ----------------------------------------------------------------
        @invariant()
        def jobs_match_the_model(self) -> None:
            for job_id, expected in self.model.items():
                job = self.store.get(job_id)
                assert job is not None
                assert (job.status, job.attempts, job.cancel_requested) == (
                    expected.status,
                    expected.attempts,
                    expected.cancel_requested,
                )
                if expected.status is JobStatus.RUNNING:
                    assert (job.lease_owner, job.lease_until) == (
                        expected.lease_owner,
                        expected.lease_until,
                    )

        @invariant()
        def queue_positions_match_the_model(self) -> None:
            queued = self.queued_in_order()
            assert self.store.queue_depth() == len(queued)
            for position, job_id in enumerate(queued):
                assert self.store.queue_position(job_id) == position

    return JobStoreMachine


def test_store_agrees_with_the_model(backend: Backend, fake_clock_type: type[FakeClock]) -> None:
    machine = build_machine(backend, fake_clock_type)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=100,
            stateful_step_count=30,
            deadline=None,
            database=None,  # a failure prints its own reproduction
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
