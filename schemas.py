"""Request and response bodies."""

import base64
import binascii
import re
from contextlib import suppress
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Annotated, Any, Literal

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    computed_field,
    create_model,
    field_validator,
    model_validator,
)

from headers import HEADER_UNSAFE, header_problem
from lifecycle import TELEGRAM_MAX_TEXT, channel_views
from models import (
    ADDRESS_FIELDS,
    AttemptOutcome,
    Category,
    Channel,
    NotificationStatus,
    ReportStatus,
    Scope,
    SuppressionReason,
)
from templating import LOCALES, MAX_SOURCE, VARIABLE_TYPES, encodable

MAX_TEXT_LENGTH = 100_000
HISTORY_PAGE_MAX = 200
MAX_BULK_RECIPIENTS = 20_000
# Numbers written without a country code are read as Russian ones (the coworking's
# country); any other needs its +code.
PHONE_REGION = "RU"
# Ids are BIGINT: a larger one names nothing, on SQLite as on PostgreSQL.
MAX_ID = 2**63 - 1
# RFC 5321 section 4.5.3.1.1, in octets: a UTF-8 local part counts its bytes.
MAX_LOCAL_PART_OCTETS = 64
# An ISO 8601 date and time; the offset is checked by AwareDatetime.
ISO_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")

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
    if "=?" in value:
        # RFC 2047 section 5: an encoded word must not appear in any part of an addr-spec;
        # "=?" is where any reader's idea of one starts.
        raise ValueError("value is not a valid email address: an RFC 2047 encoded word")
    return plain_address(value) or validated_address(value)


# An ASCII dot-atom local part and an ASCII domain: what nearly every address is.
_PLAIN = re.compile(
    r"(?P<local>[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)"
    r"@(?P<domain>[A-Za-z0-9.-]+)"
)


def plain_address(value: str) -> str | None:
    """What `validated_address` makes of a plain ASCII address, without checking its
    domain again when it has been seen (email-validator spends most of its time on the
    domain, and a bulk's addresses share a few); None: not plain, or not valid."""
    match = _PLAIN.fullmatch(value) if len(value) <= 254 else None
    if match is None or len(match["local"]) > MAX_LOCAL_PART_OCTETS:
        return None
    domain = _ascii_domain(match["domain"])
    return None if domain is None else f"{match['local']}@{domain}"


@lru_cache(maxsize=4096)
def _ascii_domain(domain: str) -> str | None:
    """The domain as email-validator writes it in an address, or None if it refuses it."""
    try:
        return validate_email(f"a@{domain}", check_deliverability=False).ascii_domain
    except EmailNotValidError:
        return None


def validated_address(value: str) -> str:
    """`value` checked and normalised by email-validator."""
    try:
        address = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"value is not a valid email address: {exc}") from None
    if len(address.local_part.encode()) > MAX_LOCAL_PART_OCTETS:
        raise ValueError(
            "value is not a valid email address: the part before the @-sign is longer "
            f"than {MAX_LOCAL_PART_OCTETS} octets"
        )
    if value.isascii() and address.ascii_email:
        return address.ascii_email
    return address.normalized


