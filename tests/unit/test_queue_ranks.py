"""``QueueRanks``: positions from a loaded picture plus the changes noted since."""

from __future__ import annotations

import bisect
import threading
from array import array

from kontext_server.store.queue_ranks import QueueRanks, SortedSeqs


class Table:
    """A stand-in for the jobs table: line -> queued seqs; ``load`` can be held midway."""

    def __init__(self) -> None:
        self.lines: dict[tuple[str, int], set[int]] = {}
        self.loads = 0
        self.hold: threading.Event | None = None
        self.loading = threading.Event()

    def add(self, engine: str, priority: int, seq: int) -> None:
        self.lines.setdefault((engine, priority), set()).add(seq)

    def remove(self, engine: str, priority: int, seq: int) -> None:
        self.lines[(engine, priority)].discard(seq)

    def load(self) -> list[tuple[str, int, list[int]]]:
        self.loads += 1
        picture = [(e, p, sorted(seqs)) for (e, p), seqs in self.lines.items()]
        self.loading.set()
        if self.hold is not None:
            self.hold.wait(5)
        return picture


def test_positions_count_better_priorities_then_lower_seqs_of_the_same_engine() -> None:
    table = Table()
    for seq, (engine, priority) in enumerate(
        [("local", 0), ("local", 1), ("bfl", 0), ("local", 0), ("local", 1)], start=1
    ):
        table.add(engine, priority, seq)
    ranks = QueueRanks(table.load)
    try:
        assert ranks.position("local", 0, 1) == 0
        assert ranks.position("local", 0, 4) == 1
        assert ranks.position("local", 1, 2) == 2
        assert ranks.position("local", 1, 5) == 3
        assert ranks.position("bfl", 0, 3) == 0
    finally:
        ranks.close()


def test_noted_changes_apply_at_once_and_twice_noted_count_once() -> None:
    table = Table()
    for seq in (1, 2, 3):
        table.add("local", 0, seq)
    ranks = QueueRanks(table.load, max_age_s=60)
    try:
        assert ranks.position("local", 0, 3) == 2
        ranks.note_left("local", 0, 1)
        ranks.note_left("local", 0, 1)
        ranks.note_queued("local", 1, 4)
        ranks.note_queued("local", 1, 4)
        assert ranks.position("local", 0, 3) == 1
        assert ranks.position("local", 1, 4) == 2
        ranks.note_queued("local", 0, 1)  # handed back: its place again
        assert ranks.position("local", 0, 3) == 2
        assert table.loads == 1
    finally:
        ranks.close()


def test_changes_noted_while_a_load_runs_survive_it() -> None:
    table = Table()
    for seq in (1, 2, 3):
        table.add("local", 0, seq)
    ranks = QueueRanks(table.load, max_age_s=60)
    try:
        assert ranks.position("local", 0, 3) == 2
        table.hold = threading.Event()
        table.loading.clear()
        loader = threading.Thread(target=ranks.refresh)
        loader.start()
        assert table.loading.wait(5)
        # Committed after the load read the table: the load's picture misses both.
        table.remove("local", 0, 1)
        ranks.note_left("local", 0, 1)
        table.add("local", 0, 4)
        ranks.note_queued("local", 0, 4)
        table.hold.set()
        loader.join(5)
        assert ranks.position("local", 0, 3) == 1
        assert ranks.position("local", 0, 4) == 2
    finally:
        ranks.close()


def test_sorted_seqs_count_and_find_across_chunk_boundaries() -> None:
    seqs = [2, 3, 5, 8, 13, 21, 34, 55]
    chunked = SortedSeqs(
        [array("q", [2, 3, 5]), array("q"), array("q", [8]), array("q", [13, 21, 34, 55])]
    )
    assert len(chunked) == len(seqs)
    for probe in range(0, 60):
        assert chunked.bisect_left(probe) == bisect.bisect_left(seqs, probe), probe
        assert (probe in chunked) == (probe in seqs), probe
    empty = SortedSeqs([])
    assert (len(empty), empty.bisect_left(7), 7 in empty) == (0, 0, False)


def test_a_line_loaded_in_chunks_answers_as_one_loaded_whole() -> None:
    seqs = list(range(1, 200, 3))
    lines = [("local", 0, seqs[i : i + 7]) for i in range(0, len(seqs), 7)]
    chunked = QueueRanks(lambda: lines, max_age_s=60)
    whole = QueueRanks(lambda: [("local", 0, seqs)], max_age_s=60)
    try:
        for ranks in (chunked, whole):
            assert ranks.position("local", 0, seqs[-1]) == len(seqs) - 1  # loads the picture
            ranks.note_left("local", 0, seqs[10])  # in a chunk's middle
            ranks.note_left("local", 0, seqs[7])  # a chunk's first
            ranks.note_queued("local", 0, 500)
        for seq in [*seqs, 500]:
            assert chunked.position("local", 0, seq) == whole.position("local", 0, seq), seq
        assert chunked.depth() == whole.depth() == len(seqs) - 1  # two left, one came
        assert chunked.position("local", 0, 500) == len(seqs) - 2
    finally:
        chunked.close()
        whole.close()
