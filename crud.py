"""SQL: notifications and their attempts, batches, claims and leases, history,
recipients, suppressions and inbound reports, and API keys. Each write function is one
committed unit of work.

`apply_transitions` is the one writer of a notification's state: every change after
the INSERT that creates it (an attempt's outcome, a claim, a release, a cancel, a
resend, a withdrawal) is a `lifecycle.Transition` it makes where its guard holds. The
only other writes to a notification row are a lease's renewal (`renew_leases`) and the
count of an attempt stored after its lease was lost (`_record_late_attempt`); neither
changes its status.
"""

import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Select,
    String,
    Table,
    Text,
    TextualSelect,
    and_,
    bindparam,
    case,
    column,
    delete,
    func,
    insert,
    inspect,
    literal,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy import text as sql  # `text` is also a column name
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, make_transient_to_detached, selectinload
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.types import TypeEngine

import idempotency as idempotency_keys
import suppression
from db import DATABASE_UNAVAILABLE, NO_SYNC, dialect_insert
from idempotency import IdempotencyClaim
from lifecycle import (
    Draft,
    Guard,
    Refused,
    Transition,
    claimed,
    released,
    withdrawn,
)
from models import (
    ADDRESS_FIELDS,
    ApiKey,
    Attachment,
    AttachmentBlob,
    AttemptOutcome,
    Batch,
    Channel,
    DeliveryAttempt,
    InboundReport,
    Notification,
    NotificationAttachment,
    NotificationStatus,
    Recipient,
    ReportStatus,
    Suppression,
    Template,
    TemplateVersion,
    UTCDateTime,
    utcnow,
)
from schemas import (
    HistoryCursor,
    HistoryQuery,
    RecipientCreate,
    RecipientUpdate,
    SuppressionQuery,
)

# A taken-over send's first attempt: its sender stopped before telling how it went.
ABANDONED_ERROR = (
    "the sender stopped before recording an outcome (its lease ran out); "
    "the message may have been delivered"
)


def request_holder() -> str:
    """A lease holder name for one synchronous send inside an API request."""
    return f"api:{uuid.uuid4().hex}"


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
    session: Session,
    *,
    unconfirmed: CommitUnconfirmed,
    erase: dict[str, Any],
    now: Callable[[], datetime] = utcnow,
) -> int:
    """Fail, unattempted, what a request answered 503 may have stored (its commit's
    answer was lost), so that nothing is sent that its caller was told was not; rows a
    worker has claimed meanwhile are left to it. How many rows were failed."""
    if unconfirmed.batch_id is not None:
        ids = list(
            session.scalars(
                select(Notification.id).where(Notification.batch_id == unconfirmed.batch_id)
            )
        )
    else:
        assert unconfirmed.notification_id is not None
        ids = [unconfirmed.notification_id]
    at = now()
    applied = apply_transitions(
        session=session,
        transitions=[
            withdrawn(i, at=at, holder=unconfirmed.holder, erase=erase, reason=UNCONFIRMED_ERROR)
            for i in ids
        ],
        commit=False,
    )
    # A retry with the same Idempotency-Key is a new request: its first was answered 503.
    idempotency_keys.forget_keys_of(
        session, notification_id=unconfirmed.notification_id, batch_id=unconfirmed.batch_id
    )
    session.commit()
    return len(applied.held)


def change(*, session: Session, notification: Notification, transition: Transition) -> bool:
    """Make one transition (a cancel, a resend) and commit. The object shows the change
    only if the row changed; otherwise it is reloaded to show the row as is."""
    applied = apply_transitions(session=session, transitions=[transition], load=True)
    if notification.id not in applied.held:
        session.refresh(notification)
        return False
    return True


_INSERT_NOTIFICATION = insert(cast(Table, Notification.__table__)).returning(
    Notification.__table__.c.id, Notification.__table__.c.version
)
# Every column of a notification, None unless set.
_NO_VALUES = dict.fromkeys(
    c.key for c in inspect(Notification).column_attrs if c.key not in ("id", "version")
)


def _inserted(session: Session, values: dict[str, Any]) -> Notification:
    """Insert a notification with one Core INSERT … RETURNING on the session's connection
    (the unit of work's flush costs more than the statement), and make it the session's
    own object, as loaded: every column set, so none is read again."""
    row = session.connection().execute(_INSERT_NOTIFICATION, values).one()
    notification = Notification(**(_NO_VALUES | values), id=row.id, version=row.version)
    make_transient_to_detached(notification)
    session.add(notification)
    return notification


def create_notification(
    *,
    session: Session,
    draft: Draft,
    message_id: str | None,
    queued: bool,
    lease: timedelta,
    holder: str | None = None,
    idempotency: IdempotencyClaim | None = None,
    now: Callable[[], datetime] = utcnow,
    erase: Mapping[str, Any] | None = None,
) -> Notification:
    """Store a notification before any attempt: queued for a worker, or sending now under
    a lease held by `holder`; or, when the draft is `suppressed` on every channel, final
    as `suppressed` (a sensitive text `erase`d at once).

    A notification sent now is leased to its request: if the process dies mid-send, a
    worker takes it over when the lease expires. With `idempotency`, the key is stored
    in the same transaction, or `IdempotencyKeyUsed` is raised and nothing is stored.
    """
    at = now()
    key_id = idempotency_keys.claim_key(session, idempotency, at) if idempotency else None
    if draft.suppressed is not None:
        # Every channel is suppressed: final at once, nothing to send.
        queued = True
    values = {
        **draft.columns(),
        "status": NotificationStatus.QUEUED if queued else NotificationStatus.SENDING,
        "attempts": 0,
        "channel_attempts": 0,
        "route_position": 0,
        "message_id": message_id,
        "next_attempt_at": (draft.send_at or at) if queued else None,
        "leased_by": None if queued else holder or request_holder(),
        "lease_expires_at": None if queued else at + lease,
        "created_at": at,
        "updated_at": at,
    }
    if draft.suppressed is not None:
        values.update(
            status=NotificationStatus.SUPPRESSED,
            next_attempt_at=None,
            error_message=draft.suppressed,
            **(erase or {}),
        )
    notification = _inserted(session, values)
    _link_attachments(session, draft, notification_id=notification.id)
    if key_id is not None:
        # A queued request's answer is known now; a synchronous one's after the send.
        status_code = 202 if queued else None
        idempotency_keys.link_key(
            session, key_id, notification_id=notification.id, status_code=status_code
        )
    _commit_new(session, notification_id=notification.id, holder=notification.leased_by)
    # It has no attempts yet: a response can show them without a query.
    set_committed_value(notification, "delivery_attempts", [])
    return notification


