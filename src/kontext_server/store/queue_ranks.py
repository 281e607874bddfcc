"""Queue positions served from memory: a picture of every queued job's place, refreshed as a
whole on a short period, plus this process's own changes since.

Counting the queued jobs ahead of one (an index range count) costs time in proportion to the
line: ~2 ms in the middle of 100k queued on SQLite, ~8 ms on PostgreSQL, and a fal client polls
its status several times a second. ``QueueRanks`` instead keeps, per line (engine, priority),
the sorted ``seq`` of every queued job, read in one statement (``load``); a position is then a
few binary searches, whatever the depth. The load costs time in proportion to the queue, but
once per ``max_age_s`` for the whole process, on a thread of its own, never on a poll.

Freshness (fal's ``queue_position`` is a hint, not a contract):

* This process's own writes (``note_queued`` / ``note_left``, called by the store after each
  commit that puts a job in a line or takes one out) are applied at once: a store used by one
  process answers exactly what a count would.
* Other processes' writes (another API process's submits, the workers' claims) are seen at
  the next load. While positions are being asked, a refresher thread reloads every
  ``max_age_s`` (1 s; or every four loads' time if that is longer: at most a fifth of its
  time goes to loading), so an answer reflects them within that period plus one load's
  duration: 1.0-1.1 s at 100k queued, ~3.8 s at 1M on PostgreSQL (a load takes 0.7-0.8 s
  there).
  A refresher that nobody has asked for ``idle_stop_s`` stops; the next question then loads
  at once (in the caller's thread), so an answer is never older than that.

Positions of jobs that changed line in another process meanwhile (claimed, canceled) are
simply answered from the picture: the caller reads the job's status from the store first and
asks only about queued jobs.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from array import array
from collections.abc import Callable, Iterable

__all__ = ["DEFAULT_MAX_AGE_S", "Line", "QueueRanks", "SortedSeqs"]

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE_S = 1.0  # how often the refresher reloads while positions are asked
IDLE_STOP_S = 30.0  # the refresher stops after this long without a question
LOAD_SHARE_FACTOR = 4.0  # the refresher pauses at least this many loads' time between loads

Line = tuple[str, int]  # (engine, priority): one line of the queue, served by seq
Loader = Callable[[], Iterable[tuple[str, int, Iterable[int]]]]
"""Every queued job's (engine, priority, seqs sorted ascending), one tuple per line or several
(a line's chunks, in ascending order, each above the one before: a loader cuts a long line
so that no single allocation or copy holds the GIL for long)."""


class SortedSeqs:
    """A line's seqs as loaded: sorted chunks kept as they came (no 8 MB array built out of
    them at 1M jobs: its growth and copy held the GIL ~5 ms, a stall of every status poll).
    A position is a binary search among the chunks' first seqs, then one within a chunk."""

    __slots__ = ("_chunks", "_firsts", "_length", "_starts")

    def __init__(self, chunks: Iterable[array[int]]) -> None:
        self._chunks = [chunk for chunk in chunks if len(chunk)]
        self._firsts = array("q", (chunk[0] for chunk in self._chunks))
        self._starts = array("q")
        total = 0
        for chunk in self._chunks:
            self._starts.append(total)
            total += len(chunk)
        self._length = total

    def __len__(self) -> int:
        return self._length

    def bisect_left(self, seq: int) -> int:
        """How many seqs are below ``seq``."""
        at = bisect.bisect_right(self._firsts, seq) - 1
        if at < 0:
            return 0
        return self._starts[at] + bisect.bisect_left(self._chunks[at], seq)

    def __contains__(self, seq: object) -> bool:
        if not isinstance(seq, int):
            return False
        at = bisect.bisect_right(self._firsts, seq) - 1
        return at >= 0 and _contains(self._chunks[at], seq)


