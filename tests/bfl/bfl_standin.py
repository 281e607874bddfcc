"""A stand-in for Black Forest Labs' task API (PROTOCOL.md §11), served on 127.0.0.1.

Behaves like BFL where our engine cares: ``POST /v1/{model}`` (header ``x-key``) answers
``{id, polling_url}``; ``GET /v1/get_result?id=`` answers ``Pending`` (with ``progress``)
until the task's time has passed, then ``Ready`` with a ``sample`` URL that expires after
``sample_ttl_s``; unknown ids read ``Task not found``.

Tests steer it per request through markers in the prompt (so that separate server
processes can be steered too): ``[request-moderated]``, ``[content-moderated]``,
``[error]``, ``[slow]`` (ready after ``slow_s``), ``[never]`` (pending forever); and
globally: ``fail_submits`` / ``fail_polls`` (that many 429 / 503 answers first),
``ready_after_s``, ``sample_ttl_s``. ``submissions`` records every accepted body, so
a test can count paid tasks.
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

__all__ = ["API_KEY", "StandInBfl"]

API_KEY = "test-bfl-key"
_SIZES = {"1:1": (64, 64), "16:9": (96, 54), "9:16": (54, 96), "4:3": (80, 60), "3:4": (60, 80)}


@dataclass
class _Task:
    id: str
    model: str
    body: dict[str, Any]
    created_at: float
    ready_after_s: float
    ready_at: float | None = None


@dataclass
class StandInBfl:
    ready_after_s: float = 0.3
    slow_s: float = 3.0
    sample_ttl_s: float = 600.0
    fail_submits: int = 0
    fail_polls: int = 0
    submissions: list[dict[str, Any]] = field(default_factory=list)
    polls: int = 0
    _tasks: dict[str, _Task] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    url: str = ""

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> StandInBfl:
        config = uvicorn.Config(self._app(), host="127.0.0.1", port=0, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the BFL stand-in did not start")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)

    def submissions_for(self, prompt_part: str) -> list[dict[str, Any]]:
        with self._lock:
            return [body for body in self.submissions if prompt_part in body["prompt"]]

    # --- the API -----------------------------------------------------------------------------
    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/{model}")
        async def submit(model: str, request: Request) -> Response:
            if request.headers.get("x-key") != API_KEY:
                return JSONResponse({"detail": "bad key"}, status_code=403)
            body = await request.json()  # before the lock: never hold it across an await
            with self._lock:
                if self.fail_submits > 0:
                    self.fail_submits -= 1
                    return JSONResponse(
                        {"detail": "too many active tasks"},
                        status_code=429,
                        headers={"retry-after": "0"},
                    )
                task = _Task(
                    id=str(uuid.uuid4()),
                    model=model,
                    body=body,
                    created_at=time.monotonic(),
                    ready_after_s=self._ready_after_s(body["prompt"]),
                )
                self._tasks[task.id] = task
                self.submissions.append(body)
            return JSONResponse(
                {"id": task.id, "polling_url": f"{self.url}/v1/get_result?id={task.id}"}
            )

        @app.get("/v1/get_result")
        async def get_result(id: str, request: Request) -> Response:
            if request.headers.get("x-key") != API_KEY:
                return JSONResponse({"detail": "bad key"}, status_code=403)
            with self._lock:
                self.polls += 1
                if self.fail_polls > 0:
                    self.fail_polls -= 1
                    return JSONResponse({"detail": "upstream hiccup"}, status_code=503)
                task = self._tasks.get(id)
            if task is None:
                return JSONResponse({"id": id, "status": "Task not found", "result": None})
            return JSONResponse(self._status(task))

        @app.get("/samples/{task_id}")
        async def sample(task_id: str) -> Response:
            task = self._tasks.get(task_id)
            if task is None or task.ready_at is None:
                return Response(status_code=404)
            if time.monotonic() > task.ready_at + self.sample_ttl_s:
                return Response("Request has expired", status_code=403)
            return Response(_image_bytes(task.body), media_type=_media_type(task.body))

        return app

    def _ready_after_s(self, prompt: str) -> float:
        if "[never]" in prompt:
            return float("inf")
        return self.slow_s if "[slow]" in prompt else self.ready_after_s

    def _status(self, task: _Task) -> dict[str, Any]:
        prompt = task.body["prompt"]
        elapsed_s = time.monotonic() - task.created_at
        answer: dict[str, Any] = {"id": task.id, "result": None, "progress": None}
        if elapsed_s < task.ready_after_s:
            return answer | {
                "status": "Pending",
                "progress": round(elapsed_s / task.ready_after_s, 2),
            }
        for marker, status in (
            ("[request-moderated]", "Request Moderated"),
            ("[content-moderated]", "Content Moderated"),
            ("[error]", "Error"),
        ):
            if marker in prompt:
                return answer | {"status": status, "details": {"reason": marker}}
        if task.ready_at is None:
            task.ready_at = time.monotonic()
        return answer | {
            "status": "Ready",
            "result": {"sample": f"{self.url}/samples/{task.id}", "prompt": prompt},
        }


def _media_type(body: dict[str, Any]) -> str:
    return "image/png" if body.get("output_format") == "png" else "image/jpeg"


def _image_bytes(body: dict[str, Any]) -> bytes:
    """A small image whose colour comes from the seed, in the requested size and format."""
    size = _SIZES.get(body.get("aspect_ratio") or "1:1", (64, 64))
    seed = int(body.get("seed") or 0)
    colour = (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)
    buffer = io.BytesIO()
    fmt = "PNG" if body.get("output_format") == "png" else "JPEG"
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()
