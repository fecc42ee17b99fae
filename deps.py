"""The FastAPI dependencies of the endpoints: sessions, the service's objects on
`app.state`, the caller's key and scopes, the request headers that change a send, and
path parameters that must name a stored row (a 404 otherwise)."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from anyio import to_thread
from fastapi import Depends, Header, HTTPException, Path, Request, Security, status
from sqlalchemy.orm import Session

import auth
import crud
import idempotency
from catalogue import Catalogue
from config import Settings
from delivery import Deliverer, Sending
from models import Attachment, Notification, Recipient, Scope, Template, TemplateVersion
from ratelimits import RateLimiter
from schemas import MAX_ID
from suppression import Unsubscribe

logger = logging.getLogger(__name__)


async def get_session(request: Request) -> AsyncIterator[Session]:
    """The request's session (shared by all of a request's dependants)."""
    async with _closing(request.app.state.session_factory()) as session:
        yield session


async def get_read_session(request: Request) -> AsyncIterator[Session]:
    """A session for a request that only reads, on the autocommit engine
    (`db.make_engine`): a read is one round trip, without BEGIN and ROLLBACK."""
    async with _closing(request.app.state.read_session_factory()) as session:
        yield session


@asynccontextmanager
async def _closing(session: Session) -> AsyncIterator[Session]:
    """Close a request's session without a thread hop when it holds no connection (every
    unit of work has committed); otherwise in a thread, since closing rolls back."""
    try:
        yield session
    finally:
        if not session.in_transaction():
            session.close()
        else:
            # Runs after the response has started: a rollback on a connection the
            # database dropped must not break it.
            try:
                await to_thread.run_sync(session.close)
            except Exception as exc:
                logger.warning("closing a database session failed: %s", exc)


# async: a plain `def` dependency would cost a thread hop each.
async def get_deliverer(request: Request) -> Deliverer:
    deliverer: Deliverer = request.app.state.deliverer
    return deliverer


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_limiter(request: Request) -> RateLimiter:
    limiter: RateLimiter = request.app.state.limiter
    return limiter


async def get_catalogue(request: Request) -> Catalogue:
    catalogue: Catalogue = request.app.state.catalogue
    return catalogue


SessionDep = Annotated[Session, Depends(get_session)]
CatalogueDep = Annotated[Catalogue, Depends(get_catalogue)]
ReadSessionDep = Annotated[Session, Depends(get_read_session)]
LimiterDep = Annotated[RateLimiter, Depends(get_limiter)]
DelivererDep = Annotated[Deliverer, Depends(get_deliverer)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
# What `sending` checks, as OpenAPI says it (the key's scheme is `auth.bearer`'s).
SEND_SECURITY = {"security": [{auth.bearer.scheme_name: [Scope.SEND.value]}]}
READ = [Security(auth.authenticate, scopes=[Scope.READ])]
SEND = [Security(auth.authenticate, scopes=[Scope.SEND])]
ADMIN = [Security(auth.authenticate, scopes=[Scope.ADMIN])]
# A key with `admin` has these too.
RECIPIENTS = [Security(auth.authenticate, scopes=[Scope.RECIPIENTS])]
TEMPLATES = [Security(auth.authenticate, scopes=[Scope.TEMPLATES])]
SUPPRESSIONS = [Security(auth.authenticate, scopes=[Scope.SUPPRESSIONS])]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        pattern=idempotency.KEY_PATTERN,
        description="Repeat a request safely: the same key and body answer what the first "
        "request did and send nothing again; the same key with another body is a 422.",
    ),
]
PreferHeader = Annotated[
    str | None, Header(description="`respond-async`: queue instead of sending now (202).")
]

# BIGINT ids: anything else is a 422 on every database (SQLite cannot even bind it).
NotificationId = Annotated[int, Path(ge=1, le=MAX_ID)]
BatchId = Annotated[int, Path(ge=1, le=MAX_ID)]
KeyId = Annotated[int, Path(ge=1, le=MAX_ID)]
AttachmentId = Annotated[int, Path(ge=1, le=MAX_ID)]
SuppressionId = Annotated[int, Path(ge=1, le=MAX_ID)]
ExternalIdPath = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@-]+$")]
TemplateKeyPath = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]
VersionNumber = Annotated[int, Path(ge=1, le=2**31 - 1)]
IfMatchHeader = Annotated[
    str | None,
    Header(
        max_length=64,
        description="The template's ETag as last read: the activation is refused (412) if "
        "the template changed since.",
    ),
]


def wants_async(prefer: str | None) -> bool:
    """RFC 7240: does the Prefer header ask for respond-async?"""
    if not prefer:
        return False
    return any(p.split(";")[0].strip().lower() == "respond-async" for p in prefer.split(","))


async def sending(
    request: Request,
    prefer: PreferHeader = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Sending:
    """Who sends and how they asked, for `delivery.Deliverer.submit`: the key, its scope
    and the limiter in one step, on the hot path of every send (a dependency per piece
    costs more than the pieces). The routes declare the scope in OpenAPI (`SEND_SECURITY`)."""
    caller = auth.caller(request, [Scope.SEND])
    limiter: RateLimiter = request.app.state.limiter
    key_count = getattr(request.state, "key_count", None)
    # Opened here, closed by the endpoint (`with ctx:`); it holds no connection until used.
    session = request.app.state.session_factory()
    return Sending(caller, session, limiter, wants_async(prefer), idempotency_key, key_count)


SendingDep = Annotated[Sending, Depends(sending)]


def valid_notification_id(notification_id: NotificationId, session: SessionDep) -> Notification:
    notification = crud.get_notification(session=session, notification_id=notification_id)
    if notification is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "notification not found")
    return notification


NotificationDep = Annotated[Notification, Depends(valid_notification_id)]


def valid_recipient(external_id: ExternalIdPath, session: SessionDep) -> Recipient:
    recipient = crud.get_recipient(session=session, external_id=external_id)
    if recipient is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "recipient not found")
    return recipient


RecipientDep = Annotated[Recipient, Depends(valid_recipient)]


def valid_attachment(attachment_id: AttachmentId, session: ReadSessionDep) -> Attachment:
    found = crud.get_attachments(session=session, ids=[attachment_id])
    if attachment_id not in found:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "attachment not found")
    return found[attachment_id]


AttachmentDep = Annotated[Attachment, Depends(valid_attachment)]


def valid_unsubscribe(
    token: Annotated[str, Path(max_length=512)], deliverer: DelivererDep
) -> Unsubscribe:
    """What an unsubscribe link's token names; a 404 that says nothing more if it is not
    one of ours."""
    found = deliverer.tokens.read_unsubscribe(token)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "this link is not valid")
    return found


UnsubscribeDep = Annotated[Unsubscribe, Depends(valid_unsubscribe)]


def valid_template(key: TemplateKeyPath, session: SessionDep) -> Template:
    template = crud.get_template(session=session, key=key)
    if template is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "template not found")
    return template


TemplateDep = Annotated[Template, Depends(valid_template)]


def valid_version(
    number: VersionNumber, template: TemplateDep, session: SessionDep
) -> TemplateVersion:
    version = crud.get_template_version(session=session, template=template, number=number)
    if version is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "version not found")
    return version


VersionDep = Annotated[TemplateVersion, Depends(valid_version)]


def etag(template: Template) -> str:
    """The template's ETag: its row version, bumped by every write."""
    return f'"{template.version}"'


def if_match_version(if_match: IfMatchHeader = None) -> int | None:
    """The template's row version an If-Match names, required (428 without it): a strong
    ETag of ours (RFC 9110 compares If-Match strongly); `*` is any (None)."""
    if if_match is None:
        raise HTTPException(
            status.HTTP_428_PRECONDITION_REQUIRED, "If-Match is required: the template's ETag"
        )
    if if_match.strip() == "*":
        return None
    value = if_match.strip()
    if not (value.startswith('"') and value.endswith('"') and value[1:-1].isdigit()):
        raise HTTPException(
            status.HTTP_412_PRECONDITION_FAILED, "If-Match names no version of this template"
        )
    return int(value[1:-1])


ExpectedVersion = Annotated[int | None, Depends(if_match_version)]