def create_batch(
    *,
    session: Session,
    content: Draft,
    requested: int,
    emails: Sequence[str] = (),
    drafts: Sequence[Draft] = (),
    message_ids: Sequence[str],
    idempotency: IdempotencyClaim | None = None,
    now: Callable[[], datetime] = utcnow,
) -> Batch:
    """Store a batch and its queued notifications in one transaction: one e-mail to each
    of `emails`, or one notification per draft (each with its own order and addresses),
    all with the `content` (subject, text, sensitive, send_at) of `content`."""
    at = now()
    key_id = idempotency_keys.claim_key(session, idempotency, at) if idempotency else None
    batch = Batch(
        channel=drafts[0].route[0][0] if drafts else Channel.EMAIL,
        subject=content.subject,
        requested=requested,
        accepted=len(emails) + len(drafts),
        created_at=at,
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
        "next_attempt_at": content.send_at or at,
        "attachments": [dict(a) for a in content.attachments] or None,
        "category": str(content.category),
        "unsubscribe": content.unsubscribe,
    }
    if emails:
        _insert_batch_rows(
            session,
            emails,
            message_ids,
            {**shared, "channel": Channel.EMAIL.value, "now": at},
        )
    if drafts:
        # Each row has its own order and addresses, or its own rendering of a template.
        _insert_rows(
            session,
            [
                {
                    **shared,
                    **draft.columns(),
                    "message_id": message_id,
                    "attempts": 0,
                    "channel_attempts": 0,
                    "route_position": 0,
                    "created_at": at,
                    "updated_at": at,
                    "version": 1,
                }
                for draft, message_id in zip(drafts, message_ids, strict=True)
            ],
        )
    _link_attachments(session, content, batch_id=batch.id)
    if key_id is not None:
        idempotency_keys.link_key(session, key_id, batch_id=batch.id, status_code=202)
    _commit_new(session, batch_id=batch.id)
    return batch


# A batch's rows by the chunk: what they share is sent once, what differs as two arrays.
# 10,000 rows took 330 ms in chunks of 2,000 and 335 ms in one statement (median of 4).
BATCH_INSERT_ROWS = 2_000
_INSERT_BATCH = sql(
    """
INSERT INTO notifications (
    batch_id, channel, recipient, subject, text, sensitive, status, attempts, message_id,
    send_at, next_attempt_at, created_at, updated_at, version, attachments, category,
    unsubscribe
)
SELECT :batch_id, :channel, r.recipient, :subject, :text, :sensitive, :status, 0, r.message_id,
       :send_at, :next_attempt_at, :now, :now, 1, CAST(:attachments AS json), :category,
       :unsubscribe
FROM unnest(CAST(:recipients AS varchar[]), CAST(:message_ids AS varchar[]))
    AS r(recipient, message_id)
"""
).bindparams(
    bindparam("send_at", type_=UTCDateTime()),
    bindparam("next_attempt_at", type_=UTCDateTime()),
    bindparam("now", type_=UTCDateTime()),
    bindparam("attachments", type_=JSON(none_as_null=True)),
)


