"""Logging: plain text for people, JSON lines for machines, both carrying the request id.

The request id lives in a context variable: the HTTP layer sets it for the request it
handles, the worker for the job it runs, and every log record made meanwhile carries it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Iterator
from typing import Literal

__all__ = ["JsonFormatter", "configure_logging", "current_request_id", "request_context"]

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kontext_request_id", default=None
)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s [%(request_id)s] %(message)s"


def current_request_id() -> str | None:
    return _request_id.get()


@contextlib.contextmanager
def request_context(request_id: str | None) -> Iterator[None]:
    """Every log record made inside carries ``request_id``."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = _request_id.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, pid (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        request_id = getattr(record, "request_id", None)
        if request_id and request_id != "-":
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _UnusedTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def configure_logging(level: str, fmt: Literal["text", "json"] = "text") -> None:
    """Root logging for a kontext-server process (the API or a worker)."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # transformers announces, once per image-processor class, that torchvision (which this
    # server does not use) is missing and it falls back to the PIL processor it would use
    # anyway; the line would only alarm an operator.
    logging.getLogger("transformers.utils.import_utils").addFilter(_UnusedTorchvisionNotice())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # uvicorn's own loggers go through the same handler (and so carry request ids)
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
