"""Issue 9's decision-cost fast paths are the slow paths' exact equals: power_of_two's
unrolled pair scorer against least_load's general one, and `ShmLoadView.backend_load`'s
inlined row read against the table's `read_row`."""

from __future__ import annotations

import random

from smg.dataplane.app import ShmLoadView
from smg.policies.base import BackendLoad, RouteRequest
from smg.policies.power_of_two import PowerOfTwoPolicy
from smg.shm import layout, prefix
from smg.shm.table import WorkerTable


class DictView:
    def __init__(self, loads: dict[int, BackendLoad], counts: dict[int, int]) -> None:
        self.loads = loads
        self.counts = counts

    def in_flight(self, row: int) -> int:
        return self.counts[row]

    def backend_load(self, row: int) -> BackendLoad:
        return self.loads[row]


def random_load(rng: random.Random, poll: float) -> BackendLoad:
    # Few distinct values so that exact ties (the random draw) are common.
    return BackendLoad(
        running=rng.randrange(3),
        waiting=rng.choice([-1, 0, 0, 2]),
        token_usage=rng.choice([-0.5, 0.0, 0.5, 1.0, 1.5]),
        throughput=rng.choice([0.0, -3.0, 1000.0, 2000.0]),
        valid=rng.random() < 0.7,
        waiting_tokens=rng.choice([0, 0, 512, 2048]),
        updated=poll,
    )


