"""HTTP endpoints: validate, call one or two functions, map the outcome to a status code."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import (
    APIRouter,
    Depends,
    Header,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
    Security,
    status,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import auth
import crud
import idempotency
import ratelimits
from config import Settings
from db import ReadinessProbe, get_read_session, get_session
from delivery import Deliverer, Unroutable, plan_route
from models import (
    ApiKey,
    Batch,
    Channel,
    IdempotencyKey,
    Notification,
    NotificationStatus,
    Recipient,
    utcnow,
)
from schemas import (
    MAX_ID,
    TELEGRAM_MAX_TEXT,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPublic,
    BatchCreated,
    BatchPublic,
    BulkEmailCreate,
    EmailNotificationCreate,
    HistoryQuery,
    MessageContent,
    NotificationCreate,
    NotificationDetail,
    NotificationPublic,
    NotificationsPublic,
    RecipientCreate,
    RecipientPublic,
    RecipientUpdate,
    RejectedRecipient,
    SmsNotificationCreate,
    TelegramNotificationCreate,
    printable,
)
from strictjson import StrictJSONRoute


# async: a plain `def` dependency would cost a thread hop each.
async def get_deliverer(request: Request) -> Deliverer:
    deliverer: Deliverer = request.app.state.deliverer
    return deliverer


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_limiter(request: Request) -> ratelimits.RateLimiter:
    limiter: ratelimits.RateLimiter = request.app.state.limiter
    return limiter


SessionDep = Annotated[Session, Depends(get_session)]
ReadSessionDep = Annotated[Session, Depends(get_read_session)]
LimiterDep = Annotated[ratelimits.RateLimiter, Depends(get_limiter)]
DelivererDep = Annotated[Deliverer, Depends(get_deliverer)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
SendCaller = Annotated[ApiKey, Security(auth.authenticate, scopes=[auth.Scope.SEND])]
READ = [Security(auth.authenticate, scopes=[auth.Scope.READ])]
ADMIN = [Security(auth.authenticate, scopes=[auth.Scope.ADMIN])]
# A key with `admin` has this one too.
RECIPIENTS = [Security(auth.authenticate, scopes=[auth.Scope.RECIPIENTS])]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        pattern=idempotency.KEY_PATTERN,
        description="Repeat a request safely: the same key and body answer what the first "
        "request did and send nothing again; the same key with another body is a 422.",
    ),
]


# BIGINT ids: anything else is a 422 on every database (SQLite cannot even bind it).
NotificationId = Annotated[int, Path(ge=1, le=MAX_ID)]
BatchId = Annotated[int, Path(ge=1, le=MAX_ID)]
KeyId = Annotated[int, Path(ge=1, le=MAX_ID)]


def valid_notification_id(notification_id: NotificationId, session: SessionDep) -> Notification:
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
AUTH: dict[int | str, dict[str, Any]] = {
    status.HTTP_401_UNAUTHORIZED: {"description": "No API key, or an invalid or revoked one."},
    status.HTTP_403_FORBIDDEN: {"description": "The API key lacks the scope."},
    status.HTTP_429_TOO_MANY_REQUESTS: {
        "description": "A rate limit is reached (per key, or per recipient); see Retry-After."
    },
}
IDEMPOTENCY: dict[int | str, dict[str, Any]] = {
    status.HTTP_409_CONFLICT: {
        "description": "The first request with this Idempotency-Key is still being sent."
    },
    status.HTTP_422_UNPROCESSABLE_CONTENT: {
        "description": "Invalid body, or an Idempotency-Key first used with another body."
    },
}
DATABASE_DOWN: dict[int | str, dict[str, Any]] = {
    status.HTTP_503_SERVICE_UNAVAILABLE: {
        "description": "The database or the rate-limit storage (the detail names which) is "
        "unavailable; see Retry-After. Nothing was sent, unless the body has an `id` and "
        "`status: sending`: then the SMTP server answered before the database failed, and the "
        "outcome is recorded on that notification as soon as the database is back; do not "
        "send again."
    }
}

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    status.HTTP_404_NOT_FOUND: {"description": "No such notification."}
}
TOO_LARGE: dict[int | str, dict[str, Any]] = {
    status.HTTP_413_CONTENT_TOO_LARGE: {"description": "The body is over MAX_BODY_BYTES."}
}

router = APIRouter(route_class=StrictJSONRoute, responses={**AUTH, **TOO_LARGE, **DATABASE_DOWN})
health = APIRouter(tags=["health"])
HEALTH_METHODS = "GET, HEAD, OPTIONS"


PreferHeader = Annotated[
    str | None, Header(description="`respond-async`: queue instead of sending now (202).")
]
SEND_RESPONSES: dict[int | str, dict[str, Any]] = {
    **DELIVERY_FAILED,
    **IDEMPOTENCY,
    **DATABASE_DOWN,
}


@dataclass(frozen=True)
class Sending:
    """What every send endpoint is given."""

    caller: ApiKey
    session: Session
    deliverer: Deliverer
    limiter: ratelimits.RateLimiter
    settings: Settings
    response: Response
    prefer: str | None
    idempotency_key: str | None


async def sending(
    caller: SendCaller,
    session: SessionDep,
    deliverer: DelivererDep,
    limiter: LimiterDep,
    settings: SettingsDep,
    response: Response,
    prefer: PreferHeader = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Sending:
    return Sending(caller, session, deliverer, limiter, settings, response, prefer, idempotency_key)


SendingDep = Annotated[Sending, Depends(sending)]


@router.post(
    "/notify/email",
    status_code=status.HTTP_201_CREATED,
    response_model=NotificationDetail,
    responses=SEND_RESPONSES,
    tags=["notify"],
)
def notify_email(
    data: EmailNotificationCreate,
    ctx: SendingDep,
) -> Notification:
    """Send an e-mail now (201/502), or queue it (202) when asked to or when `send_at` is set.

    When SYNC_SEND_LIMIT synchronous sends are already in progress, it is queued (202).
    """
    draft = crud.Draft(
        route=[(Channel.EMAIL, data.email)],
        text=data.text,
        subject=data.subject,
        sensitive=data.sensitive,
        send_at=data.send_at,
    )
    return send(ctx, draft=draft, body=data, endpoint="/notify/email")


@router.post(
    "/notify/sms",
    status_code=status.HTTP_201_CREATED,
    response_model=NotificationDetail,
    responses=SEND_RESPONSES,
    tags=["notify"],
)
def notify_sms(
    data: SmsNotificationCreate,
    ctx: SendingDep,
) -> Notification:
    """Send an SMS (through SMS.ru), as `/notify/email` sends an e-mail."""
    draft = routed(
        ctx.deliverer, order=[Channel.SMS], addresses={Channel.SMS: data.phone}, data=data
    )
    return send(ctx, draft=draft, body=data, endpoint="/notify/sms")


@router.post(
    "/notify/telegram",
    status_code=status.HTTP_201_CREATED,
    response_model=NotificationDetail,
    responses=SEND_RESPONSES,
    tags=["notify"],
)
def notify_telegram(
    data: TelegramNotificationCreate,
    ctx: SendingDep,
) -> Notification:
    """Send a Telegram message (through the Bot API), as `/notify/email` sends an e-mail."""
    draft = routed(
        ctx.deliverer,
        order=[Channel.TELEGRAM],
        addresses={Channel.TELEGRAM: data.chat_id},
        data=data,
        parse_mode=data.parse_mode,
    )
    return send(ctx, draft=draft, body=data, endpoint="/notify/telegram")


@router.post(
    "/notify",
    status_code=status.HTTP_201_CREATED,
    response_model=NotificationDetail,
    responses=SEND_RESPONSES,
    tags=["notify"],
)
def notify(
    data: NotificationCreate,
    ctx: SendingDep,
) -> Notification:
    """Send one message to one recipient on the first of its channels that delivers it.

    The order is the request's `channels`, else the recipient's own, else CHANNEL_ORDER;
    channels without an address for the recipient are skipped (listed in `skipped`). A
    permanent failure on a channel, or its retries running out, moves on to the next;
    201 once one delivers, 502 when all failed, 202 when queued.
    """
    contacts = data.recipient
    recipient = None
    if contacts.external_id is not None:
        recipient = crud.get_recipient(session=ctx.session, external_id=contacts.external_id)
        if recipient is None:
            raise invalid("recipient", "external_id", "no recipient with this external_id")
    addresses: dict[Channel, str | None] = {
        channel: recipient.address(channel) if recipient else contacts.address(channel)
        for channel in Channel
    }
    own_order = recipient.channels if recipient is not None else None
    draft = routed(
        ctx.deliverer,
        order=data.channels or [Channel(c) for c in own_order or ctx.settings.channel_order],
        addresses=addresses,
        data=data,
        subject=data.subject,
        parse_mode=data.parse_mode,
        recipient=recipient,
        requested=data.channels is not None,
    )
    return send(ctx, draft=draft, body=data, endpoint="/notify")


def routed(
    deliverer: Deliverer,
    *,
    order: Sequence[Channel],
    addresses: Mapping[Channel, str | None],
    data: MessageContent,
    subject: str | None = None,
    parse_mode: str | None = None,
    recipient: Recipient | None = None,
    requested: bool = True,
) -> crud.Draft:
    """The notification to store for `data`, on the channels of `order` that can reach
    the recipient; a 422 if none can, or if the caller's own order (`requested`) names a
    channel that is not configured."""
    try:
        route, skipped = plan_route(
            order=order,
            addresses=addresses,
            configured=deliverer.channels.keys(),
            unreachable=recipient.unreachable if recipient is not None else None,
            subject=subject,
            text=data.text,
            requested=requested,
        )
    except Unroutable as exc:
        raise invalid(exc.field, None, str(exc)) from None
    return crud.Draft(
        route=route,
        skipped=skipped,
        text=data.text,
        subject=subject,
        sensitive=data.sensitive,
        send_at=data.send_at,
        parse_mode=parse_mode,
        recipient_id=recipient.id if recipient is not None else None,
    )


def invalid(field: str, subfield: str | None, message: str) -> RequestValidationError:
    """A 422 shaped like FastAPI's own, about one field of the body."""
    location = ("body", field) if subfield is None else ("body", field, subfield)
    return RequestValidationError([{"type": "value_error", "loc": location, "msg": message}])