class QueueRanks:
    """Thread-safe. ``load`` reads the whole queue (one consistent statement); ``clock`` is
    monotonic seconds (tests inject a fake one)."""

    def __init__(
        self,
        load: Loader,
        *,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        idle_stop_s: float = IDLE_STOP_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not max_age_s > 0:
            raise ValueError(f"max_age_s must be positive, not {max_age_s!r}")
        self._load = load
        self.max_age_s = max_age_s
        self._idle_stop_s = max(idle_stop_s, max_age_s)
        self._clock = clock
        self._lock = threading.Lock()  # guards the picture and the deltas
        self._loading = threading.Lock()  # one load at a time
        self._lines: dict[Line, SortedSeqs] | None = None  # None: never loaded
        self._added: dict[Line, list[int]] = {}  # queued here since the load, not in it
        self._removed: dict[Line, list[int]] = {}  # left here since the load, still in it
        self._journal: list[tuple[bool, Line, int]] | None = None  # notes during a load
        self._load_s = 0.0  # how long the last load took
        self._asked_at = 0.0
        self._refresher: threading.Thread | None = None
        self._stop = threading.Event()

    # --- what the store tells it (after its commits) ----------------------------------------------
    def note_queued(self, engine: str, priority: int, seq: int) -> None:
        """A job entered its line (submitted, re-queued, handed back)."""
        self._note(True, (engine, priority), seq)

    def note_left(self, engine: str, priority: int, seq: int) -> None:
        """A job left its line (claimed, canceled, expired)."""
        self._note(False, (engine, priority), seq)

    def _note(self, queued: bool, line: Line, seq: int) -> None:
        with self._lock:
            if self._journal is not None:
                self._journal.append((queued, line, seq))
            if self._lines is not None:
                self._apply(queued, line, seq)

    def _apply(self, queued: bool, line: Line, seq: int) -> None:
        """Idempotent: the job is (or is not) in the line afterwards, whatever it was."""
        assert self._lines is not None
        base = self._lines.get(line)
        in_base = base is not None and seq in base
        keep, drop = (self._added, self._removed) if queued else (self._removed, self._added)
        if in_base != queued:
            _insert(keep.setdefault(line, []), seq)
        _discard(drop.get(line), seq)

    # --- what the API asks ------------------------------------------------------------------------
    def position(self, engine: str, priority: int, seq: int) -> int:
        """Queued jobs of ``engine`` ahead of (priority, seq): better priorities first, then
        lower seqs in the same line."""
        self.prepare()
        with self._lock:
            return self._ahead(engine, priority, seq)

    def depth(self) -> int:
        """Queued jobs of every engine (same freshness as a position)."""
        self.prepare()
        with self._lock:
            assert self._lines is not None
            return sum(self._length(line) for line in self._lines.keys() | self._added.keys())

    def prepare(self) -> None:
        """Make sure a picture is there and kept fresh: loads it now (in this thread) if there
        is none or the refresher has stopped. A store calls it before inserts whose positions
        it will ask (``queued_positions``), so that the picture predates them."""
        self._asked_at = self._clock()
        if self._lines is None or not self._refreshing():
            self.refresh()
            self._start_refresher()

    def queued_positions(self, jobs: Iterable[tuple[str, int, int]]) -> list[int]:
        """For new jobs (engine, priority, seq) just committed, in order: note each, then its
        position (so a job's answer counts the jobs before it, not those after)."""
        self.prepare()
        answers = []
        with self._lock:
            for engine, priority, seq in jobs:
                if self._journal is not None:
                    self._journal.append((True, (engine, priority), seq))
                self._apply(True, (engine, priority), seq)
                answers.append(self._ahead(engine, priority, seq))
        return answers

    def _ahead(self, engine: str, priority: int, seq: int) -> int:
        assert self._lines is not None
        ahead = 0
        for line in self._lines.keys() | self._added.keys():
            if line[0] != engine or line[1] > priority:
                continue
            if line[1] < priority:
                ahead += self._length(line)
            else:
                ahead += self._below(line, seq)
        return ahead

    def _length(self, line: Line) -> int:
        assert self._lines is not None
        base = self._lines.get(line)
        return (
            (0 if base is None else len(base))
            + len(self._added.get(line, ()))
            - len(self._removed.get(line, ()))
        )

    def _below(self, line: Line, seq: int) -> int:
        assert self._lines is not None
        base = self._lines.get(line)
        return (
            (0 if base is None else base.bisect_left(seq))
            + bisect.bisect_left(self._added.get(line, []), seq)
            - bisect.bisect_left(self._removed.get(line, []), seq)
        )

    # --- loading ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Load the whole queue now (waits for a load already under way instead)."""
        if not self._loading.acquire(blocking=False):
            with self._loading:  # someone else is loading: their picture will do
                return
        try:
            with self._lock:
                self._journal = []
            started = time.perf_counter()
            try:
                chunks: dict[Line, list[array[int]]] = {}
                for engine, priority, seqs in self._load():
                    chunk = seqs if isinstance(seqs, array) else array("q", seqs)
                    chunks.setdefault((engine, priority), []).append(chunk)
                lines = {line: SortedSeqs(parts) for line, parts in chunks.items()}
            except BaseException:
                with self._lock:
                    self._journal = None
                raise
            with self._lock:
                journal, self._journal = self._journal or [], None
                self._lines, self._added, self._removed = lines, {}, {}
                for queued, line, seq in journal:  # changes made here while it loaded
                    self._apply(queued, line, seq)
            self._load_s = time.perf_counter() - started
        finally:
            self._loading.release()

    def _refreshing(self) -> bool:
        refresher = self._refresher
        return refresher is not None and refresher.is_alive()

    def _start_refresher(self) -> None:
        with self._lock:
            if self._stop.is_set() or self._refreshing():
                return
            self._refresher = threading.Thread(
                target=self._refresh_while_asked, name="kontext-queue-ranks", daemon=True
            )
            self._refresher.start()

    @property
    def period_s(self) -> float:
        """The refresher's pause between loads: ``max_age_s``, or four loads' time when that
        is longer (a 1M-job queue on PostgreSQL loads in ~0.75 s), so that loading takes at
        most a fifth of the refresher's time."""
        return max(self.max_age_s, LOAD_SHARE_FACTOR * self._load_s)

    def _refresh_while_asked(self) -> None:
        while not self._stop.wait(self.period_s):
            if self._clock() - self._asked_at > self._idle_stop_s:
                return
            try:
                self.refresh()
            except Exception as exc:  # the store is down: answer from the last picture
                log.warning("cannot refresh queue positions: %s", exc)

    def close(self) -> None:
        """Stop the refresher (waits for it briefly)."""
        self._stop.set()
        refresher = self._refresher
        if refresher is not None and refresher is not threading.current_thread():
            refresher.join(timeout=5.0)


def _contains(seqs: array[int] | list[int], seq: int) -> bool:
    at = bisect.bisect_left(seqs, seq)
    return at < len(seqs) and seqs[at] == seq


def _insert(seqs: list[int], seq: int) -> None:
    if not seqs or seqs[-1] < seq:  # the usual case: a new job, last in its line
        seqs.append(seq)
    elif not _contains(seqs, seq):
        bisect.insort(seqs, seq)


def _discard(seqs: list[int] | None, seq: int) -> None:
    if not seqs:
        return
    at = bisect.bisect_left(seqs, seq)
    if at < len(seqs) and seqs[at] == seq:
        del seqs[at]
