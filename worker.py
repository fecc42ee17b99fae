"""The delivery worker: `python worker.py`, or a thread inside the API (WORKER_IN_API).

Eligibility, checked by one UPDATE over rows selected FOR UPDATE SKIP LOCKED:
- `queued` and `next_attempt_at` has passed (new, scheduled, or backing off), or
- `sending` under an expired lease: the worker holding it died.
A claim sets `sending` with a lease of WORKER_LEASE seconds; taking over a dead
sender's notification records its lost attempt as `abandoned`. After one attempt a
notification is `sent`; or back to `queued` with a later `next_attempt_at` (transient
failure and attempts left, exponential backoff with jitter); or `failed`. Outcomes the
database could not take (an outage) are stored before anything new is claimed.

On SIGTERM/SIGINT the worker stops claiming, finishes the message in hand, gives the
rest of its batch back to the queue and exits. Several workers and API replicas may
run at once on PostgreSQL; on SQLite run one.
"""

import logging
import os
import signal
import socket
import threading
import time
from datetime import timedelta
from types import FrameType

from sqlalchemy.orm import Session, sessionmaker

import crud
from config import Settings
from db import make_engine, make_session_factory
from delivery import Deliverer, OutcomeNotRecorded, start_recorder

logger = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL = 60.0


class Worker:
    """Claims due notifications in batches and sends each with one attempt."""

    def __init__(
        self,
        *,
        session_factory: sessionmaker[Session],
        deliverer: Deliverer,
        settings: Settings,
        worker_id: str | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.deliverer = deliverer
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.stopping = threading.Event()
        self.next_housekeeping = 0.0

    def run(self) -> None:
        """Work until `stop()`; sleep between empty polls."""
        logger.info("worker %s started", self.worker_id)
        while not self.stopping.is_set():
            try:
                handled = self.run_once()
            except Exception:
                # Database down or a bug: keep the worker alive and try again later.
                logger.exception("worker %s: claim round failed", self.worker_id)
                handled = 0
            if handled == 0:
                self._housekeeping()
                self.stopping.wait(self.settings.worker_poll_interval)
        logger.info("worker %s stopped", self.worker_id)

    def _housekeeping(self) -> None:
        """When idle, at most once a minute: forget expired Idempotency-Keys."""
        now = time.monotonic()
        if now < self.next_housekeeping:
            return
        self.next_housekeeping = now + HOUSEKEEPING_INTERVAL
        try:
            with self.session_factory() as session:
                purged = crud.purge_expired_idempotency_keys(session=session)
        except Exception:
            logger.exception("worker %s: housekeeping failed", self.worker_id)
            return
        if purged:
            logger.info("worker %s: purged %d expired idempotency keys", self.worker_id, purged)

    def stop(self) -> None:
        self.stopping.set()

    def run_once(self) -> int:
        """Claim one batch and work through it; the number of notifications attempted."""
        # Our own late outcomes first: their notifications are still leased to us.
        self.deliverer.unrecorded.flush(self.session_factory)
        lease = timedelta(seconds=self.settings.worker_lease)
        with self.session_factory() as session:
            batch = crud.claim_due(
                session=session,
                worker_id=self.worker_id,
                lease=lease,
                limit=self.settings.worker_batch_size,
            )
            # Read now: after a failed commit the objects cannot be read without a query.
            ids = [n.id for n in batch]
            done = 0
            try:
                for notification in batch:
                    if self.stopping.is_set():
                        break
                    renewed = crud.renew_lease(
                        session=session,
                        notification=notification,
                        worker_id=self.worker_id,
                        lease=lease,
                    )
                    done += 1
                    if not renewed:
                        logger.warning(
                            "worker %s: notification %d was taken over before its turn",
                            self.worker_id,
                            notification.id,
                        )
                        continue
                    self.deliverer.deliver(
                        session=session, notification=notification, quick_retries=False
                    )
            except OutcomeNotRecorded:
                logger.warning("worker %s: database unavailable mid-batch", self.worker_id)
            finally:
                # Stopping, or the database failed: what was not attempted goes back now
                # rather than when the lease runs out.
                rest = ids[done:]
                if rest:
                    session.rollback()
                    crud.release(session=session, worker_id=self.worker_id, notification_ids=rest)
            return done


def main() -> None:
    """Run one worker process until SIGTERM or SIGINT."""
    from main import build_deliverer  # the API's wiring, reused

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings()
    engine = make_engine(settings)
    deliverer, catcher = build_deliverer(settings)
    worker = Worker(
        session_factory=make_session_factory(engine), deliverer=deliverer, settings=settings
    )

    def stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("worker %s: %s, finishing", worker.worker_id, signal.Signals(signum).name)
        worker.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    stop_recorder = start_recorder(deliverer.unrecorded, worker.session_factory)
    try:
        worker.run()
    finally:
        stop_recorder()
        deliverer.mailer.close()
        if catcher is not None:
            catcher.stop()
        engine.dispose()


if __name__ == "__main__":
    main()