def send(ctx: Sending, *, draft: crud.Draft, body: MessageContent, endpoint: str) -> Notification:
    """Store `draft` and send it now on its first channel (201/502), or queue it (202)
    when asked to, when `send_at` is set, or past SYNC_SEND_LIMIT sends in progress."""
    session, deliverer, settings, response = ctx.session, ctx.deliverer, ctx.settings, ctx.response
    check_send_at(draft.send_at, settings)
    queued = draft.send_at is not None or wants_async(ctx.prefer)
    claim = idempotency.claim_for(
        ctx.idempotency_key,
        scope=f"key:{ctx.caller.id}",
        endpoint=endpoint,
        body=body,
        ttl=settings.idempotency_key_ttl,
        secret=deliverer.key,
        queued=queued,
    )
    # Slow providers must not take every request thread: past the limit, the queue sends.
    sync = not queued and deliverer.sync_sends.acquire(blocking=False)
    try:
        try:
            # A repeat is answered before the rate limits are counted: it sends nothing.
            crud.raise_if_key_used(session=session, claim=claim)
            channel, address = draft.route[0]
            [allowed], limit, retry_after = ratelimits.take_recipients(
                limiter=ctx.limiter,
                settings=settings,
                caller=ctx.caller,
                recipients=[address],
                channel=channel,
            )
            if not allowed:
                raise ratelimits.too_many(
                    f"more than {limit} messages per hour to this address", retry_after
                )
            notification = deliverer.create(
                session=session, draft=draft, queued=not sync, idempotency=claim
            )
        except crud.IdempotencyKeyUsed as used:
            assert claim is not None
            # A repeat sends nothing: its wait for the first request must not hold a slot.
            if sync:
                deliverer.sync_sends.release()
                sync = False
            record = replayed(session, settings, deliverer, claim, used, response)
            # The key's fingerprint names this endpoint, so it points at a notification.
            assert record.notification_id is not None
            replay = crud.get_notification(session=session, notification_id=record.notification_id)
            assert replay is not None  # the key goes when its notification goes
            response.status_code = record.status_code or outcome_status(replay)
            return replay
        if not sync:
            response.status_code = status.HTTP_202_ACCEPTED
            if wants_async(ctx.prefer):
                response.headers["Preference-Applied"] = "respond-async"
            return notification
        deliverer.deliver(session=session, notification=notification)
    finally:
        if sync:
            deliverer.sync_sends.release()
    response.status_code = outcome_status(notification)
    if claim is not None:
        crud.finish_idempotency_key(session=session, claim=claim, status_code=response.status_code)
    return notification


