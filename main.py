"""The notification service: `uvicorn main:app --port 8003`."""

import logging
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from anyio import to_thread
from fastapi import FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from limits.errors import StorageError
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from attachments import AttachmentRefused
from auth import (
    KeyCache,
    RequireApiKey,
    ensure_development_key,
    no_valid_key,
    too_many,
    unavailable,
)
from catalogue import Catalogue, PreconditionFailed, VersionTaken
from config import Settings
from db import DATABASE_UNAVAILABLE, ReadinessProbe, make_engine
from delivery import Conflict, NoValidRecipient, OutcomeNotRecorded
from idempotency import KeyInFlightError, KeyReusedError
from lifecycle import Refused
from ratelimits import KeyRevoked, TooMany
from recorder import start_recorder
from routes import COUNTED_BY_ROUTE, health, public, router
from schemas import printable
from templating import TemplateError
from wiring import Database, build_database, build_deliverer, build_limiter, configure_logging
from worker import Worker

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application, wired to the database and SMTP server that `settings` name."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging()
        logging.getLogger("uvicorn.access").addFilter(hide_query_strings)
        database = await to_thread.run_sync(
            partial(build_database, settings, migrate=settings.auto_migrate)
        )
        deliverer, stop_deliverer = build_deliverer(settings)
        app.state.settings = settings
        app.state.session_factory = database.session_factory
        read_database = build_database(
            settings, pool_size=max(1, settings.db_pool_size // 2), autocommit=True
        )
        app.state.read_session_factory = read_database.session_factory
        app.state.limiter = build_limiter(settings)
        app.state.key_cache = KeyCache(settings.api_key_cache_ttl)
        app.state.readiness = ReadinessProbe(
            make_engine(settings, pool_size=1), storage_check=app.state.limiter.storage.check
        )
        if settings.development and settings.bootstrap_api_key is None:
            await to_thread.run_sync(development_key, settings, app.state.session_factory)
        app.state.deliverer = deliverer
        app.state.catalogue = Catalogue(deliverer.renderer)
        if settings.templates_install:
            await to_thread.run_sync(install_templates, app.state.catalogue, database)
        worker = Worker(
            session_factory=app.state.session_factory,
            deliverer=deliverer,
            settings=settings,
            # Half the SMTP connections: the other half stays free for synchronous sends.
            threads=max(1, settings.smtp_pool_size // 2),
        )
        worker_thread = threading.Thread(target=worker.run, name="delivery-worker", daemon=True)
        if settings.worker_in_api:
            worker_thread.start()
        stop_recorder = start_recorder(deliverer.unrecorded, app.state.session_factory)
        try:
            yield
        finally:
            if worker_thread.is_alive():
                worker.stop()
                await to_thread.run_sync(worker_thread.join)
            await to_thread.run_sync(stop_recorder)
            app.state.readiness.close()
            await app.state.limiter.aclose()
            stop_deliverer()
            database.close()
            read_database.close()

    # Swagger UI and ReDoc from files shipped in a package: the docs work offline.
    app = FastAPIOffline(
        title="Notification service",
        summary="E-mail, SMS and Telegram notifications for the coworking booking system,"
        " falling back from one channel to the next, with their history.",
        version="1.0.0",
        lifespan=lifespan,
    )
    app.include_router(router)
    app.include_router(health)
    app.include_router(public)
    # An upload may be as large as the largest e-mail takes once in base64 (4 bytes for
    # 3), and its form's few headers.
    uploads = {"/attachments": settings.attachment_max_message_bytes * 3 // 4 + 64 * 1024}
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, larger=uploads)
    # Added last, so it runs first: no key, no body read, whatever its size.
    app.add_middleware(RequireApiKey, protected=router.routes, counted_by_route=COUNTED_BY_ROUTE)
    for error in (*DATABASE_UNAVAILABLE, StorageError):
        app.add_exception_handler(error, dependency_unavailable)
    app.add_exception_handler(OutcomeNotRecorded, outcome_not_recorded)
    app.add_exception_handler(Refused, refused)
    app.add_exception_handler(AttachmentRefused, attachment_refused)
    app.add_exception_handler(TemplateError, refused)
    app.add_exception_handler(VersionTaken, conflict)
    app.add_exception_handler(PreconditionFailed, precondition_failed)
    app.add_exception_handler(NoValidRecipient, no_valid_recipient)
    app.add_exception_handler(Conflict, conflict)
    app.add_exception_handler(TooMany, rate_limited)
    app.add_exception_handler(KeyRevoked, key_revoked)
    app.add_exception_handler(KeyReusedError, key_reused)
    app.add_exception_handler(KeyInFlightError, key_in_flight)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    return app


def hide_query_strings(record: logging.LogRecord) -> bool:
    """Access log lines without query strings (they carry recipient addresses) or
    unsubscribe tokens (a token names its address)."""
    if isinstance(record.args, tuple) and len(record.args) >= 3:
        path = record.args[2]
        if isinstance(path, str) and ("?" in path or path.startswith(UNSUBSCRIBE_PATH)):
            shown = path.partition("?")[0]
            if shown.startswith(UNSUBSCRIBE_PATH):
                shown = UNSUBSCRIBE_PATH + "…"
            record.args = (*record.args[:2], shown, *record.args[3:])
    return True


UNSUBSCRIBE_PATH = "/unsubscribe/"


def install_templates(catalogue: Catalogue, database: Database) -> None:
    """The shipped catalogue, installed where its files changed (`catalogue.install`)."""
    with database.session_factory() as session:
        catalogue.install(session)


def development_key(settings: Settings, session_factory: sessionmaker[Session]) -> None:
    """In development, a working key in DEV_API_KEY_FILE, so the first curl works."""
    with session_factory() as session:
        ensure_development_key(session=session, path=settings.dev_api_key_file)


class BodySizeLimit:
    """ASGI middleware: a request body over `max_bytes` is a 413 before anything reads it."""

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, larger: Mapping[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # Paths whose bodies may be larger (uploads), and how large.
        self.larger = dict(larger or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.larger.get(scope["path"], self.max_bytes)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, limit)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # FastAPI re-raises an HTTPException met while reading the body.
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, self.detail(limit))
            return message

        await self.app(scope, counted, send)

    @staticmethod
    def detail(limit: int) -> str:
        return f"request body larger than {limit} bytes"

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = JSONResponse({"detail": self.detail(limit)}, status_code=413)
        await response(scope, receive, send)


async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, without echoing the input: it may be a sensitive text, or not even
    encodable (a lone surrogate)."""
    assert isinstance(exc, RequestValidationError)
    detail = [
        {
            "type": error["type"],
            "loc": [
                printable(str(part)) if isinstance(part, str) else part for part in error["loc"]
            ],
            "msg": printable(_message(error)),
        }
        for error in exc.errors()
    ]
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def _message(error: Any) -> str:
    # A body that is not JSON as we read it (strictjson.py) says why, not only that.
    if error["type"] == "json_invalid" and "error" in error.get("ctx", {}):
        return f"{error['msg']}: {error['ctx']['error']}"
    return str(error["msg"])


async def dependency_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """A 503 naming the database or the rate-limit storage, whichever failed."""
    logger.error("%s during %s %s: %s", type(exc).__name__, request.method, request.url.path, exc)
    return unavailable(exc)


async def rate_limited(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TooMany)
    return too_many(exc)


async def key_revoked(request: Request, exc: Exception) -> JSONResponse:
    """A key revoked through another process, seen when its request was counted."""
    assert isinstance(exc, KeyRevoked)
    request.app.state.key_cache.forget(exc.key_id)
    return no_valid_key(str(exc))


async def outcome_not_recorded(request: Request, exc: Exception) -> JSONResponse:
    """The provider answered, the database did not: say so, and which notification."""
    assert isinstance(exc, OutcomeNotRecorded)
    return JSONResponse(
        {
            "detail": "database unavailable after the provider answered; the outcome is "
            "recorded on this notification when the database is back (after a failure, the "
            "queue goes on with the next channel of its order): do not send again",
            "id": exc.transition.notification_id,
            "status": "sending",
        },
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "5"},
    )


async def refused(request: Request, exc: Exception) -> JSONResponse:
    """A request the service cannot take as asked: a 422 shaped like FastAPI's own, about
    one field of the body."""
    assert isinstance(exc, Refused | TemplateError)
    location = ("body", *exc.field.split("."))
    error = {"type": "value_error", "loc": location, "msg": str(exc)}
    return await invalid_request(request, RequestValidationError([error]))


async def attachment_refused(request: Request, exc: Exception) -> JSONResponse:
    """An attachment too big (413) or of a type not taken (415); one that does not exist
    is a `Refused` (422) like any other field."""
    assert isinstance(exc, AttachmentRefused)
    return JSONResponse({"detail": str(exc)}, status_code=exc.status)


async def no_valid_recipient(request: Request, exc: Exception) -> JSONResponse:
    """A bulk request none of whose items can be sent: each listed, with why."""
    assert isinstance(exc, NoValidRecipient)
    rejected = [r.model_dump(exclude_none=True) for r in exc.rejected]
    return JSONResponse(
        {"detail": {"message": str(exc), "rejected": rejected}},
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
    )


async def precondition_failed(request: Request, exc: Exception) -> JSONResponse:
    """If-Match named a version of the row that is not the current one."""
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_412_PRECONDITION_FAILED)


async def conflict(request: Request, exc: Exception) -> JSONResponse:
    """The notification is not in a state the operation applies to."""
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_409_CONFLICT)


async def key_reused(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(
        {"detail": "this Idempotency-Key was already used with a different request"},
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
    )


async def key_in_flight(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(
        {"detail": "the first request with this Idempotency-Key is still in progress"},
        status_code=status.HTTP_409_CONFLICT,
        headers={"Retry-After": "1"},
    )


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's error body; an unknown path also points to the documentation."""
    assert isinstance(exc, StarletteHTTPException)
    body: dict[str, object] = {"detail": exc.detail}
    if exc.status_code == status.HTTP_404_NOT_FOUND and exc.detail == "Not Found":
        body["docs"] = "/docs"
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


app = create_app()
