"""Database tables: notifications, their delivery attempts, recipients, bulk batches,
templates and their versions, suppressions and inbound reports, idempotency keys and API
keys."""

from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy import text as sql  # `text` is also a column name below
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT identity on PostgreSQL; SQLite only autoincrements a plain INTEGER primary key.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Channel(StrEnum):
    """A way to reach someone; each has a sender in the `channels` package."""

    EMAIL = "email"
    SMS = "sms"
    TELEGRAM = "telegram"


# The field of a recipient's contacts (stored or given in a request) that holds each
# channel's address.
ADDRESS_FIELDS = {
    Channel.EMAIL: "email",
    Channel.SMS: "phone",
    Channel.TELEGRAM: "telegram_chat_id",
}


class Scope(StrEnum):
    """What an API key may do; `admin` implies `recipients`, `templates` and
    `suppressions`."""

    SEND = "send"
    READ = "read"
    RECIPIENTS = "recipients"
    TEMPLATES = "templates"
    SUPPRESSIONS = "suppressions"
    ADMIN = "admin"


class Category(StrEnum):
    """What kind of mail a notification is: `marketing` may be unsubscribed from."""

    TRANSACTIONAL = "transactional"
    MARKETING = "marketing"


class NotificationStatus(StrEnum):
    """Where a notification is in its life.

    queued    waiting for a worker; due at `next_attempt_at` (scheduled, or backing off)
    sending   an attempt is under way; a synchronous send takes this before its first
              attempt, a worker under a lease (`lease_expires_at`) that others respect
    sent      accepted by the SMTP server (final)
    failed    permanent error, or attempts ran out; `error_message` says why (final)
    cancelled withdrawn while queued (final)
    suppressed every channel left was suppressed for its address (unsubscribed, bounced,
              blocked): nothing sent; `error_message` says why (final)
    """

    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SUPPRESSED = "suppressed"


# The states a notification never leaves (but a resend of a failed one).
FINAL_STATUSES = frozenset(
    {
        NotificationStatus.SENT,
        NotificationStatus.FAILED,
        NotificationStatus.CANCELLED,
        NotificationStatus.SUPPRESSED,
    }
)


class AttemptOutcome(StrEnum):
    """What one attempt came to.

    pending    claimed by a worker, whose batch is being sent (no outcome yet)
    abandoned  its sender stopped (died, or lost its lease) before recording an outcome:
               the message may or may not have been delivered
    suppressed not sent: the address is suppressed on the channel (checked right before
               the send); `error` says why
    bounced    sent, then reported undeliverable by a delivery status notification
    complained sent, then reported as spam by its recipient (an ARF report)
    """

    PENDING = "pending"
    SENT = "sent"
    TRANSIENT_ERROR = "transient_error"
    PERMANENT_ERROR = "permanent_error"
    ABANDONED = "abandoned"
    SUPPRESSED = "suppressed"
    BOUNCED = "bounced"
    COMPLAINED = "complained"


class SuppressionReason(StrEnum):
    """Why an address is not sent to on a channel."""

    UNSUBSCRIBE = "unsubscribe"
    HARD_BOUNCE = "hard_bounce"
    COMPLAINT = "complaint"
    MANUAL = "manual"
    TELEGRAM_BLOCKED = "telegram_blocked"
    SMS_STOPLIST = "sms_stoplist"


class ReportStatus(StrEnum):
    """What the inbound listener made of a report it received.

    matched      a bounce or complaint of one of our notifications: recorded
    unmatched    a report it read, naming no notification of ours (kept for an operator)
    unparseable  not a delivery status notification or ARF report it can read (kept)
    ignored      a report that changes nothing (a delay, a success notice)
    """

    MATCHED = "matched"
    UNMATCHED = "unmatched"
    UNPARSEABLE = "unparseable"
    IGNORED = "ignored"