def check_send_at(send_at: datetime | None, settings: Settings) -> None:
    """A 422 unless `send_at` is within SEND_AT_HORIZON of now (either way)."""
    horizon = timedelta(seconds=settings.send_at_horizon)
    if send_at is None or abs(send_at - utcnow()) <= horizon:
        return
    raise RequestValidationError(
        [
            {
                "type": "value_error",
                "loc": ("body", "send_at"),
                "msg": f"must be within {horizon.days} days of now",
            }
        ]
    )


def replayed(
    session: Session,
    settings: Settings,
    deliverer: Deliverer,
    claim: crud.IdempotencyClaim,
    used: crud.IdempotencyKeyUsed,
    response: Response,
) -> IdempotencyKey:
    """The stored key of a repeated request, once its first request has answered."""
    try:
        record = idempotency.first_outcome(
            session=session,
            claim=claim,
            record=used.record,
            wait=settings.idempotency_wait,
            lease=deliverer.lease,
        )
    except idempotency.KeyReusedError:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "this Idempotency-Key was already used with a different request",
        ) from None
    except idempotency.KeyInFlightError:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            "the first request with this Idempotency-Key is still in progress",
            headers={"Retry-After": "1"},
        ) from None
    response.headers["Idempotent-Replayed"] = "true"
    return record


