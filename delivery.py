"""Delivering a stored notification: SMTP attempts under the retry policy, each one recorded.

An attempt's outcome is stored with the state it leaves the notification in, in one
commit, and only while the sender still holds the notification's lease. When the
database fails after the SMTP server has answered, the outcome is not dropped: it is
kept in memory (`Unrecorded`) and stored as soon as the database answers again, well
within the lease, so no other sender takes the notification over and sends it again.
Likewise a request answered 503 because its COMMIT failed may still have stored its
notification: it is failed, unsent, once the database is back, so it is never sent later.
Only a process that dies while it still holds unrecorded outcomes leaves them to the
takeover (see README: "Database outages").
"""

import logging
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial

from sqlalchemy.orm import Session, sessionmaker
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)
from tenacity.wait import wait_base

import crud
from config import Settings
from crud import IdempotencyClaim, Outcome
from db import DATABASE_UNAVAILABLE
from mailer import (
    DeliveryError,
    MessageRenderer,
    OutgoingMessage,
    PermanentDeliveryError,
    SMTPMailer,
    TransientDeliveryError,
    new_message_id,
    new_message_ids,
)
from models import AttemptOutcome, Batch, Notification, NotificationStatus, utcnow
from schemas import BulkEmailCreate, EmailNotificationCreate

logger = logging.getLogger(__name__)

# The reply smtplib's sendmail requires of DATA before it returns.
ACCEPTED = 250


class OutcomeNotRecorded(Exception):
    """The SMTP server answered but the database did not take the outcome; it is kept in
    `Unrecorded` and stored when the database is back."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(f"notification {outcome.notification_id}: outcome not recorded yet")
        self.outcome = outcome


class LeaseLost(Exception):
    """Another sender took the notification over; what happens next is theirs."""


@dataclass(frozen=True)
class LateWrite:
    """A write the database could not take: `what` it is about, and how to make it."""

    what: str
    write: Callable[[Session], object]


class Unrecorded:
    """Writes the database could not take (an outcome after SMTP answered, a withdrawal
    after a commit whose answer was lost), kept until it can."""

    def __init__(self) -> None:
        self._writes: list[LateWrite] = []
        self._lock = threading.Lock()
        # The recorder thread and the in-API worker both flush: one write, made once.
        self._flushing = threading.Lock()
        self.waiting = threading.Event()

    def __len__(self) -> int:
        with self._lock:
            return len(self._writes)

    def keep(self, what: str, write: Callable[[Session], object]) -> None:
        with self._lock:
            self._writes.append(LateWrite(what, write))
        self.waiting.set()

    def flush(self, session_factory: sessionmaker[Session]) -> int:
        """Make the kept writes, oldest first; how many were made. Raises while the
        database is still down, keeping the rest."""
        with self._flushing:
            return self._flush(session_factory)

    def _flush(self, session_factory: sessionmaker[Session]) -> int:
        made = 0
        while True:
            with self._lock:
                if not self._writes:
                    self.waiting.clear()
                    return made
                late = self._writes[0]
            with session_factory() as session:
                late.write(session)
            with self._lock:
                self._writes.remove(late)
            made += 1
            logger.info("%s: stored late", late.what)

    def run(
        self,
        session_factory: sessionmaker[Session],
        stopping: threading.Event,
        retry_every: float = 0.5,
    ) -> None:
        """Make kept writes as soon as the database takes them, until `stopping`."""
        while not stopping.is_set():
            if not self.waiting.wait(timeout=retry_every):
                continue
            try:
                self.flush(session_factory)
            except Exception as exc:
                logger.warning("%d writes still waiting for the database: %s", len(self), exc)
                stopping.wait(retry_every)
        with suppress(Exception):
            self.flush(session_factory)
        if len(self):
            logger.error(
                "stopping with writes the database never took (%s): after their leases run "
                "out, their notifications will be attempted again",
                "; ".join(late.what for late in self._writes),
            )


def record_late(session: Session, outcome: Outcome) -> None:
    """Store an outcome kept through an outage."""
    if crud.record_outcome(session=session, outcome=outcome) is None:
        logger.warning(
            "notification %d: outcome recorded after its lease was lost", outcome.notification_id
        )


def settle(session: Session, outcomes: list[Outcome]) -> set[int]:
    """Store a worker batch's outcomes (see `crud.settle_batch`); the ids settled. If the
    batch's statement fails for another reason than an outage, each outcome is stored on
    its own, so one bad row cannot hold back the rest (it is left to its lease running
    out). An outage raises."""
    try:
        return crud.settle_batch(session=session, outcomes=outcomes)
    except DATABASE_UNAVAILABLE:
        raise
    except Exception:
        logger.exception("a batch's outcomes could not be stored together; one by one")
        session.rollback()
    settled: set[int] = set()
    for outcome in outcomes:
        try:
            settled |= crud.settle_batch(session=session, outcomes=[outcome])
        except DATABASE_UNAVAILABLE:
            raise
        except Exception:
            logger.exception("notification %d: outcome not stored", outcome.notification_id)
            session.rollback()
    return settled


def settle_late(session: Session, outcomes: list[Outcome]) -> None:
    """Store a worker batch's outcomes kept through an outage."""
    settled = settle(session, outcomes)
    if len(settled) < len(outcomes):
        logger.warning(
            "%d outcomes recorded after their lease was lost", len(outcomes) - len(settled)
        )


