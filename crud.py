"""Reading and writing notifications; each write function is one committed unit of work."""

import hashlib
import hmac
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import (
    CursorResult,
    Select,
    Table,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    inspect,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy import text as sql  # `text` is also a column name
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from db import DATABASE_UNAVAILABLE
from models import (
    ApiKey,
    AttemptOutcome,
    Batch,
    Channel,
    DeliveryAttempt,
    IdempotencyKey,
    Notification,
    NotificationStatus,
    Recipient,
    UTCDateTime,
    utcnow,
)
from schemas import HistoryCursor, HistoryQuery, RecipientCreate, RecipientUpdate

# A taken-over send's first attempt: its sender stopped before telling how it went.
ABANDONED_ERROR = (
    "the sender stopped before recording an outcome (its lease ran out); "
    "the message may have been delivered"
)
# Do not compare a conditional UPDATE's WHERE with the objects in the session: it would
# change an object even when the row did not match (and the row is what counts).
NO_SYNC = {"synchronize_session": False}


def request_holder() -> str:
    """A lease holder name for one synchronous send inside an API request."""
    return f"api:{uuid.uuid4().hex}"


def text_hmac(key: bytes, text: str) -> str:
    """Keyed evidence of a text: without the key, trying every six-digit code finds nothing."""
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def erased(text: str, key: bytes) -> dict[str, Any]:
    """The column values that erase a sensitive text, keeping its length and HMAC."""
    return {"text": "", "text_length": len(text), "text_hmac": text_hmac(key, text)}


@dataclass(frozen=True)
class Outcome:
    """One attempt's result, and the state it leaves its notification in, ready to store.

    `outcome` None stores no attempt (a settlement after attempts already stored);
    `status` None leaves the notification sending (a quick retry follows).
    """

    notification_id: int
    holder: str
    finished_at: datetime
    outcome: AttemptOutcome | None = None
    started_at: datetime | None = None
    # The attempt's channel, and what its provider answered.
    channel: Channel = Channel.EMAIL
    code: int | None = None
    error: str | None = None
    provider_message_id: str | None = None
    segments: int | None = None
    cost: Decimal | None = None
    status: NotificationStatus | None = None
    next_attempt_at: datetime | None = None
    # The columns that erase a sensitive text once the notification is settled.
    erase: dict[str, Any] = field(default_factory=dict)
    # Which attempt this is: the pending row it fills (a worker's batch), or its number
    # on the notification (a synchronous send, which writes no pending row). A write made
    # again (its first commit's answer was lost) finds its attempt stored and adds nothing.
    attempt_id: int | None = None
    number: int | None = None
    # A fallback: the position in the order, the channel and the address it moves on to.
    next_step: tuple[int, Channel, str] | None = None
    # `status` sending: the lease goes on until then (a synchronous send falling back).
    lease_expires_at: datetime | None = None
    # The address refused the channel for good: remembered on the recipient.
    unreachable: bool = False

    def attempt_values(self) -> dict[str, Any]:
        """The attempt's columns."""
        return {
            "started_at": self.started_at or self.finished_at,
            "finished_at": self.finished_at,
            "channel": self.channel,
            "outcome": self.outcome,
            "code": self.code,
            "error": self.error,
            "provider_message_id": self.provider_message_id,
            "segments": self.segments,
            "cost": self.cost,
        }


@dataclass(frozen=True)
class Draft:
    """A notification to store: its channels in order, each with its address, and what
    to send on them."""

    route: Sequence[tuple[Channel, str]]
    text: str
    subject: str | None = None
    sensitive: bool = False
    send_at: datetime | None = None
    parse_mode: str | None = None
    recipient_id: int | None = None
    # Channels of the order left out, and why.
    skipped: Sequence[dict[str, str]] = ()

    def columns(self) -> dict[str, Any]:
        """The notification's columns that say what to send where."""
        channel, address = self.route[0]
        return {
            "channel": channel,
            "recipient": address,
            "route": [{"channel": str(c), "address": a} for c, a in self.route]
            if len(self.route) > 1
            else None,
            "skipped": list(self.skipped) or None,
            "recipient_id": self.recipient_id,
            "subject": self.subject,
            "text": self.text,
            "sensitive": self.sensitive,
            "parse_mode": self.parse_mode,
            "send_at": self.send_at,
        }


@dataclass(frozen=True)
class IdempotencyClaim:
    """An `Idempotency-Key` to store with what its request creates."""

    scope: str
    key: str
    fingerprint: str
    ttl: timedelta


class CommitUnconfirmed(Exception):
    """The database failed during the COMMIT of new rows: they may or may not be stored.

    `error` is the database's error; the rows are named by their notification id (one
    send, with the lease `holder` of a synchronous one) or their batch id.
    """

    def __init__(
        self,
        error: Exception,
        *,
        notification_id: int | None = None,
        holder: str | None = None,
        batch_id: int | None = None,
    ) -> None:
        self.what = f"notification {notification_id}" if batch_id is None else f"batch {batch_id}"
        super().__init__(f"{self.what}: commit unconfirmed")
        self.error = error
        self.notification_id = notification_id
        self.holder = holder
        self.batch_id = batch_id


UNCONFIRMED_ERROR = (
    "not sent: the database failed while the request was being stored, and the request "
    "was answered 503"
)


def _commit_new(session: Session, **names: Any) -> None:
    """Commit new rows, or raise `CommitUnconfirmed` naming them."""
    try:
        session.commit()
    except DATABASE_UNAVAILABLE as exc:
        raise CommitUnconfirmed(exc, **names) from exc


def withdraw_unconfirmed(
    session: Session, *, unconfirmed: CommitUnconfirmed, erase: dict[str, Any]
) -> int:
    """Fail, unattempted, what a request answered 503 may have stored (its commit's
    answer was lost), so that nothing is sent that its caller was told was not; rows a
    worker has claimed meanwhile are left to it. How many rows were failed."""
    if unconfirmed.batch_id is not None:
        target = Notification.batch_id == unconfirmed.batch_id
    else:
        target = Notification.id == unconfirmed.notification_id
    unsent = or_(
        Notification.status == NotificationStatus.QUEUED,
        and_(
            Notification.status == NotificationStatus.SENDING,
            Notification.leased_by == unconfirmed.holder,
        ),
    )
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(Notification)
        .where(target, unsent, Notification.attempts == 0)
        .values(
            status=NotificationStatus.FAILED,
            error_message=UNCONFIRMED_ERROR,
            next_attempt_at=None,
            leased_by=None,
            lease_expires_at=None,
            updated_at=utcnow(),
            version=Notification.version + 1,
            **erase,
        ),
        execution_options=NO_SYNC,
    )
    # A retry with the same Idempotency-Key is a new request: its first was answered 503.
    if unconfirmed.batch_id is not None:
        session.execute(
            delete(IdempotencyKey).where(IdempotencyKey.batch_id == unconfirmed.batch_id)
        )
    else:
        session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.notification_id == unconfirmed.notification_id
            )
        )
    session.commit()
    return result.rowcount