@router.post(
    "/notify/bulk",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=BatchCreated,
    responses={**IDEMPOTENCY, **DATABASE_DOWN},
    tags=["notify"],
)
def notify_bulk(
    data: BulkEmailCreate,
    caller: SendCaller,
    session: SessionDep,
    deliverer: DelivererDep,
    limiter: LimiterDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: IdempotencyKeyHeader = None,
) -> BatchCreated:
    """Queue one message to each item as a batch: an e-mail to each of `emails`, or to each
    stored recipient of `recipients`, on its channel order (`channels`, else its own,
    else CHANNEL_ORDER). Invalid, unknown or unreachable items are listed, not fatal."""
    check_send_at(data.send_at, settings)
    for channel in data.channels or ():
        if channel not in deliverer.channels:
            raise invalid("channels", None, f"the {channel} channel is not configured")
    if Channel.TELEGRAM in (data.channels or ()) and len(data.text) > TELEGRAM_MAX_TEXT:
        raise invalid("text", None, f"Telegram takes at most {TELEGRAM_MAX_TEXT} characters")
    # Checked here, in a worker thread, rather than while the event loop parses the body.
    if data.emails is not None:
        emails, rejected = data.valid_emails()
        items = {i: (Channel.EMAIL, address) for address, i in emails.items()}
        drafts: dict[int, crud.Draft] = {}
    else:
        drafts, rejected = bulk_drafts(session, deliverer, settings, data)
        items = {i: draft.route[0] for i, draft in drafts.items()}
    if not items:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            {
                "message": "no valid recipient",
                "rejected": [r.model_dump(exclude_none=True) for r in rejected],
            },
        )
    claim = idempotency.claim_for(
        idempotency_key,
        scope=f"key:{caller.id}",
        endpoint="/notify/bulk",
        body=data,
        ttl=settings.idempotency_key_ttl,
        secret=deliverer.key,
    )
    content = crud.Draft(
        route=(),
        text=data.text,
        subject=data.subject,
        sensitive=data.sensitive,
        send_at=data.send_at,
    )
    try:
        crud.raise_if_key_used(session=session, claim=claim)
        sendable, limited = within_recipient_limits(limiter, settings, caller, data, items)
        rejected = sorted([*rejected, *limited], key=lambda r: r.index)
        batch = deliverer.create_batch(
            session=session,
            content=content,
            requested=data.requested,
            emails=[items[i][1] for i in sendable] if not drafts else (),
            drafts=[drafts[i] for i in sendable] if drafts else (),
            idempotency=claim,
        )
    except crud.IdempotencyKeyUsed as used:
        assert claim is not None
        record = replayed(session, settings, deliverer, claim, used, response)
        assert record.batch_id is not None
        found = crud.get_batch(session=session, batch_id=record.batch_id)
        assert found is not None  # the key goes when its batch goes
        batch = found
        # The rate limits a replay met the first time are not known any more.
        rejected = [r for r in rejected if r.error != ratelimits.RECIPIENT_LIMITED]
    return BatchCreated(batch=batch_public(session, batch), rejected=rejected)


