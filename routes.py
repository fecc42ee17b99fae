"""HTTP endpoints: parse, make one call (to `delivery.Deliverer` for anything in a
notification's lifecycle, to crud for reads), map the outcome to a status code. Errors
of the layers below are mapped to responses by main.py's exception handlers."""

from typing import Annotated, Any

from fastapi import APIRouter, File, HTTPException, Query, Request, Response, UploadFile, status
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import auth
import crud
import pages
from db import ReadinessProbe
from delivery import BatchSubmitted, Submitted
from deps import (
    ADMIN,
    READ,
    RECIPIENTS,
    SEND,
    SEND_SECURITY,
    SUPPRESSIONS,
    TEMPLATES,
    AttachmentDep,
    BatchId,
    CatalogueDep,
    DelivererDep,
    ExpectedVersion,
    KeyId,
    LimiterDep,
    NotificationDep,
    ReadSessionDep,
    RecipientDep,
    SendingDep,
    SessionDep,
    SettingsDep,
    SuppressionId,
    TemplateDep,
    UnsubscribeDep,
    VersionDep,
    etag,
)
from models import (
    ApiKey,
    Attachment,
    Batch,
    Notification,
    Recipient,
    ReportStatus,
    Suppression,
    Template,
    TemplateVersion,
)
from schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPublic,
    AttachmentCreated,
    BatchCreated,
    BatchPublic,
    BulkEmailCreate,
    EmailNotificationCreate,
    HistoryQuery,
    InboundReportPublic,
    InboundReportsPublic,
    NotificationCreate,
    NotificationDetail,
    NotificationPublic,
    NotificationsPublic,
    RecipientCreate,
    RecipientPublic,
    RecipientUpdate,
    SmsNotificationCreate,
    SuppressionCreate,
    SuppressionPublic,
    SuppressionQuery,
    SuppressionsPublic,
    TelegramNotificationCreate,
    TemplateCreate,
    TemplateCreated,
    TemplatePreview,
    TemplatePreviewRequest,
    TemplatePublic,
    TemplateVersionCreate,
    TemplateVersionPublic,
    VersionCreated,
)
from strictjson import StrictJSONRoute

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
# Reached from a recipient's mail client: no key, no cookie, any body.
public = APIRouter(tags=["unsubscribe"], responses=DATABASE_DOWN)
HEALTH_METHODS = "GET, HEAD, OPTIONS"


SEND_RESPONSES: dict[int | str, dict[str, Any]] = {
    **DELIVERY_FAILED,
    **IDEMPOTENCY,
    **DATABASE_DOWN,
}


@router.post(
    "/notify/email",
    status_code=status.HTTP_201_CREATED,
    response_model=NotificationDetail,
    responses=SEND_RESPONSES,
    tags=["notify"],
    openapi_extra=SEND_SECURITY,
)
def notify_email(
    data: EmailNotificationCreate, ctx: SendingDep, deliverer: DelivererDep
) -> Response:
    """Send an e-mail now (201/502), or queue it (202) when asked to or when `send_at` is set.

    When SYNC_SEND_LIMIT synchronous sends are already in progress, it is queued (202).
    """
    with ctx:
        return answered(deliverer.submit_email(ctx, data))


@router.post(
    "/notify/sms",
    status_code=status.HTTP_201_CREATED,
    response_model=NotificationDetail,
    responses=SEND_RESPONSES,
    tags=["notify"],
    openapi_extra=SEND_SECURITY,
)
def notify_sms(data: SmsNotificationCreate, ctx: SendingDep, deliverer: DelivererDep) -> Response:
    """Send an SMS (through SMS.ru), as `/notify/email` sends an e-mail."""
    with ctx:
        return answered(deliverer.submit_sms(ctx, data))


@router.post(
    "/notify/telegram",
    status_code=status.HTTP_201_CREATED,
    response_model=NotificationDetail,
    responses=SEND_RESPONSES,
    tags=["notify"],
    openapi_extra=SEND_SECURITY,
)
def notify_telegram(
    data: TelegramNotificationCreate, ctx: SendingDep, deliverer: DelivererDep
) -> Response:
    """Send a Telegram message (through the Bot API), as `/notify/email` sends an e-mail."""
    with ctx:
        return answered(deliverer.submit_telegram(ctx, data))


