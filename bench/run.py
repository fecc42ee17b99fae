"""The benchmark: `make bench` (about 10 minutes) or `make bench-quick` (under 3).

Starts what it needs (a PostgreSQL database on the local server, Postfix's smtp-sink, a
STARTTLS+AUTH sink, the service, its worker processes and the naive reference), runs the
workloads of bench/README.md, and writes bench/results.json and bench/results.md. Every
comparison is taken side by side in one run; each figure is the median of several runs.
"""

import argparse
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg2

BENCH = Path(__file__).resolve().parent
PROJECT = BENCH.parent
ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
# Filled in by Bench.migrate(): a key stored in the database, as a real caller's is.
AUTH: dict[str, str] = {}
# W2's hand-written durable reference, and the bearer token it checks.
DURABLE = "bench.durable:app"
DURABLE_TOKEN = "durable-bench-token-0123456789"
DURABLE_TABLE = (
    "DROP TABLE IF EXISTS durable_accepted;"
    " CREATE TABLE durable_accepted (id bigserial PRIMARY KEY, email varchar(320) NOT NULL,"
    " subject varchar(998) NOT NULL, text text NOT NULL, status varchar(16) NOT NULL,"
    " created_at timestamptz NOT NULL)"
)
SMTP_USER, SMTP_PASSWORD = "bench", "bench-password"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
BODY = {
    "email": "member{n}@example.com",  # numbered per request by the wrk script
    "subject": "Бронирование подтверждено: переговорная «Байкал»",
    "text": "Здравствуйте, Иван!\n\nПереговорная «Байкал» забронирована на 25 ноября, "
    "10:00–12:00.\n",
}
# W6: the same booking text to a phone and a Telegram chat; {d} is numbered per request with
# digits, so each request has a recipient of its own (+7 916 <thread><6 digits>).
CHANNEL_BODIES = {
    "email": BODY,
    "sms": {"phone": "+7916{d}", "text": BODY["text"]},
    "telegram": {"chat_id": "{d}", "text": BODY["text"]},
}
# What W6's queued rows of each channel are addressed to: SQL over the series' `i`.
CHANNEL_ADDRESSES = {
    "email": "'member' || i || '@example.com'",
    "sms": "'+7916' || lpad(i::text, 7, '0')",
    "telegram": "(1000000 + i)::text",
}


@dataclass
class Mode:
    runs: int  # repetitions of each side-by-side measurement
    seconds: int  # wrk duration
    delivery: int  # W3 messages
    delivery_runs: int  # W3 is minutes per run: fewer repetitions
    tls_delivery: int  # W3 messages through the STARTTLS+AUTH sink
    history_rows: int  # W5 rows
    workers: int  # worker processes, and uvicorn processes of the API
    channel_delivery: int  # W6 messages delivered per channel


FULL = Mode(
    runs=3,
    seconds=10,
    delivery=50_000,
    delivery_runs=1,
    tls_delivery=10_000,
    history_rows=1_000_000,
    workers=2,
    channel_delivery=20_000,
)
# For A/B rounds (bench/ab.py): long enough wrk runs to compare, short deliveries.
AB = Mode(
    runs=1,
    seconds=5,
    delivery=10_000,
    delivery_runs=1,
    tls_delivery=2_000,
    history_rows=50_000,
    workers=2,
    channel_delivery=3_000,
)
QUICK = Mode(
    runs=1,
    seconds=2,
    delivery=3_000,
    delivery_runs=1,
    tls_delivery=1_000,
    history_rows=50_000,
    workers=2,
    channel_delivery=2_000,
)


def service_python() -> str:
    """The python of a venv holding requirements.txt and nothing else, as the Dockerfile
    installs it: the service, its workers and the references run there, not in the
    development venv, whose test tools (rich, pygments, …) libraries import when present.
    Made on first use, one per requirements.txt (.venv/bench-service-<hash>, shared with
    bench/ab.py's worktrees through their .venv link)."""
    from peer import ensure_venv

    requirements = PROJECT / "requirements.txt"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    python, _ = ensure_venv(PROJECT / ".venv" / f"bench-service-{digest}", requirements)
    return str(python)