def release_late(session: Session, worker_id: str, leased: list[crud.Leased]) -> None:
    """Give back a worker's unattempted notifications after an outage."""
    crud.release(session=session, worker_id=worker_id, leased=leased)


def start_recorder(
    unrecorded: Unrecorded, session_factory: sessionmaker[Session]
) -> Callable[[], None]:
    """Run `unrecorded.run` in a thread; the function that stops it."""
    stopping = threading.Event()
    thread = threading.Thread(
        target=unrecorded.run,
        args=(session_factory, stopping),
        name="outcome-recorder",
        daemon=True,
    )
    thread.start()

    def stop() -> None:
        stopping.set()
        unrecorded.waiting.set()
        thread.join()

    return stop


def make_retrying(settings: Settings) -> Retrying:
    """The retry policy: only transient failures, exponential backoff with jitter, bounded."""
    return Retrying(
        retry=retry_if_exception_type(TransientDeliveryError),
        stop=stop_after_attempt(settings.retry_attempts)
        | stop_before_delay(settings.retry_max_time),
        wait=wait_exponential_jitter(
            multiplier=settings.retry_initial_wait,
            max=settings.retry_max_wait,
            jitter=settings.retry_jitter,
        ),
        before_sleep=_log_backoff,
        reraise=True,
    )


def make_queue_backoff(settings: Settings) -> wait_base:
    """The background retries' wait: exponential with jitter, in seconds."""
    return wait_exponential_jitter(
        multiplier=settings.queue_retry_initial_wait,
        max=settings.queue_retry_max_wait,
        jitter=settings.queue_retry_initial_wait,
    )


def _log_backoff(state: RetryCallState) -> None:
    if state.next_action is not None:
        logger.info("next attempt in %.2f s", state.next_action.sleep)


