"""A/B of two commits on this machine: `python bench/ab.py BASE [HEAD] --rounds 3`.

Each commit is checked out in a worktree of its own (sharing this checkout's .venv) and
given this checkout's bench/ harness, so both run the same measurements; `bench/run.py
--ab --no-peers` then runs on each in turn, alternating which goes first every round, so
that a shared host's noise falls on both. Writes bench/ab-results.json and
bench/ab-results.md: each figure's median per commit over the rounds, and HEAD/BASE.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PROJECT = BENCH.parent

# The figures compared: name, how to read it from a run's results, and whether more is better.
FIGURES: list[tuple[str, Callable[[dict[str, Any]], float], bool]] = [
    ("W1 plain req/s", lambda r: r["W1_sync_send"]["plain"]["ours"]["rps"], True),
    ("W1 plain p99 ms", lambda r: r["W1_sync_send"]["plain"]["ours"]["p99_ms"], False),
    ("W1 STARTTLS+AUTH req/s", lambda r: r["W1_sync_send"]["starttls_auth"]["ours"]["rps"], True),
    (
        "W1 STARTTLS+AUTH p99 ms",
        lambda r: r["W1_sync_send"]["starttls_auth"]["ours"]["p99_ms"],
        False,
    ),
    ("W2 req/s", lambda r: r["W2_queued_accept"]["ours"]["rps"], True),
    ("W2 p99 ms", lambda r: r["W2_queued_accept"]["ours"]["p99_ms"], False),
    (
        "W2 server CPU ms per 202",
        lambda r: r["W2_queued_accept"]["ours"]["server_cpu_ms_per_req"],
        False,
    ),
    ("W3 msg/s", lambda r: r["W3_delivery"]["ours_msgs_per_s"], True),
    ("W3 STARTTLS+AUTH msg/s", lambda r: r["W3_delivery"]["ours_starttls_auth_msgs_per_s"], True),
    ("W4 s to 202", lambda r: r["W4_bulk"]["seconds_to_202"], False),
    ("W4 s to all sent", lambda r: r["W4_bulk"]["seconds_to_last_sent"], False),
    ("W7 templated s to 202", lambda r: r["W7_templates"]["templated"]["seconds_to_202"], False),
    (
        "W7 templated s to all sent",
        lambda r: r["W7_templates"]["templated"]["seconds_to_last_sent"],
        False,
    ),
    ("W7 plain s to 202", lambda r: r["W7_templates"]["plain"]["seconds_to_202"], False),
    ("W7 delivery templated/plain", lambda r: r["W7_templates"]["delivery_ratio"], False),
    ("W7 warm render µs", lambda r: r["W7_templates"]["warm_render"]["email_us"], False),
    ("W6 email req/s", lambda r: r["W6_channels"]["email"]["sync_send"]["rps"], True),
    ("W6 sms req/s", lambda r: r["W6_channels"]["sms"]["sync_send"]["rps"], True),
    ("W6 telegram req/s", lambda r: r["W6_channels"]["telegram"]["sync_send"]["rps"], True),
    ("W6 email msg/s", lambda r: r["W6_channels"]["email"]["delivery_msgs_per_s"], True),
    ("W6 sms msg/s", lambda r: r["W6_channels"]["sms"]["delivery_msgs_per_s"], True),
    ("W6 telegram msg/s", lambda r: r["W6_channels"]["telegram"]["delivery_msgs_per_s"], True),
]


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(PROJECT), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def worktree(commit: str, name: str) -> Path:
    """`commit` checked out at /tmp/notify-ab-<name>, with this checkout's .venv and bench/."""
    path = Path(f"/tmp/notify-ab-{name}")
    if path.exists():
        subprocess.run(["git", "-C", str(PROJECT), "worktree", "remove", "--force", str(path)])
        shutil.rmtree(path, ignore_errors=True)
    git("worktree", "add", "--detach", "--force", str(path), commit)
    (path / ".venv").symlink_to(PROJECT / ".venv")
    for file in BENCH.glob("*.py"):
        shutil.copy2(file, path / "bench" / file.name)
    return path


def run(path: Path, only: str) -> dict[str, Any]:
    """One `bench/run.py` in `path`; its results."""
    subprocess.run(
        [sys.executable, "bench/run.py", "--ab", "--no-peers", "--only", only],
        cwd=path,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    results: dict[str, Any] = json.loads((path / "bench" / "results-partial.json").read_text())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("base")
    parser.add_argument("head", nargs="?", default="HEAD")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="W1,W2,W3,W4,W6")
    args = parser.parse_args()
    commits = {"base": git("rev-parse", args.base), "head": git("rev-parse", args.head)}
    paths = {side: worktree(commit, side) for side, commit in commits.items()}
    rounds: dict[str, list[dict[str, Any]]] = {"base": [], "head": []}
    try:
        for number in range(args.rounds):
            order = ["base", "head"] if number % 2 == 0 else ["head", "base"]
            for side in order:
                rounds[side].append(run(paths[side], args.only))
                print(f"round {number + 1}: {side} done", flush=True)
    finally:
        for path in paths.values():
            subprocess.run(["git", "-C", str(PROJECT), "worktree", "remove", "--force", str(path)])
    table: list[dict[str, Any]] = []
    for name, read, higher_is_better in FIGURES:
        try:
            values = {side: [read(r) for r in runs] for side, runs in rounds.items()}
        except KeyError:
            continue
        base, head = (statistics.median(values[side]) for side in ("base", "head"))
        table.append(
            {
                "figure": name,
                "base": values["base"],
                "head": values["head"],
                "base_median": base,
                "head_median": head,
                "head_over_base": round(head / base, 3) if base else None,
                "higher_is_better": higher_is_better,
            }
        )
    report = {"commits": commits, "rounds": args.rounds, "only": args.only, "figures": table}
    (BENCH / "ab-results.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# A/B: {commits['base'][:7]} (base) against {commits['head'][:7]} (head)",
        "",
        f"{args.rounds} alternating rounds of `bench/run.py --ab --no-peers --only {args.only}`"
        " on this machine; medians per commit, and head/base.",
        "",
        "| figure | base (rounds) | head (rounds) | base median | head median | head/base |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in table:
        lines.append(
            f"| {row['figure']} | {', '.join(str(v) for v in row['base'])} | "
            f"{', '.join(str(v) for v in row['head'])} | {row['base_median']} | "
            f"{row['head_median']} | {row['head_over_base']} |"
        )
    (BENCH / "ab-results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
