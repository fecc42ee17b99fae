"""Idempotency-Key: a repeated POST answers what the first one did and sends nothing again.

The key is stored with a fingerprint of its request in the transaction that creates the
notification (or batch), under a unique (scope, key) constraint (`claim_key`, called by
crud's create functions). A repeat with the same fingerprint gets the first request's
resource and status code (`first_outcome`), waiting for a synchronous send still under
way; another fingerprint is a 422. Keys expire after IDEMPOTENCY_KEY_TTL seconds and are
then free for a new request; the worker purges them when idle.
"""

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import CursorResult, delete, select, update
from sqlalchemy.orm import Session

from db import NO_SYNC, dialect_insert
from models import IdempotencyKey, utcnow

# Printable ASCII without spaces, as in the IETF draft's examples (UUIDs, ULIDs, hashes).
KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"


@dataclass(frozen=True)
class IdempotencyClaim:
    """An `Idempotency-Key` to store with what its request creates."""

    scope: str
    key: str
    fingerprint: str
    ttl: timedelta


class IdempotencyKeyUsed(Exception):
    """The key is already stored (and unexpired); `record` is its first request's."""

    def __init__(self, record: IdempotencyKey) -> None:
        super().__init__(f"idempotency key {record.key!r} already used")
        self.record = record


class KeyReusedError(Exception):
    """The key was first used for a different request (a 422)."""


class KeyInFlightError(Exception):
    """The key's first request has not finished within the wait (a 409)."""


def claim_for(
    key: str | None,
    *,
    scope: str,
    endpoint: str,
    body: BaseModel,
    ttl: float,
    secret: bytes,
    **extra: Any,
) -> IdempotencyClaim | None:
    """The claim a request makes with its `Idempotency-Key`, or None without one.

    The fingerprint of a sensitive request is an HMAC under `secret`: a plain hash would
    give its code back to whoever reads the table and tries every code.
    """
    if key is None:
        return None
    request = {"endpoint": endpoint, "body": body.model_dump(mode="json"), **extra}
    canonical = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    if getattr(body, "sensitive", False):
        fingerprint = hmac.new(secret, canonical.encode(), hashlib.sha256).hexdigest()
    else:
        fingerprint = hashlib.sha256(canonical.encode()).hexdigest()
    return IdempotencyClaim(
        scope=scope, key=key, fingerprint=fingerprint, ttl=timedelta(seconds=ttl)
    )


def claim_key(session: Session, claim: IdempotencyClaim, now: datetime) -> int:
    """Insert the key in the open transaction, or raise `IdempotencyKeyUsed`.

    INSERT … ON CONFLICT DO NOTHING on the unique (scope, key): a simultaneous request
    with the same key waits for this transaction and then finds the key taken.
    """
    same_key = (IdempotencyKey.scope == claim.scope, IdempotencyKey.key == claim.key)
    while True:
        # An expired key is free again.
        session.execute(delete(IdempotencyKey).where(*same_key, IdempotencyKey.expires_at <= now))
        key_id = session.scalar(
            dialect_insert(session, IdempotencyKey)
            .values(
                scope=claim.scope,
                key=claim.key,
                fingerprint=claim.fingerprint,
                created_at=now,
                expires_at=now + claim.ttl,
            )
            .on_conflict_do_nothing(index_elements=["scope", "key"])
            .returning(IdempotencyKey.id)
        )
        if key_id is not None:
            return key_id
        session.rollback()
        record = session.scalars(select(IdempotencyKey).where(*same_key)).one_or_none()
        session.commit()
        if record is not None:
            raise IdempotencyKeyUsed(record)
        # It expired and was purged in between: try again.


def link_key(session: Session, key_id: int, **values: Any) -> None:
    """Point a claimed key at what its request created, in the open transaction."""
    session.execute(
        update(IdempotencyKey).where(IdempotencyKey.id == key_id).values(**values),
        execution_options=NO_SYNC,
    )


def forget_keys_of(
    session: Session, *, notification_id: int | None = None, batch_id: int | None = None
) -> None:
    """Delete the key of a request answered 503, in the open transaction: a retry with it
    is a new request."""
    if batch_id is not None:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.batch_id == batch_id))
    else:
        session.execute(
            delete(IdempotencyKey).where(IdempotencyKey.notification_id == notification_id)
        )


def raise_if_key_used(
    *,
    session: Session,
    claim: IdempotencyClaim | None,
    now: Callable[[], datetime] = utcnow,
) -> None:
    """Raise `IdempotencyKeyUsed` if the claim's key is stored and unexpired by `now`."""
    if claim is None:
        return
    record = session.scalars(
        select(IdempotencyKey).where(
            IdempotencyKey.scope == claim.scope,
            IdempotencyKey.key == claim.key,
            IdempotencyKey.expires_at > now(),
        )
    ).one_or_none()
    session.commit()
    if record is not None:
        raise IdempotencyKeyUsed(record)


def finish_key(*, session: Session, claim: IdempotencyClaim, status_code: int) -> None:
    """Record the status code a key's first request answered with."""
    session.execute(
        update(IdempotencyKey)
        .where(
            IdempotencyKey.scope == claim.scope,
            IdempotencyKey.key == claim.key,
            # Not a newer request's: this key may have expired and been reused meanwhile.
            IdempotencyKey.fingerprint == claim.fingerprint,
            IdempotencyKey.status_code.is_(None),
        )
        .values(status_code=status_code),
        execution_options=NO_SYNC,
    )
    session.commit()


def _settle_key(*, session: Session, record_id: int, status_code: int) -> None:
    """Fix the answer of a key whose first request died before answering."""
    session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.id == record_id, IdempotencyKey.status_code.is_(None))
        .values(status_code=status_code),
        execution_options=NO_SYNC,
    )
    session.commit()


def _get_key(*, session: Session, record_id: int) -> IdempotencyKey | None:
    """A fresh read of a stored key (no connection is held afterwards)."""
    record = session.scalars(
        select(IdempotencyKey)
        .where(IdempotencyKey.id == record_id)
        .execution_options(populate_existing=True)
    ).one_or_none()
    session.commit()
    return record


def purge_expired(*, session: Session, limit: int = 1000) -> int:
    """Delete up to `limit` expired keys; how many went."""
    expired = (
        select(IdempotencyKey.id)
        .where(IdempotencyKey.expires_at <= utcnow())
        .limit(limit)
        .scalar_subquery()
    )
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        delete(IdempotencyKey).where(IdempotencyKey.id.in_(expired))
    )
    session.commit()
    return result.rowcount


def first_outcome(
    *,
    session: Session,
    claim: IdempotencyClaim,
    record: IdempotencyKey,
    wait: float,
    lease: timedelta,
    poll: float = 0.05,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], datetime] = utcnow,
) -> IdempotencyKey:
    """The stored key once its first request has answered (its `status_code` is set).

    A first request that died mid-send never answers: once its lease has run out, its
    notification is in the workers' hands, and every repeat answers 202.
    """
    if record.fingerprint != claim.fingerprint:
        raise KeyReusedError
    deadline = time.monotonic() + wait
    while record.status_code is None and record.created_at + lease > now():
        if time.monotonic() >= deadline:
            raise KeyInFlightError
        sleep(poll)
        fresh = _get_key(session=session, record_id=record.id)
        if fresh is None:  # expired and purged meanwhile: nothing left to replay
            raise KeyInFlightError
        record = fresh
    if record.status_code is None:
        _settle_key(session=session, record_id=record.id, status_code=202)
        fresh = _get_key(session=session, record_id=record.id)
        if fresh is None:
            raise KeyInFlightError
        record = fresh
    return record