def test_power_of_two_pair_scorer_equals_least_load_scorer() -> None:
    fast = PowerOfTwoPolicy("expected_wait", random.Random(11))
    slow = PowerOfTwoPolicy("expected_wait", random.Random(11))
    rng = random.Random(3)
    outcomes = {"valid pair": 0, "one dark": 0, "dark pair": 0, "tie draws": 0}
    for step in range(4000):
        poll = float(step // 50)  # a new poll every 50 decisions resets the tallies
        loads = {row: random_load(rng, poll) for row in range(4)}
        counts = {row: rng.randrange(3) for row in range(4)}
        view = DictView(loads, counts)
        a, b = rng.sample(range(4), 2)
        request = RouteRequest(prompt_tokens=rng.choice([None, 100, 3000]))
        state = fast._random.__self__.getstate()
        chosen = fast._expected_wait(a, b, view, request)
        expected = slow._scorer.select_min_expected_wait((a, b), view, request)
        assert chosen == expected, (step, a, b, loads[a], loads[b])
        assert fast._scorer.since.rows == slow._scorer.since.rows, step
        if fast._random.__self__.getstate() != state:
            outcomes["tie draws"] += 1
        valid = loads[a].valid + loads[b].valid
        outcomes[["dark pair", "one dark", "valid pair"][valid]] += 1
    # Every branch of the pair scorer ran many times.
    assert min(outcomes.values()) >= 100, outcomes


def make_view() -> tuple[WorkerTable, ShmLoadView]:
    table = WorkerTable.create(8, 2, 1, anonymous=False)
    return table, ShmLoadView(table)


def test_shm_backend_load_reads_the_row() -> None:
    table, view = make_view()
    table.write_row(
        3,
        layout.Row(
            generation=7,
            status=1,
            flags=layout.FLAG_IN_USE | layout.FLAG_LOAD_VALID,
            running=5,
            waiting=2,
            waiting_tokens=4096,
            token_usage=0.25,
            throughput=1500.5,
            load_updated=12.5,
            status_changed=3.0,
        ),
    )
    assert view.backend_load(3) == BackendLoad(
        running=5,
        waiting=2,
        token_usage=0.25,
        throughput=1500.5,
        valid=True,
        waiting_tokens=4096,
        updated=12.5,
    )
    table.write_row(3, table.read_row(3)._replace(flags=layout.FLAG_IN_USE))
    assert view.backend_load(3).valid is False
    assert view.backend_load(4) == BackendLoad()  # an unused row reads as zeros


def test_shm_backend_load_defers_to_read_row_during_a_write() -> None:
    table, view = make_view()
    table.write_row(2, layout.Row(1, 1, layout.FLAG_LOAD_VALID, 9, 0, 0, 0.0, 0.0, 4.0, 0.0))
    index = (table.geo.rows_offset + 2 * layout.ROW_SIZE) >> 3
    calls: list[int] = []

    def read_row(row: int) -> layout.Row:
        calls.append(row)
        table._words[index] -= 1  # the writer finished
        return WorkerTable.read_row(table, row)

    table.read_row = read_row  # type: ignore[method-assign]
    table._words[index] += 1  # odd: a write in progress
    assert view.backend_load(2).running == 9
    assert calls == [2]
    assert view.backend_load(2).running == 9  # even again: the inlined read, no call
    assert calls == [2]


def test_power_of_two_on_the_shared_table_equals_least_load_scorer() -> None:
    """The pair scorer's tuple read of the table's rows (ShmLoadView.load_fields) gives
    the choices, tallies and draws of least_load's scorer over the same view's
    BackendLoads, and a row being written falls back to backend_load."""
    from smg.policies import power_of_two

    assert power_of_two.FLAG_LOAD_VALID == layout.FLAG_LOAD_VALID
    table, view = make_view()
    fast = PowerOfTwoPolicy("expected_wait", random.Random(11))
    slow = PowerOfTwoPolicy("expected_wait", random.Random(11))
    rng = random.Random(5)
    outcomes = {"valid pair": 0, "one dark": 0, "dark pair": 0, "tie draws": 0, "writing": 0}
    for step in range(3000):
        poll = float(step // 50)
        for row in range(4):
            load = random_load(rng, poll)
            flags = layout.FLAG_IN_USE | (layout.FLAG_LOAD_VALID if load.valid else 0)
            # The table holds unsigned counts and KV usage as written.
            table.write_row(
                row,
                layout.Row(
                    row + 1, 1, flags, load.running, max(load.waiting, 0),
                    load.waiting_tokens, load.token_usage, load.throughput, poll, 0.0,
                ),
            )  # fmt: skip
            table.set_in_flight(0, row, rng.randrange(3))
        a, b = rng.sample(range(4), 2)
        writing = step % 7 == 0
        index = (table.geo.rows_offset + b * layout.ROW_SIZE) >> 3
        if writing:  # odd sequence word: load_fields answers None for b
            table._words[index] += 1
            assert view.load_fields(b) is None
            table.read_row = lambda row, at=index: _even_read(table, row, at)  # type: ignore[method-assign]
            outcomes["writing"] += 1
        request = RouteRequest(prompt_tokens=rng.choice([None, 100, 3000]))
        state = fast._random.__self__.getstate()
        chosen = fast._expected_wait(a, b, view, request)
        if writing:
            del table.read_row
        expected = slow._scorer.select_min_expected_wait((a, b), view, request)
        assert chosen == expected, step
        assert fast._scorer.since.rows == slow._scorer.since.rows, step
        if fast._random.__self__.getstate() != state:
            outcomes["tie draws"] += 1
        valid = view.backend_load(a).valid + view.backend_load(b).valid
        outcomes[["dark pair", "one dark", "valid pair"][valid]] += 1
    assert min(outcomes.values()) >= 100, outcomes


def _even_read(table: WorkerTable, row: int, index: int) -> layout.Row:
    """The writer finishes as the reader waits: the sequence word even again."""
    if table._words[index] & 1:
        table._words[index] -= 1
    return WorkerTable.read_row(table, row)


def loop_boundaries(n: int) -> list[int]:
    """The block ends as first written (one block at a time), the reference."""
    ends: list[int] = []
    end = prefix.FIRST_BLOCK
    while end < n:
        ends.append(end)
        end += min(max(end >> 2, prefix.FIRST_BLOCK), prefix.BLOCK)
    ends.append(n)
    return ends


def test_prefix_boundaries_equal_the_block_loop() -> None:
    head = [64, 128, 192, 256, 320, 400, 500, 625, 781, 976, 1220, 1525, 1906, 2382]
    assert prefix.boundaries(8192) == [*head, *range(2894, 8192, 512), 8192]
    for n in range(0, 40000):
        assert prefix.boundaries(n) == loop_boundaries(n), n
    first = prefix.boundaries(100)
    first.append(-1)  # a caller's list is its own: the cached head is never shared
    assert prefix.boundaries(100) == [64, 100]


def test_prefix_longest_finds_every_known_length() -> None:
    """The three fast paths (all, all but one, all but two blocks) and the binary search
    below them give each known prefix length exactly."""
    hashes, _ = prefix.chain("".join(chr(97 + i % 26) for i in range(9000)), "m")
    for known in range(len(hashes) + 1):
        index = prefix.PrefixIndex.create(3, 1024, anonymous=False)
        index.insert(2, hashes[:known], row=3, generation=1)
        assert index.longest(hashes) == known, known
    empty = prefix.PrefixIndex.create(1, 1024, anonymous=False)
    for short in ([], hashes[:1], hashes[:2]):
        assert empty.longest(short) == 0