def bulk_drafts(
    session: Session, deliverer: Deliverer, settings: Settings, data: BulkEmailCreate
) -> tuple[dict[int, crud.Draft], list[RejectedRecipient]]:
    """A notification for each stored recipient of `data.recipients` (by item index), and
    the items refused: unknown, repeated, or no channel of the order reaches them."""
    assert data.recipients is not None
    found = crud.get_recipients(session=session, external_ids=list(set(data.recipients)))
    drafts: dict[int, crud.Draft] = {}
    rejected: list[RejectedRecipient] = []
    seen: dict[str, int] = {}
    for index, external_id in enumerate(data.recipients):
        recipient = found.get(external_id)
        if external_id in seen:
            error = f"duplicate of item {seen[external_id]}"
        elif recipient is None:
            error = "no recipient with this external_id"
        else:
            seen[external_id] = index
            order = data.channels or [
                Channel(c) for c in recipient.channels or settings.channel_order
            ]
            try:
                drafts[index] = routed(
                    deliverer,
                    order=order,
                    addresses={c: recipient.address(c) for c in Channel},
                    data=data,
                    subject=data.subject,
                    recipient=recipient,
                    requested=data.channels is not None,
                )
                continue
            except RequestValidationError as exc:
                error = printable(exc.errors()[0]["msg"])
        rejected.append(
            RejectedRecipient(index=index, external_id=printable(external_id), error=error)
        )
    return drafts, rejected


def within_recipient_limits(
    limiter: ratelimits.RateLimiter,
    settings: Settings,
    caller: ApiKey,
    data: BulkEmailCreate,
    items: dict[int, tuple[Channel, str]],
) -> tuple[list[int], list[RejectedRecipient]]:
    """The items (indices) whose first address is still under its hourly limit, and the
    others as rejected items."""
    RECIPIENT_LIMITED = ratelimits.RECIPIENT_LIMITED
    allowed: list[int] = []
    limited: list[RejectedRecipient] = []
    for channel in Channel:
        on_channel = [(i, address) for i, (c, address) in items.items() if c == channel]
        if not on_channel:
            continue
        # Two stored recipients may share an address: each message counts.
        granted, _, _ = ratelimits.take_recipients(
            limiter=limiter,
            settings=settings,
            caller=caller,
            recipients=[address for _, address in on_channel],
            channel=channel,
        )
        for (i, _), ok in zip(on_channel, granted, strict=True):
            if ok:
                allowed.append(i)
            else:
                item = data.emails[i] if data.emails is not None else None
                external_id = data.recipients[i] if data.recipients is not None else None
                limited.append(
                    RejectedRecipient(
                        index=i, email=item, external_id=external_id, error=RECIPIENT_LIMITED
                    )
                )
    return sorted(allowed), limited


@router.get(
    "/batches/{batch_id}",
    dependencies=READ,
    response_model=BatchPublic,
    responses={status.HTTP_404_NOT_FOUND: {"description": "No such batch."}},
    tags=["history"],
)
def read_batch(batch_id: BatchId, session: ReadSessionDep) -> BatchPublic:
    """A batch and how many of its notifications are in each status."""
    batch = crud.get_batch(session=session, batch_id=batch_id)
    if batch is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "batch not found")
    return batch_public(session, batch)


def batch_public(session: Session, batch: Batch) -> BatchPublic:
    counts = crud.count_batch(session=session, batch_id=batch.id)
    return BatchPublic.model_validate(batch).model_copy(update={"counts": counts})