@router.post(
    "/notify",
    status_code=status.HTTP_201_CREATED,
    response_model=NotificationDetail,
    responses=SEND_RESPONSES,
    tags=["notify"],
    openapi_extra=SEND_SECURITY,
)
def notify(data: NotificationCreate, ctx: SendingDep, deliverer: DelivererDep) -> Response:
    """Send one message to one recipient on the first of its channels that delivers it.

    The order is the request's `channels`, else the recipient's own, else CHANNEL_ORDER;
    channels without an address for the recipient are skipped (listed in `skipped`). A
    permanent failure on a channel, or its retries running out, moves on to the next;
    201 once one delivers, 502 when all failed, 202 when queued.
    """
    with ctx:
        return answered(deliverer.submit_routed(ctx, data))


def answered(submitted: Submitted) -> Response:
    """A submitted notification's answer, serialised here, in the route's thread: returned
    as a Response, FastAPI neither validates it again nor hops to a thread to do so."""
    headers = {}
    if submitted.replayed:
        headers["Idempotent-Replayed"] = "true"
    if submitted.preference_applied:
        headers["Preference-Applied"] = "respond-async"
    body = NotificationDetail.model_validate(submitted.notification).model_dump_json()
    return Response(body, submitted.status_code, headers, media_type="application/json")


@router.post(
    "/notify/bulk",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=BatchCreated,
    responses={**IDEMPOTENCY, **DATABASE_DOWN},
    tags=["notify"],
    openapi_extra=SEND_SECURITY,
)
def notify_bulk(
    data: BulkEmailCreate, ctx: SendingDep, deliverer: DelivererDep, response: Response
) -> BatchCreated:
    """Queue one message to each item as a batch: an e-mail to each of `emails`, or to each
    stored recipient of `recipients`, on its channel order (`channels`, else its own,
    else CHANNEL_ORDER). Invalid, unknown or unreachable items are listed, not fatal."""
    with ctx:
        submitted: BatchSubmitted = deliverer.submit_bulk(ctx, data)
        batch = batch_public(ctx.session, submitted.batch)
    if submitted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return BatchCreated(batch=batch, rejected=submitted.rejected, suppressed=submitted.suppressed)


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


@router.get(
    "/notifications", dependencies=READ, response_model=NotificationsPublic, tags=["history"]
)
def list_notifications(
    query: Annotated[HistoryQuery, Query()], session: ReadSessionDep
) -> Response:
    """History, newest first, one page at a time."""
    page, next_position = crud.list_notifications(session=session, query=query)
    listed = NotificationsPublic(
        data=[NotificationPublic.model_validate(n) for n in page],
        next_cursor=next_position.encode() if next_position else None,
    )
    # Serialised here, once, as `answered` does (no second validation, no thread hop).
    return Response(listed.model_dump_json(), media_type="application/json")


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
    response.status_code = deliverer.resend(session=session, notification=notification)
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
    return deliverer.cancel(session=session, notification=notification)


RECIPIENT_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    status.HTTP_404_NOT_FOUND: {"description": "No recipient with this external id."}
}


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
    """A recipient's addresses and channel order (suppressions: `GET /suppressions`)."""
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
    """Change some fields (null clears one)."""
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


ATTACHMENT_REFUSED: dict[int | str, dict[str, Any]] = {
    status.HTTP_400_BAD_REQUEST: {"description": "The body is not readable multipart/form-data."},
    status.HTTP_413_CONTENT_TOO_LARGE: {
        "description": "The file, once encoded, is over ATTACHMENT_MAX_MESSAGE_BYTES."
    },
    status.HTTP_415_UNSUPPORTED_MEDIA_TYPE: {"description": "A type not in ATTACHMENT_TYPES."},
}


@router.post(
    "/attachments",
    dependencies=SEND,
    status_code=status.HTTP_201_CREATED,
    response_model=AttachmentCreated,
    responses=ATTACHMENT_REFUSED,
    tags=["attachments"],
)
def upload_attachment(
    file: Annotated[UploadFile, File(description="The file; its part's Content-Type is its type.")],
    session: SessionDep,
    deliverer: DelivererDep,
) -> Attachment:
    """Store a file to attach to e-mail (multipart/form-data, field `file`); sends name it
    by its `id`. Its bytes are stored once however often they are uploaded; one no
    notification refers to expires after ATTACHMENT_RETENTION."""
    return deliverer.attachments.upload(
        session=session, file=file.file, filename=file.filename, content_type=file.content_type
    )


@router.get(
    "/attachments/{attachment_id}",
    dependencies=READ,
    response_model=AttachmentCreated,
    responses={status.HTTP_404_NOT_FOUND: {"description": "No such attachment."}},
    tags=["attachments"],
)
def read_attachment(attachment: AttachmentDep) -> Attachment:
    return attachment


