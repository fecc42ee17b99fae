"""Who is calling and what they may do: API keys and their scopes.

Scopes:
    send        POST /notify, /notify/email, /notify/sms, /notify/telegram, /notify/bulk
    read        GET /notifications…, GET /batches/…
    recipients  /recipients… (store, read, change and erase recipients)
    admin       resend, cancel, managing keys (/keys), and everything `recipients` may

A key is `ntf_` and 43 URL-safe characters (256 random bits). Only its SHA-256 is stored:
the key carries enough entropy that a slow password hash would add nothing, and lookup by
hash lets the check be one indexed query; the found hash is compared in constant time.
A key's request rate is counted with its check (`ratelimits.py`).
"""

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from anyio import to_thread
from fastapi import Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from limits.errors import StorageError
from sqlalchemy.orm import Session
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as Scope_

import crud
from config import Settings
from db import DATABASE_UNAVAILABLE
from models import ApiKey, Scope
from ratelimits import (
    KEY_REFUSED,
    STORAGE_UNAVAILABLE,
    KeyCount,
    RateLimiter,
    TooMany,
    key_limit_reached,
)

logger = logging.getLogger(__name__)

KEY_PREFIX = "ntf_"
# last_used_at is written at most this often per key.
TOUCH_EVERY = timedelta(seconds=60)


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
        logger.warning("the development API key is revoked; create one: python cli.py keys create")
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


bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key: `Authorization: Bearer ntf_…`.",
)


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"}
    )


class KeyCache:
    """Valid keys found lately, by hash, for `ttl` seconds: a request with a cached key is
    admitted without a database round trip or a thread hop. A key revoked through this
    process is forgotten at once; one revoked elsewhere (another process or replica, the
    command line) is seen through `RateLimiter.admit` on its next request (Redis), or, with
    the in-memory rate-limit storage (one process), when its entry expires."""

    MAX_KEYS = 10_000

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._keys: dict[str, tuple[ApiKey, float]] = {}

    def get(self, key_hash: str) -> ApiKey | None:
        found = self._keys.get(key_hash)
        if found is None or found[1] <= time.monotonic():
            return None
        return found[0]

    def put(self, key_hash: str, api_key: ApiKey) -> None:
        if self.ttl <= 0:
            return
        if len(self._keys) >= self.MAX_KEYS:
            self._keys.clear()
        self._keys[key_hash] = (api_key, time.monotonic() + self.ttl)

    def forget(self, key_id: int) -> None:
        for key_hash, (api_key, _) in list(self._keys.items()):
            if api_key.id == key_id:
                self._keys.pop(key_hash, None)


def identify(*, session: Session, key_hash: str) -> ApiKey | None:
    """The stored, unrevoked key with this hash, or None."""
    api_key = crud.find_api_key(session=session, key_hash=key_hash)
    if api_key is None or not hmac.compare_digest(api_key.key_hash, key_hash):
        return None
    return api_key


DATABASE_DOWN = "database unavailable, try again later"


def unavailable(exc: BaseException) -> JSONResponse:
    """The 503 of a request a dependency did not answer: the rate-limit storage (a
    `StorageError`) or the database, named in `detail`."""
    detail = STORAGE_UNAVAILABLE if isinstance(exc, StorageError) else DATABASE_DOWN
    return JSONResponse(
        {"detail": detail},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "5"},
    )


def too_many(exc: TooMany) -> JSONResponse:
    """The 429 of a rate limit reached: the key's per minute, or an address's per hour."""
    return JSONResponse(
        {"detail": str(exc)}, status_code=status.HTTP_429_TOO_MANY_REQUESTS, headers=exc.headers
    )


