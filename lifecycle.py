"""A notification's life as plain data and pure rules: no session, no I/O, no clock.

- `Draft`: what a request asks to store (its route, its content).
- `plan_route`: the channels a draft is tried on, for every send (one channel named by
  the endpoint, or an order of several), with the addresses to skip.
- `Attempt`: one try on a channel, as its row in `delivery_attempts` records it.
- `Transition`: a change of a notification's state, guarded by the state it leaves
  (`Guard`); `crud.apply_transitions` is the one writer of them.
- `next_state`: after an attempt, the state it leaves the notification in (sent, queued
  for a retry, on to the next channel, failed): the fallback and retry rule, the same for
  a synchronous send and for a worker.
- `channel_views`: each channel of the order as history shows it.
- The channels' content limits, defined once (the Telegram text limit is the channel's).
"""

import hashlib
import hmac
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

from channels.base import (
    DeliveryError,
    File,
    Message,
    Receipt,
    RecipientUnreachable,
    TransientDeliveryError,
)
from channels.telegram import MAX_TEXT as TELEGRAM_MAX_TEXT
from models import (
    AttemptOutcome,
    Category,
    Channel,
    Notification,
    NotificationStatus,
    SuppressionReason,
)


def text_hmac(key: bytes, text: str) -> str:
    """Keyed evidence of a text: without the key, trying every six-digit code finds nothing."""
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def erased(text: str, key: bytes) -> dict[str, Any]:
    """The column values that erase a sensitive text (and every part a template rendered,
    HTML included), keeping the text's length and HMAC."""
    return {
        "text": "",
        "content": None,
        "text_length": len(text),
        "text_hmac": text_hmac(key, text),
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
    # Sent by template: its key, version and locale, and each route channel's rendering.
    template_key: str | None = None
    template_version: int | None = None
    locale: str | None = None
    content: Mapping[str, Mapping[str, str]] | None = None
    # The e-mail's attachments, as `Notification.attachments` describes them.
    attachments: Sequence[Mapping[str, Any]] = ()
    category: Category = Category.TRANSACTIONAL
    # The suppression scope its one-click unsubscribe link offers, if it has one.
    unsubscribe: str | None = None
    # Why it is not sent at all (every channel suppressed): stored as `suppressed`.
    suppressed: str | None = None

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
            "template_key": self.template_key,
            "template_version": self.template_version,
            "locale": self.locale,
            "content": dict(self.content) if self.content is not None else None,
            "attachments": [dict(a) for a in self.attachments] or None,
            "category": self.category,
            "unsubscribe": self.unsubscribe,
        }


class Refused(ValueError):
    """A request the service cannot take as asked (a 422): `field` names what is wrong."""

    def __init__(self, message: str, *, field: str = "channels") -> None:
        super().__init__(message)
        self.field = field


class Unroutable(Refused):
    """A notification no channel can carry as asked."""


class EverySuppressed(Exception):
    """Every channel that could carry a notification is suppressed for its address: it
    is stored `suppressed` on the first of them (`step`), nothing sent."""

    def __init__(self, step: tuple[Channel, str], skipped: list[dict[str, str]], reason: str):
        super().__init__(reason)
        self.step = step
        self.skipped = skipped
        self.reason = reason


