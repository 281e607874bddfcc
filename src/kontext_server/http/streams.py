"""Open status streams per API key: a slot is taken when a stream opens and released when it
ends, fails or its client goes away (``StreamSlots``, one per app, on ``ApiContext``)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable

__all__ = ["StreamSlots", "TooManyStreamsError", "released_after"]


class TooManyStreamsError(Exception):
    """The caller already holds its allowed number of open status streams (answered 429)."""

    retry_after_s = 5


class StreamSlots:
    """Open status streams per API key (``None``: anonymous callers, together).

    ``acquire`` takes a slot or raises ``TooManyStreamsError``; the returned release callable
    may be called any number of times (only the first counts). Thread-safe.
    """

    def __init__(self) -> None:
        self._open: Counter[str | None] = Counter()
        self._lock = threading.Lock()

    def acquire(self, owner: str | None, limit: int) -> Callable[[], None]:
        with self._lock:
            if self._open[owner] >= limit:
                raise TooManyStreamsError(
                    f"This API key already has {self._open[owner]} open status streams (limit "
                    f"{limit}); close one, or poll the status URL instead"
                )
            self._open[owner] += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                self._open[owner] -= 1
                if self._open[owner] <= 0:
                    del self._open[owner]

        return release

    def open_streams(self, owner: str | None) -> int:
        with self._lock:
            return self._open[owner]


async def released_after(
    stream: AsyncIterable[str], release: Callable[[], None]
) -> AsyncIterator[str]:
    """``stream``, calling ``release`` when it ends, fails or the client goes away."""
    try:
        async for chunk in stream:
            yield chunk
    finally:
        release()
