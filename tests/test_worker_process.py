"""`python worker.py` as a real process: killed mid-batch, or asked to stop with SIGTERM."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from config import PROJECT_DIR, Settings
from models import Notification, NotificationStatus, utcnow
from tests.conftest import SECRET_KEY, queue_messages
from tests.smtpd import ScriptedHandler
from worker import Worker

MESSAGES = 200
BATCH = 50


@pytest.fixture
def start_worker(
    settings: Settings, tmp_path: Path
) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Starts `python worker.py` on the test database and SMTP server; kills it at the end."""
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        env = os.environ | {
            "DATABASE_URL": settings.database_url,
            "SMTP_HOST": settings.smtp_host,
            "SMTP_PORT": str(settings.smtp_port),
            "EMAIL_FROM": settings.email_from,
            "SECRET_KEY": SECRET_KEY,
            "WORKER_BATCH_SIZE": str(BATCH),
            "WORKER_LEASE": "1",
            "WORKER_POLL_INTERVAL": "0.05",
        }
        with (tmp_path / f"worker-{len(processes)}.log").open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "worker.py"], cwd=PROJECT_DIR, env=env, stdout=log, stderr=log
            )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def count(db: sessionmaker[Session], status: NotificationStatus) -> int:
    with db() as session:
        return (
            session.scalar(
                select(func.count()).select_from(Notification).where(Notification.status == status)
            )
            or 0
        )


def drain_queue(worker: Worker, db: sessionmaker[Session], timeout: float) -> None:
    """Run `worker` until nothing is queued or sending any more."""
    deadline = time.monotonic() + timeout
    while count(db, NotificationStatus.QUEUED) + count(db, NotificationStatus.SENDING):
        assert time.monotonic() < deadline, "the queue never emptied"
        if not worker.run_once():
            time.sleep(0.05)


@pytest.mark.slow
def test_a_worker_killed_mid_batch_loses_nothing(
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    make_worker: Callable[..., Worker],
    start_worker: Callable[[], subprocess.Popen[bytes]],
) -> None:
    message_ids = queue_messages(db, MESSAGES)
    doomed = start_worker()
    wait_for(lambda: len(smtp.received) >= BATCH // 2, 30, "the worker to start sending")

    doomed.send_signal(signal.SIGKILL)
    doomed.wait(10)
    claimed_by_the_dead = count(db, NotificationStatus.SENDING)
    assert claimed_by_the_dead > 0, "killed between batches: nothing to take over"

    # The dead worker's leases (WORKER_LEASE, 1 s) have run out by the clock of the worker
    # that takes over, 1.1 s ahead, instead of being waited out.
    ahead = timedelta(seconds=1.1)
    drain_queue(make_worker(now=lambda: utcnow() + ahead), db, timeout=60)

    delivered = Counter(r.message["Message-ID"] for r in smtp.received)
    assert set(delivered) == set(message_ids)
    # At least once: what the killed worker sent of its batch but had not recorded yet
    # is sent again, and nothing else; at most one batch.
    assert sum(n - 1 for n in delivered.values()) <= BATCH
    assert count(db, NotificationStatus.SENT) == MESSAGES


@pytest.mark.slow
def test_sigterm_finishes_the_message_in_hand_and_gives_back_the_rest(
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    make_worker: Callable[..., Worker],
    start_worker: Callable[[], subprocess.Popen[bytes]],
) -> None:
    message_ids = queue_messages(db, MESSAGES)
    worker = start_worker()
    wait_for(lambda: len(smtp.received) >= BATCH // 2, 30, "the worker to start sending")

    worker.send_signal(signal.SIGTERM)

    assert worker.wait(10) == 0
    assert count(db, NotificationStatus.SENDING) == 0
    sent = count(db, NotificationStatus.SENT)
    assert sent == len(smtp.received) < MESSAGES
    assert count(db, NotificationStatus.QUEUED) == MESSAGES - sent

    drain_queue(make_worker(), db, timeout=60)

    delivered = Counter(r.message["Message-ID"] for r in smtp.received)
    assert set(delivered) == set(message_ids)
    assert max(delivered.values()) == 1