def plan_route(
    *,
    order: Sequence[Channel],
    addresses: Mapping[Channel, str | None],
    configured: Collection[Channel],
    suppressed: Mapping[Channel, str] | None = None,
    subject: str | None = None,
    text: str = "",
    requested: bool = True,
    rendered: Mapping[Channel, tuple[str | None, str]] | None = None,
) -> tuple[list[tuple[Channel, str]], list[dict[str, str]]]:
    """The channels to try, in `order`, each with its address; and those left out, with
    why (no address for the recipient, or its address `suppressed` on the channel).
    A templated message gives each channel's (subject, text) as `rendered`: a channel
    the template has no part for is left out.

    Raises `Unroutable` when a `requested` order (the caller's own) names a channel that is
    not configured, or Telegram for a text over 4,096 characters; an order that is not the
    caller's (the recipient's, CHANNEL_ORDER) skips such channels. Raises it as well when
    no channel is left (e-mail without a subject is left out), and `EverySuppressed`
    when none is left but for suppressions.
    """
    route: list[tuple[Channel, str]] = []
    skipped: list[dict[str, str]] = []
    blocked: list[tuple[Channel, str]] = []
    for channel in order:
        if channel not in configured:
            if requested:
                raise Unroutable(f"the {channel} channel is not configured")
            skipped.append({"channel": str(channel), "reason": "not configured"})
            continue
        address = addresses.get(channel)
        if address is None:
            skipped.append({"channel": str(channel), "reason": "no address"})
            continue
        if rendered is not None:
            if channel not in rendered:
                skipped.append({"channel": str(channel), "reason": "not in the template"})
                continue
            subject, text = rendered[channel]
        if channel == Channel.EMAIL and subject is None:
            skipped.append({"channel": str(channel), "reason": "no subject"})
            continue
        if channel == Channel.TELEGRAM and len(text) > TELEGRAM_MAX_TEXT:
            if requested:
                raise Unroutable(
                    f"Telegram takes at most {TELEGRAM_MAX_TEXT} characters", field="text"
                )
            skipped.append({"channel": str(channel), "reason": "text too long"})
            continue
        if suppressed and channel in suppressed:
            blocked.append((channel, address))
            skipped.append({"channel": str(channel), "reason": suppressed[channel]})
            continue
        route.append((channel, address))
    if not route and blocked:
        channel, address = blocked[0]
        rest = [s for s in skipped if s["channel"] != str(channel)]
        raise EverySuppressed((channel, address), rest, suppressed[channel])  # type: ignore[index]
    if not route:
        reasons = ", ".join(f"{s['channel']}: {s['reason']}" for s in skipped)
        raise Unroutable(f"no channel of the order can reach this recipient ({reasons})")
    return route, skipped