def outcome_status(notification: Notification, *, sent: int = status.HTTP_201_CREATED) -> int:
    """`sent` if sent; 502 failed; 202 left to the background retries (queued, taken over)."""
    if notification.status == NotificationStatus.SENT:
        return sent
    if notification.status == NotificationStatus.FAILED:
        return status.HTTP_502_BAD_GATEWAY
    return status.HTTP_202_ACCEPTED


@router.get(
    "/notifications", dependencies=READ, response_model=NotificationsPublic, tags=["history"]
)
def list_notifications(
    query: Annotated[HistoryQuery, Query()], session: ReadSessionDep
) -> NotificationsPublic:
    """History, newest first, one page at a time."""
    page, next_position = crud.list_notifications(session=session, query=query)
    return NotificationsPublic(
        data=[NotificationPublic.model_validate(n) for n in page],
        next_cursor=next_position.encode() if next_position else None,
    )


@router.get(
    "/notifications/{notification_id}",
    dependencies=READ,
    response_model=NotificationDetail,
    responses=NOT_FOUND,
    tags=["history"],
)
def read_notification(notification: NotificationDep) -> Notification:
    """One notification with every delivery attempt."""
    return notification


@router.post(
    "/notifications/{notification_id}/retry",
    dependencies=ADMIN,
    response_model=NotificationDetail,
    responses={
        status.HTTP_409_CONFLICT: {"description": "Only a failed notification can be resent."},
        **NOT_FOUND,
        **DELIVERY_FAILED,
    },
    tags=["history"],
)
def resend_notification(
    notification: NotificationDep, session: SessionDep, deliverer: DelivererDep, response: Response
) -> Notification:
    """Send a failed notification again (or queue it, past SYNC_SEND_LIMIT); new attempts
    are added to the same notification."""
    sync = deliverer.sync_sends.acquire(blocking=False)
    try:
        if not deliverer.claim_for_resend(
            session=session, notification=notification, queued=not sync
        ):
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                "the text of this sensitive notification is erased"
                if notification.text_hmac
                else f"notification is {notification.status}, only failed ones are resent",
            )
        if sync:
            deliverer.deliver(session=session, notification=notification)
    finally:
        if sync:
            deliverer.sync_sends.release()
    response.status_code = outcome_status(notification, sent=status.HTTP_200_OK)
    return notification


@router.post(
    "/notifications/{notification_id}/cancel",
    dependencies=ADMIN,
    response_model=NotificationDetail,
    responses={
        status.HTTP_409_CONFLICT: {"description": "Only a queued notification is cancelled."},
        **NOT_FOUND,
    },
    tags=["history"],
)
def cancel_notification(
    notification: NotificationDep, session: SessionDep, deliverer: DelivererDep
) -> Notification:
    """Withdraw a queued or scheduled notification before a worker sends it."""
    if not crud.cancel(session=session, notification=notification, key=deliverer.key):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"notification is {notification.status}, only queued ones are cancelled",
        )
    return notification


RECIPIENT_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    status.HTTP_404_NOT_FOUND: {"description": "No recipient with this external id."}
}
ExternalIdPath = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@-]+$")]


def valid_recipient(external_id: ExternalIdPath, session: SessionDep) -> Recipient:
    recipient = crud.get_recipient(session=session, external_id=external_id)
    if recipient is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "recipient not found")
    return recipient


RecipientDep = Annotated[Recipient, Depends(valid_recipient)]


@router.post(
    "/recipients",
    dependencies=RECIPIENTS,
    status_code=status.HTTP_201_CREATED,
    response_model=RecipientPublic,
    responses={status.HTTP_200_OK: {"model": RecipientPublic, "description": "Replaced."}},
    tags=["recipients"],
)
def upsert_recipient(data: RecipientCreate, session: SessionDep, response: Response) -> Recipient:
    """Store a recipient under its `external_id` (201), or replace the stored one (200)."""
    recipient, created = crud.upsert_recipient(session=session, data=data)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return recipient


@router.get(
    "/recipients/{external_id}",
    dependencies=RECIPIENTS,
    response_model=RecipientPublic,
    responses=RECIPIENT_NOT_FOUND,
    tags=["recipients"],
)
def read_recipient(recipient: RecipientDep) -> Recipient:
    """A recipient's addresses, channel order and unreachable channels."""
    return recipient


