"""Who is calling, what they may do, and how much: API keys, scopes and rate limits.

Scopes:
    send   POST /notify/email, POST /notify/bulk
    read   GET /notifications…, GET /batches/…
    admin  resend, cancel, and managing keys (/keys)

A key is `ntf_` and 43 URL-safe characters (256 random bits). Only its SHA-256 is stored:
the key carries enough entropy that a slow password hash would add nothing, and lookup by
hash lets the check be one indexed query; the found hash is compared in constant time.

Rate limits are fixed windows counted in PostgreSQL (`rate_counters`), so every API replica
sees the same counts without another service: requests per key per minute, and messages
per recipient address per hour (the caller's own limit, or the service-wide one).

Command line (the service's settings and database):
    python security.py create NAME --scopes send,read [--recipient-hourly-limit N]
    python security.py list
    python security.py revoke NAME
"""

import argparse
import hashlib
import hmac
import logging
import math
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from anyio import to_thread
from fastapi import Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from sqlalchemy.orm import Session
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as Scope_

import crud
from config import Settings
from db import DATABASE_UNAVAILABLE, get_session
from models import ApiKey, utcnow

logger = logging.getLogger(__name__)

KEY_PREFIX = "ntf_"
RECIPIENT_LIMITED = "rate limit: too many messages to this address this hour"
# The most rows one key's request counter is split over (see authenticate).
COUNTER_SHARDS = 8
# last_used_at is written at most this often per key.
TOUCH_EVERY = timedelta(seconds=60)


class Scope(StrEnum):
    SEND = "send"
    READ = "read"
    ADMIN = "admin"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    return key[: len(KEY_PREFIX) + 4]


def issue_key(
    *,
    session: Session,
    name: str,
    scopes: Sequence[str],
    requests_per_minute: int | None = None,
    recipient_hourly_limit: int | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; the stored record and the key itself, which is shown only now."""
    key = new_key()
    record = crud.create_api_key(
        session=session,
        name=name,
        key_hash=hash_key(key),
        prefix=display_prefix(key),
        scopes=scopes,
        requests_per_minute=requests_per_minute,
        recipient_hourly_limit=recipient_hourly_limit,
    )
    return record, key


def ensure_development_key(*, session: Session, path: Path) -> None:
    """Keep a working key, with every scope, in `path` (development only)."""
    if path.exists():
        key = path.read_text().strip()
        if crud.find_api_key(session=session, key_hash=hash_key(key)):
            return
    existing = crud.get_api_key_by_name(session=session, name="development")
    if existing is not None and existing.revoked_at is not None:
        logger.warning("the development API key is revoked; create one: python security.py")
        return
    key = new_key()
    if existing is None:
        crud.create_api_key(
            session=session,
            name="development",
            key_hash=hash_key(key),
            prefix=display_prefix(key),
            scopes=list(Scope),
        )
    else:
        crud.replace_api_key_hash(
            session=session, api_key=existing, key_hash=hash_key(key), prefix=display_prefix(key)
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    logger.warning("development API key written to %s (send it as Authorization: Bearer)", path)


class BodySizeLimit:
    """ASGI middleware: a request body over `max_bytes` is a 413 before anything reads it."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope_, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI re-raises an HTTPException met while reading the body.
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, self.detail)
            return message

        await self.app(scope, counted, send)

    @property
    def detail(self) -> str:
        return f"request body larger than {self.max_bytes} bytes"

    async def _refuse(self, scope: Scope_, receive: Receive, send: Send) -> None:
        response = JSONResponse({"detail": self.detail}, status_code=413)
        await response(scope, receive, send)


bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key: `Authorization: Bearer ntf_…`.",
)


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"}
    )


def too_many(detail: str, retry_after: float) -> HTTPException:
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        detail,
        headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
    )


def window(now: datetime, length: timedelta) -> tuple[datetime, float]:
    """The start of the fixed window `now` is in, and the seconds until it ends."""
    seconds = length.total_seconds()
    start = now.timestamp() // seconds * seconds
    return datetime.fromtimestamp(start, now.tzinfo), start + seconds - now.timestamp()


def identify(*, session: Session, settings: Settings, credentials: str) -> ApiKey | None:
    """The valid, unrevoked key `credentials` is, or None."""
    presented = hash_key(credentials)
    api_key = bootstrap_key(settings, presented) or crud.find_api_key(
        session=session, key_hash=presented
    )
    if api_key is None or not hmac.compare_digest(api_key.key_hash, presented):
        return None
    return api_key