def _str_enum(enum: type[StrEnum]) -> Enum:
    # VARCHAR without a CHECK constraint: a new state or channel needs no migration.
    return Enum(
        enum,
        native_enum=False,
        create_constraint=False,
        length=32,
        values_callable=lambda members: [m.value for m in members],
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Batch(Base):
    """One bulk request: many notifications with the same content."""

    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    channel: Mapped[Channel] = mapped_column(_str_enum(Channel))
    subject: Mapped[str | None] = mapped_column(String(998))
    # Items in the request, and how many of them became notifications.
    requested: Mapped[int] = mapped_column(Integer)
    accepted: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Recipient(Base):
    """Someone the calling services know (by their own id), with an address per channel."""

    __tablename__ = "recipients"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    # The caller's id for this person (the user service's user id).
    external_id: Mapped[str] = mapped_column(String(128), unique=True)
    email: Mapped[str | None] = mapped_column(String(320))
    phone: Mapped[str | None] = mapped_column(String(16))  # E.164
    telegram_chat_id: Mapped[str | None] = mapped_column(String(64))
    locale: Mapped[str | None] = mapped_column(String(35))
    # Their own channel order; None takes the request's or CHANNEL_ORDER.
    channels: Mapped[list[str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    def address(self, channel: Channel) -> str | None:
        """The recipient's address on `channel`, if any."""
        address: str | None = getattr(self, ADDRESS_FIELDS[channel])
        return address


class Notification(Base):
    """One message to one recipient, tried on its channels in order until one delivers.

    `channel` and `recipient` are the channel being tried (or that delivered, or failed
    last) and its address; `route` the whole order when there is more than one channel.
    """

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    channel: Mapped[Channel] = mapped_column(_str_enum(Channel))
    # An address in the channel's own form: e-mail address, phone number, chat id.
    recipient: Mapped[str] = mapped_column(String(320))
    # Channels to try in order, as [{"channel": …, "address": …}], when there are two or
    # more; `route_position` is the one being tried. None: `channel` alone.
    route: Mapped[list[dict[str, str]] | None] = mapped_column(JSON)
    route_position: Mapped[int] = mapped_column(Integer, default=0, server_default=sql("0"))
    # Attempts on the channel being tried (`attempts` counts them all).
    channel_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=sql("0"))
    # Channels of the order left out at request time, as [{"channel": …, "reason": …}].
    skipped: Mapped[list[dict[str, str]] | None] = mapped_column(JSON)
    recipient_id: Mapped[int | None] = mapped_column(
        ForeignKey("recipients.id", ondelete="SET NULL")
    )
    # Telegram's parse_mode, when the caller asked for one.
    parse_mode: Mapped[str | None] = mapped_column(String(16))
    subject: Mapped[str | None] = mapped_column(String(998))
    # The first channel's text (and subject); a templated notification has every
    # channel's own in `content`.
    text: Mapped[str] = mapped_column(Text)
    # Sent by template: which version, in which locale, and what it rendered to for each
    # channel of the route when accepted, {channel: {"subject", "text", "html",
    # "parse_mode"}}: what every attempt sends, whatever the template becomes later.
    template_key: Mapped[str | None] = mapped_column(String(64))
    template_version: Mapped[int | None] = mapped_column(Integer)
    locale: Mapped[str | None] = mapped_column(String(35))
    content: Mapped[dict[str, dict[str, str]] | None] = mapped_column(JSON)
    # The attachments an e-mail carries, as [{"id", "filename", "content_type", "size",
    # "sha256"}] in order (`notification_attachments` links them for their expiry); other
    # channels leave them out and say so. None: no attachment, and no query to send.
    attachments: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    # A sensitive text (a code, a reset link) is erased once the notification is settled;
    # its length and an HMAC under SECRET_KEY stay as evidence of what was sent (a plain
    # hash of a six-digit code is reversed by trying a million codes).
    sensitive: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Marketing mail may be unsubscribed from; transactional mail only when its template
    # opts in (`unsubscribe`, the suppression scope its link offers: "category:<key>").
    category: Mapped[Category] = mapped_column(
        _str_enum(Category), default=Category.TRANSACTIONAL, server_default="transactional"
    )
    unsubscribe: Mapped[str | None] = mapped_column(String(80))
    text_length: Mapped[int | None] = mapped_column(Integer)
    text_hmac: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[NotificationStatus] = mapped_column(_str_enum(NotificationStatus))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    message_id: Mapped[str | None] = mapped_column(String(255))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    send_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    leased_by: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Bumped by every write, so a writer holding a stale copy (a worker whose lease ran
    # out and was taken over) fails with StaleDataError instead of overwriting the row.
    version: Mapped[int] = mapped_column(Integer, server_default=sql("1"))

    delivery_attempts: Mapped[list["DeliveryAttempt"]] = relationship(
        back_populates="notification",
        order_by="DeliveryAttempt.number",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )

    # History is read newest first, by (created_at, id), optionally narrowed by one filter.
    __table_args__ = (
        Index("ix_notifications_created_at_id", "created_at", "id"),
        Index("ix_notifications_recipient_created_at_id", "recipient", "created_at", "id"),
        Index("ix_notifications_status_created_at_id", "status", "created_at", "id"),
        Index("ix_notifications_channel_created_at_id", "channel", "created_at", "id"),
        # A batch's history and its counts per status.
        Index("ix_notifications_batch_id_created_at_id", "batch_id", "created_at", "id"),
        # The worker's two questions: what is due, and whose lease has run out.
        Index(
            "ix_notifications_due",
            "next_attempt_at",
            postgresql_where=sql("status = 'queued'"),
            sqlite_where=sql("status = 'queued'"),
        ),
        Index(
            "ix_notifications_lease",
            "lease_expires_at",
            postgresql_where=sql("status = 'sending'"),
            sqlite_where=sql("status = 'sending'"),
        ),
    )
    __mapper_args__ = {"version_id_col": version}

    @property
    def channels(self) -> list[str]:
        """The channel order this notification was given (after skipped ones)."""
        if self.route is None:
            return [str(self.channel)]
        return [step["channel"] for step in self.route]

    def address_on(self, channel: Channel) -> str | None:
        """Its address on `channel`, if its order has that channel (a fallback may have
        moved it on since)."""
        if self.route is None:
            return self.recipient if self.channel == channel else None
        return next((s["address"] for s in self.route if s["channel"] == channel), None)

    def step(self, position: int) -> tuple[Channel, str] | None:
        """The channel and address at `position` of the order, if there is one."""
        if self.route is None or not 0 <= position < len(self.route):
            return None
        return Channel(self.route[position]["channel"]), self.route[position]["address"]


class Template(Base):
    """A message the callers send by key (`booking_confirmed`), in versions; one active.

    Notifications keep its key and version number, not a foreign key: deleting a template
    leaves their history as it was.
    """

    __tablename__ = "templates"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    category: Mapped[Category] = mapped_column(_str_enum(Category))
    # Every notification made from it is sensitive (a code): callers cannot forget it.
    sensitive: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Transactional mail that offers one-click unsubscribe all the same (reminders).
    unsubscribe: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    default_locale: Mapped[str] = mapped_column(String(35))
    description: Mapped[str | None] = mapped_column(Text)
    active_version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # Bumped by every write: the ETag an activation's If-Match must name.
    version: Mapped[int] = mapped_column(Integer, server_default=sql("1"))

    versions: Mapped[list["TemplateVersion"]] = relationship(
        back_populates="template",
        order_by="TemplateVersion.number",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )
    __mapper_args__ = {"version_id_col": version}


class TemplateVersion(Base):
    """One immutable version of a template: its variables, and its sources per locale,
    {locale: {"subject", "text", "html", "sms", "telegram"}} (each optional)."""

    __tablename__ = "template_versions"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    template_id: Mapped[int] = mapped_column(ForeignKey("templates.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    # [{"name", "type", "required", "example"}]
    variables: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    content: Mapped[dict[str, dict[str, str]]] = mapped_column(JSON)
    # "HTML": the Telegram text is HTML, autoescaped; None: plain text.
    telegram_parse_mode: Mapped[str | None] = mapped_column(String(16))
    # Where it came from ("api", "catalogue") and, for the catalogue, the hash of its
    # files: installing again adds a version only when they changed.
    source: Mapped[str] = mapped_column(String(16), default="api")
    source_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    template: Mapped[Template] = relationship(back_populates="versions")

    __table_args__ = (UniqueConstraint("template_id", "number"),)


class AttachmentBlob(Base):
    """An attachment's bytes, stored once per SHA-256 however often they are uploaded."""

    __tablename__ = "attachment_blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Attachment(Base):
    """A file a caller uploaded (or sent inline) to attach to e-mail: its name and type,
    and its bytes by hash. One no notification refers to expires after
    ATTACHMENT_RETENTION."""

    __tablename__ = "attachments"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("attachment_blobs.sha256"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(127))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class NotificationAttachment(Base):
    """That a notification refers to an attachment: it is kept while one does."""

    __tablename__ = "notification_attachments"

    notification_id: Mapped[int] = mapped_column(
        ForeignKey("notifications.id", ondelete="CASCADE"), primary_key=True
    )
    attachment_id: Mapped[int] = mapped_column(
        ForeignKey("attachments.id"), primary_key=True, index=True
    )


class Suppression(Base):
    """An address not sent to on a channel, for all mail or for one `scope`: "all",
    "marketing", or "category:<template key>"; enforced when a notification is accepted
    and again right before each send. `address` is folded (`suppression.folded`)."""

    __tablename__ = "suppressions"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    channel: Mapped[Channel] = mapped_column(_str_enum(Channel))
    address: Mapped[str] = mapped_column(String(320))
    scope: Mapped[str] = mapped_column(String(80))
    reason: Mapped[SuppressionReason] = mapped_column(_str_enum(SuppressionReason))
    # What the provider or report said (a DSN's status and diagnostic), or an operator's note.
    detail: Mapped[str | None] = mapped_column(Text)
    notification_id: Mapped[int | None] = mapped_column(
        ForeignKey("notifications.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    # Also the index of both checks: by channel and address.
    __table_args__ = (UniqueConstraint("channel", "address", "scope"),)


class InboundReport(Base):
    """A message the inbound SMTP listener received (a bounce, a complaint), what it made
    of it, and, unless it was matched, its bytes for an operator."""

    __tablename__ = "inbound_reports"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    mail_from: Mapped[str] = mapped_column(String(320))
    rcpt_to: Mapped[str] = mapped_column(String(320))
    kind: Mapped[str] = mapped_column(String(32))  # delivery-status, feedback-report, unknown
    status: Mapped[ReportStatus] = mapped_column(_str_enum(ReportStatus))
    notification_id: Mapped[int | None] = mapped_column(
        ForeignKey("notifications.id", ondelete="SET NULL")
    )
    # The DSN's status (5.1.1), or the ARF feedback type (abuse).
    code: Mapped[str | None] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text)
    raw: Mapped[bytes | None] = mapped_column(LargeBinary)

    __table_args__ = (Index("ix_inbound_reports_status_id", "status", "id"),)

    @property
    def size(self) -> int | None:
        """Bytes kept of an unread report."""
        return len(self.raw) if self.raw is not None else None


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    notification_id: Mapped[int] = mapped_column(ForeignKey("notifications.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # None while pending.
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    channel: Mapped[Channel] = mapped_column(_str_enum(Channel), server_default="email")
    outcome: Mapped[AttemptOutcome] = mapped_column(_str_enum(AttemptOutcome))
    # The provider's code: an SMTP reply code, an SMS.ru status_code, a Bot API error_code.
    code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    # What the provider said of an accepted message: its id, SMS parts and price.
    provider_message_id: Mapped[str | None] = mapped_column(String(255))
    segments: Mapped[int | None] = mapped_column(Integer)
    cost: Mapped[Decimal | None] = mapped_column(Numeric(12, 4))

    notification: Mapped[Notification] = relationship(back_populates="delivery_attempts")

    # Also the index for reading one notification's attempts.
    __table_args__ = (UniqueConstraint("notification_id", "number"),)


class IdempotencyKey(Base):
    """An `Idempotency-Key` a caller sent, and what its first request created.

    The unique (scope, key) constraint is what makes two simultaneous requests with the
    same key create one notification: the second insert finds the first one's row.
    """

    __tablename__ = "idempotency_keys"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    # Whose key it is: the caller's name once access control exists, "" until then.
    scope: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    # sha256 of the endpoint and the request body: the same key with another body is refused.
    fingerprint: Mapped[str] = mapped_column(String(64))
    # The first response's status code, once that request has finished.
    status_code: Mapped[int | None] = mapped_column(Integer)
    notification_id: Mapped[int | None] = mapped_column(
        ForeignKey("notifications.id", ondelete="CASCADE")
    )
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)

    __table_args__ = (UniqueConstraint("scope", "key"),)


class ApiKey(Base):
    """A caller's credential: only the key's SHA-256 is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    # The key's first characters, to tell keys apart in listings and logs.
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # Space-separated: send, read, recipients, admin.
    scopes: Mapped[str] = mapped_column(String(255))
    # Per-caller limits; NULL takes the service-wide setting.
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    recipient_hourly_limit: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