def channel_views(
    *,
    order: Sequence[Channel],
    current: Channel,
    status: NotificationStatus,
    skipped: Sequence[tuple[Channel, str]],
    attempts: Sequence[tuple[Channel, str | None]],
    attachments: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Each channel of a notification's order as history shows it: skipped at request
    time, failed (before the current one), sent, failed, cancelled or trying (the current
    one), or not tried (after it); with its attempts (channel, error) counted, its last
    error, and the `attachments` (their names) it leaves out if it is not e-mail."""
    views: list[dict[str, Any]] = [
        {"channel": channel, "status": "skipped", "attempts": 0, "error": reason}
        for channel, reason in skipped
    ]
    position = order.index(current)
    for index, channel in enumerate(order):
        errors = [error for on, error in attempts if on == channel and error]
        if index < position:
            state = "failed"
        elif index > position:
            state = "not tried"
        elif status in (
            NotificationStatus.SENT,
            NotificationStatus.FAILED,
            NotificationStatus.SUPPRESSED,
        ):
            state = str(status)
        elif status == NotificationStatus.CANCELLED:
            state = "cancelled"
        else:
            state = "trying"
        views.append(
            {
                "channel": channel,
                "status": state,
                "attempts": sum(1 for on, _ in attempts if on == channel),
                "error": errors[-1] if errors else None,
                "left_out": left_out(channel, attachments),
            }
        )
    return views


def left_out(channel: Channel, attachments: Sequence[str]) -> str | None:
    """What `channel` leaves out of a message with `attachments` (their names)."""
    if channel == Channel.EMAIL or not attachments:
        return None
    return f"{len(attachments)} attachment(s), e-mail only: {', '.join(attachments)}"


def carries_files(notification: Notification) -> bool:
    """Whether the notification's current channel sends files with it (e-mail, when it
    has attachments): only then are they read."""
    return bool(notification.attachments) and notification.channel == Channel.EMAIL


def message_for(notification: Notification, files: Sequence[File] = ()) -> Message:
    """What to send on the notification's channel now: a templated one's snapshot for
    that channel, as rendered when it was accepted (never rendered again); on e-mail,
    with the `files` of its attachments."""
    attachments = tuple(files) if notification.channel == Channel.EMAIL else ()
    part = (notification.content or {}).get(str(notification.channel))
    if part is not None:
        return Message(
            address=notification.recipient,
            text=part["text"],
            subject=part.get("subject"),
            html=part.get("html"),
            message_id=notification.message_id,
            sensitive=notification.sensitive,
            parse_mode=part.get("parse_mode"),
            attachments=attachments,
        )
    return Message(
        address=notification.recipient,
        text=notification.text,
        subject=notification.subject,
        message_id=notification.message_id,
        sensitive=notification.sensitive,
        parse_mode=notification.parse_mode,
        attachments=attachments,
    )


@dataclass(frozen=True)
class Attempt:
    """One try on a channel, as `delivery_attempts` records it.

    It is named by the pending row a worker's claim wrote for it (`attempt_id`), or by its
    `number` on the notification (a synchronous send writes no pending row): written again
    after a commit whose answer was lost, it is found stored and counted once.
    """

    channel: Channel
    started_at: datetime
    finished_at: datetime
    outcome: AttemptOutcome
    code: int | None = None
    error: str | None = None
    provider_message_id: str | None = None
    segments: int | None = None
    cost: Decimal | None = None
    # A transient failure's wait asked for by the provider (Telegram's retry_after).
    retry_after: float | None = None
    # The address refused the channel for good: it is suppressed, for this reason.
    suppress: SuppressionReason | None = None
    attempt_id: int | None = None
    number: int | None = None

    @classmethod
    def of(
        cls,
        result: Receipt | DeliveryError,
        *,
        channel: Channel,
        started_at: datetime,
        finished_at: datetime,
        attempt_id: int | None = None,
        number: int | None = None,
    ) -> "Attempt":
        """The attempt a provider's receipt, or a delivery error, makes."""
        if isinstance(result, Receipt):
            return cls(
                channel=channel,
                started_at=started_at,
                finished_at=finished_at,
                outcome=AttemptOutcome.SENT,
                code=result.code,
                provider_message_id=result.provider_message_id,
                segments=result.segments,
                cost=result.cost,
                attempt_id=attempt_id,
                number=number,
            )
        transient = isinstance(result, TransientDeliveryError)
        return cls(
            channel=channel,
            started_at=started_at,
            finished_at=finished_at,
            outcome=AttemptOutcome.TRANSIENT_ERROR if transient else AttemptOutcome.PERMANENT_ERROR,
            code=result.code,
            # A server's reply may hold a NUL, which PostgreSQL text cannot store.
            error=str(result).replace("\x00", "\ufffd"),
            retry_after=result.retry_after if transient else None,
            suppress=result.reason if isinstance(result, RecipientUnreachable) else None,
            attempt_id=attempt_id,
            number=number,
        )

    @classmethod
    def skipped(
        cls,
        reason: str,
        *,
        channel: Channel,
        at: datetime,
        attempt_id: int | None = None,
        number: int | None = None,
    ) -> "Attempt":
        """No try: the address is suppressed on the channel (found right before the send)."""
        return cls(
            channel=channel,
            started_at=at,
            finished_at=at,
            outcome=AttemptOutcome.SUPPRESSED,
            error=reason,
            attempt_id=attempt_id,
            number=number,
        )

    @property
    def sent(self) -> bool:
        return self.outcome == AttemptOutcome.SENT

    @property
    def transient(self) -> bool:
        return self.outcome == AttemptOutcome.TRANSIENT_ERROR

    @property
    def counted(self) -> bool:
        """Whether the notification's counters include it already (a worker's claim
        counted its pending row; a synchronous attempt is counted when stored)."""
        return self.attempt_id is not None

    def values(self) -> dict[str, Any]:
        """Its columns in `delivery_attempts` (but its identity)."""
        return {
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "channel": self.channel,
            "outcome": self.outcome,
            "code": self.code,
            "error": self.error,
            "provider_message_id": self.provider_message_id,
            "segments": self.segments,
            "cost": self.cost,
        }