class IdempotencyKeyUsed(Exception):
    """The key is already stored (and unexpired); `record` is its first request's."""

    def __init__(self, record: IdempotencyKey) -> None:
        super().__init__(f"idempotency key {record.key!r} already used")
        self.record = record


def _dialect(session: Session) -> Any:
    """The dialect module whose insert() has ON CONFLICT: PostgreSQL's, or SQLite's."""
    return postgresql if session.get_bind().dialect.name == "postgresql" else sqlite


def _claim_key(session: Session, claim: IdempotencyClaim, now: datetime) -> int:
    """Insert the key in the open transaction, or raise `IdempotencyKeyUsed`.

    INSERT … ON CONFLICT DO NOTHING on the unique (scope, key): a simultaneous request
    with the same key waits for this transaction and then finds the key taken.
    """
    same_key = (IdempotencyKey.scope == claim.scope, IdempotencyKey.key == claim.key)
    dialect = _dialect(session)
    while True:
        # An expired key is free again.
        session.execute(delete(IdempotencyKey).where(*same_key, IdempotencyKey.expires_at <= now))
        key_id = session.scalar(
            dialect.insert(IdempotencyKey)
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


def create_notification(
    *,
    session: Session,
    draft: Draft,
    message_id: str | None,
    queued: bool,
    lease: timedelta,
    holder: str | None = None,
    idempotency: IdempotencyClaim | None = None,
) -> Notification:
    """Store a notification before any attempt: queued for a worker, or sending now under
    a lease held by `holder`.

    A notification sent now is leased to its request: if the process dies mid-send, a
    worker takes it over when the lease expires. With `idempotency`, the key is stored
    in the same transaction, or `IdempotencyKeyUsed` is raised and nothing is stored.
    """
    now = utcnow()
    key_id = _claim_key(session, idempotency, now) if idempotency else None
    notification = Notification(
        **draft.columns(),
        status=NotificationStatus.QUEUED if queued else NotificationStatus.SENDING,
        attempts=0,
        channel_attempts=0,
        route_position=0,
        message_id=message_id,
        next_attempt_at=(draft.send_at or now) if queued else None,
        leased_by=None if queued else holder or request_holder(),
        lease_expires_at=None if queued else now + lease,
        created_at=now,
        updated_at=now,
    )
    session.add(notification)
    session.flush()
    if key_id is not None:
        # A queued request's answer is known now; a synchronous one's after the send.
        status_code = 202 if queued else None
        _link_key(session, key_id, notification_id=notification.id, status_code=status_code)
    _commit_new(session, notification_id=notification.id, holder=notification.leased_by)
    # It has no attempts yet: a response can show them without a query.
    set_committed_value(notification, "delivery_attempts", [])
    return notification


def _link_key(session: Session, key_id: int, **values: Any) -> None:
    session.execute(
        update(IdempotencyKey).where(IdempotencyKey.id == key_id).values(**values),
        execution_options=NO_SYNC,
    )


def create_batch(
    *,
    session: Session,
    content: Draft,
    requested: int,
    emails: Sequence[str] = (),
    drafts: Sequence[Draft] = (),
    message_ids: Sequence[str],
    idempotency: IdempotencyClaim | None = None,
) -> Batch:
    """Store a batch and its queued notifications in one transaction: one e-mail to each
    of `emails`, or one notification per draft (each with its own order and addresses),
    all with the `content` (subject, text, sensitive, send_at) of `content`."""
    now = utcnow()
    key_id = _claim_key(session, idempotency, now) if idempotency else None
    batch = Batch(
        channel=drafts[0].route[0][0] if drafts else Channel.EMAIL,
        subject=content.subject,
        requested=requested,
        accepted=len(emails) + len(drafts),
        created_at=now,
    )
    session.add(batch)
    session.flush()
    shared = {
        "batch_id": batch.id,
        "subject": content.subject,
        "text": content.text,
        "sensitive": content.sensitive,
        "status": NotificationStatus.QUEUED.value,
        "send_at": content.send_at,
        "next_attempt_at": content.send_at or now,
    }
    if emails:
        _insert_batch_rows(
            session,
            emails,
            message_ids,
            {**shared, "channel": Channel.EMAIL.value, "now": now},
        )
    if drafts:
        # Each row has its own order and addresses: a plain executemany.
        session.execute(
            insert(cast(Table, Notification.__table__)),
            [
                {
                    **draft.columns(),
                    **shared,
                    "message_id": message_id,
                    "attempts": 0,
                    "channel_attempts": 0,
                    "route_position": 0,
                    "created_at": now,
                    "updated_at": now,
                    "version": 1,
                }
                for draft, message_id in zip(drafts, message_ids, strict=True)
            ],
        )
    if key_id is not None:
        _link_key(session, key_id, batch_id=batch.id, status_code=202)
    _commit_new(session, batch_id=batch.id)
    return batch


# A batch's rows in one statement: what they share is sent once, what differs as two arrays.
_INSERT_BATCH = sql(
    """
INSERT INTO notifications (
    batch_id, channel, recipient, subject, text, sensitive, status, attempts, message_id,
    send_at, next_attempt_at, created_at, updated_at, version
)
SELECT :batch_id, :channel, r.recipient, :subject, :text, :sensitive, :status, 0, r.message_id,
       :send_at, :next_attempt_at, :now, :now, 1
FROM unnest(CAST(:recipients AS varchar[]), CAST(:message_ids AS varchar[]))
    AS r(recipient, message_id)
"""
).bindparams(
    bindparam("send_at", type_=UTCDateTime()),
    bindparam("next_attempt_at", type_=UTCDateTime()),
    bindparam("now", type_=UTCDateTime()),
)


def _insert_batch_rows(
    session: Session, recipients: Sequence[str], message_ids: Sequence[str], shared: dict[str, Any]
) -> None:
    """Insert one queued notification per recipient: one `INSERT … SELECT FROM unnest` on
    PostgreSQL, a Core executemany elsewhere (SQLite: local, no round trips to save)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            _INSERT_BATCH,
            {**shared, "recipients": list(recipients), "message_ids": list(message_ids)},
        )
        return
    now = shared.pop("now")
    session.execute(
        insert(cast(Table, Notification.__table__)),
        [
            {
                **shared,
                "recipient": recipient,
                "message_id": message_id,
                "attempts": 0,
                "created_at": now,
                "updated_at": now,
                "version": 1,
            }
            for recipient, message_id in zip(recipients, message_ids, strict=True)
        ],
    )


def raise_if_key_used(*, session: Session, claim: IdempotencyClaim | None) -> None:
    """Raise `IdempotencyKeyUsed` if the claim's key is stored and unexpired."""
    if claim is None:
        return
    record = session.scalars(
        select(IdempotencyKey).where(
            IdempotencyKey.scope == claim.scope,
            IdempotencyKey.key == claim.key,
            IdempotencyKey.expires_at > utcnow(),
        )
    ).one_or_none()
    session.commit()
    if record is not None:
        raise IdempotencyKeyUsed(record)


def finish_idempotency_key(*, session: Session, claim: IdempotencyClaim, status_code: int) -> None:
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


def settle_idempotency_key(*, session: Session, record_id: int, status_code: int) -> None:
    """Fix the answer of a key whose first request died before answering."""
    session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.id == record_id, IdempotencyKey.status_code.is_(None))
        .values(status_code=status_code),
        execution_options=NO_SYNC,
    )
    session.commit()


