"""HTTP endpoints: validate, call one or two functions, map the outcome to a status code."""

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, status
from sqlalchemy import text
from sqlalchemy.orm import Session

import crud
from delivery import Deliverer
from models import Notification, NotificationStatus
from schemas import (
    EmailNotificationCreate,
    HistoryQuery,
    NotificationDetail,
    NotificationPublic,
    NotificationsPublic,
)


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


def get_deliverer(request: Request) -> Deliverer:
    deliverer: Deliverer = request.app.state.deliverer
    return deliverer


SessionDep = Annotated[Session, Depends(get_session)]
DelivererDep = Annotated[Deliverer, Depends(get_deliverer)]


def valid_notification_id(notification_id: int, session: SessionDep) -> Notification:
    notification = crud.get_notification(session=session, notification_id=notification_id)
    if notification is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "notification not found")
    return notification


NotificationDep = Annotated[Notification, Depends(valid_notification_id)]

DELIVERY_FAILED: dict[int | str, dict[str, Any]] = {
    status.HTTP_202_ACCEPTED: {
        "model": NotificationDetail,
        "description": "Queued: asked for, scheduled, or handed to the background retries "
        "after transient failures.",
    },
    status.HTTP_502_BAD_GATEWAY: {
        "model": NotificationDetail,
        "description": "Delivery failed; the notification is stored as failed with the reason.",
    },
}
DATABASE_DOWN: dict[int | str, dict[str, Any]] = {
    status.HTTP_503_SERVICE_UNAVAILABLE: {
        "description": "The database is unavailable; nothing was sent."
    }
}

router = APIRouter()


@router.post(
    "/notify/email",
    status_code=status.HTTP_201_CREATED,
    response_model=NotificationDetail,
    responses={
        **DELIVERY_FAILED,
        **DATABASE_DOWN,
    },
    tags=["notify"],
)
def notify_email(
    data: EmailNotificationCreate,
    session: SessionDep,
    deliverer: DelivererDep,
    response: Response,
    prefer: Annotated[
        str | None, Header(description="`respond-async`: queue instead of sending now (202).")
    ] = None,
) -> Notification:
    """Send an e-mail now (201/502), or queue it (202) when asked to or when `send_at` is set."""
    queued = data.send_at is not None or wants_async(prefer)
    notification = deliverer.create_email(session=session, data=data, queued=queued)
    if queued:
        response.status_code = status.HTTP_202_ACCEPTED
        if wants_async(prefer):
            response.headers["Preference-Applied"] = "respond-async"
        return notification
    deliverer.deliver(session=session, notification=notification)
    response.status_code = outcome_status(notification)
    return notification


def outcome_status(notification: Notification, *, sent: int = status.HTTP_201_CREATED) -> int:
    """`sent` if sent; 502 failed; 202 left to the background retries (queued, taken over)."""
    if notification.status == NotificationStatus.SENT:
        return sent
    if notification.status == NotificationStatus.FAILED:
        return status.HTTP_502_BAD_GATEWAY
    return status.HTTP_202_ACCEPTED


@router.get("/notifications", response_model=NotificationsPublic, tags=["history"])
def list_notifications(
    query: Annotated[HistoryQuery, Query()], session: SessionDep
) -> NotificationsPublic:
    """History, newest first, one page at a time."""
    page, next_position = crud.list_notifications(session=session, query=query)
    return NotificationsPublic(
        data=[NotificationPublic.model_validate(n) for n in page],
        next_cursor=next_position.encode() if next_position else None,
    )


@router.get("/notifications/{notification_id}", response_model=NotificationDetail, tags=["history"])
def read_notification(notification: NotificationDep) -> Notification:
    """One notification with every delivery attempt."""
    return notification


@router.post(
    "/notifications/{notification_id}/retry",
    response_model=NotificationDetail,
    responses={
        status.HTTP_409_CONFLICT: {"description": "Only a failed notification can be resent."},
        **DELIVERY_FAILED,
    },
    tags=["history"],
)
def resend_notification(
    notification: NotificationDep, session: SessionDep, deliverer: DelivererDep, response: Response
) -> Notification:
    """Send a failed notification again; new attempts are added to the same notification."""
    if not deliverer.claim_for_resend(session=session, notification=notification):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"notification is {notification.status}, only failed ones are resent",
        )
    deliverer.deliver(session=session, notification=notification)
    response.status_code = outcome_status(notification, sent=status.HTTP_200_OK)
    return notification


@router.post(
    "/notifications/{notification_id}/cancel",
    response_model=NotificationDetail,
    responses={
        status.HTTP_409_CONFLICT: {"description": "Only a queued notification is cancelled."}
    },
    tags=["history"],
)
def cancel_notification(notification: NotificationDep, session: SessionDep) -> Notification:
    """Withdraw a queued or scheduled notification before a worker sends it."""
    if not crud.cancel(session=session, notification=notification):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"notification is {notification.status}, only queued ones are cancelled",
        )
    return notification


def wants_async(prefer: str | None) -> bool:
    """RFC 7240: does the Prefer header ask for respond-async?"""
    if not prefer:
        return False
    return any(p.split(";")[0].strip().lower() == "respond-async" for p in prefer.split(","))


@router.get("/healthz", tags=["health"])
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses=DATABASE_DOWN, tags=["health"])
def readyz(session: SessionDep) -> dict[str, str]:
    """The database answers."""
    session.execute(text("SELECT 1"))
    return {"status": "ok"}