def _insert_rows(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Insert notification rows (each with the same keys). On PostgreSQL one `INSERT …
    SELECT FROM unnest`: a column with one value in every row is bound once, each other
    column as one array (an executemany of a templated bulk's rows took 9× as long);
    elsewhere a Core executemany."""
    table = cast(Table, Notification.__table__)
    if session.get_bind().dialect.name != "postgresql":
        session.execute(insert(table), list(rows))
        return
    first = rows[0]
    shared = [k for k in first if all(row[k] == first[k] for row in rows)]
    varying = [k for k in first if k not in shared]
    # Cast, each of them: PostgreSQL reads an untyped parameter in a SELECT list as text.
    arrays = [
        sql_cast(
            bindparam(f"many_{k}", [row[k] for row in rows], type_=_array_of(table.c[k].type)),
            _array_of(_cast_type(table.c[k])),
        )
        for k in varying
    ]
    unnested = func.unnest(*arrays).table_valued(*varying).render_derived()
    values = [
        sql_cast(bindparam(f"one_{k}", first[k], type_=table.c[k].type), _cast_type(table.c[k]))
        for k in shared
    ]
    session.execute(
        insert(table).from_select(
            [*shared, *varying], select(*values, *(unnested.c[k] for k in varying))
        )
    )


def _array_of(type_: TypeEngine[Any]) -> ARRAY[Any]:
    # One dimension: a JSON value that is a list (a route) is one item, not a sub-array.
    return ARRAY(type_, dimensions=1)


def _cast_type(column: Column[Any]) -> TypeEngine[Any]:
    # CAST(… AS VARCHAR(n)) would cut an over-long value; the column refuses it instead.
    return Text() if isinstance(column.type, String) else column.type


def _insert_batch_rows(
    session: Session, recipients: Sequence[str], message_ids: Sequence[str], shared: dict[str, Any]
) -> None:
    """Insert one queued notification per recipient: an `INSERT … SELECT FROM unnest` per
    `BATCH_INSERT_ROWS` of them on PostgreSQL (the statement of 20,000 at once is 8 MB of
    the process's peak memory, and no faster), a Core executemany elsewhere (SQLite:
    local, no round trips to save)."""
    if session.get_bind().dialect.name == "postgresql":
        for start in range(0, len(recipients), BATCH_INSERT_ROWS):
            end = start + BATCH_INSERT_ROWS
            session.execute(
                _INSERT_BATCH,
                {
                    **shared,
                    "recipients": list(recipients[start:end]),
                    "message_ids": list(message_ids[start:end]),
                },
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


@dataclass(frozen=True)
class Applied:
    """What `apply_transitions` stored: the notifications whose guard held (by id; loaded
    as they are now when asked to), and those whose attempt was stored by this write."""

    held: dict[int, Notification | None]
    recorded: set[int]


_TABLE = cast(Table, Notification.__table__)
_COLUMNS = list(_TABLE.c)
_COLUMN_NAMES = [c.name for c in _COLUMNS]

# Every transition of a list in one statement: what each row may leave (its guard) and
# what it becomes, one array per column. Each attempt fills its pending row (or the one a
# takeover marked abandoned; never one already settled, so a list stored again after a
# commit whose answer was lost changes nothing), or is inserted under its number where
# the guard held (ON CONFLICT: once). For each transition: whether its guard held, whether
# its attempt was stored now, and the row as it is now.
_APPLY = """
WITH v AS (
    SELECT * FROM unnest(
        CAST(:ids AS bigint[]), CAST(:guards AS varchar[]), CAST(:holders AS varchar[]),
        CAST(:ats AS timestamptz[]), CAST(:statuses AS varchar[]),
        CAST(:next_attempts AS timestamptz[]), CAST(:leased_bys AS varchar[]),
        CAST(:lease_ends AS timestamptz[]), CAST(:sets_errors AS boolean[]),
        CAST(:error_messages AS text[]), CAST(:text_lengths AS integer[]),
        CAST(:text_hmacs AS varchar[]), CAST(:next_positions AS integer[]),
        CAST(:next_channels AS varchar[]), CAST(:next_addresses AS varchar[]),
        CAST(:counted AS integer[]), CAST(:attempt_ids AS bigint[]),
        CAST(:numbers AS integer[]), CAST(:attempt_channels AS varchar[]),
        CAST(:outcomes AS varchar[]), CAST(:started AS timestamptz[]),
        CAST(:finished AS timestamptz[]), CAST(:codes AS integer[]),
        CAST(:errors AS text[]), CAST(:provider_ids AS varchar[]),
        CAST(:segments AS integer[]), CAST(:costs AS numeric[])
    ) AS v(id, guard, holder, at, status, next_attempt_at, leased_by, lease_expires_at,
           sets_error, error_message, text_length, text_hmac, next_position, next_channel,
           next_address, counted, attempt_id, number, attempt_channel, outcome, started_at,
           finished_at, code, error, provider_message_id, segments, cost)
), changed AS (
    UPDATE notifications AS n SET
        status = COALESCE(v.status, n.status),
        next_attempt_at = CASE WHEN v.status IS NULL THEN n.next_attempt_at
                               ELSE v.next_attempt_at END,
        leased_by = CASE WHEN v.status IS NULL THEN n.leased_by ELSE v.leased_by END,
        lease_expires_at = CASE WHEN v.status IS NULL THEN n.lease_expires_at
                                ELSE v.lease_expires_at END,
        error_message = CASE WHEN v.sets_error THEN v.error_message ELSE n.error_message END,
        sent_at = CASE WHEN v.status = 'sent' THEN v.at ELSE n.sent_at END,
        updated_at = v.at,
        text = CASE WHEN v.text_hmac IS NULL THEN n.text ELSE '' END,
        content = CASE WHEN v.text_hmac IS NULL THEN n.content ELSE NULL END,
        text_length = COALESCE(v.text_length, n.text_length),
        text_hmac = COALESCE(v.text_hmac, n.text_hmac),
        route_position = COALESCE(v.next_position, n.route_position),
        channel = COALESCE(v.next_channel, n.channel),
        recipient = COALESCE(v.next_address, n.recipient),
        attempts = CASE WHEN v.number IS NULL THEN n.attempts + v.counted
                        ELSE GREATEST(n.attempts, v.number) END,
        channel_attempts = CASE
            WHEN v.next_position IS NOT NULL THEN 0
            WHEN v.number IS NULL THEN n.channel_attempts + v.counted
            WHEN n.attempts >= v.number THEN n.channel_attempts
            ELSE n.channel_attempts + 1 END,
        version = n.version + 1
    FROM v
    WHERE n.id = v.id AND CASE v.guard
        WHEN 'held' THEN n.status = 'sending' AND n.leased_by IS NOT DISTINCT FROM v.holder
        WHEN 'queued' THEN n.status = 'queued'
        WHEN 'failed' THEN n.status = 'failed' AND n.text_hmac IS NULL
        WHEN 'due' THEN (n.status = 'queued' AND n.next_attempt_at <= v.at)
                     OR (n.status = 'sending' AND n.lease_expires_at < v.at)
        WHEN 'unsent' THEN n.attempts = 0 AND (n.status = 'queued'
                     OR (n.status = 'sending' AND n.leased_by IS NOT DISTINCT FROM v.holder))
        ELSE false END
    RETURNING {returning}
){attempts}
SELECT v.id, changed.id IS NOT NULL, {recorded}{columns}
FROM v LEFT JOIN changed ON changed.id = v.id
"""
# Where a list carries attempts: each fills its pending row, or is inserted.
_ATTEMPTS = """, filled AS (
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
), inserted AS (
    INSERT INTO delivery_attempts (notification_id, number, started_at, finished_at, channel,
                                   outcome, code, error, provider_message_id, segments, cost)
    SELECT v.id, v.number, v.started_at, v.finished_at, v.attempt_channel, v.outcome, v.code,
           v.error, v.provider_message_id, v.segments, v.cost
    FROM v JOIN changed ON changed.id = v.id
    WHERE v.number IS NOT NULL AND v.outcome IS NOT NULL
    ON CONFLICT (notification_id, number) DO NOTHING
    RETURNING notification_id
)"""
_RECORDED = (
    "v.id IN (SELECT notification_id FROM filled UNION ALL SELECT notification_id FROM inserted)"
)
_FLAGS = (column("transition_id", BigInteger), column("held", Boolean), column("recorded", Boolean))


def _apply_statement(*, shown: bool, attempts: bool) -> TextualSelect:
    """`_APPLY` returning the rows as stored (`shown`: for objects to show them) or only
    whether each held, with or without the attempts' part (a claim, a cancel has none)."""
    statement = _APPLY.format(
        returning="n.*" if shown else "n.id",
        attempts=_ATTEMPTS if attempts else "",
        recorded=_RECORDED if attempts else "false",
        columns="".join(f", changed.{c.name}" for c in _COLUMNS) if shown else "",
    )
    columns: list[ColumnElement[Any]] = [*_FLAGS, *(_COLUMNS if shown else ())]
    return sql(statement).columns(*columns)


_APPLY_STATEMENTS = {
    (shown, attempts): _apply_statement(shown=shown, attempts=attempts)
    for shown in (False, True)
    for attempts in (False, True)
}
# The shown ones as ORM statements, built once: SQLAlchemy memoizes a statement's cache
# key on the object, and a new one per call cost a walk of the whole statement.
_LOADING_STATEMENTS = {
    attempts: select(Notification, *_FLAGS).from_statement(_APPLY_STATEMENTS[True, attempts])
    for attempts in (False, True)
}


def apply_transitions(
    *,
    session: Session,
    transitions: Sequence[Transition],
    load: bool = False,
    commit: bool = True,
) -> Applied:
    """Make each transition where its guard holds, and store each attempt, in one commit
    (or in the open transaction: `commit` False): the one writer of a notification's state.

    On PostgreSQL one statement makes them all; SQLite (local, no round trips to save)
    takes them one by one. With `load`, the notifications whose guard held are loaded as
    stored (the session's own objects of them show the new state, their new attempt
    included). An attempt of a transition whose guard failed is stored all the same, since
    it happened: a worker's fills its pending row, a synchronous one is added to the
    history (or found there, stored by a commit whose answer was lost). An address that
    refused its channel for good is suppressed there. Each notification at
    most once in a list (one statement cannot change a row twice).
    """
    if not transitions:
        return Applied({}, set())
    assert len({t.notification_id for t in transitions}) == len(transitions), "one each"
    if session.get_bind().dialect.name == "postgresql":
        held, recorded = _apply_together(session, transitions, load)
    else:
        held, recorded = _apply_one_by_one(session, transitions, load)
    for t in transitions:
        attempt = t.attempt
        if (
            attempt is not None
            and attempt.number is not None
            and t.notification_id not in held
            and _record_late_attempt(session, t.notification_id, attempt.number, attempt.values())
        ):
            # Too late for the state, but the attempt is history all the same.
            recorded.add(t.notification_id)
    _suppress_refused(session, [t for t in transitions if t.notification_id in recorded])
    if commit:
        session.commit()
    if load:
        _show_attempts(held, transitions, recorded)
    return Applied(held, recorded)


def _apply_together(
    session: Session, transitions: Sequence[Transition], load: bool
) -> tuple[dict[int, Notification | None], set[int]]:
    """`_APPLY` for every transition in one statement; with `load`, through the ORM, so
    the identity map's objects of the rows show them as stored."""
    with_attempts = any(t.attempt is not None for t in transitions)
    statement = _APPLY_STATEMENTS[load, with_attempts]
    held: dict[int, Notification | None] = {}
    recorded: set[int] = set()
    parameters = _transition_columns(transitions)
    if load and all(_in_session(session, t.notification_id) for t in transitions):
        # The session has each object (a synchronous send's): the stored columns are set
        # on it as loaded, without the ORM's loading of rows (a fifth of such a send's CPU).
        for row in session.execute(_APPLY_STATEMENTS[True, with_attempts], parameters):
            if row.held:
                notification = _in_session(session, row.transition_id)
                assert notification is not None
                # By position: the columns follow the flags (`_apply_statement`).
                for name, value in zip(_COLUMN_NAMES, row[len(_FLAGS) :], strict=False):
                    set_committed_value(notification, name, value)
                held[row.transition_id] = notification
            if row.recorded:
                recorded.add(row.transition_id)
        return held, recorded
    if load:
        kept = _loaded_attempts(session, [t.notification_id for t in transitions])
        loaded = session.execute(
            _LOADING_STATEMENTS[with_attempts],
            parameters,
            execution_options={"populate_existing": True},
        )
        for notification, transition_id, was_held, was_recorded in loaded:
            if was_held:
                held[transition_id] = notification
            if was_recorded:
                recorded.add(transition_id)
        _keep_attempts(session, kept)
        return held, recorded
    for row in session.execute(statement, parameters):
        if row.held:
            held[row.transition_id] = None
        if row.recorded:
            recorded.add(row.transition_id)
    return held, recorded


def _transition_columns(transitions: Sequence[Transition]) -> dict[str, list[Any]]:
    """The transitions as one array per column, for `_APPLY`."""
    columns: dict[str, list[Any]] = {
        name: []
        for name in (
            "ids guards holders ats statuses next_attempts leased_bys lease_ends sets_errors "
            "error_messages text_lengths text_hmacs next_positions next_channels "
            "next_addresses counted attempt_ids numbers attempt_channels outcomes started "
            "finished codes errors provider_ids segments costs"
        ).split()
    }
    for t in transitions:
        sets_error, error_message = t.error_message
        step, attempt = t.step, t.attempt
        values = [
            t.notification_id,
            str(t.guard),
            t.holder,
            t.at,
            str(t.status) if t.status is not None else None,
            t.next_attempt_at,
            t.leased_by,
            t.lease_expires_at,
            sets_error,
            error_message,
            t.erase.get("text_length"),
            t.erase.get("text_hmac"),
            step.position if step else None,
            str(step.channel) if step else None,
            step.address if step else None,
            t.counted,
            attempt.attempt_id if attempt else None,
            attempt.number if attempt else None,
            str(attempt.channel) if attempt else None,
            str(attempt.outcome) if attempt else None,
            attempt.started_at if attempt else None,
            attempt.finished_at if attempt else None,
            attempt.code if attempt else None,
            attempt.error if attempt else None,
            attempt.provider_message_id if attempt else None,
            attempt.segments if attempt else None,
            attempt.cost if attempt else None,
        ]
        for values_of, value in zip(columns.values(), values, strict=True):
            values_of.append(value)
    return columns


def _guard(t: Transition) -> Any:
    """`t.guard` as a condition on its row (as `_APPLY` reads it)."""
    n = Notification
    status = n.status
    if t.guard == Guard.HELD:
        return and_(
            status == NotificationStatus.SENDING, n.leased_by.is_not_distinct_from(t.holder)
        )
    if t.guard == Guard.QUEUED:
        return status == NotificationStatus.QUEUED
    if t.guard == Guard.FAILED:
        return and_(status == NotificationStatus.FAILED, n.text_hmac.is_(None))
    if t.guard == Guard.DUE:
        return or_(
            and_(status == NotificationStatus.QUEUED, n.next_attempt_at <= t.at),
            and_(status == NotificationStatus.SENDING, n.lease_expires_at < t.at),
        )
    return and_(
        n.attempts == 0,
        or_(
            status == NotificationStatus.QUEUED,
            and_(status == NotificationStatus.SENDING, n.leased_by.is_not_distinct_from(t.holder)),
        ),
    )


def _values(t: Transition) -> dict[str, Any]:
    """The columns `t` sets (as `_APPLY` sets them)."""
    n = Notification
    values: dict[str, Any] = {"updated_at": t.at, "version": n.version + 1, **t.erase}
    if t.status is not None:
        values |= {
            "status": t.status,
            "next_attempt_at": t.next_attempt_at,
            "leased_by": t.leased_by,
            "lease_expires_at": t.lease_expires_at,
        }
        if t.status == NotificationStatus.SENT:
            values["sent_at"] = t.at
    sets_error, error_message = t.error_message
    if sets_error:
        values["error_message"] = error_message
    number = t.attempt.number if t.attempt is not None else None
    if number is not None:
        counted = n.attempts >= number
        values["attempts"] = case((counted, n.attempts), else_=number)
        values["channel_attempts"] = n.channel_attempts + case((counted, 0), else_=1)
    elif t.counted:
        values["attempts"] = n.attempts + t.counted
        values["channel_attempts"] = n.channel_attempts + t.counted
    if t.step is not None:
        values |= {
            "route_position": t.step.position,
            "channel": t.step.channel,
            "recipient": t.step.address,
            "channel_attempts": 0,
        }
    return values


def _apply_one_by_one(
    session: Session, transitions: Sequence[Transition], load: bool
) -> tuple[dict[int, Notification | None], set[int]]:
    """`_APPLY` one transition at a time, in the open transaction; with `load`, the rows
    that changed are read back through the ORM."""
    held: dict[int, Notification | None] = {}
    recorded: set[int] = set()
    attempts = cast(Table, DeliveryAttempt.__table__)
    for t in transitions:
        row = session.execute(
            update(_TABLE)
            .where(_TABLE.c.id == t.notification_id, _guard(t))
            .values(_values(t))
            .returning(_TABLE.c.id)
        ).first()
        if row is not None:
            held[t.notification_id] = None
        attempt = t.attempt
        if attempt is None:
            continue
        if attempt.attempt_id is not None:
            filled = session.execute(
                update(attempts)
                .where(
                    attempts.c.id == attempt.attempt_id,
                    attempts.c.outcome.in_([AttemptOutcome.PENDING, AttemptOutcome.ABANDONED]),
                )
                .values(attempt.values())
                .returning(attempts.c.id)
            ).first()
        elif row is not None and attempt.number is not None:
            filled = session.execute(
                dialect_insert(session, DeliveryAttempt)
                .values(
                    notification_id=t.notification_id, number=attempt.number, **attempt.values()
                )
                .on_conflict_do_nothing(index_elements=["notification_id", "number"])
                .returning(DeliveryAttempt.id)
            ).first()
        else:
            continue
        if filled is not None:
            recorded.add(t.notification_id)
    if load and held:
        kept = _loaded_attempts(session, list(held))
        loaded = session.scalars(
            select(Notification)
            .where(Notification.id.in_(list(held)))
            .execution_options(populate_existing=True)
        )
        held |= {n.id: n for n in loaded}
        _keep_attempts(session, kept)
    return held, recorded


def _in_session(session: Session, notification_id: int) -> Notification | None:
    """The session's own object of a notification, if it has one (no query)."""
    key = inspect(Notification).identity_key_from_primary_key((notification_id,))
    found: Notification | None = session.identity_map.get(key)
    return found


def _loaded_attempts(session: Session, ids: Sequence[int]) -> dict[int, list[DeliveryAttempt]]:
    """The attempts already loaded on the session's objects of `ids`: loading a row again
    (populate_existing) resets them, and a response must not query while it is written."""
    mapper = inspect(Notification)
    kept: dict[int, list[DeliveryAttempt]] = {}
    for notification_id in ids:
        key = mapper.identity_key_from_primary_key((notification_id,))
        notification = session.identity_map.get(key)
        if notification is not None and "delivery_attempts" not in inspect(notification).unloaded:
            kept[notification_id] = list(notification.delivery_attempts)
    return kept


def _keep_attempts(session: Session, kept: Mapping[int, list[DeliveryAttempt]]) -> None:
    """Give the objects back the attempts `_loaded_attempts` kept."""
    mapper = inspect(Notification)
    for notification_id, attempts in kept.items():
        notification = session.identity_map.get(
            mapper.identity_key_from_primary_key((notification_id,))
        )
        if notification is not None:
            set_committed_value(notification, "delivery_attempts", attempts)


def _show_attempts(
    held: Mapping[int, Notification | None],
    transitions: Sequence[Transition],
    recorded: set[int],
) -> None:
    """Add each attempt stored under its number to its loaded notification's attempts, as
    committed (no query)."""
    for t in transitions:
        notification = held.get(t.notification_id)
        attempt = t.attempt
        if (
            notification is None
            or attempt is None
            or attempt.number is None
            or t.notification_id not in recorded
            or "delivery_attempts" in inspect(notification).unloaded
        ):
            continue
        row = DeliveryAttempt(
            notification_id=notification.id, number=attempt.number, **attempt.values()
        )
        set_committed_value(
            notification, "delivery_attempts", [*notification.delivery_attempts, row]
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
        .values(attempts=Notification.attempts + 1, version=Notification.version + 1)
        .returning(Notification.attempts),
        execution_options=NO_SYNC,
    )
    if last is None:  # the notification was deleted meanwhile
        return False
    session.execute(
        insert(DeliveryAttempt).values(notification_id=notification_id, number=last, **attempt)
    )
    return True


def _suppress_refused(session: Session, transitions: Sequence[Transition]) -> None:
    """Suppress the addresses that refused their channel for good (a blocked bot, an SMS
    stop list, an unknown mailbox), so no later send tries them."""
    refused = {
        t.notification_id: t.attempt
        for t in transitions
        if t.attempt is not None and t.attempt.suppress is not None
    }
    if not refused:
        return
    owners = session.scalars(select(Notification).where(Notification.id.in_(list(refused))))
    rows = []
    for notification in owners:
        attempt = refused[notification.id]
        assert attempt is not None and attempt.suppress is not None
        address = notification.address_on(attempt.channel)
        if address is None:
            continue
        rows.append(
            {
                "channel": attempt.channel,
                "address": address,
                "scope": suppression.ALL,
                "reason": attempt.suppress,
                "detail": attempt.error,
                "notification_id": notification.id,
            }
        )
    add_suppressions(session=session, rows=rows, commit=False)


def add_suppressions(
    *,
    session: Session,
    rows: Sequence[Mapping[str, Any]],
    commit: bool = True,
    now: Callable[[], datetime] = utcnow,
) -> list[int]:
    """Suppress each row's (channel, address, scope), its address folded; a live row
    already there is left as it was (a repeat adds nothing), an expired one replaced. The
    one writer of suppressions; the ids of the rows added or replaced."""
    if not rows:
        return []
    at = now()
    values = [
        {
            "detail": None,
            "notification_id": None,
            "expires_at": None,
            **row,
            "address": suppression.folded(row["channel"], row["address"]),
            "created_at": at,
        }
        for row in rows
    ]
    # One row per key (a statement cannot touch a row twice), in key order (no deadlock
    # between two such statements).
    unique = {(str(v["channel"]), v["address"], v["scope"]): v for v in values}
    statement = dialect_insert(session, Suppression).values([unique[k] for k in sorted(unique)])
    replaced = {
        name: statement.excluded[name]
        for name in ("reason", "detail", "notification_id", "created_at", "expires_at")
    }
    added = session.scalars(
        # A row that has expired is replaced; a live one is left as it was.
        statement.on_conflict_do_update(
            index_elements=["channel", "address", "scope"],
            set_=replaced,
            where=and_(Suppression.expires_at.is_not(None), Suppression.expires_at <= at),
        ).returning(Suppression.id)
    ).all()
    if commit:
        session.commit()
    return list(added)


def suppressions_for(
    *,
    session: Session,
    pairs: Iterable[tuple[Channel | str, str]],
    now: Callable[[], datetime] = utcnow,
) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """The live suppressions of each (channel, address), by (channel, folded address):
    [(scope, reason)]. One query, whatever the number of addresses."""
    by_channel: dict[str, set[str]] = {}
    for channel, address in pairs:
        by_channel.setdefault(str(channel), set()).add(suppression.folded(channel, address))
    found: dict[tuple[str, str], list[tuple[str, str]]] = {}
    if not by_channel:
        return found
    at = now()
    rows: Iterable[Any]
    if session.get_bind().dialect.name == "postgresql":
        # Every send asks this: one prepared text, arrays bound (the ORM's construction
        # and compilation cost a queued 202 more than the query, bench/README.md).
        rows = session.execute(
            _SUPPRESSIONS_FOR,
            {
                "channels": list(by_channel),
                "addresses": sorted({a for addresses in by_channel.values() for a in addresses}),
                "now": at,
            },
        )
    else:
        # SQLite binds at most 32,766 parameters a statement: a few hundred at a time.
        rows = [
            row
            for channel, addresses in by_channel.items()
            for chunk in _chunks(sorted(addresses), 500)
            for row in session.execute(
                select(
                    Suppression.channel,
                    Suppression.address,
                    Suppression.scope,
                    Suppression.reason,
                )
                .where(Suppression.channel == channel, Suppression.address.in_(chunk))
                .where(or_(Suppression.expires_at.is_(None), Suppression.expires_at > at))
            )
        ]
    for channel, address, scope, reason in rows:
        if address in by_channel.get(str(channel), ()):
            found.setdefault((str(channel), address), []).append((scope, str(reason)))
    return found


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_SUPPRESSIONS_FOR = sql(
    """
SELECT channel, address, scope, reason FROM suppressions
WHERE channel = ANY(CAST(:channels AS varchar[])) AND address = ANY(CAST(:addresses AS varchar[]))
  AND (expires_at IS NULL OR expires_at > :now)
"""
).bindparams(bindparam("now", type_=UTCDateTime()))


def suppressed_now(
    *,
    session: Session,
    notifications: Sequence[Notification],
    now: Callable[[], datetime] = utcnow,
) -> dict[int, str]:
    """Which of `notifications` a suppression stops on its current channel right now
    (added while it waited in the queue), with why."""
    found = suppressions_for(
        session=session,
        pairs=[(n.channel, n.recipient) for n in notifications],
        now=now,
    )
    if not found:
        return {}
    reasons: dict[int, str] = {}
    for n in notifications:
        scopes = suppression.blocking_scopes(n.category, n.template_key)
        reason = suppression.stopped(found, n.channel, n.recipient, scopes)
        if reason is not None:
            reasons[n.id] = reason
    return reasons


def list_suppressions(
    *, session: Session, query: SuppressionQuery
) -> tuple[list[Suppression], int | None]:
    """A page of suppressions, newest first, and the id to continue after, if any."""
    statement = select(Suppression)
    if query.channel is not None:
        statement = statement.where(Suppression.channel == query.channel)
    if query.address is not None:
        channel = query.channel or (Channel.EMAIL if "@" in query.address else Channel.SMS)
        statement = statement.where(
            Suppression.address == suppression.folded(channel, query.address)
        )
    if query.reason is not None:
        statement = statement.where(Suppression.reason == query.reason)
    if query.before is not None:
        statement = statement.where(Suppression.id < query.before)
    rows = list(session.scalars(statement.order_by(Suppression.id.desc()).limit(query.limit + 1)))
    page = rows[: query.limit]
    return page, (page[-1].id if len(rows) > query.limit else None)


def get_suppression(*, session: Session, suppression_id: int) -> Suppression | None:
    return session.get(Suppression, suppression_id)


def find_suppression(
    *, session: Session, channel: Channel, address: str, scope: str
) -> Suppression | None:
    return session.scalars(
        select(Suppression).where(
            Suppression.channel == channel,
            Suppression.address == suppression.folded(channel, address),
            Suppression.scope == scope,
        )
    ).one_or_none()


def delete_suppression(*, session: Session, row: Suppression) -> None:
    session.delete(row)
    session.commit()


def mark_delivered_attempt(
    *,
    session: Session,
    notification_id: int,
    outcome: AttemptOutcome,
    code: int | None,
    error: str,
) -> bool:
    """Mark the notification's last sent attempt as bounced or complained about, once;
    whether it changed (a repeated report changes nothing). The notification's status is
    left as it is (the message did leave); its version is bumped, so a writer holding an
    older copy of it fails rather than overwrite what it does not know."""
    last = session.scalar(
        select(DeliveryAttempt.id)
        .where(
            DeliveryAttempt.notification_id == notification_id,
            DeliveryAttempt.outcome.in_(
                [AttemptOutcome.SENT, AttemptOutcome.BOUNCED, AttemptOutcome.COMPLAINED]
            ),
        )
        .order_by(DeliveryAttempt.number.desc())
        .limit(1)
    )
    if last is None:
        return False
    changed = session.scalar(
        update(DeliveryAttempt)
        .where(DeliveryAttempt.id == last, DeliveryAttempt.outcome != outcome)
        # A bounce means it was never delivered: a complaint after it changes nothing.
        .where(DeliveryAttempt.outcome != AttemptOutcome.BOUNCED)
        .values(outcome=outcome, code=code, error=error)
        .returning(DeliveryAttempt.id)
    )
    if changed is None:
        return False
    session.execute(
        update(Notification)
        .where(Notification.id == notification_id)
        .values(version=Notification.version + 1, updated_at=utcnow()),
        execution_options=NO_SYNC,
    )
    return True


def store_report(*, session: Session, values: Mapping[str, Any]) -> int:
    """Keep an inbound report; its id."""
    report = InboundReport(**values)
    session.add(report)
    session.flush()
    return report.id


def forget_reports(*, session: Session, before: datetime) -> int:
    """Delete the inbound reports received before `before` (their bytes hold third
    parties' mail); how many."""
    gone = session.scalars(
        delete(InboundReport).where(InboundReport.received_at < before).returning(InboundReport.id)
    ).all()
    session.commit()
    return len(gone)


def list_reports(
    *, session: Session, status: ReportStatus | None, limit: int, before: int | None
) -> tuple[list[InboundReport], dict[str, int]]:
    """A page of inbound reports, newest first, and how many there are of each status."""
    statement = select(InboundReport)
    if status is not None:
        statement = statement.where(InboundReport.status == status)
    if before is not None:
        statement = statement.where(InboundReport.id < before)
    rows = list(session.scalars(statement.order_by(InboundReport.id.desc()).limit(limit)))
    counts = {
        str(status): count
        for status, count in session.execute(
            select(InboundReport.status, func.count()).group_by(InboundReport.status)
        )
    }
    return rows, counts


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
    is_due = or_(
        and_(Notification.status == NotificationStatus.QUEUED, Notification.next_attempt_at <= at),
        and_(Notification.status == NotificationStatus.SENDING, Notification.lease_expires_at < at),
    )
    has_pending = (
        select(DeliveryAttempt.id)
        .where(
            DeliveryAttempt.notification_id == Notification.id,
            DeliveryAttempt.outcome == AttemptOutcome.PENDING,
        )
        .exists()
    )
    due = session.execute(
        select(
            Notification.id,
            Notification.status,
            Notification.updated_at,
            Notification.next_attempt_at,
            # Asked of taken-over sends only: a queued row has no pending attempt.
            case(
                (Notification.status == NotificationStatus.SENDING, has_pending), else_=False
            ).label("has_pending"),
        )
        .where(is_due)
        # A taken-over send has no next_attempt_at: it is due since its lease ran out.
        .order_by(func.coalesce(Notification.next_attempt_at, Notification.lease_expires_at))
        .limit(limit)
        .with_for_update(skip_locked=True, of=Notification)
    ).all()
    if not due:
        session.commit()
        return []
    # The claimed rows come back loaded (objects of them in the session show the claim).
    applied = apply_transitions(
        session=session,
        transitions=[
            claimed(
                row.id,
                at=at,
                worker_id=worker_id,
                lease=lease,
                next_attempt_at=row.next_attempt_at,
                # A synchronous send taken over has no pending attempt: its lost attempt
                # counts too.
                lost=row.status == NotificationStatus.SENDING and not row.has_pending,
            )
            for row in due
        ],
        load=True,
        commit=False,
    )
    leased_rows = [n for n in applied.held.values() if n is not None]
    # A taken-over send's lost attempt began when its sender last wrote the row.
    lost = {
        row.id: row.updated_at
        for row in due
        if row.status == NotificationStatus.SENDING and row.id in applied.held
    }
    if lost:
        _abandon(session, leased_rows, lost, at)
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
            for n in leased_rows
        ],
    ).all()
    session.commit()
    leased = [Leased(n, a) for n, a in zip(leased_rows, attempt_ids, strict=True)]
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