@router.patch(
    "/recipients/{external_id}",
    dependencies=RECIPIENTS,
    response_model=RecipientPublic,
    responses=RECIPIENT_NOT_FOUND,
    tags=["recipients"],
)
def update_recipient(
    data: RecipientUpdate, recipient: RecipientDep, session: SessionDep
) -> Recipient:
    """Change some fields (null clears one); channels that refused it are tried again."""
    return crud.update_recipient(session=session, recipient=recipient, data=data)


@router.delete(
    "/recipients/{external_id}",
    dependencies=RECIPIENTS,
    status_code=status.HTTP_204_NO_CONTENT,
    responses=RECIPIENT_NOT_FOUND,
    tags=["recipients"],
)
def delete_recipient(recipient: RecipientDep, session: SessionDep) -> None:
    """Erase a recipient's contacts; the notifications sent to it stay in the history."""
    crud.delete_recipient(session=session, recipient=recipient)


def wants_async(prefer: str | None) -> bool:
    """RFC 7240: does the Prefer header ask for respond-async?"""
    if not prefer:
        return False
    return any(p.split(";")[0].strip().lower() == "respond-async" for p in prefer.split(","))


@health.get("/healthz")
@health.head("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    """The process is alive (answered on the event loop, never behind request threads)."""
    return {"status": "ok"}


@health.options("/healthz", include_in_schema=False)
@health.options("/readyz", include_in_schema=False)
async def health_options() -> Response:
    """The methods a health check answers (RFC 9110 OPTIONS: 204 with Allow)."""
    return Response(status_code=status.HTTP_204_NO_CONTENT, headers={"Allow": HEALTH_METHODS})


@health.get("/readyz", responses=DATABASE_DOWN)
@health.head("/readyz", include_in_schema=False)
async def readyz(request: Request) -> Any:
    """The database and the rate-limit storage answer, each checked side by side on a
    thread of its own (1 s at most); a 503 names the one that did not."""
    probe: ReadinessProbe = request.app.state.readiness
    down = await probe.unavailable()
    if down is None:
        return {"status": "ok"}
    return JSONResponse(
        {"detail": f"{down} unavailable"},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "5"},
    )


@router.post(
    "/keys",
    dependencies=ADMIN,
    status_code=status.HTTP_201_CREATED,
    response_model=ApiKeyCreated,
    responses={status.HTTP_409_CONFLICT: {"description": "A key with this name exists."}},
    tags=["keys"],
)
def create_key(data: ApiKeyCreate, session: SessionDep) -> ApiKeyCreated:
    """Issue a key; the response is the only time the key itself is shown."""
    try:
        record, key = auth.issue_key(
            session=session,
            name=data.name,
            scopes=data.scopes,
            requests_per_minute=data.requests_per_minute,
            recipient_hourly_limit=data.recipient_hourly_limit,
        )
    except IntegrityError:
        session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, "a key with this name exists") from None
    return ApiKeyCreated(key=key, **ApiKeyPublic.model_validate(record).model_dump())


@router.get("/keys", dependencies=ADMIN, response_model=list[ApiKeyPublic], tags=["keys"])
def list_keys(session: SessionDep) -> list[ApiKey]:
    """Every key, revoked ones included; never the keys themselves."""
    return crud.list_api_keys(session=session)


@router.post(
    "/keys/{key_id}/revoke",
    dependencies=ADMIN,
    response_model=ApiKeyPublic,
    responses={status.HTTP_404_NOT_FOUND: {"description": "No such key."}},
    tags=["keys"],
)
def revoke_key(
    key_id: KeyId,
    session: SessionDep,
    limiter: LimiterDep,
    settings: SettingsDep,
    request: Request,
) -> ApiKey:
    """Revoke a key: its next request is a 401, in every process."""
    api_key = crud.get_api_key(session=session, key_id=key_id)
    if api_key is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "key not found")
    revoked = crud.revoke_api_key(session=session, api_key=api_key)
    auth.announce_revocation(
        limiter=limiter,
        cache=request.app.state.key_cache,
        settings=settings,
        key_id=key_id,
    )
    return revoked
