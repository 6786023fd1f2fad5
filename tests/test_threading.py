"""The kernels' thread pool (csrc/common/threading.h), through its test hook _C._parallel_for_probe:
every item runs exactly once, a stalled worker's share is taken over, exceptions come back, nested
and concurrent calls run inline, and a forked child gets a working pool."""
import multiprocessing
import threading

import pytest

import quark
from quark import _C


@pytest.fixture
def threads():
    before = quark.num_threads()
    yield quark.set_num_threads
    quark.set_num_threads(before)


def check_cover(n, runs, chunks):
    assert runs == [1] * n
    spans = sorted((b, e) for b, e, _ in chunks)
    assert all(b < e for b, e in spans)
    assert [b for b, _ in spans] == [0] + [e for _, e in spans[:-1]]   # disjoint, no gap
    assert (spans[-1][1] if spans else 0) == n


@pytest.mark.parametrize("nthreads", [1, 2, 3, 5])
@pytest.mark.parametrize("n,grain", [(1, 1), (2, 1), (4, 1), (7, 3), (1000, 1), (1000, 64), (100_003, 1)])
def test_every_item_runs_exactly_once(threads, nthreads, n, grain):
    threads(nthreads)
    runs, chunks, _ = _C._parallel_for_probe(n, grain)
    check_cover(n, runs, chunks)
    assert all(e - b >= grain for b, e, _ in chunks if e != n)
    if nthreads > 1 and n >= 8 * nthreads * grain:
        assert len(chunks) > nthreads   # split finer than one share per thread


def test_zero_and_negative_items_run_nothing(threads):
    threads(3)
    for n in (0, -5):
        runs, chunks, _ = _C._parallel_for_probe(n)
        assert runs == [] and chunks == []


def test_stalled_worker_share_is_taken_over(threads):
    # The first chunk a worker takes sleeps 300 ms; meanwhile the calling thread claims every other
    # chunk (an OpenMP static split would leave the worker's half waiting for it).
    threads(2)
    runs, chunks, _ = _C._parallel_for_probe(4096, 1, stall_ms=300)
    check_cover(4096, runs, chunks)
    assert len(chunks) >= 16
    assert sum(1 for *_, slot in chunks if slot != 0) <= 1


def test_exception_in_a_chunk_is_raised_and_pool_stays_usable(threads):
    threads(3)
    for throw_at in (0, 517, 9_999):
        with pytest.raises(ValueError, match=f"item {throw_at} failed"):
            _C._parallel_for_probe(10_000, 1, throw_at=throw_at)
    runs, chunks, _ = _C._parallel_for_probe(10_000, 1)
    check_cover(10_000, runs, chunks)


def test_nested_call_runs_inline(threads):
    threads(3)
    runs, chunks, nested_inline = _C._parallel_for_probe(500, 1, inner=37)
    check_cover(500, runs, chunks)
    assert nested_inline


def test_concurrent_callers_all_complete(threads):
    # Kernels called from several Python threads at once (the GIL is released): one holds the workers,
    # the others run inline; every call still covers its items once.
    threads(2)
    results, errors = [], []

    def call(n):
        try:
            for _ in range(20):
                runs, chunks, _ = _C._parallel_for_probe(n, 1)
                results.append((n, runs, chunks))
        except Exception as e:   # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    workers = [threading.Thread(target=call, args=(n,)) for n in (300, 1001, 4096, 17)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors and len(results) == 80
    for n, runs, chunks in results:
        check_cover(n, runs, chunks)


def _probe_in_child(nthreads):
    quark.set_num_threads(nthreads)
    runs, chunks, _ = _C._parallel_for_probe(5000, 1)
    return runs == [1] * 5000, len({slot for *_, slot in chunks})


def test_forked_child_starts_its_own_workers(threads):
    threads(2)
    _C._parallel_for_probe(5000, 1)   # the parent's workers exist before the fork
    with multiprocessing.get_context("fork").Pool(1) as p:
        ok, slots = p.apply(_probe_in_child, (3,))
    assert ok and 1 <= slots <= 3


def test_probe_bounds_its_arguments():
    with pytest.raises(ValueError, match="at most 2"):
        _C._parallel_for_probe(2 ** 40)
    with pytest.raises(ValueError, match="stall_ms"):
        _C._parallel_for_probe(10, stall_ms=5000)


def test_thread_count_bounds(threads):
    threads(256)
    assert quark.num_threads() == 256
    with pytest.raises(ValueError, match="between 1 and 256"):
        _C.set_num_threads(257)