def get_idempotency_key(*, session: Session, record_id: int) -> IdempotencyKey | None:
    """A fresh read of a stored key (no connection is held afterwards)."""
    record = session.scalars(
        select(IdempotencyKey)
        .where(IdempotencyKey.id == record_id)
        .execution_options(populate_existing=True)
    ).one_or_none()
    session.commit()
    return record


def purge_expired_idempotency_keys(*, session: Session, limit: int = 1000) -> int:
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


def get_batch(*, session: Session, batch_id: int) -> Batch | None:
    return session.get(Batch, batch_id)


def count_batch(*, session: Session, batch_id: int) -> dict[NotificationStatus, int]:
    """The batch's notifications per status, every status present."""
    counts = dict.fromkeys(NotificationStatus, 0)
    rows = session.execute(
        select(Notification.status, func.count())
        .where(Notification.batch_id == batch_id)
        .group_by(Notification.status)
    )
    for notification_status, count in rows:
        counts[notification_status] = count
    return counts


def record_outcome(*, session: Session, outcome: Outcome) -> int | None:
    """Store an attempt (numbered `outcome.number`) and the state it leaves its
    notification in, in one commit.

    The state changes only while `outcome.holder` still holds the lease; the attempt is
    stored either way, since it happened, and only once: made again after a commit whose
    answer was lost, the write finds its attempt stored and counts nothing twice. The
    notification's attempt count, or None when the lease is not held any more (another
    sender took the notification over, or the first commit already released it).
    """
    values = _state_after(outcome)
    number = outcome.number
    if outcome.outcome is not None:
        assert number is not None, "a synchronous attempt is numbered"
        counted = Notification.attempts >= number
        values["attempts"] = case((counted, Notification.attempts), else_=number)
        values.setdefault(
            "channel_attempts", Notification.channel_attempts + case((counted, 0), else_=1)
        )
    held = session.execute(
        update(Notification)
        .where(*_held(outcome))
        .values(**values, version=Notification.version + 1)
        .returning(Notification.attempts),
        execution_options=NO_SYNC,
    ).first()
    attempt = outcome.attempt_values()
    stored = False
    if held is not None and number is not None:
        stored = (
            session.scalar(
                _dialect(session)
                .insert(DeliveryAttempt)
                .values(notification_id=outcome.notification_id, number=number, **attempt)
                .on_conflict_do_nothing(index_elements=["notification_id", "number"])
                .returning(DeliveryAttempt.id)
            )
            is not None
        )
    elif number is not None:
        # Too late for the state, but the attempt is history all the same.
        stored = _record_late_attempt(session, outcome.notification_id, number, attempt)
    if stored:
        _remember_unreachable(session, [outcome])
    session.commit()
    return held[0] if held is not None else None


