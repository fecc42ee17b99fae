"""Delivering a stored notification: attempts on its channels under the retry policy,
each one recorded.

A notification is tried on the channels of its order one at a time. A permanent failure
on a channel, or its retries running out (FALLBACK_AFTER_ATTEMPTS attempts on a channel
with another after it, QUEUE_MAX_ATTEMPTS on the last), moves it to the next channel;
it ends `failed` only when every channel has failed. A channel that refused the address
for good (`RecipientUnreachable`: a blocked bot) is remembered on the recipient.

An attempt's outcome is stored with the state it leaves the notification in, in one
commit, and only while the sender still holds the notification's lease. When the
database fails after the SMTP server has answered, the outcome is not dropped: it is
kept in memory (`Unrecorded`) and stored as soon as the database answers again, well
within the lease, so no other sender takes the notification over and sends it again.
A failed COMMIT may have been made all the same (only its answer was lost): a kept
outcome names its attempt (a worker's pending row, a synchronous send's attempt number),
and storing it again finds that attempt stored and changes nothing twice. Likewise a
request answered 503 because its COMMIT failed may still have stored its notification:
it is failed, unsent, once the database is back, so it is never sent later.
Only a process that dies while it still holds unrecorded outcomes leaves them to the
takeover (see README: "Database outages").
"""

import logging
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial

from sqlalchemy.orm import Session, sessionmaker
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)
from tenacity.wait import wait_base

import crud
from channels.base import (
    DeliveryError,
    Message,
    PermanentDeliveryError,
    Receipt,
    RecipientUnreachable,
    Sender,
    TransientDeliveryError,
)
from config import Settings
from crud import IdempotencyClaim, Outcome
from db import DATABASE_UNAVAILABLE
from mailer import new_message_id, new_message_ids
from models import AttemptOutcome, Batch, Channel, Notification, NotificationStatus, utcnow
from schemas import TELEGRAM_MAX_TEXT

