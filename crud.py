"""Reading and writing notifications; each write function is one committed unit of work."""

from datetime import datetime
from typing import Any

from sqlalchemy import CursorResult, select, tuple_, update
from sqlalchemy.orm import Session, selectinload

from mailer import DeliveryError, TransientDeliveryError
from models import (
    AttemptOutcome,
    Channel,
    DeliveryAttempt,
    Notification,
    NotificationStatus,
    utcnow,
)
from schemas import EmailNotificationCreate, HistoryCursor, HistoryQuery


def create_email_notification(
    *, session: Session, data: EmailNotificationCreate, message_id: str
) -> Notification:
    """Store an e-mail notification about to be sent; it exists before any SMTP attempt."""
    notification = Notification(
        channel=Channel.EMAIL,
        recipient=data.email,
        subject=data.subject,
        text=data.text,
        status=NotificationStatus.SENDING,
        attempts=0,
        message_id=message_id,
    )
    session.add(notification)
    session.commit()
    return notification


def record_attempt(
    *,
    session: Session,
    notification: Notification,
    started_at: datetime,
    error: DeliveryError | None,
) -> DeliveryAttempt:
    """Log one SMTP attempt; a successful one makes the notification sent."""
    finished_at = utcnow()
    notification.attempts += 1
    attempt = DeliveryAttempt(
        notification=notification,
        number=notification.attempts,
        started_at=started_at,
        finished_at=finished_at,
    )
    if error is None:
        attempt.outcome = AttemptOutcome.SENT
        notification.status = NotificationStatus.SENT
        notification.sent_at = finished_at
        notification.error_message = None
    else:
        attempt.outcome = (
            AttemptOutcome.TRANSIENT_ERROR
            if isinstance(error, TransientDeliveryError)
            else AttemptOutcome.PERMANENT_ERROR
        )
        attempt.smtp_code = error.smtp_code
        attempt.error = notification.error_message = str(error)
    session.add(attempt)
    session.commit()
    return attempt


def mark_failed(*, session: Session, notification: Notification) -> Notification:
    """Give up on a notification; its last attempt's error stays as the reason."""
    notification.status = NotificationStatus.FAILED
    session.commit()
    return notification


def claim_for_resend(*, session: Session, notification: Notification) -> bool:
    """Move a failed notification back to sending; False if it is not failed (any more)."""
    # A conditional UPDATE, so two simultaneous resends cannot both win.
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(Notification)
        .where(Notification.id == notification.id, Notification.status == NotificationStatus.FAILED)
        .values(status=NotificationStatus.SENDING, updated_at=utcnow())
    )
    session.commit()
    session.refresh(notification)
    return result.rowcount == 1


def get_notification(*, session: Session, notification_id: int) -> Notification | None:
    """One notification with its attempts, or None."""
    return session.get(
        Notification, notification_id, options=[selectinload(Notification.delivery_attempts)]
    )


def list_notifications(
    *, session: Session, query: HistoryQuery
) -> tuple[list[Notification], HistoryCursor | None]:
    """A page of history, newest first, and the cursor of the next page if there is one."""
    statement = select(Notification)
    if query.recipient is not None:
        statement = statement.where(Notification.recipient == query.recipient)
    if query.status is not None:
        statement = statement.where(Notification.status == query.status)
    if query.created_from is not None:
        statement = statement.where(Notification.created_at >= query.created_from)
    if query.created_to is not None:
        statement = statement.where(Notification.created_at < query.created_to)
    if (position := query.position) is not None:
        statement = statement.where(
            tuple_(Notification.created_at, Notification.id) < (position.created_at, position.id)
        )
    statement = statement.order_by(Notification.created_at.desc(), Notification.id.desc())
    rows = list(session.scalars(statement.limit(query.limit + 1)))
    page = rows[: query.limit]
    if len(rows) <= query.limit:
        return page, None
    last = page[-1]
    return page, HistoryCursor(created_at=last.created_at, id=last.id)
