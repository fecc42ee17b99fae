"""Delivering a stored notification: SMTP attempts under the retry policy, each one recorded."""

import logging
from datetime import timedelta
from email.message import EmailMessage

from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError
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
from crud import IdempotencyClaim
from mailer import (
    DeliveryError,
    PermanentDeliveryError,
    SMTPMailer,
    TransientDeliveryError,
    build_message,
    new_message_id,
)
from models import Batch, Notification, utcnow
from schemas import BulkEmailCreate, EmailNotificationCreate

logger = logging.getLogger(__name__)


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
    ) -> None:
        self.mailer = mailer
        self.retrying = retrying
        self.sender = sender
        # How long a synchronous send may take before a worker may take it over.
        self.lease = lease
        self.queue_backoff = queue_backoff
        self.max_attempts = max_attempts

    @classmethod
    def from_settings(cls, settings: Settings, *, mailer: SMTPMailer) -> "Deliverer":
        return cls(
            mailer=mailer,
            retrying=make_retrying(settings),
            sender=settings.email_from,
            lease=timedelta(seconds=settings.worker_lease),
            queue_backoff=make_queue_backoff(settings),
            max_attempts=settings.queue_max_attempts,
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
        return crud.create_email_notification(
            session=session,
            data=data,
            message_id=new_message_id(self.sender),
            queued=queued,
            lease=self.lease,
            idempotency=idempotency,
        )

    def create_batch(
        self,
        *,
        session: Session,
        data: BulkEmailCreate,
        recipients: list[str],
        idempotency: IdempotencyClaim | None = None,
    ) -> Batch:
        """Queue one e-mail per recipient, as one batch."""
        return crud.create_email_batch(
            session=session,
            data=data,
            recipients=recipients,
            message_ids=[new_message_id(self.sender) for _ in recipients],
            idempotency=idempotency,
        )

    def claim_for_resend(self, *, session: Session, notification: Notification) -> bool:
        """Take a failed notification for a resend in this request; False if not failed."""
        return crud.claim_for_resend(session=session, notification=notification, lease=self.lease)

    def message_for(self, notification: Notification) -> EmailMessage:
        return build_message(
            sender=self.sender,
            recipient=notification.recipient,
            subject=notification.subject or "",
            text=notification.text,
            message_id=notification.message_id or new_message_id(self.sender),
            date=utcnow(),
        )

    def deliver(
        self, *, session: Session, notification: Notification, quick_retries: bool = True
    ) -> Notification:
        """Attempt `notification` (with the quick retries, or once): sent, failed or queued."""
        try:
            try:
                if quick_retries:
                    # copy(): the policy object is shared by every request thread.
                    for attempt in self.retrying.copy():
                        with attempt:
                            self.attempt(session=session, notification=notification)
                else:
                    self.attempt(session=session, notification=notification)
            except DeliveryError as exc:
                self.settle_failure(session=session, notification=notification, error=exc)
        except StaleDataError:
            # Our lease ran out and a worker claimed the notification: it is theirs now.
            session.rollback()
            session.refresh(notification)
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

    def settle_failure(
        self, *, session: Session, notification: Notification, error: DeliveryError
    ) -> None:
        """After a failed attempt: back to the queue for later, or failed for good."""
        if isinstance(error, TransientDeliveryError) and notification.attempts < self.max_attempts:
            delay = self.backoff_after(notification.attempts)
            crud.requeue(
                session=session,
                notification=notification,
                at=utcnow() + timedelta(seconds=delay),
            )
        else:
            crud.mark_failed(session=session, notification=notification)

    def backoff_after(self, attempts: int) -> float:
        """Seconds to wait before the background retry that follows `attempts` attempts."""
        # tenacity's wait strategies only read the attempt number from the state.
        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = attempts
        return float(self.queue_backoff(state))

    def attempt(self, *, session: Session, notification: Notification) -> None:
        """One SMTP attempt, recorded; raises its `DeliveryError` after recording it."""
        started_at = utcnow()
        error: DeliveryError | None = None
        try:
            self.mailer.send(self.message_for(notification))
        except DeliveryError as exc:
            error = exc
        except Exception as exc:
            # A bug rather than a delivery failure; still leave a final, explained state.
            logger.exception("notification %d: unexpected error while sending", notification.id)
            error = PermanentDeliveryError(f"internal error: {type(exc).__name__}")
        crud.record_attempt(
            session=session, notification=notification, started_at=started_at, error=error
        )
        if error is not None:
            logger.warning(
                "notification %d: attempt %d failed: %s",
                notification.id,
                notification.attempts,
                error,
            )
            raise error