ExternalId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:@-]+$",
        description="The caller's own id for this person (the user service's user id).",
    ),
]
# A BCP 47 language tag: ru, ru-RU, en-GB.
Locale = Annotated[str, Field(max_length=35, pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")]
ParseMode = Literal["HTML", "MarkdownV2", "Markdown"]

EmailAddress = Annotated[
    str, AfterValidator(email_address), WithJsonSchema({"type": "string", "format": "email"})
]


def phone_number(value: str) -> str:
    """A valid phone number in E.164 form (+79161234567)."""
    if HEADER_UNSAFE.search(value) or len(value) > 64:
        raise ValueError("value is not a valid phone number")
    try:
        number = phonenumbers.parse(value, PHONE_REGION)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"value is not a valid phone number: {exc}") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("value is not a valid phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


PhoneNumber = Annotated[
    str,
    AfterValidator(phone_number),
    WithJsonSchema({"type": "string", "examples": ["+79161234567"]}),
]


def telegram_chat_id(value: object) -> str:
    """A chat id as the Bot API takes it: a number, or @channelusername."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not CHAT_ID.match(value):
        raise ValueError("must be a Telegram chat id (a number) or @channelusername")
    return value


# A chat id is a non-zero integer (negative for groups and channels); a public username is
# 5-32 letters, digits and underscores, starting with a letter.
CHAT_ID = re.compile(r"^(-?[1-9][0-9]{0,19}|@[A-Za-z][A-Za-z0-9_]{4,31})$")
TelegramChatId = Annotated[
    str,
    BeforeValidator(telegram_chat_id),
    WithJsonSchema({"type": "string", "examples": ["123456789", "@coworking_news"]}),
]


def iso_8601(value: object) -> object:
    """A string that starts with an ISO 8601 date and time; anything else (a number would
    be read as seconds since 1970) is refused before pydantic reads it."""
    if value is not None and not (isinstance(value, str) and ISO_DATETIME.match(value)):
        raise ValueError("must be an ISO 8601 date and time string: 2026-11-25T18:00:00+03:00")
    return value


# A time to filter by; without an offset it is UTC.
HistoryTime = Annotated[
    datetime | None,
    BeforeValidator(iso_8601),
    WithJsonSchema({"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]}),
]

SendAt = Annotated[
    AwareDatetime | None,
    BeforeValidator(iso_8601),
    WithJsonSchema({"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]}),
]


def subject_line(subject: str | None) -> str | None:
    if subject is None:
        return None
    problem = header_problem(subject)
    if problem is not None:
        raise ValueError(problem)
    if not subject.strip():
        raise ValueError("must not be blank")
    return subject


TemplateKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        pattern=r"^[a-z][a-z0-9_]*$",
        description="A template's key: booking_confirmed.",
    ),
]
TemplateData = Annotated[
    dict[str, Any],
    Field(max_length=200, description="The template's variables, by name."),
]


MAX_ATTACHMENTS = 10
INLINE_MAX = 1024 * 1024


def _base64(value: object) -> object:
    """Inline content: base64 (RFC 4648; line breaks allowed), strictly decoded."""
    if not isinstance(value, str):
        raise ValueError("must be a base64 string")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None


class AttachmentRef(BaseModel):
    """An attachment uploaded by `POST /attachments`."""

    model_config = ConfigDict(extra="forbid")

    id: int = Field(ge=1, le=MAX_ID)


class InlineAttachment(BaseModel):
    """A file given in the request itself, stored as an upload would be."""

    model_config = ConfigDict(extra="forbid")

    # No examples: the schema's examples of a send are sends that reach SMS and Telegram.
    filename: str = Field(min_length=1, max_length=255, description="Счёт № 5.pdf, say.")
    content_type: str = Field(min_length=3, max_length=127, description="application/pdf, say.")
    content: Annotated[
        bytes,
        BeforeValidator(_base64),
        WithJsonSchema({"type": "string", "contentEncoding": "base64"}),
        Field(max_length=INLINE_MAX, description="The file in base64, at most 1 MB decoded."),
    ]


AttachmentItem = AttachmentRef | InlineAttachment


class MessageContent(BaseModel):
    """What to send: a plain-text body, or a stored template with its data; and when."""

    template: TemplateKey | None = Field(
        default=None,
        description="Send by a stored template (rendered now, before anything is stored), "
        "in place of `subject` and `text`.",
    )
    version: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="The template's version; default: active."
    )
    locale: Locale | None = Field(
        default=None,
        description="The template's locale: this one, else the recipient's, else the "
        "template's default, else ru.",
    )
    data: TemplateData | None = None
    category: Category | None = Field(
        default=None,
        description="transactional (codes, bookings) or marketing (may be unsubscribed from: "
        "one-click List-Unsubscribe); default: the template's, else transactional.",
    )
    # After `template`: its validator reads whether a template was given.
    text: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_TEXT_LENGTH,
        description="Or `template`.",
        examples=["Переговорная «Байкал» забронирована на 25 ноября, 10:00–12:00."],
        validate_default=True,
    )
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
    attachments: list[AttachmentItem] | None = Field(
        default=None,
        max_length=MAX_ATTACHMENTS,
        description="Files for e-mail, by id (`POST /attachments`) or inline; SMS and "
        "Telegram leave them out, and history says so.",
    )

    @field_validator("send_at")
    @classmethod
    def send_at_in_utc(cls, send_at: datetime | None) -> datetime | None:
        return in_utc(send_at)

    @field_validator("text")
    @classmethod
    def text_is_printable(cls, text: str | None, info: ValidationInfo) -> str | None:
        if text is None:
            if info.data.get("template") is None:
                raise ValueError("give `text` (and `subject` for e-mail), or `template`")
            return None
        if BODY_UNSAFE.search(text):
            raise ValueError("must not contain control characters other than tab and line breaks")
        if not text.strip():
            raise ValueError("must not be blank")
        return text

    @model_validator(mode="after")
    def text_or_template(self) -> "MessageContent":
        if self.text is not None and self.template is not None:
            raise ValueError("give either `text` (and `subject` for e-mail) or `template`")
        if self.template is None and (self.version, self.locale, self.data) != (None,) * 3:
            raise ValueError("`version`, `locale` and `data` go with `template`")
        if self.template is not None and getattr(self, "subject", None) is not None:
            raise ValueError("a template has its own subject: give `template` or `subject`")
        return self


class EmailContent(MessageContent):
    """A subject and a plain-text body (or a template), and when to send them."""

    subject: Annotated[str | None, AfterValidator(subject_line)] = Field(
        default=None,
        min_length=1,
        max_length=998,
        description="Required with `text`.",
        validate_default=True,
    )

    @field_validator("subject")
    @classmethod
    def subject_with_text(cls, subject: str | None, info: ValidationInfo) -> str | None:
        if subject is None and info.data.get("text") is not None:
            raise ValueError("is required with `text`")
        return subject


class EmailNotificationCreate(EmailContent):
    """What the booking and user services send; the body they already use."""

    email: EmailAddress


_email_address = TypeAdapter(EmailAddress)


def _each_once(channels: list[Channel]) -> list[Channel]:
    if len(set(channels)) != len(channels):
        raise ValueError("must name each channel at most once")
    return channels


ChannelOrder = Annotated[
    Annotated[
        list[Channel], Field(min_length=1, max_length=len(Channel)), AfterValidator(_each_once)
    ]
    | None,
    Field(
        default=None,
        description="Channels to try, in order: the next one is tried when one fails for "
        "good or runs out of retries. Default: the recipient's own order, else CHANNEL_ORDER.",
        examples=[["telegram", "sms", "email"]],
    ),
]


class RejectedRecipient(BaseModel):
    index: int = Field(description="Position in `emails` (or `recipients`), from 0.")
    email: str | None = Field(default=None, description="The item of `emails`.")
    external_id: str | None = Field(default=None, description="The item of `recipients`.")
    error: str


class EmailItem(BaseModel):
    """A bulk item with data of its own for the template (over the shared `data`)."""

    model_config = ConfigDict(extra="forbid")

    email: str
    data: TemplateData


class RecipientItem(BaseModel):
    """A bulk item: a stored recipient with data of its own for the template."""

    model_config = ConfigDict(extra="forbid")

    external_id: ExternalId
    data: TemplateData


def _item(kind: type[BaseModel], plain: TypeAdapter[str]) -> Any:
    """A bulk item given as a plain value, or as an object with data of its own: an error
    is reported at the item itself, whichever form it has."""

    def validate(value: object) -> object:
        if isinstance(value, dict):
            try:
                return kind.model_validate(value)
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(part) for part in error["loc"])
                raise ValueError(f"{where}: {error['msg']}") from None
        try:
            return plain.validate_python(value)
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"]) from None

    return validate


_EXTERNAL_ID = TypeAdapter(ExternalId)
_ANY_STRING = TypeAdapter(str)
BulkEmail = Annotated[
    str | EmailItem,
    PlainValidator(_item(EmailItem, _ANY_STRING)),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"$ref": "#/components/schemas/EmailItem"}]}),
]
BulkRecipient = Annotated[
    str | RecipientItem,
    PlainValidator(_item(RecipientItem, _EXTERNAL_ID)),
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "string",
                    "pattern": r"^[A-Za-z0-9._:@-]+$",
                    "minLength": 1,
                    "maxLength": 128,
                },
                {"$ref": "#/components/schemas/RecipientItem"},
            ]
        }
    ),
]


class BulkEmailCreate(MessageContent):
    """One message to many recipients: e-mail addresses (the body the booking system's
    gateway uses), or stored recipients by external id, each reached on its own order.
    With a template, an item may carry data of its own."""

    subject: Annotated[str | None, AfterValidator(subject_line)] = Field(
        default=None, min_length=1, max_length=998, description="Required with `emails`."
    )
    emails: list[BulkEmail] | None = Field(
        default=None, min_length=1, max_length=MAX_BULK_RECIPIENTS
    )
    recipients: list[BulkRecipient] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_BULK_RECIPIENTS,
        description="External ids of stored recipients (POST /recipients).",
    )
    channels: ChannelOrder

    @model_validator(mode="after")
    def one_kind_of_recipient(self) -> "BulkEmailCreate":
        if (self.emails is None) == (self.recipients is None):
            raise ValueError("give either `emails` or `recipients`")
        if self.emails is not None and self.subject is None and self.template is None:
            raise ValueError("`subject` is required with `emails`")
        items = [*(self.emails or ()), *(self.recipients or ())]
        if self.template is None and any(isinstance(i, BaseModel) for i in items):
            raise ValueError("items with `data` go with `template`")
        if self.emails is not None and self.channels not in (None, [Channel.EMAIL]):
            raise ValueError("`channels` goes with `recipients`; `emails` are sent by e-mail")
        return self

    @property
    def requested(self) -> int:
        return len(self.emails or self.recipients or ())

    def item_data(self, index: int) -> dict[str, Any]:
        """The template data of item `index`: the shared `data`, and the item's own over it."""
        items = self.emails or self.recipients or ()
        item = items[index]
        own = item.data if isinstance(item, EmailItem | RecipientItem) else {}
        return {**(self.data or {}), **own}

    def email_item(self, index: int) -> str | None:
        """Item `index` of `emails` as given (its address), if `emails` is given."""
        if self.emails is None:
            return None
        item = self.emails[index]
        return printable(item if isinstance(item, str) else item.email)

    def external_ids(self) -> list[str]:
        """The external id of each item of `recipients`."""
        return [i if isinstance(i, str) else i.external_id for i in self.recipients or ()]

    def valid_emails(self) -> tuple[dict[str, int], list[RejectedRecipient]]:
        """The valid addresses, normalised and each once (with their index), and the items
        refused, with why."""
        rejected: list[RejectedRecipient] = []
        accepted: dict[str, int] = {}
        seen: dict[str, int] = {}
        for index, given in enumerate(self.emails or ()):
            item = given if isinstance(given, str) else given.email
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


class SmsNotificationCreate(MessageContent):
    """An SMS: the `/notify/email` body with a phone number instead of an address."""

    phone: PhoneNumber = Field(description="E.164 (+79161234567), or a Russian number.")


class TelegramNotificationCreate(MessageContent):
    """A Telegram message: the `/notify/email` body with a chat id."""

    chat_id: TelegramChatId
    text: str | None = Field(
        default=None,
        min_length=1,
        max_length=TELEGRAM_MAX_TEXT,
        examples=["Переговорная «Байкал» забронирована."],
        validate_default=True,
    )
    parse_mode: ParseMode | None = Field(
        default=None, description="Bot API formatting; plain text unless asked."
    )


class Contacts(BaseModel):
    """Addresses to reach someone at: one field per channel (models.ADDRESS_FIELDS), typed
    here once for requests and stored recipients alike."""

    email: EmailAddress | None = None
    phone: PhoneNumber | None = None
    telegram_chat_id: TelegramChatId | None = None

    def address(self, channel: Channel) -> str | None:
        """The address given for `channel`, if any."""
        address: str | None = getattr(self, ADDRESS_FIELDS[channel])
        return address


class NotifyRecipient(Contacts):
    """A stored recipient (`external_id`), or addresses given right here."""

    model_config = ConfigDict(extra="forbid")

    external_id: ExternalId | None = None

    @model_validator(mode="after")
    def one_way_to_name(self) -> "NotifyRecipient":
        addresses = [self.address(channel) for channel in Channel]
        if self.external_id is not None and any(a is not None for a in addresses):
            raise ValueError("give either `external_id` or addresses, not both")
        if self.external_id is None and all(a is None for a in addresses):
            raise ValueError("give `external_id`, or at least one address")
        return self


class NotificationCreate(MessageContent):
    """One message to one recipient, on the first of its channels that delivers it."""

    recipient: NotifyRecipient
    channels: ChannelOrder
    subject: Annotated[str | None, AfterValidator(subject_line)] = Field(
        default=None, min_length=1, max_length=998, description="Required for e-mail."
    )
    parse_mode: ParseMode | None = Field(default=None, description="Telegram only.")


class RecipientUpdate(Contacts):
    """Fields to change; an explicit null clears one."""

    model_config = ConfigDict(extra="forbid")

    locale: Locale | None = None
    channels: ChannelOrder


class RecipientCreate(RecipientUpdate):
    """A recipient, stored (or replaced) under the caller's id for them."""

    external_id: ExternalId


class _StoredRecipient(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    external_id: str
    locale: str | None
    channels: list[Channel] | None
    created_at: datetime
    updated_at: datetime


# A stored recipient as answered: its addresses, one field per channel (ADDRESS_FIELDS), as
# stored, not validated again (a rule made stricter since must not hide old recipients).
RecipientPublic = create_model(
    "RecipientPublic",
    __base__=_StoredRecipient,
    **{field: (str | None, ...) for field in ADDRESS_FIELDS.values()},  # type: ignore[call-overload]
)


class DeliveryAttemptPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    number: int
    started_at: datetime
    finished_at: datetime | None = Field(description="Null while the attempt is pending.")
    channel: Channel
    outcome: AttemptOutcome
    code: int | None = Field(
        description="The provider's code: SMTP reply, SMS.ru status_code, Bot API error_code."
    )
    error: str | None
    provider_message_id: str | None
    segments: int | None = Field(description="SMS parts billed.")
    cost: Decimal | None = Field(description="What the provider charged, when it said.")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def smtp_code(self) -> int | None:
        """The SMTP reply code of an e-mail attempt (its `code`)."""
        return self.code if self.channel == Channel.EMAIL else None


class SkippedChannel(BaseModel):
    channel: Channel
    reason: str


class AttachmentPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    filename: str = Field(description="As it is sent (sanitised).")
    content_type: str
    size: int = Field(description="Bytes, before encoding.")
    sha256: str


class AttachmentCreated(AttachmentPublic):
    created_at: datetime


class NotificationPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    channel: Channel = Field(
        description="The channel being tried, or the one that delivered (or failed last)."
    )
    recipient: str = Field(description="The address on that channel.")
    channels: list[Channel] = Field(description="The order it was given.")
    skipped: list[SkippedChannel] | None = Field(
        description="Channels of the order left out at request time, and why."
    )
    subject: str | None
    text: str | None = Field(description="Null for a sensitive notification.")
    sensitive: bool
    category: Category
    text_length: int | None = Field(description="Length of a sensitive text, once erased.")
    template_key: str | None = Field(description="The template it was sent by, if any.")
    template_version: int | None
    locale: str | None
    content: dict[Channel, dict[str, str]] | None = Field(
        description="What the template rendered for each channel of the order, as sent; "
        "null for a sensitive notification."
    )
    attachments: list[AttachmentPublic] | None = Field(
        description="What the e-mail carries; other channels leave it out."
    )
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
            self.content = None
        return self


class ChannelOutcome(BaseModel):
    channel: Channel
    status: str = Field(
        description="sent, failed, suppressed, trying, cancelled, skipped or not tried"
    )
    attempts: int
    error: str | None = None
    left_out: str | None = Field(
        default=None, description="What this channel cannot carry (attachments), left out."
    )


class NotificationDetail(NotificationPublic):
    delivery_attempts: list[DeliveryAttemptPublic]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def channel_outcomes(self) -> list[ChannelOutcome]:
        """Each channel of the order, and how it went."""
        return [
            ChannelOutcome.model_validate(view)
            for view in channel_views(
                order=self.channels,
                current=self.channel,
                status=self.status,
                skipped=[(s.channel, s.reason) for s in self.skipped or ()],
                attempts=[(a.channel, a.error) for a in self.delivery_attempts],
                attachments=[a.filename for a in self.attachments or ()],
            )
        ]


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
    suppressed: list[RejectedRecipient] = Field(
        default_factory=list,
        description="Items not queued because every channel of theirs is suppressed (an "
        "unsubscribe, a bounce, a block): not errors, counted apart from `rejected`.",
    )


def _scopes_known(scopes: list[str]) -> list[str]:
    known = [str(scope) for scope in Scope]
    unknown = set(scopes) - set(known)
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)}; use {', '.join(known)}")
    return sorted(set(scopes), key=known.index)


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


def _printable(value: str) -> str:
    if HEADER_UNSAFE.search(value):
        raise ValueError("must not contain control characters")
    return value


# An address a query filters by: as given (each channel's normal form is tried), printable.
QueriedAddress = Annotated[str, Field(max_length=320), AfterValidator(_printable)]


class HistoryQuery(BaseModel):
    """Filters and paging of GET /notifications."""

    model_config = ConfigDict(extra="forbid")

    recipient: QueriedAddress | None = None
    status: NotificationStatus | None = None
    channel: Channel | None = Field(
        default=None, description="The channel tried last (or that delivered)."
    )
    batch_id: int | None = Field(default=None, ge=1, le=MAX_ID)
    created_from: HistoryTime = Field(default=None, description="Inclusive; UTC if no offset.")
    created_to: HistoryTime = Field(default=None, description="Exclusive; UTC if no offset.")
    limit: int = Field(default=50, ge=1, le=HISTORY_PAGE_MAX)
    cursor: str | None = None

    @property
    def recipient_forms(self) -> list[str]:
        """The stored forms `recipient` may stand for on the channels asked about: an
        address in email-validator's normal form (lower-case domain), a number in E.164,
        a chat id as given. Digits alone may be a local number and a chat id alike."""
        if self.recipient is None:
            return []
        normal_forms = {Channel.EMAIL: email_address, Channel.SMS: phone_number}
        forms: list[str] = []
        for channel, normal_form in normal_forms.items():
            if self.channel in (None, channel):
                with suppress(ValueError):
                    forms.append(normal_form(self.recipient))
        as_chat = self.channel in (None, Channel.TELEGRAM) and CHAT_ID.match(self.recipient)
        if as_chat or not forms:
            forms.append(self.recipient)
        return list(dict.fromkeys(forms))

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


SuppressionScope = Annotated[
    str,
    Field(
        max_length=80,
        pattern=r"^(all|marketing|category:[a-z][a-z0-9_]{0,63})$",
        description="all, marketing, or category:<template key>.",
    ),
]


class SuppressionCreate(BaseModel):
    """An address an operator stops sending to."""

    model_config = ConfigDict(extra="forbid")

    channel: Channel
    address: str = Field(min_length=1, max_length=320)
    scope: SuppressionScope = "all"
    reason: SuppressionReason = SuppressionReason.MANUAL
    detail: str | None = Field(default=None, max_length=1000)
    expires_at: SendAt = Field(default=None, description="Lifted at this time; default: never.")

    @model_validator(mode="after")
    def normal_address(self) -> "SuppressionCreate":
        normal_form = {
            Channel.EMAIL: email_address,
            Channel.SMS: phone_number,
            Channel.TELEGRAM: telegram_chat_id,
        }[self.channel]
        self.address = normal_form(self.address)
        if self.detail is not None and HEADER_UNSAFE.search(self.detail):
            raise ValueError("detail must not contain control characters")
        return self


class SuppressionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    channel: Channel
    address: str = Field(description="Folded: lower case, no +tag, ASCII domain.")
    scope: str
    reason: SuppressionReason
    detail: str | None
    notification_id: int | None
    created_at: datetime
    expires_at: datetime | None


class SuppressionsPublic(BaseModel):
    data: list[SuppressionPublic]
    next_before: int | None = Field(description="Pass as `before` for the next page.")


class SuppressionQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    channel: Channel | None = None
    address: QueriedAddress | None = None
    reason: SuppressionReason | None = None
    limit: int = Field(default=50, ge=1, le=HISTORY_PAGE_MAX)
    before: int | None = Field(default=None, ge=1, le=MAX_ID)


class InboundReportPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    received_at: datetime
    mail_from: str
    rcpt_to: str
    kind: str
    status: ReportStatus
    notification_id: int | None
    code: str | None
    detail: str | None
    size: int | None = Field(description="Bytes kept of an unread report.")


class InboundReportsPublic(BaseModel):
    data: list[InboundReportPublic]
    counts: dict[str, int] = Field(description="Reports kept, per status.")


VariableName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]
TemplateSource = Annotated[str | None, Field(default=None, max_length=MAX_SOURCE)]


