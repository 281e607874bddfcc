"""Worker input prefetch: per-job wall time with the next job's inputs fetched ahead, or not.

``--jobs`` jobs are queued in a fresh SQLite store, each with its own reference image URL on
a loopback HTTP server that answers after ``--latency-ms`` (a remote image host). One
``JobRunner`` (the real worker loop: claim, fetch + decode, edit, publish, fenced finish)
runs them back to back on a fake engine that sleeps ``--edit-ms`` per edit, once with
``prefetch_jobs=0`` and once with ``prefetch_jobs=1``. Per-job wall time is claim to finish
(``run_next``). The first job cannot be fetched ahead; the saving is on the others. Prints
a table and one JSON object.

    .venv/bin/python benchmarks/prefetch.py [--jobs 10] [--edit-ms 300] [--latency-ms 200]
        [--size 1024]
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from kontext_server.domain.editing import EditInput, EditRequest, EditResult, EncodedImage
from kontext_server.domain.jobs import JobStatus, NewJob
from kontext_server.files.local import LocalFileStore
from kontext_server.net.fetch import SafeFetcher
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.worker.runner import JobRunner, RunnerLimits

__all__ = ["run"]

ENDPOINT = "fal-ai/flux-kontext/dev"


class SleepEngine:
    """A GPU stand-in: ``edit_s`` of sleep (the main thread blocked, as in a CUDA call that
    releases the GIL), then a small PNG."""

    random_weights = False
    default_steps = 1

    def __init__(self, edit_s: float) -> None:
        self.edit_s = edit_s
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, format="PNG")
        self._output = buf.getvalue()

    def edit(
        self,
        request: EditRequest,
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> EditResult:
        time.sleep(self.edit_s)
        if on_step:
            on_step(1, 1)
        image = EncodedImage(self._output, 64, 64, "image/png")
        return EditResult([image], seed=1, timings={"inference": self.edit_s})


def reference_jpeg(side: int) -> bytes:
    """A photo-like ``side``×``side`` JPEG (noise over a gradient: a realistic decode cost)."""
    gradient = Image.linear_gradient("L").resize((side, side))
    noise = Image.effect_noise((side, side), 40)
    image = Image.merge("RGB", (gradient, noise, gradient.transpose(Image.Transpose.ROTATE_90)))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@contextmanager
def image_server(body: bytes, latency_s: float, requests: list[str] | None = None) -> Iterator[int]:
    """Serves ``body`` after ``latency_s``; appends each request's path to ``requests``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if requests is not None:
                requests.append(self.path)
            time.sleep(latency_s)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield int(httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()


def run_jobs(folder: Path, port: int, jobs: int, edit_s: float, prefetch_jobs: int) -> list[float]:
    """Per-job wall seconds (claim to finish) of ``jobs`` queued jobs on one runner."""
    store = SQLiteJobStore(str(folder / "jobs.db"))
    files = LocalFileStore(folder / "files")
    fetcher = SafeFetcher(
        allow_hosts=["127.0.0.1"], allow_ports=[80, 443], timeout_s=30, max_bytes=64 << 20
    )
    runner = JobRunner(
        store,
        files,
        SleepEngine(edit_s),
        fetcher,
        worker_id="bench",
        limits=RunnerLimits(prefetch_jobs=prefetch_jobs),
        model_name="sleep",
    )
    ids = [f"job-{i}" for i in range(jobs)]
    for i, job_id in enumerate(ids):
        data = EditInput(
            prompt="make it blue", references=(f"http://127.0.0.1:{port}/ref-{i}.jpg",)
        )
        store.submit(NewJob(id=job_id, endpoint=ENDPOINT, input=data))
    walls = []
    try:
        for _ in ids:
            started = time.perf_counter()
            assert runner.run_next()
            walls.append(time.perf_counter() - started)
        for job_id in ids:
            job = store.get(job_id)
            assert job is not None and job.status is JobStatus.SUCCEEDED, job
    finally:
        runner.close()
        store.close()
    return walls


def drain(runner: JobRunner) -> None:
    while runner.run_next():
        pass


def run_workers(
    jobs: int, edit_ms: float, latency_ms: float, size: int, workers: int
) -> dict[str, Any]:
    """``workers`` runners (threads, one store handle each) drain one queue, prefetch off and
    on: wall time and image fetches per job."""
    body = reference_jpeg(size)
    found: dict[str, Any] = {"workers": workers, "jobs": jobs}
    for mode, prefetch_jobs in (("off", 0), ("on", 1)):
        requests: list[str] = []
        with (
            image_server(body, latency_ms / 1000, requests) as port,
            tempfile.TemporaryDirectory(prefix=f"prefetch-{mode}-") as folder,
        ):
            store = SQLiteJobStore(str(Path(folder) / "jobs.db"))
            for i in range(jobs):
                data = EditInput(prompt="p", references=(f"http://127.0.0.1:{port}/ref-{i}.jpg",))
                store.submit(NewJob(id=f"job-{i}", endpoint=ENDPOINT, input=data))
            runners = [
                JobRunner(
                    SQLiteJobStore(str(Path(folder) / "jobs.db")),
                    LocalFileStore(Path(folder) / "files"),
                    SleepEngine(edit_ms / 1000),
                    SafeFetcher(
                        allow_hosts=["127.0.0.1"], allow_ports=[80], timeout_s=30, max_bytes=1 << 26
                    ),
                    worker_id=f"w{n}",
                    limits=RunnerLimits(prefetch_jobs=prefetch_jobs),
                    model_name="sleep",
                )
                for n in range(workers)
            ]
            started = time.perf_counter()
            threads = [threading.Thread(target=drain, args=(runner,)) for runner in runners]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall_s = time.perf_counter() - started
            for runner in runners:
                runner.close()
                runner.store.close()
            store.close()
        found[mode] = {"wall_s": round(wall_s, 2), "fetches_per_job": len(requests) / jobs}
    return found


def run(jobs: int, edit_ms: float, latency_ms: float, size: int) -> dict[str, Any]:
    body = reference_jpeg(size)
    # the fetch + decode the prefetch can hide: measured here, outside the runner
    started = time.perf_counter()
    Image.open(io.BytesIO(body)).convert("RGB")
    decode_ms = (time.perf_counter() - started) * 1000
    walls: dict[str, list[float]] = {}
    with image_server(body, latency_ms / 1000) as port:
        for mode, prefetch_jobs in (("off", 0), ("on", 1)):
            with tempfile.TemporaryDirectory(prefix=f"prefetch-{mode}-") as folder:
                walls[mode] = run_jobs(Path(folder), port, jobs, edit_ms / 1000, prefetch_jobs)
    off_ms = [w * 1000 for w in walls["off"]]
    on_ms = [w * 1000 for w in walls["on"]]
    # job 1 has nothing ahead of it: the steady state is jobs 2..N
    off_median = statistics.median(off_ms[1:])
    on_median = statistics.median(on_ms[1:])
    return {
        "benchmark": "worker input prefetch",
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "jobs": jobs,
        "edit_ms": edit_ms,
        "latency_ms": latency_ms,
        "reference": f"{size}x{size} JPEG, {len(body)} bytes, decode {decode_ms:.1f} ms",
        "per_job_ms": {"off": [round(m, 1) for m in off_ms], "on": [round(m, 1) for m in on_ms]},
        "median_ms_jobs_2_to_n": {"off": round(off_median, 1), "on": round(on_median, 1)},
        "saving_ms_per_job": round(off_median - on_median, 1),
        "saving_pct": round(100 * (off_median - on_median) / off_median, 1),
        "total_s": {"off": round(sum(off_ms) / 1000, 3), "on": round(sum(on_ms) / 1000, 3)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--edit-ms", type=float, default=300.0)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--size", type=int, default=1024, help="reference image side, pixels")
    parser.add_argument(
        "--workers", type=int, default=1, help="several runners on one queue: wall and fetches"
    )
    args = parser.parse_args()
    if args.jobs < 2:
        parser.error("--jobs must be at least 2")
    if args.workers > 1:
        found = run_workers(args.jobs, args.edit_ms, args.latency_ms, args.size, args.workers)
        for mode in ("off", "on"):
            figures = found[mode]
            print(
                f"{args.workers} workers, prefetch {mode}: {figures['wall_s']} s for "
                f"{args.jobs} jobs, {figures['fetches_per_job']:.2f} fetches per job"
            )
        print(json.dumps(found))
        return
    result = run(args.jobs, args.edit_ms, args.latency_ms, args.size)
    print(f"{'job':>4} {'prefetch off ms':>16} {'prefetch on ms':>15}")
    for i, (off, on) in enumerate(zip(*result["per_job_ms"].values(), strict=True), start=1):
        print(f"{i:>4} {off:>16.1f} {on:>15.1f}")
    medians = result["median_ms_jobs_2_to_n"]
    print(
        f"median of jobs 2..{args.jobs}: off {medians['off']} ms, on {medians['on']} ms;"
        f" saving {result['saving_ms_per_job']} ms per job ({result['saving_pct']}%)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