def _held(outcome: Outcome) -> tuple[Any, ...]:
    """The condition that `outcome`'s notification is still sending under its holder."""
    return (
        Notification.id == outcome.notification_id,
        Notification.status == NotificationStatus.SENDING,
        Notification.leased_by == outcome.holder,
    )


def _record_late_attempt(
    session: Session, notification_id: int, number: int, attempt: dict[str, Any]
) -> bool:
    """Store attempt `number` of a notification its sender no longer holds; whether it
    was stored now (False: its first commit, whose answer was lost, stored it)."""
    same = (DeliveryAttempt.notification_id == notification_id, DeliveryAttempt.number == number)
    # The takeover recorded it as abandoned: now its outcome is known.
    filled = session.scalar(
        update(DeliveryAttempt)
        .where(*same, DeliveryAttempt.outcome == AttemptOutcome.ABANDONED)
        .values(**attempt)
        .returning(DeliveryAttempt.id),
        execution_options=NO_SYNC,
    )
    if filled is not None:
        return True
    if session.scalar(select(DeliveryAttempt.id).where(*same)) is not None:
        return False
    # No trace of it at all: a new attempt at the end of the history.
    last = session.scalar(
        update(Notification)
        .where(Notification.id == notification_id)
        .values(attempts=Notification.attempts + 1)
        .returning(Notification.attempts),
        execution_options=NO_SYNC,
    )
    if last is None:  # the notification was deleted meanwhile
        return False
    session.execute(
        insert(DeliveryAttempt).values(notification_id=notification_id, number=last, **attempt)
    )
    return True


def _state_after(outcome: Outcome) -> dict[str, Any]:
    """The notification's columns as `outcome` leaves them (but its attempt count)."""
    values: dict[str, Any] = {"updated_at": outcome.finished_at}
    if outcome.outcome is not None:
        values["error_message"] = outcome.error
    if outcome.status is not None:
        values |= {
            "status": outcome.status,
            "next_attempt_at": outcome.next_attempt_at,
            "leased_by": None,
            "lease_expires_at": None,
            **outcome.erase,
        }
        if outcome.status == NotificationStatus.SENDING:
            # A synchronous send going on to its next channel keeps its lease.
            values.pop("leased_by")
            values["lease_expires_at"] = outcome.lease_expires_at
        if outcome.status == NotificationStatus.SENT:
            values["sent_at"] = outcome.finished_at
    if outcome.next_step is not None:
        position, channel, address = outcome.next_step
        values |= {
            "route_position": position,
            "channel": channel,
            "recipient": address,
            "channel_attempts": 0,
        }
    return values


def apply_outcome(notification: Notification, outcome: Outcome, number: int) -> None:
    """Show a stored outcome on the in-memory notification, as committed (no query)."""
    changes: dict[str, Any] = {}
    if outcome.outcome is not None:
        changes["attempts"] = number
        changes["channel_attempts"] = notification.channel_attempts + 1
        if "delivery_attempts" not in inspect(notification).unloaded:
            attempt = DeliveryAttempt(
                notification_id=outcome.notification_id,
                number=number,
                **outcome.attempt_values(),
            )
            changes["delivery_attempts"] = [*notification.delivery_attempts, attempt]
    changes |= _state_after(outcome)
    changes["version"] = notification.version + 1
    for name, value in changes.items():
        set_committed_value(notification, name, value)


@dataclass(frozen=True)
class Leased:
    """A notification claimed by a worker, and the pending attempt written for it."""

    notification: Notification
    attempt_id: int