class Guard(StrEnum):
    """The state a transition may leave; any other state leaves the row unchanged.

    held    sending, under the lease of `Transition.holder`
    queued  queued (a cancel)
    failed  failed, its text not erased (a resend)
    due     queued with `next_attempt_at` passed, or sending under a lease run out
            before `Transition.at` (a worker's claim)
    unsent  never attempted: queued, or sending under `holder` (a request answered 503
            that may have stored it after all)
    """

    HELD = "held"
    QUEUED = "queued"
    FAILED = "failed"
    DUE = "due"
    UNSENT = "unsent"


@dataclass(frozen=True)
class Step:
    """A position in a notification's order: its channel and address there."""

    position: int
    channel: Channel
    address: str


@dataclass(frozen=True)
class Transition:
    """A change of one notification's state, made only where `guard` holds.

    `status` None keeps the status (an attempt a quick retry follows). With a status,
    `next_attempt_at`, `leased_by` and `lease_expires_at` are set as given (`leased_by`
    only while sending). `attempt` is stored whether or not the guard held: it happened.
    """

    notification_id: int
    at: datetime
    guard: Guard
    status: NotificationStatus | None
    holder: str | None = None
    next_attempt_at: datetime | None = None
    leased_by: str | None = None
    lease_expires_at: datetime | None = None
    # On to another position of the order (a fallback, a resend from the first channel).
    step: Step | None = None
    # The columns that erase a sensitive text.
    erase: Mapping[str, Any] = field(default_factory=dict)
    attempt: Attempt | None = None
    # Added to the attempt counters (a worker's claim +1, a release -1); a stored
    # synchronous attempt counts itself.
    counted: int = 0
    # The notification's `error_message` when no attempt sets it (a withdrawal).
    reason: str | None = None

    @property
    def error_message(self) -> tuple[bool, str | None]:
        """Whether it sets `error_message`, and to what: an attempt's error (None when it
        sent), or the reason given."""
        if self.attempt is not None:
            return True, self.attempt.error
        return self.reason is not None, self.reason


@dataclass(frozen=True)
class Policy:
    """The retry and fallback rule's numbers.

    A transient failure is retried from the queue (after `backoff(attempts on the channel)`
    seconds, never sooner than the provider asked) until `max_attempts` attempts on the
    channel, or `fallback_after` when another channel follows it; then, or at once after a
    permanent failure or a suppression, the next channel of the order is tried, and with
    none left the notification ends failed (suppressed, if the last channel was). A
    sensitive text is erased once the notification is final.
    """

    max_attempts: int
    fallback_after: int
    backoff: Callable[[int], float]
    key: bytes


# The final states an attempt can leave a notification in: a sensitive text is erased.
SETTLED = (NotificationStatus.SENT, NotificationStatus.FAILED, NotificationStatus.SUPPRESSED)


def next_state(
    notification: Notification, attempt: Attempt, policy: Policy, *, holder: str
) -> Transition:
    """The transition `attempt` makes on `notification`, still held by `holder`: sent;
    queued for a retry on its channel; queued, due now, on the next channel of its order
    (after a refusal, or a suppression); failed; or suppressed, when the last channel is."""
    at = attempt.finished_at
    on_channel = notification.channel_attempts + (0 if attempt.counted else 1)
    position = notification.route_position + 1
    following = notification.step(position)
    limit = policy.fallback_after if following is not None else policy.max_attempts
    status = NotificationStatus.SENT if attempt.sent else NotificationStatus.FAILED
    if attempt.outcome == AttemptOutcome.SUPPRESSED:
        status = NotificationStatus.SUPPRESSED
    next_attempt_at: datetime | None = None
    step: Step | None = None
    if attempt.transient and on_channel < limit:
        status = NotificationStatus.QUEUED
        wait = max(policy.backoff(on_channel), attempt.retry_after or 0.0)
        next_attempt_at = at + timedelta(seconds=wait)
    elif not attempt.sent and following is not None:
        status = NotificationStatus.QUEUED
        next_attempt_at = at
        step = Step(position, *following)
    erase: dict[str, Any] = {}
    if notification.sensitive and status in SETTLED:
        erase = erased(notification.text, policy.key)
    return Transition(
        notification_id=notification.id,
        at=at,
        guard=Guard.HELD,
        holder=holder,
        status=status,
        next_attempt_at=next_attempt_at,
        step=step,
        erase=erase,
        attempt=attempt,
    )