TEMPLATE_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    status.HTTP_404_NOT_FOUND: {"description": "No template with this key (or no such version)."}
}
TEMPLATE_REFUSED: dict[int | str, dict[str, Any]] = {
    status.HTTP_422_UNPROCESSABLE_CONTENT: {
        "description": "A source the sandbox refuses (syntax, a private attribute, an "
        "undeclared variable, a limit), or an example that does not render; `loc` names it."
    }
}


@router.post(
    "/templates",
    dependencies=TEMPLATES,
    status_code=status.HTTP_201_CREATED,
    response_model=TemplateCreated,
    responses={
        status.HTTP_409_CONFLICT: {"description": "A template with this key exists."},
        **TEMPLATE_REFUSED,
    },
    tags=["templates"],
)
def create_template(
    data: TemplateCreate, session: SessionDep, catalogue: CatalogueDep, response: Response
) -> TemplateCreated:
    """Store a template and its first version (active unless `activate` is false)."""
    template, version, warnings = catalogue.create(session, data)
    response.headers["ETag"] = etag(template)
    return TemplateCreated(
        **TemplatePublic.model_validate(template).model_dump(),
        version=TemplateVersionPublic.model_validate(version),
        warnings=warnings,
    )


@router.get(
    "/templates", dependencies=TEMPLATES, response_model=list[TemplatePublic], tags=["templates"]
)
def list_templates(session: SessionDep) -> list[Template]:
    """Every template, by key."""
    return crud.list_templates(session=session)


@router.get(
    "/templates/{key}",
    dependencies=TEMPLATES,
    response_model=TemplatePublic,
    responses=TEMPLATE_NOT_FOUND,
    tags=["templates"],
)
def read_template(template: TemplateDep, response: Response) -> Template:
    """A template; its ETag is what an activation's If-Match names."""
    response.headers["ETag"] = etag(template)
    return template


@router.delete(
    "/templates/{key}",
    dependencies=TEMPLATES,
    status_code=status.HTTP_204_NO_CONTENT,
    responses=TEMPLATE_NOT_FOUND,
    tags=["templates"],
)
def delete_template(template: TemplateDep, session: SessionDep) -> None:
    """Delete a template and its versions; notifications sent by it keep their history."""
    crud.delete_template(session=session, template=template)


@router.post(
    "/templates/{key}/versions",
    dependencies=TEMPLATES,
    status_code=status.HTTP_201_CREATED,
    response_model=VersionCreated,
    responses={
        **TEMPLATE_NOT_FOUND,
        **TEMPLATE_REFUSED,
        status.HTTP_409_CONFLICT: {"description": "Another version was added at once."},
    },
    tags=["templates"],
)
def add_version(
    data: TemplateVersionCreate,
    template: TemplateDep,
    session: SessionDep,
    catalogue: CatalogueDep,
    response: Response,
) -> VersionCreated:
    """Add an immutable version (active at once if `activate`)."""
    version, warnings = catalogue.add_version(session, template, data)
    response.headers["ETag"] = etag(template)
    return VersionCreated(
        **TemplateVersionPublic.model_validate(version).model_dump(), warnings=warnings
    )


@router.get(
    "/templates/{key}/versions",
    dependencies=TEMPLATES,
    response_model=list[TemplateVersionPublic],
    responses=TEMPLATE_NOT_FOUND,
    tags=["templates"],
)
def list_versions(template: TemplateDep, session: SessionDep) -> list[TemplateVersion]:
    """Every version of a template, oldest first."""
    return crud.list_template_versions(session=session, template=template)


@router.get(
    "/templates/{key}/versions/{number}",
    dependencies=TEMPLATES,
    response_model=TemplateVersionPublic,
    responses=TEMPLATE_NOT_FOUND,
    tags=["templates"],
)
def read_version(version: VersionDep) -> TemplateVersion:
    """One version of a template."""
    return version


@router.post(
    "/templates/{key}/versions/{number}/activate",
    dependencies=TEMPLATES,
    response_model=TemplatePublic,
    responses={
        **TEMPLATE_NOT_FOUND,
        status.HTTP_412_PRECONDITION_FAILED: {
            "description": "The template changed since the ETag in If-Match was read."
        },
        status.HTTP_428_PRECONDITION_REQUIRED: {"description": "If-Match is required."},
    },
    tags=["templates"],
)
def activate_version(
    template: TemplateDep,
    version: VersionDep,
    session: SessionDep,
    catalogue: CatalogueDep,
    response: Response,
    expected: ExpectedVersion,
) -> Template:
    """Make a version the active one (activating an older one is the rollback); sends
    already accepted keep what they rendered."""
    catalogue.activate(session, template, version.number, if_match=expected)
    response.headers["ETag"] = etag(template)
    return template


