"""The in-memory rate limits (`memory://`): the library's moving-window answers, without a
timer thread, and expired keys dropped as calls go on."""

import random
import sys
import threading
from collections import Counter
from types import SimpleNamespace

import limits.storage.memory
import pytest
from limits import RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from ratelimits import MemoryWindowStorage, RateLimiter


class Clock:
    """A clock that moves only when told."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_limit_th_hit_passes_the_next_is_refused_until_the_window_moves() -> None:
    clock = Clock()
    strategy = MovingWindowRateLimiter(MemoryWindowStorage(clock=clock))
    item = RateLimitItemPerMinute(5)
    start = clock.now

    passed = []
    for _ in range(5):
        passed.append(strategy.hit(item, "ivan"))
        clock.now += 10
    refused = strategy.hit(item, "ivan")
    stats = strategy.get_window_stats(item, "ivan")

    assert passed == [True] * 5
    assert refused is False
    assert (stats.reset_time, stats.remaining) == (start + 60, 0)
    # The first hit is exactly a minute old: still in the window for a hit, no longer for
    # the stats, as in MemoryStorage.
    clock.now = start + 60
    assert strategy.hit(item, "ivan") is False
    stats = strategy.get_window_stats(item, "ivan")
    assert (stats.reset_time, stats.remaining) == (start + 70, 1)
    clock.now = start + 60.5
    assert strategy.hit(item, "ivan") is True
    assert strategy.hit(item, "ivan") is False
    stats = strategy.get_window_stats(item, "ivan")
    assert (stats.reset_time, stats.remaining) == (start + 70, 0)
    # Another subject has a window of its own.
    assert strategy.hit(item, "anna") is True


def test_it_answers_as_the_librarys_memory_storage_does(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    # MemoryStorage reads `time.time()` of its module: the same clock for both.
    monkeypatch.setattr(limits.storage.memory, "time", SimpleNamespace(time=clock))
    ours = MovingWindowRateLimiter(MemoryWindowStorage(clock=clock))
    theirs = MovingWindowRateLimiter(MemoryStorage())
    items = [RateLimitItemPerMinute(3), RateLimitItemPerSecond(2, 10), RateLimitItemPerMinute(1)]
    steps = random.Random(16)

    for step in range(5_000):
        clock.now += steps.uniform(0, 6)
        item = steps.choice(items)
        subject = f"rcpt:{steps.randrange(6)}"
        assert ours.hit(item, subject) == theirs.hit(item, subject), step
        our_stats = ours.get_window_stats(item, subject)
        their_stats = theirs.get_window_stats(item, subject)
        assert our_stats.remaining == their_stats.remaining, step
        # With no hit in the window, MemoryStorage's reset time depends on whether its
        # timer has run yet; with one, it is the oldest hit's time plus the window.
        if our_stats.remaining < item.amount:
            assert our_stats.reset_time == their_stats.reset_time, step


def test_keys_whose_window_has_passed_are_dropped_as_calls_go_on() -> None:
    clock = Clock()
    storage = MemoryWindowStorage(clock=clock, sweep=4)
    strategy = MovingWindowRateLimiter(storage)
    item = RateLimitItemPerMinute(20)
    for n in range(1_000):
        strategy.hit(item, f"rcpt:{n}@example.org")
    clock.now += 59
    strategy.hit(item, "key:1")
    assert storage.key_count() == 1_001  # all still in their window

    clock.now += 2
    for _ in range(100):
        strategy.hit(item, "key:1")
    after_100 = storage.key_count()
    for _ in range(200):
        strategy.hit(item, "key:1")

    assert after_100 == 1_001 - 4 * 100
    assert storage.key_count() == 1


def test_the_memory_limiter_starts_no_thread() -> None:
    before = set(threading.enumerate())

    limiter = RateLimiter("memory://")
    for n in range(100):
        limiter.take_recipients([f"rcpt{n}@example.org"], 20)
    started = set(threading.enumerate()) - before

    assert isinstance(limiter.storage, MemoryWindowStorage)
    assert started == set()


def test_hits_racing_on_a_key_let_exactly_the_limit_through() -> None:
    limiter = RateLimiter("memory://")
    item = RateLimitItemPerMinute(5)
    subjects = [f"rcpt:{n}" for n in range(300)]
    passed: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def hit_each_twice() -> None:
        start.wait()
        mine = [s for s in subjects for _ in range(2) if limiter.hit(item, s) is None]
        with lock:
            passed.extend(mine)

    threads = [threading.Thread(target=hit_each_twice) for _ in range(8)]
    interval = sys.getswitchinterval()
    # Threads switch as often as they can instead of every 5 ms: races show.
    sys.setswitchinterval(1e-6)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)

    # 16 hits on each subject, 5 let through.
    assert Counter(passed) == dict.fromkeys(subjects, 5)