logger = logging.getLogger(__name__)


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
    """Store an outcome kept through an outage (once, if its first commit was made after
    all and only its answer was lost)."""
    if crud.record_outcome(session=session, outcome=outcome) is None:
        logger.warning(
            "notification %d: no longer held when its outcome was recorded (taken over, or "
            "already stored by a commit whose answer was lost)",
            outcome.notification_id,
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
            "%d outcomes no longer held when recorded (taken over, or already stored by a "
            "commit whose answer was lost)",
            len(outcomes) - len(settled),
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
    """The retry policy: only transient failures, exponential backoff with jitter, bounded.

    A provider that asks for a pause (Telegram's retry_after, a Retry-After header) gets at
    least that; one longer than RETRY_MAX_WAIT is left to the queue's backoff."""
    backoff = wait_exponential_jitter(
        multiplier=settings.retry_initial_wait,
        max=settings.retry_max_wait,
        jitter=settings.retry_jitter,
    )

    def retry_now(exc: BaseException) -> bool:
        return isinstance(exc, TransientDeliveryError) and (
            exc.retry_after is None or exc.retry_after <= settings.retry_max_wait
        )

    def wait(state: RetryCallState) -> float:
        assert state.outcome is not None
        asked = getattr(state.outcome.exception(), "retry_after", None)
        return max(backoff(state), asked or 0.0)

    return Retrying(
        retry=retry_if_exception(retry_now),
        stop=stop_after_attempt(settings.retry_attempts)
        | stop_before_delay(settings.retry_max_time),
        wait=wait,
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


class Unroutable(ValueError):
    """A notification no channel can carry as asked (a 422): `field` names what is wrong."""

    def __init__(self, message: str, *, field: str = "channels") -> None:
        super().__init__(message)
        self.field = field


def plan_route(
    *,
    order: Sequence[Channel],
    addresses: Mapping[Channel, str | None],
    configured: Collection[Channel],
    unreachable: Mapping[str, str] | None = None,
    subject: str | None = None,
    text: str = "",
    requested: bool = True,
) -> tuple[list[tuple[Channel, str]], list[dict[str, str]]]:
    """The channels to try, in `order`, each with its address; and those left out, with
    why (no address for the recipient, or the address refused the channel for good).

    Raises `Unroutable` when a `requested` order (the caller's own) names a channel that is
    not configured, or Telegram for a text over 4,096 characters; an order that is not the
    caller's (the recipient's, CHANNEL_ORDER) skips such channels. Raises it as well when
    no channel is left (e-mail without a subject is left out).
    """
    route: list[tuple[Channel, str]] = []
    skipped: list[dict[str, str]] = []
    for channel in order:
        if channel not in configured:
            if requested:
                raise Unroutable(f"the {channel} channel is not configured")
            skipped.append({"channel": str(channel), "reason": "not configured"})
            continue
        address = addresses.get(channel)
        if address is None:
            skipped.append({"channel": str(channel), "reason": "no address"})
            continue
        if unreachable and str(channel) in unreachable:
            reason = f"unreachable: {unreachable[str(channel)]}"
            skipped.append({"channel": str(channel), "reason": reason})
            continue
        if channel == Channel.EMAIL and subject is None:
            skipped.append({"channel": str(channel), "reason": "no subject"})
            continue
        if channel == Channel.TELEGRAM and len(text) > TELEGRAM_MAX_TEXT:
            if requested:
                raise Unroutable(
                    f"Telegram takes at most {TELEGRAM_MAX_TEXT} characters", field="text"
                )
            skipped.append({"channel": str(channel), "reason": "text too long"})
            continue
        route.append((channel, address))
    if not route:
        reasons = ", ".join(f"{s['channel']}: {s['reason']}" for s in skipped)
        raise Unroutable(f"no channel of the order can reach this recipient ({reasons})")
    return route, skipped


class Deliverer:
    """Sends notifications through their channels and records every attempt.

    A transient failure that outlasts the quick retries is handed to the background
    retries (queued, due after `queue_backoff`) until `max_attempts` attempts on the
    channel (`fallback_after` when another channel follows it); then, or at once after a
    permanent failure, the next channel of the order is tried, and with none left the
    notification ends failed.
    """

    def __init__(
        self,
        *,
        channels: Mapping[Channel, Sender],
        retrying: Retrying,
        sender: str,
        lease: timedelta,
        queue_backoff: wait_base,
        max_attempts: int,
        key: bytes,
        sync_sends: int = 16,
        fallback_after: int | None = None,
    ) -> None:
        # The configured channels; a notification for another one fails on that channel.
        self.channels = dict(channels)
        self.retrying = retrying
        self.sender = sender
        # How long a synchronous send may take before a worker may take it over.
        self.lease = lease
        self.queue_backoff = queue_backoff
        self.max_attempts = max_attempts
        self.fallback_after = fallback_after or max_attempts
        # The HMAC key of erased sensitive texts.
        self.key = key
        # Synchronous sends at once: the rest go to the queue, so a silent SMTP server
        # can hold at most this many request threads.
        self.sync_sends = threading.BoundedSemaphore(sync_sends)
        self.unrecorded = Unrecorded()

    @classmethod
    def from_settings(
        cls, settings: Settings, *, channels: Mapping[Channel, Sender]
    ) -> "Deliverer":
        return cls(
            channels=channels,
            retrying=make_retrying(settings),
            sender=settings.email_from,
            lease=timedelta(seconds=settings.worker_lease),
            queue_backoff=make_queue_backoff(settings),
            max_attempts=settings.queue_max_attempts,
            fallback_after=settings.fallback_after_attempts,
            key=settings.hmac_key(),
            sync_sends=settings.sync_send_limit,
        )

    @property
    def pool_size(self) -> int:
        """Messages sent at once by a worker: the largest channel's connection pool."""
        return max((sender.pool_size for sender in self.channels.values()), default=1)

    def close(self) -> None:
        """Close every channel's connections."""
        for sender in self.channels.values():
            sender.close()

    def create(
        self,
        *,
        session: Session,
        draft: crud.Draft,
        queued: bool = False,
        idempotency: IdempotencyClaim | None = None,
    ) -> Notification:
        """Store a new notification: to send now, or queued for a worker."""
        by_email = any(channel == Channel.EMAIL for channel, _ in draft.route)
        try:
            return crud.create_notification(
                session=session,
                draft=draft,
                message_id=new_message_id(self.sender) if by_email else None,
                queued=queued,
                lease=self.lease,
                idempotency=idempotency,
            )
        except crud.CommitUnconfirmed as unconfirmed:
            self.withdraw_later(unconfirmed, draft.text if draft.sensitive else None)
            raise unconfirmed.error from None

    def create_batch(
        self,
        *,
        session: Session,
        content: crud.Draft,
        requested: int,
        emails: Sequence[str] = (),
        drafts: Sequence[crud.Draft] = (),
        idempotency: IdempotencyClaim | None = None,
    ) -> Batch:
        """Queue one e-mail to each of `emails`, or one notification per draft, as a batch."""
        try:
            return crud.create_batch(
                session=session,
                content=content,
                requested=requested,
                emails=emails,
                drafts=drafts,
                message_ids=new_message_ids(self.sender, len(emails) + len(drafts)),
                idempotency=idempotency,
            )
        except crud.CommitUnconfirmed as unconfirmed:
            self.withdraw_later(unconfirmed, content.text if content.sensitive else None)
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

    @staticmethod
    def message_for(notification: Notification) -> Message:
        """What to send on the notification's channel now."""
        return Message(
            address=notification.recipient,
            text=notification.text,
            subject=notification.subject,
            message_id=notification.message_id,
            sensitive=notification.sensitive,
            parse_mode=notification.parse_mode,
        )

    def deliver(
        self, *, session: Session, notification: Notification, quick_retries: bool = True
    ) -> Notification:
        """Attempt `notification` (with the quick retries, or once): sent, failed or queued.

        Raises `OutcomeNotRecorded` when the database failed after the SMTP server
        answered; the outcome is then kept and stored later.
        """
        try:
            # Still sending after a channel has failed: the next one is tried now.
            while notification.status == NotificationStatus.SENDING:
                self._deliver_on_channel(session, notification, quick_retries)
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

    def _deliver_on_channel(
        self, session: Session, notification: Notification, quick_retries: bool
    ) -> None:
        """Attempt the notification on its current channel (with the quick retries, or
        once) and settle it: sent, queued, failed, or sending on to its next channel."""
        channel = notification.channel
        try:
            if quick_retries:
                # copy(): the policy object is shared by every request thread.
                for attempt in self.retrying.copy():
                    with attempt:
                        self.attempt(session=session, notification=notification)
            else:
                self.attempt(session=session, notification=notification, final=True)
        except DeliveryError as exc:
            # Not settled yet by a final attempt (which may have moved it on already).
            if (
                notification.status == NotificationStatus.SENDING
                and notification.channel == channel
            ):
                outcome = self.settlement(notification, exc, synchronous=True)
                self.store(session, notification, outcome)

    def settlement(
        self,
        notification: Notification,
        error: DeliveryError | None,
        *,
        attempted: int = 0,
        synchronous: bool = False,
    ) -> Outcome:
        """The state a notification is left in after its last attempt on its channel ended
        in `error` (None: sent); `attempted` counts that attempt if it is not stored yet.

        Moving on to the next channel after a permanent failure, a `synchronous` send keeps
        sending (under a renewed lease); otherwise it is queued, due now.
        """
        now = utcnow()
        on_channel = notification.channel_attempts + attempted
        status = NotificationStatus.SENT if error is None else NotificationStatus.FAILED
        next_attempt_at: datetime | None = None
        lease_expires_at: datetime | None = None
        position = notification.route_position + 1
        following = notification.step(position)
        next_step: tuple[int, Channel, str] | None = None
        limit = self.fallback_after if following is not None else self.max_attempts
        if isinstance(error, TransientDeliveryError) and on_channel < limit:
            status = NotificationStatus.QUEUED
            # At least as long as the provider asked for (Telegram's retry_after).
            wait = max(self.backoff_after(on_channel), error.retry_after or 0.0)
            next_attempt_at = now + timedelta(seconds=wait)
        elif error is not None and following is not None:
            next_step = (position, *following)
            # A request goes on at once past a refusal; a channel that has spent its
            # retries (seconds each) leaves the next one to the queue, due now.
            if synchronous and not isinstance(error, TransientDeliveryError):
                status = NotificationStatus.SENDING
                lease_expires_at = now + self.lease
            else:
                status = NotificationStatus.QUEUED
                next_attempt_at = now
        erase = {}
        if notification.sensitive and status in (
            NotificationStatus.SENT,
            NotificationStatus.FAILED,
        ):
            erase = crud.erased(notification.text, self.key)
        return Outcome(
            notification_id=notification.id,
            holder=notification.leased_by or "",
            finished_at=now,
            channel=notification.channel,
            status=status,
            next_attempt_at=next_attempt_at,
            erase=erase,
            next_step=next_step,
            lease_expires_at=lease_expires_at,
        )

    def backoff_after(self, attempts: int) -> float:
        """Seconds to wait before the background retry that follows `attempts` attempts."""
        # tenacity's wait strategies only read the attempt number from the state.
        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = attempts
        return float(self.queue_backoff(state))

    def transmit(self, notification: Notification) -> Receipt | DeliveryError:
        """Hand the message to its channel's provider; its receipt, or the error."""
        sender = self.channels.get(notification.channel)
        if sender is None:
            # Queued before a configuration change took the channel away.
            return PermanentDeliveryError(f"the {notification.channel} channel is not configured")
        try:
            return sender.send(self.message_for(notification))
        except DeliveryError as exc:
            return exc
        except Exception as exc:
            # A bug rather than a delivery failure; still leave a final, explained state.
            logger.exception("notification %d: unexpected error while sending", notification.id)
            return PermanentDeliveryError(f"internal error: {type(exc).__name__}")

    def concluded(
        self,
        notification: Notification,
        result: Receipt | DeliveryError,
        *,
        started_at: datetime,
        attempted: int = 0,
        attempt_id: int | None = None,
        number: int | None = None,
        synchronous: bool = False,
    ) -> Outcome:
        """An attempt's outcome, settling the notification (sent, queued, failed, or on to
        its next channel); `attempted` counts the attempt if the notification does not yet.
        The attempt is named by its pending row (`attempt_id`) or its `number`."""
        error = result if isinstance(result, DeliveryError) else None
        settled = replace(
            self.settlement(notification, error, attempted=attempted, synchronous=synchronous),
            started_at=started_at,
            attempt_id=attempt_id,
            number=number,
        )
        if isinstance(result, Receipt):
            return replace(
                settled,
                outcome=AttemptOutcome.SENT,
                code=result.code,
                provider_message_id=result.provider_message_id,
                segments=result.segments,
                cost=result.cost,
            )
        return replace(
            settled,
            outcome=AttemptOutcome.TRANSIENT_ERROR
            if isinstance(result, TransientDeliveryError)
            else AttemptOutcome.PERMANENT_ERROR,
            code=result.code,
            unreachable=isinstance(result, RecipientUnreachable),
            # A server's reply may hold a NUL, which PostgreSQL text cannot store.
            error=str(result).replace("\x00", "\ufffd"),
        )

    def attempt(self, *, session: Session, notification: Notification, final: bool = False) -> None:
        """One attempt on the notification's channel, stored; raises its `DeliveryError`
        after storing it.

        A `final` attempt also settles the notification (sent, queued, failed, or on to
        its next channel) in the same commit; otherwise only a success does.
        """
        started_at = utcnow()
        result = self.transmit(notification)
        final_outcome = self.concluded(
            notification,
            result,
            started_at=started_at,
            attempted=1,
            # Its identity: stored late, it is stored once however often the write is made.
            number=notification.attempts + 1,
            synchronous=True,
        )
        if isinstance(result, Receipt) or final:
            outcome = final_outcome
        else:
            # A quick retry may follow: the notification stays sending on this channel.
            outcome = replace(
                final_outcome,
                status=None,
                next_attempt_at=None,
                erase={},
                next_step=None,
                lease_expires_at=None,
            )
        self.store(session, notification, outcome, keep=final_outcome)
        if isinstance(result, DeliveryError):
            logger.warning(
                "notification %d: attempt %d (%s) failed: %s",
                notification.id,
                notification.attempts,
                outcome.channel,
                result,
            )
            raise result

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
            if kept.status == NotificationStatus.SENDING:
                # Moving on to the next channel, but this request cannot send it any more
                # (it answers 503): the queue does, as soon as the database is back.
                kept = replace(
                    kept,
                    status=NotificationStatus.QUEUED,
                    next_attempt_at=kept.finished_at,
                    lease_expires_at=None,
                )
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