def holding_on(transition: Transition, lease: timedelta) -> Transition:
    """A move to the next channel that its sender makes at once, still holding the
    notification (a synchronous send past a refusal), rather than leaving it to the queue."""
    return replace(
        transition,
        status=NotificationStatus.SENDING,
        next_attempt_at=None,
        leased_by=transition.holder,
        lease_expires_at=transition.at + lease,
    )


def recorded_only(transition: Transition) -> Transition:
    """The attempt of `transition` alone, the notification still sending on its channel
    (a quick retry follows)."""
    return replace(transition, status=None, next_attempt_at=None, step=None, erase={})


def claimed(
    notification_id: int,
    *,
    at: datetime,
    worker_id: str,
    lease: timedelta,
    next_attempt_at: datetime | None,
    lost: bool,
) -> Transition:
    """A worker's claim of a due notification under a lease, counting the attempt it is
    about to make (and a taken-over synchronous send's `lost` one); its due time stays,
    for a release to give it back in its place."""
    return Transition(
        notification_id=notification_id,
        at=at,
        guard=Guard.DUE,
        status=NotificationStatus.SENDING,
        next_attempt_at=next_attempt_at,
        leased_by=worker_id,
        lease_expires_at=at + lease,
        counted=2 if lost else 1,
    )


def released(notification: Notification, *, at: datetime, worker_id: str) -> Transition:
    """A claimed, unattempted notification given back to the queue, its claim uncounted."""
    return Transition(
        notification_id=notification.id,
        at=at,
        guard=Guard.HELD,
        holder=worker_id,
        status=NotificationStatus.QUEUED,
        # A taken-over synchronous send has none: due at once.
        next_attempt_at=notification.next_attempt_at or at,
        counted=-1,
    )


def cancelled(notification: Notification, *, at: datetime, key: bytes) -> Transition:
    """A queued notification withdrawn before a worker sends it."""
    return Transition(
        notification_id=notification.id,
        at=at,
        guard=Guard.QUEUED,
        status=NotificationStatus.CANCELLED,
        erase=erased(notification.text, key) if notification.sensitive else {},
    )


def resent(
    notification: Notification, *, at: datetime, holder: str | None, lease: timedelta
) -> Transition:
    """A failed notification back to its first channel with the retries of a new one:
    sending under `holder`'s lease, or (no holder) queued, due now."""
    first = notification.step(0) or (notification.channel, notification.recipient)
    sending = holder is not None
    return Transition(
        notification_id=notification.id,
        at=at,
        guard=Guard.FAILED,
        status=NotificationStatus.SENDING if sending else NotificationStatus.QUEUED,
        next_attempt_at=None if sending else at,
        leased_by=holder,
        lease_expires_at=at + lease if sending else None,
        step=Step(0, *first),
    )


def withdrawn(
    notification_id: int, *, at: datetime, holder: str | None, erase: Mapping[str, Any], reason: str
) -> Transition:
    """An unattempted notification failed, unsent, for `reason`."""
    return Transition(
        notification_id=notification_id,
        at=at,
        guard=Guard.UNSENT,
        holder=holder,
        status=NotificationStatus.FAILED,
        erase=erase,
        reason=reason,
    )