class RequireApiKey:
    """ASGI middleware: a request without a valid key is a 401 before its body is read.

    FastAPI parses and validates a body before any dependency runs, so without this an
    anonymous caller would get 422s (and make the server parse megabytes). The key found
    is handed to `authenticate` in the request state; scopes and rate limits stay there.
    """

    def __init__(self, app: ASGIApp, *, open_paths: set[str]) -> None:
        self.app = app
        self.open_paths = open_paths

    async def __call__(self, scope: Scope_, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        scheme, _, credentials = (Headers(scope=scope).get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            await self._refuse(scope, receive, send, "an API key is required: Bearer <key>")
            return
        state = scope["app"].state
        try:
            api_key = await to_thread.run_sync(self._identify, state, credentials.strip())
        except DATABASE_UNAVAILABLE:
            logger.exception("database unavailable while checking an API key")
            response = JSONResponse(
                {"detail": "database unavailable, try again later"},
                status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                headers={"Retry-After": "5"},
            )
            await response(scope, receive, send)
            return
        if api_key is None:
            await self._refuse(scope, receive, send, "invalid or revoked API key")
            return
        scope.setdefault("state", {})["api_key"] = api_key
        await self.app(scope, receive, send)

    @staticmethod
    def _identify(state: Any, credentials: str) -> ApiKey | None:
        with state.session_factory() as session:
            return identify(session=session, settings=state.settings, credentials=credentials)

    @staticmethod
    async def _refuse(scope: Scope_, receive: Receive, send: Send, detail: str) -> None:
        response = JSONResponse(
            {"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )
        await response(scope, receive, send)


def authenticate(
    security_scopes: SecurityScopes,
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    session: Annotated[Session, Depends(get_session)],
) -> ApiKey:
    """The caller's key, if valid, unrevoked, holding the scopes and within its request rate."""
    settings: Settings = request.app.state.settings
    # Normally RequireApiKey has found the key already.
    api_key: ApiKey | None = getattr(request.state, "api_key", None)
    if api_key is None:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise unauthorized("an API key is required: Authorization: Bearer <key>")
        api_key = identify(session=session, settings=settings, credentials=credentials.credentials)
        if api_key is None:
            raise unauthorized("invalid or revoked API key")
    granted = set(api_key.scopes.split())
    missing = [scope for scope in security_scopes.scopes if scope not in granted]
    if missing:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"this API key lacks the scope: {', '.join(missing)}"
        )
    limit = api_key.requests_per_minute or settings.rate_limit_requests_per_minute
    start, retry_after = window(utcnow(), timedelta(minutes=1))
    # Every request of a key would update one counter row and queue on its row lock;
    # a high limit is split over several rows, each holding its share, picked at random.
    shards = max(1, min(COUNTER_SHARDS, limit // 100))
    subject = f"key:{api_key.id}:{secrets.randbelow(shards)}"
    share = -(-limit // shards)
    if not crud.take_rate(session=session, subjects=[subject], window_start=start, limit=share):
        raise too_many(f"more than {limit} requests per minute for this API key", retry_after)
    if api_key.id:
        crud.touch_api_key(session=session, api_key=api_key, every=TOUCH_EVERY)
    return api_key


def bootstrap_key(settings: Settings, presented: str) -> ApiKey | None:
    """BOOTSTRAP_API_KEY, checked against the settings alone: it has every scope, is not
    stored, and is revoked by removing it from the environment."""
    if settings.bootstrap_api_key is None:
        return None
    key_hash = hash_key(settings.bootstrap_api_key.get_secret_value())
    if not hmac.compare_digest(key_hash, presented):
        return None
    return ApiKey(id=0, name="bootstrap", key_hash=key_hash, scopes=" ".join(Scope))


def take_recipients(
    *, session: Session, settings: Settings, caller: ApiKey, recipients: Sequence[str]
) -> tuple[set[str], int, float]:
    """Count a message for each address this hour; the addresses within the limit, the
    limit, and the seconds until the window ends."""
    limit = caller.recipient_hourly_limit or settings.rate_limit_per_recipient_per_hour
    start, retry_after = window(utcnow(), timedelta(hours=1))
    taken = crud.take_rate(
        session=session,
        subjects=[f"rcpt:{address.lower()}" for address in recipients],
        window_start=start,
        limit=limit,
    )
    allowed = {address for address in recipients if f"rcpt:{address.lower()}" in taken}
    return allowed, limit, retry_after


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def main(argv: Sequence[str] | None = None) -> None:
    """Manage API keys from the command line."""
    from db import make_engine, make_session_factory, run_migrations

    parser = argparse.ArgumentParser(prog="python security.py", description="Manage API keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key and print it once")
    create.add_argument("name")
    create.add_argument(
        "--scopes", default="send", help="comma-separated: send, read, admin (default: send)"
    )
    create.add_argument("--requests-per-minute", type=positive)
    create.add_argument("--recipient-hourly-limit", type=positive)
    commands.add_parser("list", help="list keys (never the keys themselves)")
    revoke = commands.add_parser("revoke", help="revoke a key by name")
    revoke.add_argument("name")
    args = parser.parse_args(argv)

    settings = Settings()
    engine = make_engine(settings)
    if settings.auto_migrate:
        run_migrations(engine)
    with make_session_factory(engine)() as session:
        if args.command == "create":
            try:
                scopes = [Scope(s.strip()) for s in args.scopes.split(",") if s.strip()]
            except ValueError as exc:
                parser.error(str(exc))
            if crud.get_api_key_by_name(session=session, name=args.name):
                parser.error(f"a key named {args.name!r} exists")
            _, key = issue_key(
                session=session,
                name=args.name,
                scopes=scopes,
                requests_per_minute=args.requests_per_minute,
                recipient_hourly_limit=args.recipient_hourly_limit,
            )
            print(key)
        elif args.command == "list":
            for record in crud.list_api_keys(session=session):
                state = "revoked" if record.revoked_at else "active"
                print(f"{record.name}\t{record.prefix}…\t{record.scopes}\t{state}")
        else:
            found = crud.get_api_key_by_name(session=session, name=args.name)
            if found is None:
                parser.error(f"no key named {args.name!r}")
            crud.revoke_api_key(session=session, api_key=found)
            print(f"revoked {args.name}")
    engine.dispose()


if __name__ == "__main__":
    main()