def release(
    *,
    session: Session,
    worker_id: str,
    leased: Sequence[Leased],
    now: Callable[[], datetime] = utcnow,
) -> int:
    """Give leased, unattempted notifications back to the queue (a worker stopping), with
    their pending attempts withdrawn; how many went back."""
    at = now()
    applied = apply_transitions(
        session=session,
        transitions=[released(item.notification, at=at, worker_id=worker_id) for item in leased],
        commit=False,
    )
    released_ids = set(applied.held)
    if released_ids:
        back = released_ids
        session.execute(
            delete(DeliveryAttempt).where(
                DeliveryAttempt.id.in_(
                    [item.attempt_id for item in leased if item.notification.id in back]
                ),
                DeliveryAttempt.outcome == AttemptOutcome.PENDING,
            )
        )
    session.commit()
    return len(released_ids)


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
    """Store a recipient by its `external_id`, replacing what was stored; the recipient,
    and whether it is new."""
    now = utcnow()
    values = {
        **{field: getattr(data, field) for field in ADDRESS_FIELDS.values()},
        "locale": data.locale,
        "channels": [str(c) for c in data.channels] if data.channels else None,
        "updated_at": now,
    }
    # INSERT … ON CONFLICT: two simultaneous upserts of one id cannot both insert.
    row = session.execute(
        dialect_insert(session, Recipient)
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
    """Change the fields `data` sets (an explicit null clears one)."""
    for name, value in data.model_dump(mode="json", exclude_unset=True).items():
        setattr(recipient, name, value)
    recipient.updated_at = utcnow()
    session.commit()
    return recipient


def delete_recipient(*, session: Session, recipient: Recipient) -> None:
    """Erase a recipient's contacts; its notifications stay in the history."""
    session.delete(recipient)
    session.commit()


def get_template(*, session: Session, key: str) -> Template | None:
    return session.scalars(select(Template).where(Template.key == key)).one_or_none()


def list_templates(*, session: Session) -> list[Template]:
    return list(session.scalars(select(Template).order_by(Template.key)))


def get_template_version(
    *, session: Session, template: Template, number: int
) -> TemplateVersion | None:
    return session.scalars(
        select(TemplateVersion).where(
            TemplateVersion.template_id == template.id, TemplateVersion.number == number
        )
    ).one_or_none()


def latest_template_version(*, session: Session, template: Template) -> TemplateVersion | None:
    return session.scalars(
        select(TemplateVersion)
        .where(TemplateVersion.template_id == template.id)
        .order_by(TemplateVersion.number.desc())
        .limit(1)
    ).one_or_none()


def list_template_versions(*, session: Session, template: Template) -> list[TemplateVersion]:
    return list(
        session.scalars(
            select(TemplateVersion)
            .where(TemplateVersion.template_id == template.id)
            .order_by(TemplateVersion.number)
        )
    )


def resolve_template(
    *, session: Session, key: str, number: int | None
) -> tuple[Template, TemplateVersion] | None:
    """A template by key and its version `number` (None: the active one), in one query."""
    number_wanted = Template.active_version if number is None else number
    row = session.execute(
        select(Template, TemplateVersion)
        .join(TemplateVersion, TemplateVersion.template_id == Template.id)
        .where(Template.key == key, TemplateVersion.number == number_wanted)
    ).one_or_none()
    return None if row is None else (row[0], row[1])


def create_template(
    *, session: Session, values: Mapping[str, Any], version: Mapping[str, Any], activate: bool
) -> tuple[Template, TemplateVersion]:
    """Store a template and its first version; IntegrityError if the key is taken."""
    template = Template(**values, active_version=1 if activate else None)
    stored = TemplateVersion(**version, number=1)
    template.versions.append(stored)
    session.add(template)
    session.commit()
    return template, stored


def add_template_version(
    *, session: Session, template: Template, version: Mapping[str, Any], activate: bool
) -> TemplateVersion:
    """Store the template's next version (activated if asked); IntegrityError when another
    writer took the same number first."""
    latest = latest_template_version(session=session, template=template)
    stored = TemplateVersion(
        **version, template_id=template.id, number=(latest.number if latest else 0) + 1
    )
    session.add(stored)
    # Bumps the template's row version: an If-Match read before this no longer holds.
    template.updated_at = utcnow()
    if activate:
        template.active_version = stored.number
    session.commit()
    return stored


def activate_template_version(
    *, session: Session, template: Template, number: int, expected: int | None
) -> bool:
    """Make version `number` the active one, if the template's row version is still
    `expected` (None: whatever it is); False if another write came first."""
    table = cast(Table, Template.__table__)
    statement = (
        update(Template)
        .where(table.c.id == template.id)
        .values(active_version=number, updated_at=utcnow(), version=table.c.version + 1)
    )
    if expected is not None:
        statement = statement.where(table.c.version == expected)
    changed = session.execute(statement, execution_options={"synchronize_session": False})
    session.commit()
    session.refresh(template)
    return bool(cast(Any, changed).rowcount)


def delete_template(*, session: Session, template: Template) -> None:
    """Delete a template and its versions; notifications sent by it keep their key,
    version and rendered content."""
    session.delete(template)
    session.commit()


def store_attachment(
    *,
    session: Session,
    sha256: str,
    data: bytes,
    filename: str,
    content_type: str,
    now: Callable[[], datetime] = utcnow,
) -> Attachment:
    """Store an attachment; its bytes only if no other upload has stored the same ones."""
    at = now()
    blob = dialect_insert(session, AttachmentBlob).values(
        sha256=sha256, size=len(data), data=data, created_at=at
    )
    # Stored already: touched, and so locked until this commits, and too new for
    # `expire_attachments` to delete under the attachment about to refer to it.
    session.execute(
        blob.on_conflict_do_update(
            index_elements=["sha256"], set_={"created_at": blob.excluded.created_at}
        )
    )
    attachment = Attachment(
        sha256=sha256, filename=filename, content_type=content_type, size=len(data), created_at=at
    )
    session.add(attachment)
    session.commit()
    return attachment


def get_attachments(*, session: Session, ids: Sequence[int]) -> dict[int, Attachment]:
    found = session.scalars(select(Attachment).where(Attachment.id.in_(ids)))
    return {attachment.id: attachment for attachment in found}


def attachment_data(*, session: Session, sha256s: Sequence[str]) -> dict[str, bytes]:
    """The bytes stored under each of `sha256s` (those that are)."""
    rows = session.execute(
        select(AttachmentBlob.sha256, AttachmentBlob.data).where(AttachmentBlob.sha256.in_(sha256s))
    )
    return {sha: bytes(data) for sha, data in rows}


def _link_attachments(
    session: Session,
    draft: Draft,
    *,
    notification_id: int | None = None,
    batch_id: int | None = None,
) -> None:
    """Record that a notification (or every one of a batch) refers to the draft's
    attachments, in the transaction that stores it."""
    ids = sorted({a["id"] for a in draft.attachments})
    if not ids:
        return
    table = cast(Table, NotificationAttachment.__table__)
    try:
        if notification_id is not None:
            rows = [{"notification_id": notification_id, "attachment_id": i} for i in ids]
            session.execute(insert(table), rows)
            return
        for attachment_id in ids:
            session.execute(
                insert(table).from_select(
                    ["notification_id", "attachment_id"],
                    select(Notification.id, literal(attachment_id, BigInteger)).where(
                        Notification.batch_id == batch_id
                    ),
                )
            )
    except IntegrityError:
        # Expired between the request's check and this insert: nothing is stored.
        session.rollback()
        raise AttachmentGone(ids) from None


class AttachmentGone(Refused):
    """An attachment a send names expired before the send was stored (a 422)."""

    def __init__(self, ids: Sequence[int]) -> None:
        super().__init__(
            f"attachment {', '.join(map(str, ids))}: no longer stored", field="attachments"
        )


def expire_attachments(*, session: Session, before: datetime) -> int:
    """Delete the attachments uploaded before `before` that no notification refers to,
    then the bytes stored before it that no attachment shares any more; how many
    attachments went."""
    referred = select(NotificationAttachment.attachment_id).where(
        NotificationAttachment.attachment_id == Attachment.id
    )
    gone = session.execute(
        delete(Attachment).where(Attachment.created_at < before, ~referred.exists())
    )
    shared = select(Attachment.id).where(Attachment.sha256 == AttachmentBlob.sha256)
    session.execute(
        delete(AttachmentBlob).where(AttachmentBlob.created_at < before, ~shared.exists())
    )
    session.commit()
    return int(cast(Any, gone).rowcount)