@router.post(
    "/templates/{key}/preview",
    dependencies=TEMPLATES,
    response_model=TemplatePreview,
    responses={**TEMPLATE_NOT_FOUND, **TEMPLATE_REFUSED},
    tags=["templates"],
)
def preview_template(
    data: TemplatePreviewRequest,
    template: TemplateDep,
    session: SessionDep,
    catalogue: CatalogueDep,
) -> TemplatePreview:
    """Render a version (default: the active one) with `data` in a locale: every channel's
    output, the SMS parts and encoding, and warnings. Nothing is stored or sent."""
    number = data.version or template.active_version
    version = (
        crud.get_template_version(session=session, template=template, number=number)
        if number is not None
        else None
    )
    if version is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "version not found")
    return catalogue.preview(template, version, data)


SUPPRESSION_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    status.HTTP_404_NOT_FOUND: {"description": "No such suppression."}
}


@router.get(
    "/suppressions",
    dependencies=SUPPRESSIONS,
    response_model=SuppressionsPublic,
    tags=["suppressions"],
)
def list_suppressions(
    query: Annotated[SuppressionQuery, Query()], session: ReadSessionDep
) -> SuppressionsPublic:
    """Addresses not sent to, newest first; filter by channel, address (folded as stored)
    and reason."""
    rows, next_before = crud.list_suppressions(session=session, query=query)
    return SuppressionsPublic(
        data=[SuppressionPublic.model_validate(row) for row in rows], next_before=next_before
    )


@router.post(
    "/suppressions",
    dependencies=SUPPRESSIONS,
    status_code=status.HTTP_201_CREATED,
    response_model=SuppressionPublic,
    responses={status.HTTP_200_OK: {"model": SuppressionPublic, "description": "Already there."}},
    tags=["suppressions"],
)
def add_suppression(
    data: SuppressionCreate, session: SessionDep, response: Response
) -> Suppression:
    """Stop sending to an address on a channel (for all mail, marketing, or one
    template's); one that is there already is left as it was (200)."""
    added = crud.add_suppressions(session=session, rows=[data.model_dump()])
    row = crud.find_suppression(
        session=session, channel=data.channel, address=data.address, scope=data.scope
    )
    assert row is not None
    response.status_code = status.HTTP_201_CREATED if added else status.HTTP_200_OK
    return row


@router.delete(
    "/suppressions/{suppression_id}",
    dependencies=SUPPRESSIONS,
    status_code=status.HTTP_204_NO_CONTENT,
    responses=SUPPRESSION_NOT_FOUND,
    tags=["suppressions"],
)
def delete_suppression(suppression_id: SuppressionId, session: SessionDep) -> None:
    """Send to the address again."""
    row = crud.get_suppression(session=session, suppression_id=suppression_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "suppression not found")
    crud.delete_suppression(session=session, row=row)


@router.get(
    "/inbound-reports",
    dependencies=SUPPRESSIONS,
    response_model=InboundReportsPublic,
    tags=["suppressions"],
)
def list_inbound_reports(
    session: ReadSessionDep,
    report_status: Annotated[ReportStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
) -> InboundReportsPublic:
    """What the inbound listener received (bounces, complaints), newest first, with a
    count per status: `unparseable` and `unmatched` ones wait for an operator."""
    rows, counts = crud.list_reports(
        session=session, status=report_status, limit=limit, before=before
    )
    return InboundReportsPublic(
        data=[InboundReportPublic.model_validate(row) for row in rows], counts=counts
    )


UNSUBSCRIBE_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    status.HTTP_404_NOT_FOUND: {"description": "Not a link of this service."}
}


@public.post(
    "/unsubscribe/{token}",
    response_class=HTMLResponse,
    responses=UNSUBSCRIBE_NOT_FOUND,
)
def unsubscribe(found: UnsubscribeDep, session: SessionDep, deliverer: DelivererDep) -> str:
    """RFC 8058 one-click unsubscribe: the address its token names is suppressed for the
    token's scope, whatever the body (`List-Unsubscribe=One-Click` form data, multipart,
    or none). A repeat changes nothing."""
    deliverer.unsubscribe(session=session, found=found)
    return pages.unsubscribed()


@public.get(
    "/unsubscribe/{token}",
    response_class=HTMLResponse,
    responses=UNSUBSCRIBE_NOT_FOUND,
)
def unsubscribe_page(found: UnsubscribeDep) -> str:
    """A page with a button that unsubscribes (a POST): a GET never does, since link
    scanners follow every URL of a message."""
    return pages.confirm_unsubscribe()


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


# The send routes count their key's request with their recipients, in one round trip.
COUNTED_BY_ROUTE = [
    route for route in router.routes if getattr(route, "openapi_extra", None) is SEND_SECURITY
]
