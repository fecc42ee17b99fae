"""Idempotency-Key: a repeated POST answers what the first one did and sends nothing again.

The key is stored with a fingerprint of its request in the transaction that creates the
notification (or batch), under a unique (scope, key) constraint; see `crud._claim_key`.
A repeat with the same fingerprint gets the first request's resource and status code,
waiting for a synchronous send still under way; another fingerprint is a 422. Keys expire
after IDEMPOTENCY_KEY_TTL seconds and are then free for a new request.
"""

import hashlib
import hmac
import json
import time
from datetime import timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy.orm import Session

import crud
from crud import IdempotencyClaim
from models import IdempotencyKey, utcnow

# Printable ASCII without spaces, as in the IETF draft's examples (UUIDs, ULIDs, hashes).
KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"


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


class KeyReusedError(Exception):
    """The key was first used for a different request."""


class KeyInFlightError(Exception):
    """The key's first request has not finished within the wait."""


def first_outcome(
    *,
    session: Session,
    claim: IdempotencyClaim,
    record: IdempotencyKey,
    wait: float,
    lease: timedelta,
    poll: float = 0.05,
) -> IdempotencyKey:
    """The stored key once its first request has answered (its `status_code` is set).

    A first request that died mid-send never answers: once its lease has run out, its
    notification is in the workers' hands, and every repeat answers 202.
    """
    if record.fingerprint != claim.fingerprint:
        raise KeyReusedError
    deadline = time.monotonic() + wait
    while record.status_code is None and record.created_at + lease > utcnow():
        if time.monotonic() >= deadline:
            raise KeyInFlightError
        time.sleep(poll)
        fresh = crud.get_idempotency_key(session=session, record_id=record.id)
        if fresh is None:  # expired and purged meanwhile: nothing left to replay
            raise KeyInFlightError
        record = fresh
    if record.status_code is None:
        crud.settle_idempotency_key(session=session, record_id=record.id, status_code=202)
        fresh = crud.get_idempotency_key(session=session, record_id=record.id)
        if fresh is None:
            raise KeyInFlightError
        record = fresh
    return record
