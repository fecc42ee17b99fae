"""The delivery worker: `python worker.py`, or a thread inside the API (WORKER_IN_API).

Eligibility, checked by one UPDATE over rows selected FOR UPDATE SKIP LOCKED:
- `queued` and `next_attempt_at` has passed (new, scheduled, or backing off), or
- `sending` under an expired lease: the worker holding it died.
Right after the claim, one query finds those a suppression now stops on their channel
(added while they waited): they are not sent, and move on as after a refusal.
A claim sets `sending` with a lease of WORKER_LEASE seconds and writes each
notification's attempt as `pending`, in one transaction; taking over a dead sender's
notification records its lost attempt as `abandoned`. The batch is sent on each
notification's current channel (e-mail, SMS, Telegram), as many at once as the largest
channel's connection pool (SMTP_POOL_SIZE, CHANNEL_POOL_SIZE); once half the lease has
passed, the lease on what is left is renewed (one statement, only where this worker still
holds it). Then the whole batch is settled in one statement: each notification `sent`; or
back to `queued` with a later `next_attempt_at` (transient failure and attempts left on its
channel, exponential backoff with jitter, never sooner than the provider's retry_after);
or `queued`, due now, on the next channel of its order (a permanent failure, or the
channel's attempts ran out); or `failed` when no channel is left. Outcomes the database
could not take (an outage) are stored before anything new is claimed.

Delivery is at least once: a worker killed mid-batch has sent part of its batch without
recording it, and those are sent again after the lease runs out, so a crash resends at
most one batch (WORKER_BATCH_SIZE). Two live workers never send the same notification
(each renews its leases every half lease while the database answers).

On SIGTERM/SIGINT the worker stops claiming, finishes the messages in hand, gives the
rest of its batch back to the queue and exits. Several workers and API replicas may
run at once, on PostgreSQL (rows locked with SKIP LOCKED) and on SQLite (one writer at
a time; the claim's UPDATE checks again that each row is still due).
"""

import logging
import os
import signal
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import datetime, timedelta
from types import FrameType

from sqlalchemy.orm import Session, sessionmaker

import crud
import idempotency
from channels.base import DeliveryError, File
from config import Settings
from db import DATABASE_UNAVAILABLE
from delivery import Deliverer
from lifecycle import Transition, carries_files
from recorder import start_recorder
from wiring import build_database, build_deliverer, configure_logging

logger = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL = 60.0