class VariableSpec(BaseModel):
    """A variable a template's version takes."""

    model_config = ConfigDict(extra="forbid")

    name: VariableName
    type: Literal[tuple(VARIABLE_TYPES)] = "string"  # type: ignore[valid-type]
    required: bool = True
    example: Any = Field(default=None, description="Required for a required variable.")


class LocaleContent(BaseModel):
    """A version's sources in one locale, each a Jinja2 template (sandboxed); at least one.
    E-mail needs `subject` and `text` or `html` (then the text is made from the HTML)."""

    model_config = ConfigDict(extra="forbid")

    subject: TemplateSource
    text: TemplateSource
    html: TemplateSource
    sms: TemplateSource
    telegram: TemplateSource


class TemplateVersionCreate(BaseModel):
    """A new version: its variables and its sources per locale (ru, en)."""

    model_config = ConfigDict(extra="forbid")

    variables: list[VariableSpec] = Field(default_factory=list, max_length=100)
    content: dict[Literal[LOCALES], LocaleContent] = Field(  # type: ignore[valid-type]
        min_length=1, examples=[{"ru": {"sms": "Ваш код: {{ code }}"}}]
    )
    telegram_parse_mode: Literal["HTML"] | None = Field(
        default=None, description="HTML: the Telegram text is HTML, its data escaped."
    )
    activate: bool = Field(default=False, description="Make it the active version now.")

    @field_validator("variables")
    @classmethod
    def names_once(cls, variables: list[VariableSpec]) -> list[VariableSpec]:
        names = [v.name for v in variables]
        if len(set(names)) != len(names):
            raise ValueError("must name each variable once")
        return variables

    @model_validator(mode="after")
    def utf8_only(self) -> "TemplateVersionCreate":
        if not encodable(self.model_dump()):
            raise ValueError("must not contain an unpaired surrogate (\\ud800…)")
        return self