def claim_due(
    *,
    session: Session,
    worker_id: str,
    lease: timedelta,
    limit: int,
    now: Callable[[], datetime] = utcnow,
) -> list[Leased]:
    """Lease up to `limit` due notifications to `worker_id`, oldest due first, and write
    a pending attempt for each, in one transaction; due and leased by the clock `now`.

    Due: queued with `next_attempt_at` passed, or sending under an expired lease (its
    sender died). A taken-over send's lost attempt becomes `abandoned`: its sender's
    pending attempt, or (a synchronous send keeps none) a new one. Rows locked by another
    claimer are skipped, and the UPDATE checks again that each row is due, so no two
    workers get the same notification (on SQLite, which has no row locks, the UPDATE's
    check is what decides).
    """
    at = now()
    taken_over = and_(
        Notification.status == NotificationStatus.SENDING, Notification.lease_expires_at < at
    )
    is_due = or_(
        and_(Notification.status == NotificationStatus.QUEUED, Notification.next_attempt_at <= at),
        taken_over,
    )
    due = session.execute(
        select(Notification.id, Notification.status, Notification.updated_at)
        .where(is_due)
        # A taken-over send has no next_attempt_at: it is due since its lease ran out.
        .order_by(func.coalesce(Notification.next_attempt_at, Notification.lease_expires_at))
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if not due:
        session.commit()
        return []
    has_pending = (
        select(DeliveryAttempt.id)
        .where(
            DeliveryAttempt.notification_id == Notification.id,
            DeliveryAttempt.outcome == AttemptOutcome.PENDING,
        )
        .exists()
    )
    # A synchronous send taken over has no pending attempt: its lost attempt counts too.
    lost_sync = case(
        (and_(Notification.status == NotificationStatus.SENDING, ~has_pending), 1), else_=0
    )
    claimed = session.scalars(
        update(Notification)
        .where(Notification.id.in_([row.id for row in due]), is_due)
        .values(
            status=NotificationStatus.SENDING,
            leased_by=worker_id,
            lease_expires_at=at + lease,
            # This claim's attempt, plus the lost one of a synchronous send taken over.
            attempts=Notification.attempts + 1 + lost_sync,
            channel_attempts=Notification.channel_attempts + 1 + lost_sync,
            updated_at=at,
            version=Notification.version + 1,
        )
        .returning(Notification),
        # Objects of these rows already in the session show the claimed row, not their own.
        execution_options=NO_SYNC | {"populate_existing": True},
    ).all()
    claimed_ids = {n.id for n in claimed}
    lost = {
        row.id: row.updated_at
        for row in due
        if row.status == NotificationStatus.SENDING and row.id in claimed_ids
    }
    if lost:
        _abandon(session, claimed, lost, at)
    # On the table, not the entity: no ORM bulk machinery for rows nobody loads.
    attempts = cast(Table, DeliveryAttempt.__table__)
    attempt_ids = session.scalars(
        insert(attempts).returning(attempts.c.id, sort_by_parameter_order=True),
        [
            {
                "notification_id": n.id,
                "number": n.attempts,
                "started_at": at,
                "channel": n.channel,
                "outcome": AttemptOutcome.PENDING,
            }
            for n in claimed
        ],
    ).all()
    session.commit()
    leased = [Leased(n, a) for n, a in zip(claimed, attempt_ids, strict=True)]
    return sorted(
        leased, key=lambda item: (item.notification.next_attempt_at or at, item.notification.id)
    )


def _abandon(
    session: Session, claimed: Sequence[Notification], lost: dict[int, datetime], now: datetime
) -> None:
    """Record the attempts of taken-over sends as abandoned."""
    abandoned = {"finished_at": now, "outcome": AttemptOutcome.ABANDONED, "error": ABANDONED_ERROR}
    pending = set(
        session.scalars(
            update(DeliveryAttempt)
            .where(
                DeliveryAttempt.notification_id.in_(list(lost)),
                DeliveryAttempt.outcome == AttemptOutcome.PENDING,
            )
            .values(**abandoned)
            .returning(DeliveryAttempt.notification_id),
            execution_options=NO_SYNC,
        )
    )
    synchronous = [n for n in claimed if n.id in lost and n.id not in pending]
    if synchronous:
        session.execute(
            insert(DeliveryAttempt),
            [
                {
                    "notification_id": n.id,
                    # The number before this claim's.
                    "number": n.attempts - 1,
                    "started_at": lost[n.id],
                    "channel": n.channel,
                    **abandoned,
                }
                for n in synchronous
            ],
        )


def renew_leases(
    *,
    session: Session,
    worker_id: str,
    notification_ids: Sequence[int],
    lease: timedelta,
    now: Callable[[], datetime] = utcnow,
) -> set[int]:
    """Extend our lease on a batch's notifications to `lease` from `now()`; the ids still
    ours (the others were taken over: our lease on them had run out)."""
    kept = session.scalars(
        update(Notification)
        .where(
            Notification.id.in_(notification_ids),
            Notification.status == NotificationStatus.SENDING,
            Notification.leased_by == worker_id,
        )
        .values(lease_expires_at=now() + lease, version=Notification.version + 1)
        .returning(Notification.id),
        execution_options=NO_SYNC,
    ).all()
    session.commit()
    return set(kept)


def release(*, session: Session, worker_id: str, leased: Sequence[Leased]) -> int:
    """Give leased, unattempted notifications back to the queue (a worker stopping), with
    their pending attempts withdrawn; how many went back."""
    released = session.scalars(
        update(Notification)
        .where(
            Notification.id.in_([item.notification.id for item in leased]),
            Notification.status == NotificationStatus.SENDING,
            Notification.leased_by == worker_id,
        )
        .values(
            status=NotificationStatus.QUEUED,
            # A taken-over synchronous send has none: due at once.
            next_attempt_at=func.coalesce(Notification.next_attempt_at, utcnow()),
            leased_by=None,
            lease_expires_at=None,
            attempts=Notification.attempts - 1,
            channel_attempts=Notification.channel_attempts - 1,
            version=Notification.version + 1,
        )
        .returning(Notification.id),
        execution_options=NO_SYNC,
    ).all()
    if released:
        back = set(released)
        session.execute(
            delete(DeliveryAttempt).where(
                DeliveryAttempt.id.in_(
                    [item.attempt_id for item in leased if item.notification.id in back]
                ),
                DeliveryAttempt.outcome == AttemptOutcome.PENDING,
            )
        )
    session.commit()
    return len(released)


# One statement for a whole batch: each row's outcome fills its pending attempt (or the
# one a takeover marked abandoned; never one already settled, so a batch stored again after
# a commit whose answer was lost changes nothing), and its notification's state changes
# only while this worker still holds it. Each id, whether its state was settled, and
# whether its attempt was filled now.
_SETTLE_BATCH = sql(
    """
WITH v AS (
    SELECT * FROM unnest(
        CAST(:ids AS bigint[]), CAST(:holders AS varchar[]), CAST(:statuses AS varchar[]),
        CAST(:next_attempts AS timestamptz[]), CAST(:errors AS text[]),
        CAST(:finished AS timestamptz[]), CAST(:sent_at AS timestamptz[]),
        CAST(:text_lengths AS integer[]), CAST(:text_hmacs AS varchar[]),
        CAST(:attempt_ids AS bigint[]), CAST(:outcomes AS varchar[]),
        CAST(:started AS timestamptz[]), CAST(:codes AS integer[]),
        CAST(:provider_ids AS varchar[]), CAST(:segments AS integer[]),
        CAST(:costs AS numeric[]), CAST(:next_positions AS integer[]),
        CAST(:next_channels AS varchar[]), CAST(:next_addresses AS varchar[])
    ) AS v(id, holder, status, next_attempt_at, error, finished_at, sent_at, text_length,
           text_hmac, attempt_id, outcome, started_at, code, provider_message_id, segments,
           cost, next_position, next_channel, next_address)
), settled AS (
    UPDATE notifications AS n SET
        status = v.status,
        next_attempt_at = v.next_attempt_at,
        error_message = v.error,
        sent_at = COALESCE(v.sent_at, n.sent_at),
        updated_at = v.finished_at,
        leased_by = NULL,
        lease_expires_at = NULL,
        text = CASE WHEN v.text_hmac IS NULL THEN n.text ELSE '' END,
        text_length = COALESCE(v.text_length, n.text_length),
        text_hmac = COALESCE(v.text_hmac, n.text_hmac),
        route_position = COALESCE(v.next_position, n.route_position),
        channel = COALESCE(v.next_channel, n.channel),
        recipient = COALESCE(v.next_address, n.recipient),
        channel_attempts = CASE WHEN v.next_position IS NULL THEN n.channel_attempts ELSE 0 END,
        version = n.version + 1
    FROM v
    WHERE n.id = v.id AND n.status = 'sending' AND n.leased_by = v.holder
    RETURNING n.id
), recorded AS (
    UPDATE delivery_attempts AS a SET
        outcome = v.outcome,
        started_at = v.started_at,
        finished_at = v.finished_at,
        code = v.code,
        error = v.error,
        provider_message_id = v.provider_message_id,
        segments = v.segments,
        cost = v.cost
    FROM v
    WHERE a.id = v.attempt_id AND a.outcome IN ('pending', 'abandoned')
    RETURNING a.notification_id
)
SELECT v.id, v.id IN (SELECT id FROM settled), v.id IN (SELECT notification_id FROM recorded)
FROM v
"""
)


def settle_batch(*, session: Session, outcomes: Sequence[Outcome]) -> set[int]:
    """Store a batch's outcomes in one commit: each fills its pending attempt, and leaves
    its notification settled (sent, queued for a retry, or failed) while its holder still
    holds it. The ids whose state was stored; the others were taken over, and only their
    attempt is stored (it happened all the same), or were stored already (a commit whose
    answer was lost), and nothing is stored again."""
    if not outcomes:
        return set()
    if session.get_bind().dialect.name == "postgresql":
        rows = [tuple(row) for row in session.execute(_SETTLE_BATCH, _settle_columns(outcomes))]
    else:
        rows = [(o.notification_id, *_settle_one(session, o)) for o in outcomes]
    recorded = {notification_id for notification_id, _, filled in rows if filled}
    _remember_unreachable(session, [o for o in outcomes if o.notification_id in recorded])
    session.commit()
    return {notification_id for notification_id, held, _ in rows if held}


def _settle_columns(outcomes: Sequence[Outcome]) -> dict[str, list[Any]]:
    """The batch's outcomes as one array per column, for `_SETTLE_BATCH`."""
    for o in outcomes:
        assert o.status is not None and o.attempt_id is not None, "a batch outcome is final"
    return {
        "ids": [o.notification_id for o in outcomes],
        "holders": [o.holder for o in outcomes],
        "statuses": [str(o.status) for o in outcomes],
        "next_attempts": [o.next_attempt_at for o in outcomes],
        "errors": [o.error for o in outcomes],
        "finished": [o.finished_at for o in outcomes],
        "sent_at": [
            o.finished_at if o.status == NotificationStatus.SENT else None for o in outcomes
        ],
        "text_lengths": [o.erase.get("text_length") for o in outcomes],
        "text_hmacs": [o.erase.get("text_hmac") for o in outcomes],
        "attempt_ids": [o.attempt_id for o in outcomes],
        "outcomes": [str(o.outcome) for o in outcomes],
        "started": [o.started_at or o.finished_at for o in outcomes],
        "codes": [o.code for o in outcomes],
        "provider_ids": [o.provider_message_id for o in outcomes],
        "segments": [o.segments for o in outcomes],
        "costs": [o.cost for o in outcomes],
        "next_positions": [o.next_step[0] if o.next_step else None for o in outcomes],
        "next_channels": [str(o.next_step[1]) if o.next_step else None for o in outcomes],
        "next_addresses": [o.next_step[2] if o.next_step else None for o in outcomes],
    }


def _settle_one(session: Session, outcome: Outcome) -> tuple[bool, bool]:
    """`settle_batch` for one outcome, in the open transaction (SQLite: local, no round
    trips to save). Whether the notification's state was stored, and its attempt."""
    held = session.execute(
        update(Notification)
        .where(*_held(outcome))
        .values(**_state_after(outcome), version=Notification.version + 1)
        .returning(Notification.id),
        execution_options=NO_SYNC,
    ).first()
    filled = session.execute(
        update(DeliveryAttempt)
        .where(
            DeliveryAttempt.id == outcome.attempt_id,
            DeliveryAttempt.outcome.in_([AttemptOutcome.PENDING, AttemptOutcome.ABANDONED]),
        )
        .values(outcome.attempt_values())
        .returning(DeliveryAttempt.id),
        execution_options=NO_SYNC,
    ).first()
    return held is not None, filled is not None


def _remember_unreachable(session: Session, outcomes: Sequence[Outcome]) -> None:
    """Note on their recipients the channels that refused them for good (a blocked bot),
    so later sends skip those channels until the recipient is updated."""
    refused = {o.notification_id: o for o in outcomes if o.unreachable}
    if not refused:
        return
    owners = session.execute(
        select(
            Notification.id, Notification.recipient_id, Notification.route, Notification.recipient
        ).where(Notification.id.in_(list(refused)), Notification.recipient_id.is_not(None))
    ).all()
    recipients = {
        r.id: r
        for r in session.scalars(
            select(Recipient)
            .where(Recipient.id.in_([owner.recipient_id for owner in owners]))
            .with_for_update()
        )
    }
    for notification_id, recipient_id, route, current in owners:
        outcome = refused[notification_id]
        recipient = recipients.get(cast(int, recipient_id))
        steps = route or [{"channel": outcome.channel, "address": current}]
        address = next((s["address"] for s in steps if s["channel"] == outcome.channel), None)
        if recipient is None or recipient.address(outcome.channel) != address:
            # Deleted, or given a new address since the send: that one may work.
            continue
        recipient.unreachable = {
            **(recipient.unreachable or {}),
            str(outcome.channel): outcome.error or "unreachable",
        }
    session.flush()


def cancel(*, session: Session, notification: Notification, key: bytes) -> bool:
    """Cancel a queued notification; False if it is no longer queued, with `notification`
    then showing the state it is really in."""
    values: dict[str, Any] = {
        "status": NotificationStatus.CANCELLED,
        "next_attempt_at": None,
        "updated_at": utcnow(),
    }
    if notification.sensitive:
        values |= erased(notification.text, key)
    return _change_if(
        session,
        notification,
        Notification.status == NotificationStatus.QUEUED,
        values,
    )


def claim_for_resend(
    *, session: Session, notification: Notification, lease: timedelta, queued: bool = False
) -> bool:
    """Move a failed notification back to sending under a lease held by this request, or
    to the queue; False if it is not failed (any more) or its sensitive text is erased."""
    if notification.text_hmac is not None:
        return False
    now = utcnow()
    # A resend has the retries of a new notification, from the first channel of its order.
    values: dict[str, Any] = {"updated_at": now, "route_position": 0, "channel_attempts": 0}
    first = notification.step(0)
    if first is not None:
        values |= {"channel": first[0], "recipient": first[1]}
    if queued:
        values |= {"status": NotificationStatus.QUEUED, "next_attempt_at": now}
    else:
        values |= {
            "status": NotificationStatus.SENDING,
            "leased_by": request_holder(),
            "lease_expires_at": now + lease,
        }
    # Conditional, so two simultaneous resends cannot both win.
    return _change_if(
        session, notification, Notification.status == NotificationStatus.FAILED, values
    )


def _change_if(
    session: Session, notification: Notification, condition: Any, values: dict[str, Any]
) -> bool:
    """UPDATE the notification's row if `condition` holds, and commit. The object shows
    the change only if the row changed; otherwise it is reloaded to show the row as is."""
    version = session.scalar(
        update(Notification)
        .where(Notification.id == notification.id, condition)
        .values(**values, version=Notification.version + 1)
        .returning(Notification.version),
        execution_options=NO_SYNC,
    )
    session.commit()
    if version is None:
        session.refresh(notification)
        return False
    for name, value in (values | {"version": version}).items():
        set_committed_value(notification, name, value)
    return True


def get_notification(*, session: Session, notification_id: int) -> Notification | None:
    """One notification with its attempts, or None."""
    return session.get(
        Notification, notification_id, options=[selectinload(Notification.delivery_attempts)]
    )


def list_notifications(
    *, session: Session, query: HistoryQuery
) -> tuple[list[Notification], HistoryCursor | None]:
    """A page of history, newest first, and the cursor of the next page if there is one."""
    # One indexed, ordered scan per stored form of `recipient` (digits may be a phone number
    # and a chat id alike), merged here: an IN list could not be read from the index in order.
    forms: list[str | None] = [*query.recipient_forms] or [None]
    rows: list[Notification] = []
    for form in forms:
        rows += session.scalars(_history_page(query, form))
    if len(forms) > 1:
        rows.sort(key=lambda n: (n.created_at, n.id), reverse=True)
    page = rows[: query.limit]
    if len(rows) <= query.limit:
        return page, None
    last = page[-1]
    return page, HistoryCursor(created_at=last.created_at, id=last.id)


def _history_page(query: HistoryQuery, recipient: str | None) -> Select[Notification]:
    """The query for one page of history (one row more, to know if another page follows)."""
    statement = select(Notification)
    if recipient is not None:
        statement = statement.where(Notification.recipient == recipient)
    if query.status is not None:
        statement = statement.where(Notification.status == query.status)
    if query.channel is not None:
        statement = statement.where(Notification.channel == query.channel)
    if query.batch_id is not None:
        statement = statement.where(Notification.batch_id == query.batch_id)
    if query.created_from is not None:
        statement = statement.where(Notification.created_at >= query.created_from)
    if query.created_to is not None:
        statement = statement.where(Notification.created_at < query.created_to)
    if (position := query.position) is not None:
        statement = statement.where(
            tuple_(Notification.created_at, Notification.id) < (position.created_at, position.id)
        )
    statement = statement.order_by(Notification.created_at.desc(), Notification.id.desc())
    return statement.limit(query.limit + 1)


def create_api_key(
    *,
    session: Session,
    name: str,
    key_hash: str,
    prefix: str,
    scopes: Sequence[str],
    requests_per_minute: int | None = None,
    recipient_hourly_limit: int | None = None,
) -> ApiKey:
    """Store a new key (its hash); IntegrityError if the name is taken."""
    api_key = ApiKey(
        name=name,
        key_hash=key_hash,
        prefix=prefix,
        scopes=" ".join(scopes),
        requests_per_minute=requests_per_minute,
        recipient_hourly_limit=recipient_hourly_limit,
        created_at=utcnow(),
    )
    session.add(api_key)
    session.commit()
    return api_key


def find_api_key(*, session: Session, key_hash: str) -> ApiKey | None:
    """The unrevoked key with this hash, or None."""
    return session.scalars(
        select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
    ).one_or_none()


def api_key_touch_due(api_key: ApiKey, *, every: timedelta) -> bool:
    """Whether the key's last use is older than `every` (not a write per request)."""
    return api_key.last_used_at is None or utcnow() - api_key.last_used_at >= every


def touch_api_key(*, session: Session, api_key: ApiKey) -> None:
    """Record that the key was used now."""
    now = utcnow()
    # By id: the record may have been read in another session.
    session.execute(
        update(ApiKey).where(ApiKey.id == api_key.id).values(last_used_at=now),
        execution_options=NO_SYNC,
    )
    session.commit()
    api_key.last_used_at = now


def list_api_keys(*, session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def get_api_key(*, session: Session, key_id: int) -> ApiKey | None:
    return session.get(ApiKey, key_id)


def get_api_key_by_name(*, session: Session, name: str) -> ApiKey | None:
    return session.scalars(select(ApiKey).where(ApiKey.name == name)).one_or_none()


def revoke_api_key(*, session: Session, api_key: ApiKey) -> ApiKey:
    """Revoke a key; it fails on its next request. Revoking twice changes nothing."""
    if api_key.revoked_at is None:
        api_key.revoked_at = utcnow()
        session.commit()
    return api_key


def replace_api_key_hash(*, session: Session, api_key: ApiKey, key_hash: str, prefix: str) -> None:
    """Point an existing key at a new secret (the bootstrap key changed) and un-revoke it."""
    api_key.key_hash = key_hash
    api_key.prefix = prefix
    api_key.revoked_at = None
    session.commit()


def upsert_recipient(*, session: Session, data: RecipientCreate) -> tuple[Recipient, bool]:
    """Store a recipient by its `external_id`, replacing what was stored (and forgetting
    the channels that refused it); the recipient, and whether it is new."""
    now = utcnow()
    values = {
        "email": data.email,
        "phone": data.phone,
        "telegram_chat_id": data.telegram_chat_id,
        "locale": data.locale,
        "channels": [str(c) for c in data.channels] if data.channels else None,
        "unreachable": None,
        "updated_at": now,
    }
    # INSERT … ON CONFLICT: two simultaneous upserts of one id cannot both insert.
    row = session.execute(
        _dialect(session)
        .insert(Recipient)
        .values(external_id=data.external_id, created_at=now, **values)
        .on_conflict_do_update(index_elements=["external_id"], set_=values)
        .returning(Recipient.id, Recipient.created_at)
    ).one()
    session.commit()
    recipient = session.get(Recipient, row.id, populate_existing=True)
    assert recipient is not None
    session.commit()
    return recipient, row.created_at == now


def get_recipient(*, session: Session, external_id: str) -> Recipient | None:
    return session.scalars(
        select(Recipient).where(Recipient.external_id == external_id)
    ).one_or_none()


def get_recipients(*, session: Session, external_ids: Sequence[str]) -> dict[str, Recipient]:
    """The stored recipients among `external_ids`, by external id."""
    found = session.scalars(select(Recipient).where(Recipient.external_id.in_(external_ids)))
    return {r.external_id: r for r in found}


def update_recipient(*, session: Session, recipient: Recipient, data: RecipientUpdate) -> Recipient:
    """Change the fields `data` sets (an explicit null clears one); the channels that
    refused the recipient are forgotten."""
    for name, value in data.model_dump(mode="json", exclude_unset=True).items():
        setattr(recipient, name, value)
    recipient.unreachable = None
    recipient.updated_at = utcnow()
    session.commit()
    return recipient


def delete_recipient(*, session: Session, recipient: Recipient) -> None:
    """Erase a recipient's contacts; its notifications stay in the history."""
    session.delete(recipient)
    session.commit()
