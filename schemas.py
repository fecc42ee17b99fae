"""Request and response bodies."""

import base64
import binascii
import re
from datetime import UTC, datetime
from typing import Annotated

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from models import AttemptOutcome, Channel, NotificationStatus

MAX_TEXT_LENGTH = 100_000
HISTORY_PAGE_MAX = 200
MAX_BULK_RECIPIENTS = 20_000
# The scopes an API key can hold (security.Scope).
API_SCOPES = ("send", "read", "admin")
# Ids are BIGINT: a larger one names nothing, on SQLite as on PostgreSQL.
MAX_ID = 2**63 - 1
# An ISO 8601 date and time; the offset is checked by AwareDatetime.
ISO_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")

# C0 and C1 controls and DEL. Any of them in a header could start a new header line.
HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# In a body, line breaks and tabs are content; other controls (C0, DEL, C1) are not.
BODY_UNSAFE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def printable(value: str, limit: int = 400) -> str:
    """`value` safe to echo in a response: lone surrogates escaped, length capped."""
    return value[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def in_utc(value: datetime | None) -> datetime | None:
    """An aware datetime in UTC; one that does not fit there is invalid, not a crash."""
    if value is None:
        return None
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range") from None


def email_address(value: str) -> str:
    """A valid address: an ASCII one as given (its domain in lower case), so any relay can
    take it; a non-ASCII one normalised (it needs a relay with SMTPUTF8)."""
    if HEADER_UNSAFE.search(value):
        raise ValueError("value is not a valid email address: control characters")
    try:
        address = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"value is not a valid email address: {exc}") from None
    if value.isascii() and address.ascii_email:
        return address.ascii_email
    return address.normalized


EmailAddress = Annotated[
    str, AfterValidator(email_address), WithJsonSchema({"type": "string", "format": "email"})
]


def iso_8601(value: object) -> object:
    if value is not None and not (isinstance(value, str) and ISO_DATETIME.match(value)):
        raise ValueError("must be an ISO 8601 string with a UTC offset: 2026-11-25T18:00:00+03:00")
    return value


SendAt = Annotated[
    AwareDatetime | None,
    BeforeValidator(iso_8601),
    WithJsonSchema({"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]}),
]


class EmailContent(BaseModel):
    """A subject and a plain-text body, and when to send them."""

    subject: str = Field(min_length=1, max_length=998)
    text: str = Field(min_length=1, max_length=MAX_TEXT_LENGTH)
    send_at: SendAt = Field(
        default=None,
        description="Send at this time through the queue (answered 202): an ISO 8601 string "
        "with a UTC offset, at most SEND_AT_HORIZON ahead; a time in the past is due at once.",
    )
    sensitive: bool = Field(
        default=False,
        description="A code or reset link: the text is never returned by the API and is "
        "erased from the database once the notification is sent, failed or cancelled.",
    )

    @field_validator("send_at")
    @classmethod
    def send_at_in_utc(cls, send_at: datetime | None) -> datetime | None:
        return in_utc(send_at)

    @field_validator("subject")
    @classmethod
    def subject_is_one_header_line(cls, subject: str) -> str:
        # splitlines() also breaks on U+2028/U+2029, which the email package refuses.
        if HEADER_UNSAFE.search(subject) or len(subject.splitlines()) > 1:
            raise ValueError("must not contain line breaks or other control characters")
        if not subject.strip():
            raise ValueError("must not be blank")
        return subject

    @field_validator("text")
    @classmethod
    def text_is_printable(cls, text: str) -> str:
        if BODY_UNSAFE.search(text):
            raise ValueError("must not contain control characters other than tab and line breaks")
        if not text.strip():
            raise ValueError("must not be blank")
        return text


class EmailNotificationCreate(EmailContent):
    """What the booking and user services send; the body they already use."""

    email: EmailAddress


_email_address = TypeAdapter(EmailAddress)


class RejectedRecipient(BaseModel):
    index: int = Field(description="Position in `emails`, from 0.")
    email: str
    error: str


class BulkEmailCreate(EmailContent):
    """One message to many recipients; the body the booking system's gateway uses."""

    emails: list[str] = Field(min_length=1, max_length=MAX_BULK_RECIPIENTS)

    def recipients(self) -> tuple[dict[str, int], list[RejectedRecipient]]:
        """The valid addresses, normalised and each once (with their index), and the items
        refused, with why."""
        rejected: list[RejectedRecipient] = []
        accepted: dict[str, int] = {}
        seen: dict[str, int] = {}
        for index, item in enumerate(self.emails):
            try:
                address = _email_address.validate_python(item)
            except ValidationError as exc:
                error = printable(exc.errors()[0]["msg"])
                rejected.append(RejectedRecipient(index=index, email=printable(item), error=error))
                continue
            # Mailboxes are case-insensitive in practice: one message each.
            folded = address.lower()
            if folded in seen:
                error = f"duplicate of item {seen[folded]}"
                rejected.append(RejectedRecipient(index=index, email=printable(item), error=error))
                continue
            seen[folded] = index
            accepted[address] = index
        return accepted, rejected


class DeliveryAttemptPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    number: int
    started_at: datetime
    finished_at: datetime | None = Field(description="Null while the attempt is pending.")
    outcome: AttemptOutcome
    smtp_code: int | None
    error: str | None


class NotificationPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    channel: Channel
    recipient: str
    subject: str | None
    text: str | None = Field(description="Null for a sensitive notification.")
    sensitive: bool
    text_length: int | None = Field(description="Length of a sensitive text, once erased.")
    batch_id: int | None
    status: NotificationStatus
    attempts: int
    error_message: str | None
    message_id: str | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    send_at: datetime | None
    next_attempt_at: datetime | None

    @model_validator(mode="after")
    def hide_sensitive_text(self) -> "NotificationPublic":
        if self.sensitive:
            self.text = None
        return self


class NotificationDetail(NotificationPublic):
    delivery_attempts: list[DeliveryAttemptPublic]


class NotificationsPublic(BaseModel):
    data: list[NotificationPublic]
    next_cursor: str | None = Field(
        description="Pass as `cursor` to get the next (older) page; null on the last page."
    )


class BatchPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    channel: Channel
    subject: str | None
    requested: int = Field(description="Items in the request.")
    accepted: int = Field(description="Notifications created: valid, distinct addresses.")
    created_at: datetime
    counts: dict[NotificationStatus, int] = Field(
        default_factory=dict, description="Notifications per status now."
    )


class BatchCreated(BaseModel):
    batch: BatchPublic
    rejected: list[RejectedRecipient] = Field(description="Items that were not queued, and why.")


def _scopes_known(scopes: list[str]) -> list[str]:
    unknown = set(scopes) - set(API_SCOPES)
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)}; use {', '.join(API_SCOPES)}")
    return sorted(set(scopes), key=API_SCOPES.index)


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    scopes: Annotated[list[str], AfterValidator(_scopes_known)] = Field(min_length=1)
    requests_per_minute: int | None = Field(default=None, ge=1, le=1_000_000)
    recipient_hourly_limit: int | None = Field(default=None, ge=1, le=1_000_000)


class ApiKeyPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    prefix: str = Field(description="The key's first characters, to recognise it.")
    scopes: list[str]
    requests_per_minute: int | None
    recipient_hourly_limit: int | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @field_validator("scopes", mode="before")
    @classmethod
    def split_scopes(cls, scopes: object) -> object:
        return scopes.split() if isinstance(scopes, str) else scopes


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="The key itself. It is not stored and never shown again.")


class HistoryCursor(BaseModel):
    """A position in the history: the last row of the page before."""

    created_at: AwareDatetime
    id: int = Field(ge=1, le=MAX_ID)

    @field_validator("created_at")
    @classmethod
    def created_at_in_utc(cls, created_at: datetime) -> datetime | None:
        return in_utc(created_at)

    def encode(self) -> str:
        return base64.urlsafe_b64encode(self.model_dump_json().encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> "HistoryCursor":
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            return cls.model_validate_json(raw, strict=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("is not a cursor returned by this API") from exc


class HistoryQuery(BaseModel):
    """Filters and paging of GET /notifications."""

    model_config = ConfigDict(extra="forbid")

    recipient: str | None = Field(default=None, max_length=320)
    status: NotificationStatus | None = None
    batch_id: int | None = Field(default=None, ge=1, le=MAX_ID)
    created_from: datetime | None = Field(default=None, description="Inclusive; UTC if no offset.")
    created_to: datetime | None = Field(default=None, description="Exclusive; UTC if no offset.")
    limit: int = Field(default=50, ge=1, le=HISTORY_PAGE_MAX)
    cursor: str | None = None

    @field_validator("recipient")
    @classmethod
    def normalise_address(cls, recipient: str | None) -> str | None:
        # Stored addresses are email-validator's normal form (lower-case domain).
        if recipient is None:
            return None
        if HEADER_UNSAFE.search(recipient):
            raise ValueError("must not contain control characters")
        try:
            return email_address(recipient)
        except ValueError:
            return recipient

    @field_validator("created_from", "created_to")
    @classmethod
    def assume_utc(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return in_utc(value)

    @field_validator("cursor")
    @classmethod
    def cursor_is_ours(cls, cursor: str | None) -> str | None:
        if not cursor:
            return None  # `?cursor=` is the first page
        HistoryCursor.decode(cursor)
        return cursor

    @property
    def position(self) -> HistoryCursor | None:
        return None if self.cursor is None else HistoryCursor.decode(self.cursor)