class RequireApiKey:
    """ASGI middleware: a request without a valid key is a 401 before its body is read,
    and one over its key's request rate a 429.

    FastAPI parses and validates a body before any dependency runs, so without this an
    anonymous caller would get 422s (and make the server parse megabytes). A key seen
    lately comes from `KeyCache`, and its count and revocation check are one async Redis
    round trip, so a request reaches its route without a thread hop; an unknown key is
    looked up in a thread. The key is handed to `authenticate` (scopes) in the request
    state.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        protected: Sequence[BaseRoute],
        counted_by_route: Sequence[BaseRoute] = (),
    ) -> None:
        """`counted_by_route`: routes that count the key's request themselves, with their
        recipients, in one round trip (`ratelimits.KeyCount`)."""
        self.app = app
        # Any other path is open: health, documentation, and unknown paths (a 404).
        self.protected = protected
        self.counted_by_route = {id(route) for route in counted_by_route}

    async def __call__(self, scope: Scope_, receive: Receive, send: Send) -> None:
        route = self._route(scope) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        scheme, _, credentials = (Headers(scope=scope).get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            await self._refuse(scope, receive, send, "an API key is required: Bearer <key>")
            return
        state = scope["app"].state
        settings: Settings = state.settings
        cache: KeyCache = state.key_cache
        limiter: RateLimiter = state.limiter
        presented = hash_key(credentials.strip())
        try:
            api_key = bootstrap_key(settings, presented) or cache.get(presented)
            if api_key is None:
                # Not seen lately: the database says, in a thread.
                api_key = await to_thread.run_sync(self._identify, state, presented)
                if api_key is None:
                    await self._refuse(scope, receive, send, KEY_REFUSED)
                    return
                cache.put(presented, api_key)
            limit = api_key.requests_per_minute or settings.rate_limit_requests_per_minute
            counted_later = id(route) in self.counted_by_route
            revoked, retry_after = (
                (False, None) if counted_later else await limiter.admit(api_key, limit)
            )
        except (*DATABASE_UNAVAILABLE, StorageError) as exc:
            logger.exception("storage unavailable while checking an API key")
            await unavailable(exc)(scope, receive, send)
            return
        if revoked:
            cache.forget(api_key.id)
            await self._refuse(scope, receive, send, KEY_REFUSED)
            return
        if retry_after is not None:
            await too_many(key_limit_reached(limit, retry_after))(scope, receive, send)
            return
        if not counted_later:
            await self._admitted(scope, receive, send, api_key)
            return
        count = KeyCount(api_key, limit)
        scope.setdefault("state", {})["key_count"] = count
        await self._admitted(scope, receive, send, api_key)
        if not count.done:
            # Answered before its route counted it (a 422, say): counted now all the same.
            await self._count_late(limiter, cache, count)

    def _route(self, scope: Scope_) -> BaseRoute | None:
        """The protected route `scope` is for, if any."""
        return next((r for r in self.protected if r.matches(scope)[0] != Match.NONE), None)

    async def _admitted(self, scope: Scope_, receive: Receive, send: Send, api_key: ApiKey) -> None:
        if api_key.id and crud.api_key_touch_due(api_key, every=TOUCH_EVERY):
            await self._touch(scope["app"].state, api_key)
        scope.setdefault("state", {})["api_key"] = api_key
        await self.app(scope, receive, send)

    @staticmethod
    async def _count_late(limiter: RateLimiter, cache: KeyCache, count: KeyCount) -> None:
        """Count a request that ended before its route counted it (the answer is sent)."""
        count.done = True
        try:
            revoked, _ = await limiter.admit(count.api_key, count.limit)
        except StorageError as exc:
            logger.warning("could not count a request of key %d: %s", count.api_key.id, exc)
            return
        if revoked:
            cache.forget(count.api_key.id)

    @staticmethod
    def _identify(state: Any, key_hash: str) -> ApiKey | None:
        with state.read_session_factory() as session:
            return identify(session=session, key_hash=key_hash)

    @staticmethod
    async def _touch(state: Any, api_key: ApiKey) -> None:
        """Record the key's use (at most once a minute per key and process); bookkeeping,
        so a database error here does not fail the request."""

        def touch() -> None:
            with state.session_factory() as session:
                crud.touch_api_key(session=session, api_key=api_key)

        try:
            await to_thread.run_sync(touch)
        except DATABASE_UNAVAILABLE as exc:
            logger.warning("could not record the use of key %d: %s", api_key.id, exc)

    @staticmethod
    async def _refuse(scope: Scope_, receive: Receive, send: Send, detail: str) -> None:
        await no_valid_key(detail)(scope, receive, send)


def no_valid_key(detail: str) -> JSONResponse:
    """The 401 of a request without a valid key."""
    return JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})


async def authenticate(
    security_scopes: SecurityScopes,
    request: Request,
    # For the OpenAPI security scheme; RequireApiKey has checked the key already.
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> ApiKey:
    """The caller's key (found by RequireApiKey), if it holds the scopes."""
    return caller(request, security_scopes.scopes)


def caller(request: Request, scopes: Sequence[str]) -> ApiKey:
    """The key RequireApiKey found for `request`: a 401 if none, a 403 if it lacks one of
    `scopes`."""
    api_key: ApiKey | None = getattr(request.state, "api_key", None)
    if api_key is None:
        raise unauthorized("an API key is required: Authorization: Bearer <key>")
    granted = set(api_key.scopes.split())
    # Operators manage recipients and templates too.
    if Scope.ADMIN in granted:
        granted |= {Scope.RECIPIENTS, Scope.TEMPLATES, Scope.SUPPRESSIONS}
    missing = [scope for scope in scopes if scope not in granted]
    if missing:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"this API key lacks the scope: {', '.join(missing)}"
        )
    return api_key


def announce_revocation(
    *, limiter: RateLimiter, cache: KeyCache | None, settings: Settings, key_id: int
) -> None:
    """After a key is revoked in the database: forget it here, and tell the processes that
    cached it (through the rate-limit storage, for longer than they cache it)."""
    if cache is not None:
        cache.forget(key_id)
    limiter.mark_revoked(key_id, seconds=2 * settings.api_key_cache_ttl + 60)


def bootstrap_key(settings: Settings, presented: str) -> ApiKey | None:
    """BOOTSTRAP_API_KEY, checked against the settings alone: it has every scope, is not
    stored, and is revoked by removing it from the environment."""
    if settings.bootstrap_api_key is None:
        return None
    key_hash = hash_key(settings.bootstrap_api_key.get_secret_value())
    if not hmac.compare_digest(key_hash, presented):
        return None
    return ApiKey(id=0, name="bootstrap", key_hash=key_hash, scopes=" ".join(Scope))