class TemplateCreate(TemplateVersionCreate):
    """A template and its first version (active)."""

    key: TemplateKey
    category: Category = Category.TRANSACTIONAL
    sensitive: bool = Field(
        default=False, description="Every notification sent by it is sensitive (a code)."
    )
    unsubscribe: bool = Field(
        default=False,
        description="Transactional mail that offers one-click unsubscribe all the same "
        "(scope category:<key>); marketing mail always does.",
    )
    default_locale: Literal[LOCALES] = "ru"  # type: ignore[valid-type]
    description: str | None = Field(default=None, max_length=1000)
    activate: bool = True


class TemplateVersionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    number: int
    variables: list[VariableSpec]
    content: dict[str, dict[str, str]]
    telegram_parse_mode: str | None
    source: str = Field(description="api, or catalogue (the service's shipped files).")
    created_at: datetime


class TemplatePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    key: str
    category: Category
    sensitive: bool
    unsubscribe: bool
    default_locale: str
    description: str | None
    active_version: int | None
    created_at: datetime
    updated_at: datetime


class TemplateCreated(TemplatePublic):
    version: TemplateVersionPublic
    warnings: list[str]


class VersionCreated(TemplateVersionPublic):
    warnings: list[str]


class TemplatePreviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(default=None, ge=1, le=2**31 - 1, description="Default: active.")
    locale: Locale | None = None
    data: TemplateData = Field(default_factory=dict)


class SmsPreview(BaseModel):
    text: str
    encoding: str = Field(description="gsm7 or ucs2")
    segments: int
    characters: int


class TemplatePreview(BaseModel):
    version: int
    locale: str
    email: dict[str, str] | None = Field(description="subject, text and html")
    sms: SmsPreview | None
    telegram: dict[str, str] | None = Field(description="text and parse_mode")
    warnings: list[str]