def wait_log(process: "Process", pattern: str, timeout: float = 60) -> None:
    """Until `process` has written a line matching `pattern` to its log."""
    deadline = time.monotonic() + timeout
    line = re.compile(pattern.encode(), re.MULTILINE)
    while not line.search(Path(process.log.name).read_bytes()):
        if process.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{process.log.name}: no line matching {pattern!r}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of `pid` and its children so far: uvicorn's workers are
    children of its supervisor."""
    total = 0.0
    for p in [pid, *children(pid)]:
        fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


class Process:
    """A child process, stopped with SIGTERM at the end."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.port = 0  # where it listens, if it does
        self.log = log.open("wb")
        self.popen = subprocess.Popen(
            args, cwd=PROJECT, env=os.environ | env, stdout=self.log, stderr=self.log
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> float:
        """Stop it; its peak RSS in MB (of its largest process: uvicorn's workers are
        children of a supervisor)."""
        rss = float("nan")
        if self.popen.poll() is None:
            rss = max(peak_rss_mb(p) for p in [self.pid, *children(self.pid)])
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self.log.close()
        return rss


class Bench:
    def __init__(self, mode: Mode, workdir: Path) -> None:
        self.mode = mode
        self.workdir = workdir
        self.python = service_python()
        self.results: dict[str, Any] = {}
        self.no_peers = False
        self.admin = psycopg2.connect(ADMIN_URL)
        self.admin.autocommit = True
        self.database = f"notify_bench_{int(time.time())}"
        with self.admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{self.database}"')
        base = ADMIN_URL.rsplit("/", 1)[0]
        self.database_url = f"{base}/{self.database}"
        self.sink_port = free_port()
        self.tls_port = free_port()
        self.ca_file = workdir / "ca.pem"
        self.processes: list[Process] = []

    # -- infrastructure -------------------------------------------------------------

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Process:
        process = Process(args, env or {}, self.workdir / f"{name}.log")
        self.processes.append(process)
        return process

    def start_sinks(self) -> None:
        # -c: count; -u: drop root; backlog 1000. It accepts and discards every message.
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.start("smtp-sink", ["smtp-sink", "-c", *user, f"127.0.0.1:{self.sink_port}", "1000"])
        wait_port(self.sink_port)
        self.start(
            "tls-sink",
            [
                sys.executable,  # the bench's own venv: trustme is a test tool
                str(BENCH / "tls_sink.py"),
                str(self.tls_port),
                str(self.ca_file),
                SMTP_USER,
                SMTP_PASSWORD,
            ],
        )
        wait_port(self.tls_port)

    def service_env(self, *, tls: bool = False, **extra: str) -> dict[str, str]:
        env = {
            "DATABASE_URL": self.database_url,
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(self.tls_port if tls else self.sink_port),
            "SECRET_KEY": "bench-secret-key",
            "WORKER_IN_API": "false",
            # As docker-compose.yaml runs it: the limits shared in Redis (a queued 202
            # counts its key and its recipient there, in one round trip), lifted.
            "RATE_LIMIT_STORAGE": REDIS_URL,
            "RATE_LIMIT_REQUESTS_PER_MINUTE": "1000000000",
            "RATE_LIMIT_PER_RECIPIENT_PER_HOUR": "1000000000",
            "EMAIL_FROM": "Coworking <noreply@coworking.local>",
        }
        if tls:
            env |= {
                "SMTP_SECURITY": "starttls",
                "SMTP_USER": SMTP_USER,
                "SMTP_PASSWORD": SMTP_PASSWORD,
                "SMTP_CA_FILE": str(self.ca_file),
            }
        return env | extra

    @contextmanager
    def service(self, name: str, env: dict[str, str], app: str = "main:app") -> Iterator[Process]:
        """The service as the Dockerfile runs it: `--workers` uvicorn processes (the naive
        reference as it was: one)."""
        port = free_port()
        processes = self.mode.workers if app in ("main:app", DURABLE) else 1
        process = self.start(
            name,
            [
                self.python,
                "-m",
                "uvicorn",
                app,
                "--port",
                str(port),
                "--workers",
                str(processes),
                "--log-level",
                "warning",
                "--no-access-log",
                *(["--http", "serving:GuardedHTTP"] if app == "main:app" else []),
            ],
            # Each server counts from nothing: a per-key window of earlier runs would
            # make later ones slower.
            env
            | {"PORT": str(port), "RATE_LIMIT_PREFIX": f"bench-{name}-{port}-{time.time()}"}
            # As the image starts its servers: migrated before (`python cli.py migrate`).
            | ({"AUTO_MIGRATE": "false"} if app == "main:app" else {}),
        )
        wait_port(port)
        process.port = port
        try:
            yield process
        finally:
            self.rss(name, process.stop())

    def rss(self, name: str, mb: float) -> None:
        peaks = self.results.setdefault("peak_rss_mb", {})
        peaks[name] = max(peaks.get(name, 0.0), round(mb, 1))

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        with psycopg2.connect(self.database_url) as connection, connection.cursor() as cursor:
            cursor.execute(statement)
            return cursor.fetchall() if cursor.description else []

    # -- load generation --------------------------------------------------------------

    def wrk(
        self,
        url: str,
        *,
        connections: int,
        body: dict[str, Any] | str | None = None,
        headers: dict[str, str] | None = None,
        seconds: int | None = None,
        server: Process | None = None,
    ) -> dict[str, float]:
        """wrk's throughput and latency percentiles, and its own CPU seconds; with `server`,
        that process tree's CPU milliseconds per request."""
        script = self.workdir / "wrk.lua"
        lines = []
        if body is not None:
            lines += [
                'wrk.method = "POST"',
                f"wrk.body = {lua_string(wrk_body(body))}",
                'wrk.headers["Content-Type"] = "application/json"',
            ]
        if body is not None and ("{n}" in wrk_body(body) or "{d}" in wrk_body(body)):
            # One recipient per request: each thread numbers its own ("<thread>-<count>", or
            # in digits alone "<thread><count in 6 digits>").
            lines += [
                "count = 0",
                "function request()",
                "  count = count + 1",
                '  local body = (string.gsub(wrk.body, "{n}", id .. "-" .. count))',
                '  body = (string.gsub(body, "{d}", string.format("%d%06d", id, count)))',
                "  return wrk.format(nil, nil, nil, body)",
                "end",
            ]
        for name, value in (headers or {}).items():
            lines.append(f'wrk.headers["{name}"] = {lua_string(value)}')
        script.write_text("\n".join(lines) + "\n" + STATUS_COUNTER)
        args = [
            "wrk",
            "-t",
            str(min(2, connections)),  # wrk wants at least one connection per thread
            "-c",
            str(connections),
            "-d",
            f"{seconds or self.mode.seconds}s",
            "--latency",
            "-s",
            str(script),
            url,
        ]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        server_before = tree_cpu_s(server.pid) if server else 0.0
        run = subprocess.run(args, capture_output=True, text=True, check=True)
        server_cpu = tree_cpu_s(server.pid) - server_before if server else 0.0
        if run.stderr.strip():  # a broken script still runs, without its headers
            raise RuntimeError(f"wrk: {run.stderr}")
        output = run.stdout
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = parse_wrk(output)
        result["wrk_cpu_s"] = round(
            after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 2
        )
        if server is not None and result["requests"]:
            result["server_cpu_ms_per_req"] = round(server_cpu * 1000 / result["requests"], 3)
        return result

    # -- workloads ----------------------------------------------------------------------

    def migrate(self) -> None:
        """The schema, and a stored API key with every scope (`python cli.py keys create`)."""
        subprocess.run(
            [self.python, "-m", "alembic", "upgrade", "head"],
            cwd=PROJECT,
            check=True,
            env=os.environ | {"DATABASE_URL": self.database_url},
            capture_output=True,
        )
        created = subprocess.run(
            [self.python, "cli.py", "keys", "create", "bench", "--scopes", "send,read,admin"],
            cwd=PROJECT,
            check=True,
            env=os.environ | self.service_env(),
            capture_output=True,
            text=True,
        )
        AUTH["Authorization"] = f"Bearer {created.stdout.strip()}"

    def truncate(self) -> None:
        self.sql(
            "TRUNCATE notifications, delivery_attempts, batches, idempotency_keys RESTART IDENTITY"
            " CASCADE"
        )

    def w1_sync(self) -> None:
        """Synchronous send, 16 clients: ours (stores every attempt) vs the naive reference."""
        out: dict[str, Any] = {}
        for label, tls in (("plain", False), ("starttls_auth", True)):
            ours: list[dict[str, float]] = []
            naive: list[dict[str, float]] = []
            naive_env = {
                k: v for k, v in self.service_env(tls=tls).items() if k.startswith("SMTP_")
            }
            for _ in range(self.mode.runs):
                self.truncate()
                with self.service(f"api-w1-{label}", self.service_env(tls=tls)) as api:
                    ours.append(
                        self.wrk(
                            f"http://127.0.0.1:{api.port}/notify/email",
                            connections=16,
                            body=BODY,
                            headers=AUTH,
                        )
                    )
                with self.service(f"naive-w1-{label}", naive_env, app="bench.naive:app") as ref:
                    naive.append(
                        self.wrk(
                            f"http://127.0.0.1:{ref.port}/notify/email", connections=16, body=BODY
                        )
                    )
            stored = self.sql("SELECT count(*) FROM delivery_attempts")[0][0]
            ours_m, naive_m = medians(ours), medians(naive)
            out[label] = {
                "ours": ours_m,
                "naive": naive_m,
                "throughput_ratio": round(ours_m["rps"] / naive_m["rps"], 2),
                "p99_ratio_naive_over_ours": round(naive_m["p99_ms"] / ours_m["p99_ms"], 2),
                "attempts_stored_last_run": stored,
                "non_2xx_last_run": ours[-1].get("non_2xx", 0),
            }
        self.results["W1_sync_send"] = out

    def w2_queued(self) -> None:
        """Queued accept (202) vs the hand-written durable reference (`durable.py`, same
        uvicorn command) and a trivial endpoint of the same app (/healthz), with each
        server's CPU per request."""
        ours, durable, ceiling = [], [], []
        reference_env = {"DATABASE_URL": self.database_url, "DURABLE_TOKEN": DURABLE_TOKEN}
        for _ in range(self.mode.runs):
            self.truncate()
            with self.service("api-w2", self.service_env()) as api:
                base = f"http://127.0.0.1:{api.port}"
                ours.append(
                    self.wrk(
                        f"{base}/notify/email",
                        connections=16,
                        body=BODY,
                        headers=AUTH | {"Prefer": "respond-async"},
                        server=api,
                    )
                )
                ceiling.append(self.wrk(f"{base}/healthz", connections=16, server=api))
            self.sql(DURABLE_TABLE)
            with self.service("durable-w2", reference_env, app=DURABLE) as reference:
                durable.append(
                    self.wrk(
                        f"http://127.0.0.1:{reference.port}/notify/email",
                        connections=16,
                        body=BODY,
                        headers={"Authorization": f"Bearer {DURABLE_TOKEN}"},
                        server=reference,
                    )
                )
        ours_m, durable_m, ceiling_m = medians(ours), medians(durable), medians(ceiling)
        self.results["W2_queued_accept"] = {
            "ours": ours_m,
            "durable": durable_m,
            "ceiling_healthz": ceiling_m,
            "ratio": round(ours_m["rps"] / ceiling_m["rps"], 2),
            "ratio_to_durable": round(ours_m["rps"] / durable_m["rps"], 2),
            "cpu_ratio_to_durable": round(
                ours_m["server_cpu_ms_per_req"] / durable_m["server_cpu_ms_per_req"], 2
            ),
        }

    def queue_rows(self, count: int, channel: str = "email") -> None:
        self.truncate()
        text = BODY["text"].replace("'", "''")
        quoted = "'" + BODY["subject"].replace("'", "''") + "'"
        subject = quoted if channel == "email" else "NULL"
        message_id = "'<bench-' || i || '@coworking.local>'" if channel == "email" else "NULL"
        self.sql(
            "INSERT INTO notifications (channel, recipient, subject, text, status, attempts,"
            " message_id, next_attempt_at, created_at, updated_at)"
            f" SELECT '{channel}', {CHANNEL_ADDRESSES[channel]}, {subject}, '{text}',"
            f" 'queued', 0, {message_id}, now(), now(), now()"
            f" FROM generate_series(1, {count}) AS i"
        )

    def drain(self, name: str, env: dict[str, str], expected: int) -> float:
        """Start the workers, wait until `expected` are sent; seconds first claim → last sent."""
        workers = [
            self.start(
                f"{name}-{n}",
                [self.python, "worker.py"],
                env | {"WORKER_POLL_INTERVAL": "0.2"},
            )
            for n in range(self.mode.workers)
        ]
        deadline = time.monotonic() + 900
        while self.sql("SELECT count(*) FROM notifications WHERE status = 'sent'")[0][0] < expected:
            failed = self.sql("SELECT error_message FROM notifications WHERE status = 'failed'")
            if failed or time.monotonic() > deadline:
                raise RuntimeError(f"{name}: not everything was sent: {failed[:1]}")
            time.sleep(0.5)
        for worker in workers:
            self.rss("worker", worker.stop())
        first, last = self.sql("SELECT min(started_at), max(finished_at) FROM delivery_attempts")[0]
        return float((last - first).total_seconds())

    def smtp_source(self, count: int, size: int) -> float:
        """Postfix's smtp-source: `count` messages of `size` bytes over 16 sessions."""
        started = time.monotonic()
        subprocess.run(
            [
                "smtp-source",
                "-s",
                "16",
                "-m",
                str(count),
                "-l",
                str(size),
                "-f",
                "noreply@coworking.local",
                "-t",
                "member@example.com",
                f"127.0.0.1:{self.sink_port}",
            ],
            check=True,
            capture_output=True,
        )
        return time.monotonic() - started

    def w3_delivery(self) -> None:
        """Queued notifications delivered by the workers vs smtp-source, same sink and size."""
        count = self.mode.delivery
        ours, limit = [], []
        size = 0
        size = message_size()
        for _ in range(self.mode.delivery_runs):
            self.queue_rows(count)
            seconds = self.drain("worker-w3", self.service_env(), count)
            ours.append(count / seconds)
        for _ in range(self.mode.runs):
            limit.append(count / self.smtp_source(count, size))
        peer = self.post_office(count, size)
        tls_count = self.mode.tls_delivery
        self.queue_rows(tls_count)
        tls_seconds = self.drain("worker-w3-tls", self.service_env(tls=True), tls_count)
        self.results["W3_delivery"] = {
            "post_office": peer,
            "ratio_to_post_office": round(statistics.median(ours) / peer["msg_per_s"], 2),
            "messages": count,
            "message_bytes": size,
            "workers": self.mode.workers,
            "ours_msgs_per_s": round(statistics.median(ours), 1),
            "smtp_source_msgs_per_s": round(statistics.median(limit), 1),
            "ratio": round(statistics.median(ours) / statistics.median(limit), 2),
            "runs": {"ours": self.mode.delivery_runs, "smtp_source": self.mode.runs},
            "starttls_auth_messages": tls_count,
            "ours_starttls_auth_msgs_per_s": round(tls_count / tls_seconds, 1),
        }

    def post_office(self, count: int, size: int) -> dict[str, Any]:
        """django-post_office (`send_many`, then `send_queued_mail --processes N`) into
        the same sink, on a database of its own; nothing with `--no-peers`."""
        if self.no_peers:
            return {"msg_per_s": float("nan"), "enqueue_s": float("nan"), "deliver_s": 0.0}
        from peer import run_post_office

        result = run_post_office(
            admin_url=ADMIN_URL,
            smtp_host="127.0.0.1",
            smtp_port=self.sink_port,
            count=count,
            workdir=self.workdir,
            processes=self.mode.workers,
            subject=BODY["subject"],
            text=BODY["text"],
            message_bytes=size,
        )
        self.rss("post_office", result["peak_rss_mb"])
        return result

    def bulk_round(self, name: str, body: dict[str, Any], count: int) -> tuple[float, float]:
        """One /notify/bulk of `count` with the workers running: seconds to the 202, and
        until `GET /batches/{id}` counts every one sent."""
        self.truncate()
        env = self.service_env()
        with self.service(f"api-{name}", env) as api:
            workers = [
                self.start(
                    f"worker-{name}-{n}",
                    [self.python, "worker.py"],
                    env | {"WORKER_POLL_INTERVAL": "0.1"},
                )
                for n in range(self.mode.workers)
            ]
            # Each worker polling first: their start-up (imports, the schema's check) is
            # not the bulk's to pay for on the two cores.
            for worker in workers:
                wait_log(worker, r"worker \S+ started$")
            base = f"http://127.0.0.1:{api.port}"
            started = time.monotonic()
            response = httpx.post(f"{base}/notify/bulk", json=body, headers=AUTH, timeout=60)
            accepted = time.monotonic() - started
            response.raise_for_status()
            batch = response.json()["batch"]
            if batch["accepted"] != count:
                raise RuntimeError(f"{name}: {batch['accepted']} of {count} accepted")
            while True:
                counts = httpx.get(f"{base}/batches/{batch['id']}", headers=AUTH).json()["counts"]
                if counts["sent"] == count:
                    break
                time.sleep(0.1)
            sent = time.monotonic() - started
            for worker in workers:
                self.rss("worker", worker.stop())
        return accepted, sent

    def w4_bulk(self) -> None:
        """One /notify/bulk of 10,000: time to 202, and until the last is sent."""
        emails = [f"member{i}@example.com" for i in range(10_000)]
        body = {"emails": emails, "subject": BODY["subject"], "text": BODY["text"]}
        env = self.service_env()
        accepted, sent = self.bulk_round("w4", body, 10_000)
        # Peak RSS of the API while it takes the largest bulk allowed.
        self.truncate()
        largest = body | {"emails": [f"member{i}@example.com" for i in range(20_000)]}
        with self.service("api-w4-20000", env | {"WORKER_IN_API": "false"}) as api:
            httpx.post(
                f"http://127.0.0.1:{api.port}/notify/bulk", json=largest, headers=AUTH, timeout=60
            ).raise_for_status()
        peer = self.post_office(10_000, message_size())
        self.results["W4_bulk"] = {
            "recipients": 10_000,
            "workers": self.mode.workers,
            "seconds_to_202": round(accepted, 3),
            "seconds_to_last_sent": round(sent, 2),
            "post_office": {
                "seconds_to_stored": peer["enqueue_s"],
                "seconds_to_last_sent": round(peer["enqueue_s"] + peer["deliver_s"], 2),
            },
        }

    def w7_templates(self) -> None:
        """A bulk of 10,000 by the shipped booking_confirmed (HTML and its text twin, data
        per recipient) beside a plain-text bulk of the same size, rounds interleaved; and
        a warm render per message (bench/render.py, in a process of its own)."""
        count = 10_000
        emails = [f"member{i}@example.com" for i in range(count)]
        plain = {"emails": emails, "subject": BODY["subject"], "text": BODY["text"]}
        templated = {
            "template": "booking_confirmed",
            "locale": "ru",
            "data": {
                "room": "Байкал",
                "start": "2026-11-25T10:00:00+03:00",
                "end": "2026-11-25T12:00:00+03:00",
            },
            "emails": [
                {"email": email, "data": {"name": f"Участник {i}", "seats": i % 12 + 1}}
                for i, email in enumerate(emails)
            ],
        }
        runs: dict[str, list[tuple[float, float]]] = {"plain": [], "templated": []}
        for round_ in range(max(self.mode.runs, 3)):
            sides: list[tuple[str, dict[str, Any]]] = [("plain", plain), ("templated", templated)]
            for label, body in sides[:: -1 if round_ % 2 else 1]:
                runs[label].append(self.bulk_round(f"w7-{label}", body, count))
        figures: dict[str, dict[str, Any]] = {
            label: {
                "seconds_to_202": round(statistics.median([a for a, _ in done]), 3),
                "seconds_to_last_sent": round(statistics.median([s for _, s in done]), 2),
                "runs": [[round(a, 3), round(s, 2)] for a, s in done],
            }
            for label, done in runs.items()
        }
        rendered = subprocess.run(
            [self.python, str(BENCH / "render.py")], check=True, capture_output=True, text=True
        )
        self.results["W7_templates"] = {
            "recipients": count,
            "workers": self.mode.workers,
            **figures,
            "delivery_ratio": round(
                figures["templated"]["seconds_to_last_sent"]
                / figures["plain"]["seconds_to_last_sent"],
                2,
            ),
            "warm_render": json.loads(rendered.stdout),
        }

    def w8_dkim(self) -> None:
        """W3's delivery with DKIM signing on and off, interleaved rounds in one run; and
        the signing cost per message (bench/signing_cost.py)."""
        count = max(self.mode.delivery // 5, 1_000)
        key = self.workdir / "dkim.pem"
        if not key.exists():
            subprocess.run(
                [self.python, "cli.py", "dkim", "keygen", str(key)],
                cwd=PROJECT,
                check=True,
                capture_output=True,
                env=os.environ | {"DATABASE_URL": self.database_url},
            )
        unsigned = self.service_env()
        signed = unsigned | {"DKIM_DOMAIN": "coworking.local", "DKIM_PRIVATE_KEY": str(key)}
        runs: dict[str, list[float]] = {"off": [], "on": []}
        for round_ in range(max(self.mode.runs, 3)):
            sides = [("off", unsigned), ("on", signed)]
            for label, env in sides[:: -1 if round_ % 2 else 1]:
                self.queue_rows(count)
                seconds = self.drain(f"worker-w8-{label}", env, count)
                runs[label].append(count / seconds)
        cost = subprocess.run(
            [self.python, str(BENCH / "signing_cost.py")],
            check=True,
            capture_output=True,
            text=True,
        )
        off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
        self.results["W8_dkim"] = {
            "messages": count,
            "workers": self.mode.workers,
            "off_msgs_per_s": round(off, 1),
            "on_msgs_per_s": round(on, 1),
            "ratio_on_to_off": round(on / off, 2),
            "runs": {k: [round(v, 1) for v in r] for k, r in runs.items()},
            "signing": json.loads(cost.stdout),
        }

    def w5_history(self) -> None:
        """History over N rows: first pages per filter and deep cursor pages, over HTTP."""
        rows = self.mode.history_rows
        self.truncate()
        self.sql(
            "INSERT INTO notifications (channel, recipient, subject, text, status, attempts,"
            " message_id, created_at, updated_at, sent_at)"
            " SELECT 'email', 'member' || (i % 5000) || '@example.com', 'Напоминание',"
            " 'Текст', (ARRAY['sent','sent','sent','failed','queued'])[1 + i % 5], 1,"
            " '<h-' || i || '@coworking.local>',"
            " timestamptz '2026-01-01' + i * interval '20 seconds',"
            " timestamptz '2026-01-01' + i * interval '20 seconds',"
            " timestamptz '2026-01-01' + i * interval '20 seconds'"
            f" FROM generate_series(1, {rows}) AS i"
        )
        self.sql("ANALYZE notifications")
        explain_dir = BENCH / "explain"
        explain_dir.mkdir(exist_ok=True)
        out: dict[str, Any] = {"rows": rows}
        with self.service("api-w5", self.service_env()) as api:
            base = f"http://127.0.0.1:{api.port}"
            queries = {
                "first_page": "",
                "recipient": "recipient=member42@example.com",
                "status": "status=failed",
                "date_range": "created_from=2026-02-01T00:00:00Z&created_to=2026-02-02T00:00:00Z",
            }
            urls = {name: f"{base}/notifications?limit=50&{q}" for name, q in queries.items()}
            # A depth needs more rows than its pages hold (quick mode has fewer rows).
            for depth in (d for d in (10, 100, 1000) if (d + 1) * 50 < rows):
                urls[f"depth_{depth}"] = f"{base}/notifications?limit=50&cursor=" + cursor_at(
                    base, depth
                )
            for name, url in urls.items():
                runs = [
                    self.wrk(url, connections=1, headers=AUTH, seconds=min(3, self.mode.seconds))
                    for _ in range(self.mode.runs)
                ]
                out[name] = medians(runs)
            if rows == FULL.history_rows:  # bench/explain/ holds the full run's plans
                self.explain(explain_dir)
        self.results["W5_history"] = out

    def start_outbox(self) -> str:
        """The development stand-in of SMS.ru and the Bot API (what `make run` sends to), as
        a process of its own; its base URL."""
        url_file = self.workdir / "outbox.url"
        self.start(
            "outbox",
            [self.python, str(BENCH / "outbox.py"), str(self.workdir / "outbox"), str(url_file)],
        )
        deadline = time.monotonic() + 30
        while not url_file.exists() or not url_file.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("the outbox stand-in did not start")
            time.sleep(0.05)
        return url_file.read_text()

    def w6_channels(self) -> None:
        """SMS and Telegram through the local stand-ins, side by side with e-mail into
        smtp-sink, on one service configuration: synchronous sends (16 clients), queued
        delivery (the workers), and the stand-in's own ceiling (wrk straight at it)."""
        outbox = self.start_outbox()
        env = self.service_env(
            SMS_RU_API_ID="bench-api-id",
            SMS_RU_URL=outbox,
            SMS_FROM="Coworking",
            TELEGRAM_BOT_TOKEN="123456:bench-token",
            TELEGRAM_API_URL=outbox,
        )
        out: dict[str, Any] = {}
        for channel, body in CHANNEL_BODIES.items():
            runs = []
            for _ in range(self.mode.runs):
                self.truncate()
                with self.service(f"api-w6-{channel}", env) as api:
                    runs.append(
                        self.wrk(
                            f"http://127.0.0.1:{api.port}/notify/{channel}",
                            connections=16,
                            body=body,
                            headers=AUTH,
                        )
                    )
            count = self.mode.channel_delivery
            self.queue_rows(count, channel)
            seconds = self.drain(f"worker-w6-{channel}", env, count)
            out[channel] = {
                "sync_send": medians(runs),
                "delivery_msgs_per_s": round(count / seconds, 1),
            }
        form = "api_id=bench-api-id&to=79160000001&json=1&msg=" + quote(BODY["text"])
        ceiling = [
            self.wrk(
                f"{outbox}/sms/send",
                connections=16,
                body=form,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            for _ in range(self.mode.runs)
        ]
        out["stand_in_ceiling"] = medians(ceiling)
        out["messages_per_channel"] = self.mode.channel_delivery
        for channel in ("sms", "telegram"):
            out[channel]["sync_rps_ratio_to_email"] = round(
                out[channel]["sync_send"]["rps"] / out["email"]["sync_send"]["rps"], 2
            )
            out[channel]["delivery_ratio_to_email"] = round(
                out[channel]["delivery_msgs_per_s"] / out["email"]["delivery_msgs_per_s"], 2
            )
        self.results["W6_channels"] = out

    def explain(self, directory: Path) -> None:
        """EXPLAIN ANALYZE of the history queries, as the service sends them."""
        position = self.sql(
            "SELECT created_at, id FROM notifications ORDER BY created_at DESC, id DESC"
            " OFFSET 50000 LIMIT 1"
        )[0]
        head = "SELECT * FROM notifications"
        tail = " ORDER BY created_at DESC, id DESC LIMIT 51"
        statements = {
            "first_page": head + tail,
            "recipient": head + " WHERE recipient = 'member42@example.com'" + tail,
            "status": head + " WHERE status = 'failed'" + tail,
            "date_range": head
            + " WHERE created_at >= '2026-02-01' AND created_at < '2026-02-02'"
            + tail,
            "deep_cursor": head + f" WHERE (created_at, id) < ('{position[0].isoformat()}',"
            f" {position[1]})" + tail,
        }
        for name, statement in statements.items():
            plan = self.sql("EXPLAIN (ANALYZE, BUFFERS) " + statement)
            (directory / f"{name}.txt").write_text(
                statement + "\n\n" + "\n".join(line for (line,) in plan) + "\n"
            )

    def close(self) -> None:
        for process in self.processes:
            if process.popen.poll() is None:
                process.stop()
        with self.admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        self.admin.close()


def wrk_body(body: dict[str, Any] | str) -> str:
    """A JSON body, or a form (a string) as it is; its Content-Type goes in the headers."""
    return body if isinstance(body, str) else json.dumps(body)


def cursor_at(base: str, depth: int) -> str:
    """The cursor of page `depth` of the whole history, following next_cursor."""
    cursor = ""
    with httpx.Client(headers=AUTH, timeout=30) as client:
        for _ in range(depth):
            page = client.get(f"{base}/notifications", params={"limit": 50, "cursor": cursor})
            cursor = page.json()["next_cursor"]
    return cursor


def message_size() -> int:
    """The size of the message the service builds for BODY, headers included."""
    sys.path.insert(0, str(PROJECT))
    from mailer import build_message, new_message_id

    message = build_message(
        sender="Coworking <noreply@coworking.local>",
        recipient="member1@example.com",
        subject=BODY["subject"],
        text=BODY["text"],
        message_id=new_message_id("noreply@coworking.local"),
        date=datetime.now(UTC),
    )
    return len(message.as_bytes())


def lua_string(value: str) -> str:
    return "[==[" + value + "]==]"


# Counts responses per status code in each wrk thread and prints them at the end.
STATUS_COUNTER = """
local threads = {}
function setup(thread) table.insert(threads, thread); thread:set("id", #threads) end
function init(args) statuses = {} end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      io.write(string.format("status %d %d\\n", status, count))
    end
  end
end
"""

UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def parse_wrk(output: str) -> dict[str, float]:
    def latency(percent: str) -> float:
        match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
        if match is None:
            raise RuntimeError(f"no {percent}% latency in wrk output:\n{output}")
        return round(float(match[1]) * UNITS[match[2]], 2)

    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if rps is None:
        raise RuntimeError(f"no throughput in wrk output:\n{output}")
    result = {"rps": round(float(rps[1]), 1), "p50_ms": latency("50"), "p99_ms": latency("99")}
    total = re.search(r"(\d+) requests in", output)
    result["requests"] = int(total[1]) if total else 0
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if errors:
        result["non_2xx"] = int(errors[1])
    for status, count in re.findall(r"^status (\d+) (\d+)$", output, re.M):
        result[f"status_{status}"] = result.get(f"status_{status}", 0) + int(count)
    return result


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(run[key] for run in runs), 2) for key in runs[0]}


def machine(mode: Mode) -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )

    def version(args: list[str]) -> str:
        try:
            result = subprocess.run(args, capture_output=True, text=True)
        except FileNotFoundError:
            return "missing"
        return (result.stdout or result.stderr).strip().splitlines()[0]

    from importlib.metadata import version as package_version

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": version(["psql", "--version"]),
        "wrk": version(["wrk", "--version"]),
        "postfix": version(["postconf", "-d", "mail_version"]),
        "packages": {
            p: package_version(p)
            for p in ("fastapi", "uvicorn", "sqlalchemy", "psycopg2-binary", "pydantic")
        },
        "mode": mode.__dict__,
        "load_average_at_start": os.getloadavg(),
        "service_settings": f"uvicorn --workers {mode.workers} (the Dockerfile's command),"
        " WORKER_IN_API=false, default pools (DB_POOL_SIZE=10, SMTP_POOL_SIZE=8), rate limits"
        " lifted, a stored API key; workers: default WORKER_BATCH_SIZE (500)",
    }