class Worker:
    """Claims due notifications in batches and sends each with one attempt; what is due,
    leases and their renewal go by the clock `now`."""

    def __init__(
        self,
        *,
        session_factory: sessionmaker[Session],
        deliverer: Deliverer,
        settings: Settings,
        worker_id: str | None = None,
        threads: int | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.session_factory = session_factory
        # The deliverer's clock unless told another.
        self.now = now or deliverer.now
        self.deliverer = deliverer
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.stopping = threading.Event()
        self.next_housekeeping = 0.0
        # Messages sent at once: one per pooled connection of the largest channel, unless
        # told fewer (the in-API worker leaves connections to synchronous sends).
        self.threads = threads or deliverer.pool_size
        self.executor: ThreadPoolExecutor | None = None
        # The claimed batch's notifications stopped by a suppression, with why.
        self.suppressed: dict[int, str] = {}

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
        self.close()
        logger.info("worker %s stopped", self.worker_id)

    def close(self) -> None:
        """Let the sending threads go."""
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None

    def _housekeeping(self) -> None:
        """When idle, at most once a minute: forget expired Idempotency-Keys and inbound
        reports older than INBOUND_REPORT_RETENTION, and delete expired attachments."""
        now = time.monotonic()
        if now < self.next_housekeeping:
            return
        self.next_housekeeping = now + HOUSEKEEPING_INTERVAL
        try:
            with self.session_factory() as session:
                purged = idempotency.purge_expired(session=session)
                expired = self.deliverer.attachments.expire(session=session)
                reports = crud.forget_reports(
                    session=session,
                    before=self.now() - timedelta(seconds=self.settings.inbound_report_retention),
                )
        except Exception:
            logger.exception("worker %s: housekeeping failed", self.worker_id)
            return
        if purged:
            logger.info("worker %s: purged %d expired idempotency keys", self.worker_id, purged)
        if expired:
            logger.info("worker %s: deleted %d expired attachments", self.worker_id, expired)
        if reports:
            logger.info("worker %s: forgot %d old inbound reports", self.worker_id, reports)

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
                now=self.now,
            )
            if not batch:
                return 0
            # Right before the send: a suppression added while they waited stops them.
            try:
                self.suppressed = crud.suppressed_now(
                    session=session,
                    notifications=[item.notification for item in batch],
                    now=self.now,
                )
            except DATABASE_UNAVAILABLE:
                # Not sent unchecked: given back (now, or once the database answers).
                session.rollback()
                self.deliverer.release(session, worker_id=self.worker_id, leased=batch)
                raise
        waiting = deque(batch)
        # Attempted and not settled yet.
        outcomes: list[Transition] = []
        try:
            attempted = self._send(waiting, outcomes, lease)
        finally:
            self._finish(outcomes, waiting)
        return attempted

    def _finish(self, outcomes: list[Transition], waiting: deque[crud.Leased]) -> None:
        """Settle what was sent; give back what was not attempted (stopping, or the
        database failed) now rather than when the lease runs out."""
        try:
            if outcomes:
                with self.session_factory() as session:
                    self._settle(session, outcomes)
        finally:
            if waiting:
                with self.session_factory() as session:
                    self.deliverer.release(session, worker_id=self.worker_id, leased=[*waiting])

    def _send(
        self, waiting: deque[crud.Leased], outcomes: list[Transition], lease: timedelta
    ) -> int:
        """Send what is `waiting` over up to `smtp_pool_size` connections at once, adding
        to `outcomes`. Every half lease, while anything is waiting or being sent, settle
        what was sent and renew the lease on the rest, so a send never outlives the lease
        of a live worker. Taken-over items are dropped from `waiting`; what is left there
        was not attempted (stopping). How many were attempted."""
        attempted = 0
        # Futures of the messages being sent, and their notification ids.
        in_flight: dict[Future[Transition], int] = {}
        half = lease / 2
        renew_at = self.now() + half
        pool = self._pool()
        try:
            while True:
                # The next renewal counts from a time read before this one is written, so
                # it is due half a lease before the lease written runs out, or sooner.
                now = self.now()
                if now >= renew_at:
                    self._renew(waiting, [*in_flight.values()], outcomes, lease)
                    renew_at = now + half
                dispatching = waiting and not self.stopping.is_set()
                if dispatching and len(in_flight) < self.threads:
                    item = waiting.popleft()
                    attempted += 1
                    in_flight[pool.submit(self._attempt, item)] = item.notification.id
                    continue
                if not in_flight:
                    break
                # Never longer than half a lease: the clock is read again on waking.
                until_renewal = min(renew_at - self.now(), half).total_seconds()
                done, _ = wait(
                    in_flight, timeout=max(0.0, until_renewal), return_when=FIRST_COMPLETED
                )
                for future in done:
                    del in_flight[future]
                    outcomes.append(future.result())
        finally:
            outcomes.extend(future.result() for future in wait(in_flight).done)
        return attempted

    def _pool(self) -> ThreadPoolExecutor:
        """The sending threads (a send never runs in this thread, which renews leases)."""
        if self.executor is None:
            self.executor = ThreadPoolExecutor(self.threads, thread_name_prefix="smtp-send")
        return self.executor

    def _renew(
        self,
        waiting: deque[crud.Leased],
        sending: list[int],
        outcomes: list[Transition],
        lease: timedelta,
    ) -> None:
        """A slow batch: settle what was sent, renew the lease on the rest (waiting, and
        `sending` now) in one statement, and drop from `waiting` what is not ours any more."""
        with self.session_factory() as session:
            if outcomes:
                self._settle(session, outcomes)
                outcomes.clear()
            kept = crud.renew_leases(
                session=session,
                worker_id=self.worker_id,
                notification_ids=[item.notification.id for item in waiting] + sending,
                lease=lease,
                now=self.now,
            )
        lost = [item for item in waiting if item.notification.id not in kept]
        if lost:
            logger.warning(
                "worker %s: %d notifications were taken over before their turn",
                self.worker_id,
                len(lost),
            )
        for item in lost:
            waiting.remove(item)

    def _attempt(self, item: crud.Leased) -> Transition:
        """Send one message; its outcome, whatever happens (transmit converts every error)."""
        notification = item.notification
        files: tuple[File, ...] | DeliveryError = ()
        if carries_files(notification) and notification.id not in self.suppressed:
            with self.session_factory() as session:
                files = self.deliverer.files(session, notification)
        transition, _ = self.deliverer.attempt(
            notification,
            attempt_id=item.attempt_id,
            files=files,
            suppressed=self.suppressed.get(notification.id),
        )
        return transition

    def _settle(self, session: Session, outcomes: list[Transition]) -> None:
        settled = self.deliverer.settle(session, outcomes)
        if settled is None:
            return
        tally = Counter(str(o.status) for o in outcomes if o.notification_id in settled)
        logger.info(
            "worker %s: batch of %d settled (%s)",
            self.worker_id,
            len(outcomes),
            ", ".join(f"{n} {status}" for status, n in sorted(tally.items())) or "none held",
        )
        for outcome in outcomes:
            if outcome.attempt is not None and outcome.attempt.error is not None:
                logger.warning(
                    "notification %d: %s (%s)",
                    outcome.notification_id,
                    outcome.attempt.error,
                    outcome.status,
                )
            if outcome.notification_id not in settled:
                logger.warning(
                    "notification %d: outcome recorded after its lease was lost",
                    outcome.notification_id,
                )


def main() -> None:
    """Run one worker process until SIGTERM or SIGINT."""
    configure_logging()
    settings = Settings()
    database = build_database(settings)
    deliverer, stop_deliverer = build_deliverer(settings)
    worker = Worker(
        session_factory=database.session_factory, deliverer=deliverer, settings=settings
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
        stop_deliverer()
        database.close()


if __name__ == "__main__":
    main()
