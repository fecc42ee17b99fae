"""The in-memory rate limits, the library's MemoryStorage and ours side by side in one run.

    .venv/bin/python bench/memory_limits.py [--segments 4] [--seconds 10] [--rounds 3]

Each request is counted as the API counts it (its key in a per-minute window, its recipient
in a per-hour one), every recipient new, and costs `--work-ms` of CPU besides, so recipients
pile up at about the API's pace. The library's MemoryStorage walks every key every 10 ms on a
thread of its own, so its throughput falls as they pile up; MemoryWindowStorage's should not
(the target: the last segment within 10 % of the first). Prints requests per second of each
segment, median of the rounds, and the limiter's own microseconds per request.
"""

import argparse
import gc
import itertools
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from limits import RateLimitItemPerHour, RateLimitItemPerMinute
from limits.storage import MemoryStorage, Storage
from limits.strategies import MovingWindowRateLimiter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ratelimits import MemoryWindowStorage  # noqa: E402

# The service's defaults for a recipient; the key's limit lifted, as in bench/run.py.
PER_KEY = RateLimitItemPerMinute(1_000_000)
PER_RECIPIENT = RateLimitItemPerHour(20)
STORAGES = {"limits MemoryStorage": MemoryStorage, "MemoryWindowStorage": MemoryWindowStorage}


@dataclass(frozen=True)
class Segment:
    requests_per_second: float
    limiter_us: float


def spin(seconds: float) -> None:
    """Hold the CPU (and the GIL) for `seconds`, as a request's own work does."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def run(storage: Storage, segments: int, seconds: float, work: float) -> list[Segment]:
    """Requests through `storage`, `segments` timed segments of `seconds` each."""
    strategy = MovingWindowRateLimiter(storage)
    recipients = itertools.count()
    measured = []
    for _ in range(segments):
        requests, in_limiter = 0, 0.0
        started = time.perf_counter()
        while (now := time.perf_counter()) - started < seconds:
            strategy.hit(PER_KEY, "key:1")
            strategy.hit(PER_RECIPIENT, f"rcpt:member{next(recipients)}@example.org")
            in_limiter += time.perf_counter() - now
            spin(work)
            requests += 1
        elapsed = time.perf_counter() - started
        measured.append(Segment(requests / elapsed, in_limiter / requests * 1e6))
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work-ms", type=float, default=2.5)
    args = parser.parse_args()
    results: dict[str, list[list[Segment]]] = {name: [] for name in STORAGES}
    for round_ in range(args.rounds):
        # Alternate which goes first, so neither always runs on a warmer machine.
        order = list(STORAGES) if round_ % 2 == 0 else list(reversed(STORAGES))
        for name in order:
            storage = STORAGES[name]()
            results[name].append(run(storage, args.segments, args.seconds, args.work_ms / 1e3))
            print(
                f"round {round_ + 1} {name:21}",
                " ".join(f"{s.requests_per_second:7.0f}" for s in results[name][-1]),
                "req/s",
                flush=True,
            )
            del storage
            gc.collect()
    print(
        f"\n{args.segments} x {args.seconds:g} s, {args.work_ms:g} ms of work per request, "
        f"median of {args.rounds} rounds"
    )
    print(f"{'':21} {'first req/s':>11} {'last req/s':>10} {'last/first':>10} {'limiter µs':>13}")
    for name, rounds in results.items():
        first = statistics.median(r[0].requests_per_second for r in rounds)
        last = statistics.median(r[-1].requests_per_second for r in rounds)
        us_first = statistics.median(r[0].limiter_us for r in rounds)
        us_last = statistics.median(r[-1].limiter_us for r in rounds)
        print(
            f"{name:21} {first:11.0f} {last:10.0f} {last / first:10.2f}"
            f" {us_first:6.1f}→{us_last:<6.1f}"
        )


if __name__ == "__main__":
    main()