class Deliverer:
    """Sends notifications through a mailer and records every attempt.

    A transient failure that outlasts the quick retries is handed to the background
    retries (queued, due after `queue_backoff`) until `max_attempts` attempts in all;
    anything else ends the notification as failed.
    """

    def __init__(
        self,
        *,
        mailer: SMTPMailer,
        retrying: Retrying,
        sender: str,
        lease: timedelta,
        queue_backoff: wait_base,
        max_attempts: int,
        key: bytes,
        sync_sends: int = 16,
    ) -> None:
        self.mailer = mailer
        self.retrying = retrying
        self.sender = sender
        self.renderer = MessageRenderer(sender)
        # How long a synchronous send may take before a worker may take it over.
        self.lease = lease
        self.queue_backoff = queue_backoff
        self.max_attempts = max_attempts
        # The HMAC key of erased sensitive texts.
        self.key = key
        # Synchronous sends at once: the rest go to the queue, so a silent SMTP server
        # can hold at most this many request threads.
        self.sync_sends = threading.BoundedSemaphore(sync_sends)
        self.unrecorded = Unrecorded()

    @classmethod
    def from_settings(cls, settings: Settings, *, mailer: SMTPMailer) -> "Deliverer":
        return cls(
            mailer=mailer,
            retrying=make_retrying(settings),
            sender=settings.email_from,
            lease=timedelta(seconds=settings.worker_lease),
            queue_backoff=make_queue_backoff(settings),
            max_attempts=settings.queue_max_attempts,
            key=settings.hmac_key(),
            sync_sends=settings.sync_send_limit,
        )

    def create_email(
        self,
        *,
        session: Session,
        data: EmailNotificationCreate,
        queued: bool = False,
        idempotency: IdempotencyClaim | None = None,
    ) -> Notification:
        """Store a new e-mail notification: to send now, or queued for a worker."""
        try:
            return crud.create_email_notification(
                session=session,
                data=data,
                message_id=new_message_id(self.sender),
                queued=queued,
                lease=self.lease,
                idempotency=idempotency,
            )
        except crud.CommitUnconfirmed as unconfirmed:
            self.withdraw_later(unconfirmed, data.text if data.sensitive else None)
            raise unconfirmed.error from None

    def create_batch(
        self,
        *,
        session: Session,
        data: BulkEmailCreate,
        recipients: list[str],
        idempotency: IdempotencyClaim | None = None,
    ) -> Batch:
        """Queue one e-mail per recipient, as one batch."""
        try:
            return crud.create_email_batch(
                session=session,
                data=data,
                recipients=recipients,
                message_ids=new_message_ids(self.sender, len(recipients)),
                idempotency=idempotency,
            )
        except crud.CommitUnconfirmed as unconfirmed:
            self.withdraw_later(unconfirmed, data.text if data.sensitive else None)
            raise unconfirmed.error from None

    def withdraw_later(
        self, unconfirmed: crud.CommitUnconfirmed, sensitive_text: str | None
    ) -> None:
        """The request is answered 503 (nothing sent), yet its commit may have been made:
        once the database is back, fail what it stored before anyone sends it."""
        erase = crud.erased(sensitive_text, self.key) if sensitive_text is not None else {}
        self.unrecorded.keep(
            unconfirmed.what,
            partial(crud.withdraw_unconfirmed, unconfirmed=unconfirmed, erase=erase),
        )

    def claim_for_resend(
        self, *, session: Session, notification: Notification, queued: bool = False
    ) -> bool:
        """Take a failed notification for a resend in this request (or, `queued`, for the
        queue); False if not failed."""
        return crud.claim_for_resend(
            session=session, notification=notification, lease=self.lease, queued=queued
        )

    def message_for(self, notification: Notification) -> OutgoingMessage:
        """The message's bytes and envelope (see `MessageRenderer`)."""
        return self.renderer.render(
            recipient=notification.recipient,
            subject=notification.subject or "",
            text=notification.text,
            message_id=notification.message_id or new_message_id(self.sender),
            date=utcnow(),
            sensitive=notification.sensitive,
        )

    def deliver(
        self, *, session: Session, notification: Notification, quick_retries: bool = True
    ) -> Notification:
        """Attempt `notification` (with the quick retries, or once): sent, failed or queued.

        Raises `OutcomeNotRecorded` when the database failed after the SMTP server
        answered; the outcome is then kept and stored later.
        """
        try:
            try:
                if quick_retries:
                    # copy(): the policy object is shared by every request thread.
                    for attempt in self.retrying.copy():
                        with attempt:
                            self.attempt(session=session, notification=notification)
                else:
                    self.attempt(session=session, notification=notification, final=True)
            except DeliveryError as exc:
                if notification.status == NotificationStatus.SENDING:
                    self.store(session, notification, self.settlement(notification, exc))
        except LeaseLost:
            # Our lease ran out and another sender claimed the notification: it is theirs.
            session.refresh(notification)
            # The attempts too, now: the response must not query while it is written.
            session.refresh(notification, ["delivery_attempts"])
            session.commit()
            logger.warning("notification %d: lease lost, left to its new owner", notification.id)
            return notification
        logger.info(
            "notification %d %s after %d attempt(s)",
            notification.id,
            notification.status,
            notification.attempts,
        )
        return notification

    def settlement(
        self, notification: Notification, error: DeliveryError | None, *, attempted: int = 0
    ) -> Outcome:
        """The state a notification is left in after its last attempt ended in `error`
        (None: sent); `attempted` counts that attempt if it is not stored yet."""
        now = utcnow()
        attempts = notification.attempts + attempted
        status = NotificationStatus.SENT if error is None else NotificationStatus.FAILED
        next_attempt_at: datetime | None = None
        if isinstance(error, TransientDeliveryError) and attempts < self.max_attempts:
            status = NotificationStatus.QUEUED
            next_attempt_at = now + timedelta(seconds=self.backoff_after(attempts))
        erase = {}
        if notification.sensitive and status != NotificationStatus.QUEUED:
            erase = crud.erased(notification.text, self.key)
        return Outcome(
            notification_id=notification.id,
            holder=notification.leased_by or "",
            finished_at=now,
            status=status,
            next_attempt_at=next_attempt_at,
            erase=erase,
        )

    def backoff_after(self, attempts: int) -> float:
        """Seconds to wait before the background retry that follows `attempts` attempts."""
        # tenacity's wait strategies only read the attempt number from the state.
        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = attempts
        return float(self.queue_backoff(state))

    def transmit(self, notification: Notification) -> DeliveryError | None:
        """Hand the message to the SMTP server; the error, or None if it was accepted."""
        try:
            self.mailer.send(self.message_for(notification))
        except DeliveryError as exc:
            return exc
        except Exception as exc:
            # A bug rather than a delivery failure; still leave a final, explained state.
            logger.exception("notification %d: unexpected error while sending", notification.id)
            return PermanentDeliveryError(f"internal error: {type(exc).__name__}")
        return None

    def concluded(
        self,
        notification: Notification,
        error: DeliveryError | None,
        *,
        started_at: datetime,
        attempted: int = 0,
        attempt_id: int | None = None,
    ) -> Outcome:
        """An attempt's outcome, settling the notification (sent, queued or failed);
        `attempted` counts the attempt if the notification does not yet."""
        settled = replace(
            self.settlement(notification, error, attempted=attempted),
            started_at=started_at,
            attempt_id=attempt_id,
        )
        if error is None:
            return replace(settled, outcome=AttemptOutcome.SENT, smtp_code=ACCEPTED)
        return replace(
            settled,
            outcome=AttemptOutcome.TRANSIENT_ERROR
            if isinstance(error, TransientDeliveryError)
            else AttemptOutcome.PERMANENT_ERROR,
            smtp_code=error.code,
            # A server's reply may hold a NUL, which PostgreSQL text cannot store.
            error=str(error).replace("\x00", "\ufffd"),
        )

    def attempt(self, *, session: Session, notification: Notification, final: bool = False) -> None:
        """One SMTP attempt, stored; raises its `DeliveryError` after storing it.

        A `final` attempt also settles the notification (sent, queued or failed) in the
        same commit; otherwise only a success does.
        """
        started_at = utcnow()
        error = self.transmit(notification)
        final_outcome = self.concluded(notification, error, started_at=started_at, attempted=1)
        if error is None or final:
            outcome = final_outcome
        else:
            # A quick retry may follow: the notification stays sending.
            outcome = replace(final_outcome, status=None, next_attempt_at=None, erase={})
        self.store(session, notification, outcome, keep=final_outcome)
        if error is not None:
            logger.warning(
                "notification %d: attempt %d failed: %s",
                notification.id,
                notification.attempts,
                error,
            )
            raise error

    def settle_batch(self, session: Session, outcomes: list[Outcome]) -> set[int] | None:
        """Store a worker batch's outcomes (`settle`); the ids settled, or None if the
        database failed: then they are kept and stored later."""
        try:
            return settle(session, outcomes)
        except DATABASE_UNAVAILABLE:
            self._rollback(session)
            self.unrecorded.keep(
                f"a batch of {len(outcomes)} outcomes", partial(settle_late, outcomes=outcomes)
            )
            logger.error("database unavailable: %d outcomes kept to record later", len(outcomes))
            return None

    def release(self, session: Session, *, worker_id: str, leased: list[crud.Leased]) -> None:
        """Give a worker's unattempted notifications back to the queue; if the database
        is down, as soon as it is back (still before their leases run out, mostly)."""
        try:
            crud.release(session=session, worker_id=worker_id, leased=leased)
        except DATABASE_UNAVAILABLE:
            self._rollback(session)
            self.unrecorded.keep(
                f"release of {len(leased)} notifications",
                partial(release_late, worker_id=worker_id, leased=leased),
            )

    @staticmethod
    def _rollback(session: Session) -> None:
        with suppress(Exception):
            session.rollback()

    def store(
        self,
        session: Session,
        notification: Notification,
        outcome: Outcome,
        keep: Outcome | None = None,
    ) -> None:
        """Store `outcome` and show it on `notification`.

        Raises `LeaseLost` if another sender holds the notification now, and
        `OutcomeNotRecorded` if the database failed: then `keep` (settled: no quick retry
        follows a database failure) is kept for `Unrecorded` to store later.
        """
        try:
            number = crud.record_outcome(session=session, outcome=outcome)
        except DATABASE_UNAVAILABLE:
            self._rollback(session)
            kept = keep or outcome
            self.unrecorded.keep(
                f"notification {kept.notification_id}", partial(record_late, outcome=kept)
            )
            logger.error(
                "notification %d: database unavailable, outcome kept to record later",
                kept.notification_id,
            )
            raise OutcomeNotRecorded(kept) from None
        if number is None:
            raise LeaseLost
        crud.apply_outcome(notification, outcome, number)
