"""``DrainDeadline``: when a draining worker must hand its jobs in flight back.

Owned by the worker loop, read by it and by its engines' jobs. Written by ``request``
(possibly from a signal handler), read by the others: a plain attribute and no lock, because a
handler must never wait on a lock its own thread holds.
"""

from __future__ import annotations

import time

__all__ = ["DrainDeadline"]


class DrainDeadline:
    def __init__(self) -> None:
        self._deadline: float | None = None

    def request(self, timeout_s: float) -> None:
        """Start draining: jobs in flight may run ``timeout_s`` more. A later call can only
        shorten the time."""
        deadline = time.monotonic() + timeout_s
        current = self._deadline
        self._deadline = deadline if current is None else min(current, deadline)

    @property
    def active(self) -> bool:
        """True once a drain was requested: claim nothing more."""
        return self._deadline is not None

    def time_is_up(self) -> bool:
        """True once the drain's time has passed: hand jobs in flight back."""
        deadline = self._deadline
        return deadline is not None and time.monotonic() >= deadline