def write_markdown(results: dict[str, Any], path: Path) -> None:
    w1, w2, w3, w4, w5 = (
        results[k]
        for k in ("W1_sync_send", "W2_queued_accept", "W3_delivery", "W4_bulk", "W5_history")
    )
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"Python {results['machine']['python']}, {results['machine']['postgresql']}, "
        f"{results['machine']['wrk']}. Mode: `{results['mode']}` "
        f"(median of {results['machine']['mode']['runs']} run(s) each). "
        f"Taken {results['machine']['date']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in results['machine']['load_average_at_start'])}.",
        "",
        "| workload | ours | reference | ratio | target |",
        "| --- | --- | --- | --- | --- |",
    ]
    # Issue 18's targets: plain ≥ 1.5× the naive throughput with a p99 no worse than its
    # (naive/ours ≥ 1); STARTTLS+AUTH ≥ 3×.
    for label, target in (("plain", "≥ 1.5×, ≥ 1"), ("starttls_auth", "≥ 3×")):
        row = w1[label]
        lines.append(
            f"| W1 sync send, 16 clients, {label} | {row['ours']['rps']} req/s, p50 "
            f"{row['ours']['p50_ms']} ms, p99 {row['ours']['p99_ms']} ms | naive: "
            f"{row['naive']['rps']} req/s, p99 {row['naive']['p99_ms']} ms | "
            f"{row['throughput_ratio']}× throughput, p99 naive/ours "
            f"{row['p99_ratio_naive_over_ours']} | {target} |"
        )
    lines += [
        f"| W2 queued accept (202), 16 clients | {w2['ours']['rps']} req/s, p99 "
        f"{w2['ours']['p99_ms']} ms, {w2['ours']['server_cpu_ms_per_req']} ms CPU per 202 "
        f"| durable.py: {w2['durable']['rps']} req/s, p99 {w2['durable']['p99_ms']} ms, "
        f"{w2['durable']['server_cpu_ms_per_req']} ms CPU | {w2['ratio_to_durable']} "
        f"(CPU {w2['cpu_ratio_to_durable']}×) | ≥ 0.67 (CPU ≤ 1.5×) |",
        f"| W2 ceiling: /healthz of the same app | {w2['ceiling_healthz']['rps']} req/s, p99 "
        f"{w2['ceiling_healthz']['p99_ms']} ms | | {w2['ratio']} of it | |",
        f"| W3 delivery of {w3['messages']:,} ({w3['message_bytes']} B, {w3['workers']} workers;"
        f" runs: ours {w3['runs']['ours']}, smtp-source {w3['runs']['smtp_source']}) "
        f"| {w3['ours_msgs_per_s']} msg/s | smtp-source: {w3['smtp_source_msgs_per_s']} msg/s "
        f"| {w3['ratio']} | ≥ 0.5 |",
        f"| W3 delivery of {w3['messages']:,}, django-post_office "
        f"({w3['post_office']['processes']} processes) | {w3['ours_msgs_per_s']} msg/s | "
        f"post_office: {w3['post_office']['msg_per_s']} msg/s | "
        f"{w3['ratio_to_post_office']}× | ≥ 3.5× |",
        f"| W3 delivery of {w3['starttls_auth_messages']:,}, STARTTLS+AUTH sink | "
        f"{w3['ours_starttls_auth_msgs_per_s']} msg/s | "
        "(smtp-source has no TLS) | | |",
        f"| W4 bulk of 10,000 | 202 in {w4['seconds_to_202']} s; all sent in "
        f"{w4['seconds_to_last_sent']} s | post_office: stored in "
        f"{w4['post_office']['seconds_to_stored']} s, all sent in "
        f"{w4['post_office']['seconds_to_last_sent']} s | | < 0.5 s; < 5 s |",
    ]
    for name in (
        "first_page",
        "recipient",
        "status",
        "date_range",
        "depth_10",
        "depth_100",
        "depth_1000",
    ):
        if name not in w5:  # quick mode: too few rows for the deepest pages
            continue
        row = w5[name]
        lines.append(
            f"| W5 history ({w5['rows']:,} rows), {name} | p50 {row['p50_ms']} ms, p99 "
            f"{row['p99_ms']} ms, {row['rps']} req/s (1 client) | | | p99 < 5 ms |"
        )
    w6 = results["W6_channels"]
    ceiling = w6["stand_in_ceiling"]
    for channel in ("email", "sms", "telegram"):
        row = w6[channel]
        sync = row["sync_send"]
        versus = (
            "(into smtp-sink)"
            if channel == "email"
            else f"{row['sync_rps_ratio_to_email']}× e-mail's sync, "
            f"{row['delivery_ratio_to_email']}× e-mail's delivery"
        )
        lines.append(
            f"| W6 {channel}: sync send, 16 clients; delivery of "
            f"{w6['messages_per_channel']:,} ({results['machine']['mode']['workers']} workers) "
            f"| {sync['rps']} req/s, p50 {sync['p50_ms']} ms, p99 {sync['p99_ms']} ms; "
            f"{row['delivery_msgs_per_s']} msg/s | {versus} | stand-in alone: "
            f"{ceiling['rps']} req/s | |"
        )
    w7 = results.get("W7_templates")
    if w7 is not None:
        plain, templated, render = w7["plain"], w7["templated"], w7["warm_render"]
        lines += [
            f"| W7 templated HTML bulk of {w7['recipients']:,} (booking_confirmed, data per "
            f"recipient; {w7['workers']} workers) | 202 in {templated['seconds_to_202']} s; all "
            f"sent in {templated['seconds_to_last_sent']} s | plain-text bulk: 202 in "
            f"{plain['seconds_to_202']} s, all sent in {plain['seconds_to_last_sent']} s | "
            f"{w7['delivery_ratio']}× the plain delivery | 202 < 1 s; ≤ 1.2× |",
            f"| W7 warm render per message (bench/render.py) | e-mail {render['email_us']} µs, "
            f"SMS {render['sms_us']} µs | | | < 100 µs |",
        ]
    w8 = results.get("W8_dkim")
    if w8 is not None:
        signing = w8["signing"]
        lines += [
            f"| W8 delivery of {w8['messages']:,} with DKIM (rsa-sha256, 2048 bits; "
            f"{w8['workers']} workers) | {w8['on_msgs_per_s']} msg/s signed | "
            f"{w8['off_msgs_per_s']} msg/s unsigned | {w8['ratio_on_to_off']}× | |",
            f"| W8 signing per message (bench/signing_cost.py) | {signing['ours_us']} µs | "
            f"dkimpy's own RSA: {signing['dkimpy_us']} µs; rendering alone "
            f"{signing['render_us']} µs | "
            f"{signing['speedup']}× | |",
        ]
    peaks = ", ".join(f"{k} {v} MB" for k, v in sorted(results["peak_rss_mb"].items()))
    lines += [
        "",
        f"Peak RSS (VmHWM, the largest process of each): {peaks}. Target: each API process"
        " < 120 MB during a bulk of 20,000 (`api-w4-20000`).",
        "",
        "wrk's own CPU seconds per measurement are in results.json (`wrk_cpu_s`). EXPLAIN "
        "ANALYZE of each history query is in `bench/explain/`.",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs: about 3 minutes")
    parser.add_argument("--only", help="comma-separated workloads, e.g. W1,W5")
    parser.add_argument("--ab", action="store_true", help="the A/B rounds' sizes (bench/ab.py)")
    parser.add_argument("--no-peers", action="store_true", help="skip django-post_office")
    args = parser.parse_args()
    mode = AB if args.ab else QUICK if args.quick else FULL
    for tool in ("wrk", "smtp-sink", "smtp-source"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: run bench/setup.sh (make bench does)")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="notify-bench-"))
    bench = Bench(mode, workdir)
    bench.no_peers = args.no_peers
    steps: dict[str, Callable[[], None]] = {
        "W1": bench.w1_sync,
        "W2": bench.w2_queued,
        "W3": bench.w3_delivery,
        "W4": bench.w4_bulk,
        "W5": bench.w5_history,
        "W6": bench.w6_channels,
        "W7": bench.w7_templates,
        "W8": bench.w8_dkim,
    }
    chosen = args.only.split(",") if args.only else list(steps)
    try:
        import redis  # the service's own dependency

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        raise SystemExit(
            f"Redis at {REDIS_URL} does not answer ({exc}): start it, or set BENCH_REDIS_URL"
        ) from None
    try:
        bench.start_sinks()
        bench.migrate()
        for name in chosen:
            t = time.monotonic()
            steps[name]()
            print(f"{name} done in {time.monotonic() - t:.0f} s", flush=True)
            # Kept as it goes: a run that fails later still leaves what it measured.
            progress = BENCH / "results-progress.json"
            progress.write_text(json.dumps(bench.results, indent=2) + "\n")
    finally:
        bench.close()
    bench.results["machine"] = machine(mode)
    bench.results["mode"] = "quick" if args.quick else "full"
    bench.results["total_seconds"] = round(time.monotonic() - started, 1)
    # The committed results are a full run's; a quick or partial run writes beside them.
    suffix = "-partial" if args.only else "-quick" if args.quick else ""
    (BENCH / f"results{suffix}.json").write_text(json.dumps(bench.results, indent=2) + "\n")
    if not args.only:
        write_markdown(bench.results, BENCH / f"results{suffix}.md")
    print(json.dumps(bench.results, indent=2))
    print(f"logs in {workdir}")


if __name__ == "__main__":
    main()
